"""Reading the dead-letter topic: parsed records and a bounded, never-hanging reader.

Shared by `tiktok-worker dlq inspect` and `tiktok-worker dlq redrive`.

Contract:
- `parse_record(msg)` turns a consumed Kafka message into a `DeadLetterRecord`; it never
  raises on odd headers (a missing or malformed header becomes None / 0 / "").
- `BoundedReader` assigns every partition of the topic (no group membership, no rebalances),
  starts each at the beginning or at a consumer group's committed offset, and reads up to the
  high watermarks captured when it opened. Records appended after that (for example the
  dead letters a redrive writes back) are not returned. It is `done` once every partition has
  reached its end, so it returns on an empty topic at once and never waits for new records.
  It commits only when `commit()` is called, and only to the group it was given.
- `list_redrive_progress(...)` reads the committed offsets of every redrive consumer group of
  this worker (see `worker.redrive.engine.RedriveFilter` for the naming scheme).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from worker.errors import WorkerError
from worker.kafka.deadletters import HEADER_PREFIX, REDRIVE_COUNT_HEADER
from worker.kafka.settings import admin_settings, reader_settings

# No progress at all for this long while reading (broker gone, partition leaderless): give up
# with a one-line error instead of hanging.
DEFAULT_STALL_TIMEOUT_S: Final = 30.0
METADATA_TIMEOUT_S: Final = 15.0
# The `client.id` suffix of the dead-letter tools' clients (inspect, redrive, their readers).
TOOLS_JOB: Final = "dlq-tools"


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One dead letter as read back: where it sits in the topic, its bytes, its headers.

    `destination` is None when the header is missing or empty (the event failed for every
    destination: decode_error, invalid_event); `code` is None when TikTok gave no code;
    `redrive_count` is how many times a redrive has already re-dead-lettered it.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, str]
    reason: str
    error: str
    destination: str | None
    code: int | None
    attempts: int
    failed_at: str | None
    batch_index: int | None
    redrive_count: int
    original_topic: str | None
    original_partition: int | None
    original_offset: int | None
    original_timestamp_ms: int | None


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def decode_headers(
    raw: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None,
) -> dict[str, str]:
    """Kafka headers as text; the first value of a repeated key wins, bad UTF-8 is replaced."""
    items = raw.items() if isinstance(raw, Mapping) else (raw or ())
    result: dict[str, str] = {}
    for name, value in items:
        if name in result:
            continue
        if value is None:
            result[name] = ""
        elif isinstance(value, bytes):
            result[name] = value.decode("utf-8", errors="replace")
        else:
            result[name] = value
    return result


def parse_record(msg: Message) -> DeadLetterRecord:
    """Parse one consumed dead-letter message (a message without an error)."""
    headers = decode_headers(msg.headers())

    def get(name: str) -> str | None:
        return headers.get(HEADER_PREFIX + name)

    _ts_type, ts = msg.timestamp()
    topic = msg.topic()
    partition = msg.partition()
    offset = msg.offset()
    assert topic is not None
    assert partition is not None
    assert offset is not None
    return DeadLetterRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=ts if ts > 0 else None,
        key=msg.key(),
        value=msg.value(),
        headers=headers,
        reason=(get("reason") or "").strip(),
        error=get("error") or "",
        destination=(get("destination") or "").strip() or None,
        code=_int_or_none(get("tiktok.code")),
        attempts=max(0, _int_or_none(get("attempts")) or 0),
        failed_at=(get("failed_at") or "").strip() or None,
        batch_index=_int_or_none(get("batch_index")),
        redrive_count=max(0, _int_or_none(get(REDRIVE_COUNT_HEADER)) or 0),
        original_topic=get("original.topic") or None,
        original_partition=_int_or_none(get("original.partition")),
        original_offset=_int_or_none(get("original.offset")),
        original_timestamp_ms=_int_or_none(get("original.timestamp")),
    )


class BoundedReader:
    """Reads every partition of `topic` from a start offset to the high watermark at open.

    `from_committed=True` starts each partition at `group_id`'s committed offset (or the
    beginning when there is none); otherwise at the beginning. The group is used for that and
    for `commit()` only: the reader never joins it, so there are no rebalances.
    Use from one thread at a time.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        from_committed: bool,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        consumer_factory: Any = Consumer,
        kind: str = "dead-letter topic",
    ) -> None:
        self.topic = topic
        self._kind = kind
        self._from_committed = from_committed
        self._stall_timeout_s = stall_timeout_s
        self._consumer = consumer_factory(config)
        self._bootstrap = config.get("bootstrap.servers", "?")
        # partition -> [start, end): end is the high watermark captured at open.
        self.ranges: dict[int, tuple[int, int]] = {}
        self._open: set[int] = set()
        self._stalled_s = 0.0
        self._closed = False
        # poll() and commit() may run on different executor threads: one consumer call at a time.
        self._lock = threading.Lock()

    # -- setup ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Look the topic up, capture watermarks and start offsets, and assign partitions."""
        consumer = self._consumer
        try:
            metadata = consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise WorkerError(
                f"cannot reach Kafka at {self._bootstrap}: {_kafka_text(exc)}"
            ) from None
        meta = metadata.topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise WorkerError(f"{self._kind} {self.topic!r} does not exist")
        partitions = sorted(meta.partitions)
        committed: dict[int, int] = {}
        if self._from_committed:
            wanted = [TopicPartition(self.topic, p) for p in partitions]
            try:
                tps = _retrying(lambda: consumer.committed(wanted, timeout=METADATA_TIMEOUT_S))
            except KafkaException as exc:
                raise WorkerError(f"cannot read committed offsets: {_kafka_text(exc)}") from None
            committed = {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
        assignment: list[TopicPartition] = []
        for p in partitions:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=METADATA_TIMEOUT_S, cached=False
                )
            except KafkaException as exc:
                raise WorkerError(
                    f"cannot read the end offsets of {self.topic}[{p}]: {_kafka_text(exc)}"
                ) from None
            start = max(low, committed.get(p, low))
            self.ranges[p] = (start, high)
            if start < high:
                self._open.add(p)
                assignment.append(TopicPartition(self.topic, p, start))
        if assignment:
            consumer.assign(assignment)

    # -- reading -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True when every partition has been read up to its captured end."""
        return not self._open

    @property
    def total(self) -> int:
        """Records between the start offsets and the captured ends (an upper bound: compacted
        or transactional topics have gaps)."""
        return sum(end - start for start, end in self.ranges.values())

    def poll(self, max_records: int, timeout_s: float) -> list[DeadLetterRecord]:
        """Up to `max_records` records inside the captured ranges, in partition order.

        Raises WorkerError after `stall_timeout_s` of polling without any progress.
        """
        if not self._open:
            return []
        started = time.monotonic()
        with self._lock:
            records, progressed = self._read(max_records, timeout_s)
        if progressed:
            self._stalled_s = 0.0
        else:
            self._stalled_s += time.monotonic() - started
            if self._stalled_s > self._stall_timeout_s:
                raise WorkerError(
                    f"reading {self.topic}: no progress for {self._stall_timeout_s:g}s "
                    f"(is Kafka at {self._bootstrap} reachable?)"
                )
        return records

    def _read(self, max_records: int, timeout_s: float) -> tuple[list[DeadLetterRecord], bool]:
        messages = self._consumer.consume(max_records, timeout_s)
        records: list[DeadLetterRecord] = []
        progressed = False
        for msg in messages:
            err = msg.error()
            partition = msg.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF and partition is not None:
                    # Nothing more to read right now: everything before the end was seen.
                    self._close_partition(partition)
                    progressed = True
                    continue
                if err.fatal():
                    raise WorkerError(f"reading {self.topic}: {err.str()}")
                continue  # transient errors: librdkafka retries by itself
            offset = msg.offset()
            if partition is None or offset is None or partition not in self._open:
                continue
            progressed = True
            _start, end = self.ranges[partition]
            if offset >= end:
                self._close_partition(partition)
                continue
            records.append(parse_record(msg))
            if offset + 1 >= end:
                self._close_partition(partition)
        return records, progressed

    def _close_partition(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self._consumer.pause([TopicPartition(self.topic, partition)])

    # -- committing ----------------------------------------------------------------------------

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit `offsets` (partition -> next offset to read) to the reader's group."""
        if not offsets:
            return
        tps = [TopicPartition(self.topic, p, o) for p, o in offsets.items()]
        try:
            with self._lock:
                _retrying(lambda: self._consumer.commit(offsets=tps, asynchronous=False))
        except KafkaException as exc:
            raise WorkerError(f"cannot commit redrive progress: {_kafka_text(exc)}") from None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._consumer.close()


def list_redrive_progress(
    *,
    bootstrap_servers: str,
    client: Mapping[str, Any],
    topic: str,
    group_prefix: str,
    timeout_s: float = METADATA_TIMEOUT_S,
) -> dict[str, dict[int, int]]:
    """Committed offsets on `topic` of every consumer group whose id starts with
    `group_prefix`: {group id: {partition: next offset to read}}. Groups without commits on
    the topic are left out. Raises WorkerError if the groups cannot be listed."""
    admin = AdminClient(
        admin_settings(bootstrap_servers=bootstrap_servers, client=client, job=TOOLS_JOB)
    )
    try:
        listing = _retrying(lambda: admin.list_consumer_groups(request_timeout=timeout_s).result())
    except KafkaException as exc:
        raise WorkerError(f"cannot list consumer groups: {_kafka_text(exc)}") from None
    names = sorted(g.group_id for g in listing.valid if g.group_id.startswith(group_prefix))
    result: dict[str, dict[int, int]] = {}
    for name in names:
        try:
            offsets = _retrying(
                partial(_group_offsets, bootstrap_servers, client, name, topic, timeout_s)
            )
        except KafkaException as exc:
            raise WorkerError(
                f"cannot read the offsets of consumer group {name!r}: {_kafka_text(exc)}"
            ) from None
        if offsets:
            result[name] = offsets
    return result


def _group_offsets(
    bootstrap_servers: str,
    client: Mapping[str, Any],
    group: str,
    topic: str,
    timeout_s: float,
) -> dict[int, int]:
    """The group's committed offsets on `topic`, read by a consumer that never joins it.

    Not `AdminClient.list_consumer_group_offsets`: librdkafka 2.16 aborts the process when
    the broker goes away during that request (found by the chaos suite).
    """
    reader = Consumer(
        reader_settings(
            bootstrap_servers=bootstrap_servers, group_id=group, client=client, job=TOOLS_JOB
        )
    )
    try:
        metadata = reader.list_topics(topic, timeout=timeout_s)
        partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        found = reader.committed(partitions, timeout=timeout_s)
    finally:
        reader.close()
    return {tp.partition: tp.offset for tp in found if tp.error is None and tp.offset >= 0}


_T = TypeVar("_T")
# Group coordinator errors right after a broker (or __consumer_offsets) starts, or while the
# coordinator moves, are transient: librdkafka reports them instead of retrying.
RETRY_FOR_S: Final = 15.0
_RETRY_PAUSE_S: Final = 0.25


def _retrying(call: Callable[[], _T], *, for_s: float = RETRY_FOR_S) -> _T:
    """`call()`, again after retriable Kafka errors, for up to `for_s` seconds."""
    deadline = time.monotonic() + for_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            retriable = isinstance(err, KafkaError) and (
                err.retriable()
                or err.code()
                in (
                    KafkaError.NOT_COORDINATOR,
                    KafkaError.COORDINATOR_NOT_AVAILABLE,
                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                    KafkaError._WAIT_COORD,
                )
            )
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE_S)


def _kafka_text(exc: KafkaException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.str() if isinstance(arg, KafkaError) else str(arg)
