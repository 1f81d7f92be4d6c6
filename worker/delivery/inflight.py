"""Units of in-flight work: a consumed Kafka message and the TikTok events mapped from it.

A message is finished when every event it produced is finished: delivered, dead-lettered and
acknowledged by the broker, or skipped. Only then is its offset marked in its partition's
tracker (see `worker.pipeline.pipeline` for the commit invariants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.kafka.offsets import PartitionTracker
    from worker.mapping.mapper import EventOutcome, MappedEvent


class InflightMessage:
    """One consumed Kafka message and the count of its unfinished events."""

    __slots__ = (
        "_on_finished",
        "key",
        "offset",
        "partition",
        "remaining",
        "timestamp_ms",
        "topic",
        "tracker",
    )

    def __init__(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        tracker: PartitionTracker,
        on_finished: Callable[[InflightMessage], None],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.tracker = tracker
        self.remaining = 0
        self._on_finished = on_finished

    def add_work(self, count: int = 1) -> None:
        self.remaining += count

    def finish_one(self) -> None:
        """One unit of this message's work is finished; at zero the offset is finished."""
        self.remaining -= 1
        if self.remaining == 0:
            self._on_finished(self)
        elif self.remaining < 0:  # pragma: no cover - a bug, never silently tolerated
            raise AssertionError(f"offset {self.offset} finished more often than begun")


class PendingEvent:
    """One mapped TikTok event on its way to TikTok, with what is needed to dead-letter it."""

    __slots__ = ("mapped", "message", "outcome")

    def __init__(self, message: InflightMessage, outcome: EventOutcome, mapped: MappedEvent):
        self.message = message
        self.outcome = outcome
        self.mapped = mapped

    @property
    def payload(self) -> bytes:
        return self.mapped.payload
