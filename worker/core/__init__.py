"""What every layer shares and that imports nothing else from `worker`: the fixed vocabularies
(reasons, outcomes), redaction of secrets, and the reading of msgspec's error text."""
