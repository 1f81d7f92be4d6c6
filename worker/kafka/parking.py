"""Parked records: events waiting in `kafka.retry_topic` for their destination (SPEC §4).

Value and key: the original event, byte for byte (the event's own JSON when it came from a
multi-event message, like a dead letter). Headers, all UTF-8 text (docs/parking.md):

  retry.destination         the one destination the event is parked for
  retry.subscription        the subscription that mapped it (delivery maps only that one)
  retry.reason              why it was parked: retryable | throttled | auth_error | circuit_open
  retry.failure             the kind of the last failed request: retryable | throttled |
                            auth_error (decides the dead-letter reason at the deadline)
  retry.error               the last error, short text (no PII, no token)
  retry.tiktok.code         TikTok's code of the last error, when there was one
  retry.attempts            requests made for it so far, over all its parkings
  retry.parks               how many times it has been parked (1 the first time)
  retry.first_failed_at     ISO-8601 UTC of its first failed request: the deadline counts
                            `tiktok.retry.deadline_s` from here
  retry.parked_at           ISO-8601 UTC of this parking
  retry.due_at              ISO-8601 UTC before which it is not tried again
  retry.original.topic / .partition / .offset / .timestamp
                            the source record (the same provenance as `dlq.original.*`)
  retry.batch_index         its index when the source message held several events
  retry.value_omitted       only on a reference-only record: the size of the value left out

Records are spread over the topic's partitions by destination (a stable hash of the name), so
one destination's backlog shares a partition with as few others as possible. The producer is
`worker.kafka.acked.AckedProducer`: the broker's acknowledgement finishes the source offset.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from worker.kafka.acked import AckedProducer, short_key
from worker.observability.metrics import PARK_REASONS, Metrics

__all__ = [
    "PARK_REASONS",
    "PROBE_HEADER",
    "RETRY_PREFIX",
    "Parked",
    "RetryProducer",
    "iso",
    "parse_iso",
    "partition_for",
    "retry_group_id",
]

RETRY_PREFIX: Final = "retry."
# Written by the start-up check that the retry topic is writable; consumers skip it.
PROBE_HEADER: Final = "retry.probe"


def retry_group_id(group_id: str) -> str:
    """The consumer group of the retry intake (`worker.pipeline.retries`)."""
    return group_id + ".retry"


def iso(ts: float) -> str:
    """Unix seconds as ISO-8601 UTC with milliseconds and a Z."""
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def partition_for(destination: str, partitions: int) -> int:
    """The retry-topic partition of a destination: stable across processes and restarts."""
    return zlib.crc32(destination.encode()) % max(1, partitions)


@dataclass(frozen=True, slots=True)
class Parked:
    """The headers of one parked record, typed."""

    destination: str
    subscription: str | None
    reason: str
    failure: str
    error: str
    code: int | None
    attempts: int
    parks: int
    first_failed_at: float
    parked_at: float
    due_at: float
    original_topic: str
    original_partition: int
    original_offset: int
    original_timestamp_ms: int | None
    batch_index: int | None = None
    value_omitted: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        items: list[tuple[str, str]] = [
            ("destination", self.destination),
            ("subscription", self.subscription or ""),
            ("reason", self.reason),
            ("failure", self.failure),
            ("error", self.error[:500]),
        ]
        if self.code is not None:
            items.append(("tiktok.code", str(self.code)))
        items += [
            ("attempts", str(self.attempts)),
            ("parks", str(self.parks)),
            ("first_failed_at", iso(self.first_failed_at)),
            ("parked_at", iso(self.parked_at)),
            ("due_at", iso(self.due_at)),
            ("original.topic", self.original_topic),
            ("original.partition", str(self.original_partition)),
            ("original.offset", str(self.original_offset)),
            ("original.timestamp", _opt(self.original_timestamp_ms)),
        ]
        if self.batch_index is not None:
            items.append(("batch_index", str(self.batch_index)))
        if self.value_omitted is not None:
            items.append(("value_omitted", str(self.value_omitted)))
        return [(RETRY_PREFIX + k, v.encode()) for k, v in items]

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Parked:
        """Parse the `retry.*` headers; ValueError names the first missing or bad one."""

        def get(name: str) -> str:
            value = headers.get(RETRY_PREFIX + name)
            if value is None or value == "":
                raise ValueError(f"header {RETRY_PREFIX}{name} missing")
            return value

        def opt(name: str) -> str | None:
            value = headers.get(RETRY_PREFIX + name)
            return value if value else None

        def num(name: str, value: str | None) -> int | None:
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"header {RETRY_PREFIX}{name} is not an integer") from None

        def when(name: str) -> float:
            try:
                return parse_iso(get(name))
            except ValueError as exc:
                if "missing" in str(exc):
                    raise
                raise ValueError(f"header {RETRY_PREFIX}{name} is not an ISO-8601 time") from None

        return cls(
            destination=get("destination"),
            subscription=opt("subscription"),
            reason=get("reason"),
            failure=opt("failure") or "retryable",
            error=headers.get(RETRY_PREFIX + "error", ""),
            code=num("tiktok.code", opt("tiktok.code")),
            attempts=num("attempts", get("attempts")) or 0,
            parks=num("parks", opt("parks")) or 1,
            first_failed_at=when("first_failed_at"),
            parked_at=when("parked_at"),
            due_at=when("due_at"),
            original_topic=get("original.topic"),
            original_partition=num("original.partition", get("original.partition")) or 0,
            original_offset=num("original.offset", get("original.offset")) or 0,
            original_timestamp_ms=num("original.timestamp", opt("original.timestamp")),
            batch_index=num("batch_index", opt("batch_index")),
            value_omitted=num("value_omitted", opt("value_omitted")),
        )


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


class RetryProducer(AckedProducer):
    """Parks events in the retry topic; the broker's acknowledgement calls `on_written`.

    A record too large for the retry topic is parked reference-only (`retry.value_omitted`),
    never refused: the worker then cannot deliver it when due and dead-letters it, reference
    only, so the operator finds the source record from the provenance headers.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None],
        producer: Any | None = None,
        partitions: int = 1,
    ) -> None:
        super().__init__(
            config=config, topic=topic, what="retry topic", on_fatal=on_fatal, producer=producer
        )
        self.partitions = partitions
        self._metrics = metrics

    def learn_partitions(self, timeout_s: float = 15.0) -> int:
        """Read the retry topic's partition count (blocking; call before the first `park`)."""
        metadata = self._producer.list_topics(self.topic, timeout=timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is not None and topic.error is None and topic.partitions:
            self.partitions = len(topic.partitions)
        return self.partitions

    def park(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        parked: Parked,
        on_written: Callable[[], None],
    ) -> None:
        partition = partition_for(parked.destination, self.partitions)

        def written(record: Parked) -> Callable[[], None]:
            def done() -> None:
                self._metrics.events_parked.labels(
                    destination=record.destination, reason=record.reason
                ).inc()
                on_written()

            return done

        def reference_only() -> None:
            size = len(value or b"")
            slim = replace(parked, value_omitted=size)
            self._produce(
                value=None,
                key=short_key(key),
                headers=slim.headers(),
                on_written=written(slim),
                partition=partition,
            )

        self._produce(
            value=value,
            key=key,
            headers=parked.headers(),
            on_written=written(parked),
            on_too_large=reference_only,
            partition=partition,
        )

    def probe(self, on_written: Callable[[], None]) -> None:
        """A record with no value and a `retry.probe` header: proves the topic is writable."""
        self._produce(value=None, key=None, headers=[(PROBE_HEADER, b"1")], on_written=on_written)
