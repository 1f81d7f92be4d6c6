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

Records are spread over the topic's partitions by destination (`RetryLayout`: with at least as
many partitions as destinations, each destination has a partition of its own), so a
destination that is down can have its partition left unread instead of read and parked again.
The producer is `worker.kafka.acked.AckedProducer`: the broker's acknowledgement finishes the
source offset.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from worker.kafka.acked import AckedProducer, short_key
from worker.observability.metrics import PARK_REASONS, Metrics

__all__ = [
    "PARK_REASONS",
    "PROBE_HEADER",
    "RETRY_PREFIX",
    "Parked",
    "RetryLayout",
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
    """Unix seconds as ISO-8601 UTC with milliseconds and a Z (as `datetime.isoformat`)."""
    # Every parked record carries three times and a batch parks thousands within one second:
    # the date-time part is formatted once per second, not per record.
    global _iso_second
    fraction_s, whole = math.modf(ts)  # split first, as datetime does, so rounding agrees
    fraction = round(fraction_s * 1_000_000)
    second = int(whole)
    if fraction < 0:
        second, fraction = second - 1, fraction + 1_000_000
    if fraction >= 1_000_000:
        second, fraction = second + 1, fraction - 1_000_000
    if second != _iso_second[0]:
        _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_iso_second[1]}.{fraction // 1000:03d}Z"


_iso_second: tuple[int, str] = (-1, "")
_parsed_seconds: dict[str, float] = {}
_PARSE_CACHE_MAX: Final = 4096


def parse_iso(text: str) -> float:
    """ISO-8601 to Unix seconds; a time with no zone is UTC. ValueError when unreadable."""
    if len(text) == 24 and text[19] == "." and text[23] == "Z":  # what `iso` writes
        head = text[:19]
        second = _parsed_seconds.get(head)
        if second is None:
            second = _parse_full(head + "+00:00")
            if len(_parsed_seconds) >= _PARSE_CACHE_MAX:
                _parsed_seconds.clear()
            _parsed_seconds[head] = second
        millis = text[20:23]
        if millis.isdigit():
            return second + int(millis) / 1000
    return _parse_full(text)


def _parse_full(text: str) -> float:
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def partition_for(destination: str, partitions: int) -> int:
    """The hashed retry-topic partition of a destination the layout does not know."""
    return zlib.crc32(destination.encode()) % max(1, partitions)


class RetryLayout:
    """Which retry-topic partition holds which destination's parked events.

    The configured destinations, sorted by name, take partitions 0, 1, 2, ... in turn, so
    with at least as many partitions as destinations each has a partition of its own (every
    worker of the group has the same configuration, hence the same layout). A partition that
    holds one destination only can simply be left unread while that destination is down
    (`RetryIntake`); a shared one cannot. A destination not in the configuration (a record
    parked before a configuration change) falls back to a hash of its name.
    """

    __slots__ = ("_by_destination", "_owner", "partitions")

    def __init__(self, destinations: Sequence[str], partitions: int) -> None:
        self.partitions = max(1, partitions)
        names = sorted(set(destinations))
        self._by_destination = {name: i % self.partitions for i, name in enumerate(names)}
        holders: dict[int, list[str]] = {}
        for name, partition in self._by_destination.items():
            holders.setdefault(partition, []).append(name)
        self._owner = {p: only for p, (only, *others) in holders.items() if not others}

    def partition(self, destination: str) -> int:
        found = self._by_destination.get(destination)
        return found if found is not None else partition_for(destination, self.partitions)

    def sole_destination(self, partition: int) -> str | None:
        """The one destination parked in `partition`, or None when it is shared (or unused)."""
        return self._owner.get(partition)


class Parked(msgspec.Struct, frozen=True):
    """The headers of one parked record, typed (a Struct: built once per parked event)."""

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
        # A batch parks its events with the same destination, reason, error and times: that
        # part is encoded once per batch (a one-entry cache), only the provenance per event.
        global _shared_headers
        key = (
            self.destination,
            self.reason,
            self.failure,
            self.error,
            self.code,
            self.attempts,
            self.parks,
            self.first_failed_at,
            self.parked_at,
            self.due_at,
        )
        if _shared_headers[0] != key:
            shared = [
                (H_DESTINATION, self.destination.encode()),
                (H_REASON, self.reason.encode()),
                (H_FAILURE, self.failure.encode()),
                (H_ERROR, self.error[:500].encode()),
            ]
            if self.code is not None:
                shared.append((H_CODE, str(self.code).encode()))
            shared += (
                (H_ATTEMPTS, str(self.attempts).encode()),
                (H_PARKS, str(self.parks).encode()),
                (H_FIRST_FAILED_AT, iso(self.first_failed_at).encode()),
                (H_PARKED_AT, iso(self.parked_at).encode()),
                (H_DUE_AT, iso(self.due_at).encode()),
            )
            _shared_headers = (key, shared)
        items = _shared_headers[1].copy()
        items += (
            (H_SUBSCRIPTION, (self.subscription or "").encode()),
            (H_ORIGINAL_TOPIC, self.original_topic.encode()),
            (H_ORIGINAL_PARTITION, str(self.original_partition).encode()),
            (H_ORIGINAL_OFFSET, str(self.original_offset).encode()),
            (H_ORIGINAL_TIMESTAMP, _opt(self.original_timestamp_ms).encode()),
        )
        if self.batch_index is not None:
            items.append((H_BATCH_INDEX, str(self.batch_index).encode()))
        if self.value_omitted is not None:
            items.append((H_VALUE_OMITTED, str(self.value_omitted).encode()))
        return items

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Parked:
        """Parse the `retry.*` headers; ValueError names the first missing or bad one."""
        # Straight-line (no helper closures): the retry intake runs it for every record.
        get = headers.get
        return cls(
            destination=_required(get(H_DESTINATION), H_DESTINATION),
            subscription=get(H_SUBSCRIPTION) or None,
            reason=_required(get(H_REASON), H_REASON),
            failure=get(H_FAILURE) or "retryable",
            error=get(H_ERROR, ""),
            code=_integer(get(H_CODE) or None, H_CODE),
            attempts=_integer(_required(get(H_ATTEMPTS), H_ATTEMPTS), H_ATTEMPTS) or 0,
            parks=_integer(get(H_PARKS) or None, H_PARKS) or 1,
            first_failed_at=_time(get(H_FIRST_FAILED_AT), H_FIRST_FAILED_AT),
            parked_at=_time(get(H_PARKED_AT), H_PARKED_AT),
            due_at=_time(get(H_DUE_AT), H_DUE_AT),
            original_topic=_required(get(H_ORIGINAL_TOPIC), H_ORIGINAL_TOPIC),
            original_partition=_integer(
                _required(get(H_ORIGINAL_PARTITION), H_ORIGINAL_PARTITION), H_ORIGINAL_PARTITION
            )
            or 0,
            original_offset=_integer(
                _required(get(H_ORIGINAL_OFFSET), H_ORIGINAL_OFFSET), H_ORIGINAL_OFFSET
            )
            or 0,
            original_timestamp_ms=_integer(get(H_ORIGINAL_TIMESTAMP) or None, H_ORIGINAL_TIMESTAMP),
            batch_index=_integer(get(H_BATCH_INDEX) or None, H_BATCH_INDEX),
            value_omitted=_integer(get(H_VALUE_OMITTED) or None, H_VALUE_OMITTED),
        )


H_DESTINATION: Final = RETRY_PREFIX + "destination"
H_SUBSCRIPTION: Final = RETRY_PREFIX + "subscription"
H_REASON: Final = RETRY_PREFIX + "reason"
H_FAILURE: Final = RETRY_PREFIX + "failure"
H_ERROR: Final = RETRY_PREFIX + "error"
H_CODE: Final = RETRY_PREFIX + "tiktok.code"
H_ATTEMPTS: Final = RETRY_PREFIX + "attempts"
H_PARKS: Final = RETRY_PREFIX + "parks"
H_FIRST_FAILED_AT: Final = RETRY_PREFIX + "first_failed_at"
H_PARKED_AT: Final = RETRY_PREFIX + "parked_at"
H_DUE_AT: Final = RETRY_PREFIX + "due_at"
H_ORIGINAL_TOPIC: Final = RETRY_PREFIX + "original.topic"
H_ORIGINAL_PARTITION: Final = RETRY_PREFIX + "original.partition"
H_ORIGINAL_OFFSET: Final = RETRY_PREFIX + "original.offset"
H_ORIGINAL_TIMESTAMP: Final = RETRY_PREFIX + "original.timestamp"
H_BATCH_INDEX: Final = RETRY_PREFIX + "batch_index"
H_VALUE_OMITTED: Final = RETRY_PREFIX + "value_omitted"


def _required(value: str | None, name: str) -> str:
    if not value:
        raise ValueError(f"header {name} missing")
    return value


def _integer(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"header {name} is not an integer") from None


def _time(value: str | None, name: str) -> float:
    try:
        return parse_iso(_required(value, name))
    except ValueError as exc:
        if "missing" in str(exc):
            raise
        raise ValueError(f"header {name} is not an ISO-8601 time") from None


_shared_headers: tuple[tuple[object, ...], list[tuple[str, bytes]]] = ((), [])


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
        destinations: Sequence[str] = (),
    ) -> None:
        super().__init__(
            config=config, topic=topic, what="retry topic", on_fatal=on_fatal, producer=producer
        )
        self._destinations = tuple(destinations)
        self.layout = RetryLayout(self._destinations, partitions)
        self._metrics = metrics
        self._counters: dict[tuple[str, str], Any] = {}

    def _parked_counter(self, destination: str, reason: str) -> Any:
        """The `events_parked_total` child of a label pair, looked up once."""
        counter = self._counters.get((destination, reason))
        if counter is None:
            counter = self._metrics.events_parked.labels(destination=destination, reason=reason)
            self._counters[(destination, reason)] = counter
        return counter

    def learn_partitions(self, timeout_s: float = 15.0) -> int:
        """Read the retry topic's partition count (blocking; call before the first `park`)."""
        metadata = self._producer.list_topics(self.topic, timeout=timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is not None and topic.error is None and topic.partitions:
            self.layout = RetryLayout(self._destinations, len(topic.partitions))
        return self.layout.partitions

    @property
    def partitions(self) -> int:
        return self.layout.partitions

    def park(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        parked: Parked,
        on_written: Callable[[], None],
    ) -> None:
        partition = self.layout.partition(parked.destination)
        counter = self._parked_counter(parked.destination, parked.reason)

        def written() -> None:
            counter.inc()
            on_written()

        def reference_only() -> None:
            size = len(value or b"")
            slim = msgspec.structs.replace(parked, value_omitted=size)
            self._produce(
                value=None,
                key=short_key(key),
                headers=slim.headers(),
                on_written=written,
                partition=partition,
            )

        self._produce(
            value=value,
            key=key,
            headers=parked.headers(),
            on_written=written,
            on_too_large=reference_only,
            partition=partition,
        )

    def probe(self, on_written: Callable[[], None]) -> None:
        """A record with no value and a `retry.probe` header: proves the topic is writable."""
        self._produce(value=None, key=None, headers=[(PROBE_HEADER, b"1")], on_written=on_written)
