"""Units of in-flight work: a consumed Kafka message and the TikTok events mapped from it.

A message is finished when every event it produced is finished: delivered, skipped, or parked
in the retry topic or dead-lettered and acknowledged by the broker. Its owner (the pipeline,
the retry intake, or a redrive) is told, and marks the offset in its ledger (see
`worker.kafka.offsets`).

Each message names its owner, so the sender reports an event's fate to whoever made it: the
sender is built before its users and never needs callbacks wired in afterwards.

A message is *dropped* when its partition is no longer ours (revoke, loss): from then on its
events are sent no more, dead-lettered never, and finishing them changes nothing; the next
owner of the partition reads the message again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from worker.core.vocabulary import DeadLetterReason
    from worker.mapping.mapper import EventOutcome, MappedEvent


@dataclass(frozen=True, slots=True)
class Failure:
    """Why events are being dead-lettered after delivery attempts."""

    reason: DeadLetterReason
    error: str
    code: int | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Parking:
    """Why events are being parked in the retry topic instead of retried in memory.

    `reason`: retryable | throttled | auth_error | circuit_open. `failure`: the kind of the
    destination's last failed request (retryable | throttled | auth_error), also when these
    events were parked unsent because the circuit was open; `error` and `code` are that
    request's. `first_failed_at` is the wall
    time of the first failed request of this delivery (None when no request was made: the
    circuit was open). `retry_in_s` is the earliest sensible next attempt (the circuit's pause
    or the backoff); the owner turns it into the parked record's due time.
    """

    reason: str
    failure: str
    error: str
    code: int | None
    attempts: int
    first_failed_at: float | None
    retry_in_s: float


class WorkOwner(Protocol):
    """Who made the work: told about each event's fate and each finished message."""

    def on_delivered(self, events: Sequence[PendingEvent]) -> None: ...

    def on_failed(self, events: Sequence[PendingEvent], failure: Failure) -> None: ...

    def on_parked(self, events: Sequence[PendingEvent], parking: Parking) -> None: ...

    def message_finished(self, message: InflightMessage) -> None: ...


class InflightMessage(msgspec.Struct, eq=False):
    """One consumed Kafka message and the count of its unfinished events.

    A Struct (built in C, ~4x faster than a slotted class with a keyword `__init__`: one per
    consumed message with work). `eq=False`: compared and hashed by identity (the retry intake
    keys a dict by message). `parked`: for a record read back from the retry topic, its
    `worker.kafka.parking.Parked`."""

    owner: WorkOwner
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    remaining: int = 0
    dropped: bool = False
    parked: Any = None

    def add_work(self, count: int = 1) -> None:
        self.remaining += count

    def finish_one(self) -> None:
        """One unit of this message's work is finished; at zero the offset is finished."""
        if self.dropped:
            return
        self.remaining -= 1
        if self.remaining == 0:
            self.owner.message_finished(self)
        elif self.remaining < 0:  # pragma: no cover - a bug, never silently tolerated
            raise AssertionError(f"offset {self.offset} finished more often than begun")


class PendingEvent(msgspec.Struct, eq=False):
    """One mapped TikTok event on its way to TikTok, with what is needed to dead-letter it.

    A Struct for the same reason as `InflightMessage`: one per mapped event."""

    message: InflightMessage
    outcome: EventOutcome
    mapped: MappedEvent

    @property
    def payload(self) -> bytes:
        return self.mapped.payload

    @property
    def dropped(self) -> bool:
        return self.message.dropped
