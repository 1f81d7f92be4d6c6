"""The asyncio pipeline that joins consumer, mapper, delivery and offset commits."""
