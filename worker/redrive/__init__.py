"""`dlq redrive`: dead letters sent again through the worker's own delivery path."""
