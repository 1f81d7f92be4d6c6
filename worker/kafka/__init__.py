"""Everything that talks to Kafka: the consumer thread, offset ledger, dead-letter producer and
reader, lag reading, and the start-up preflight."""
