"""Metrics, structured logs and the operations HTTP server."""
