"""TikTok Conversions worker: Segment events from Kafka to TikTok's Events API."""

__version__ = "0.1.0"
