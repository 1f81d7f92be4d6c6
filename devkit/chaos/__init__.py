"""Chaos suite: many faults at once on real Kafka, Redis and the fake TikTok server."""
