"""Integration tests: real Kafka, Redis and Prometheus started by devkit/infra (see conftest)."""
