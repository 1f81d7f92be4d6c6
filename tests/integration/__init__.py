"""Integration tests: real Kafka, Redis and Prometheus started by tests/infra (see conftest)."""
