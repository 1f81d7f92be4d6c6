"""The redrive engine: send dead letters again through the worker's own delivery path.

What a redrive does (`tiktok-worker dlq redrive`, docs/dead-letters.md):

- It reads the dead-letter topic with a `BoundedReader`: from its consumer group's committed
  offsets up to the high watermarks captured at start, then stops. It never waits for new
  records, so the dead letters it writes back are left for the next redrive.
- Each record that passes the filter (`--reason`, `--destination`; without `--reason`,
  `decode_error` and `event_too_large` records are left alone: the same bytes cannot
  succeed) is mapped again with the
  worker's `Mapper` and sent with the worker's `Sender` (lanes, retries, backoff,
  bisection), rate limiter and `TikTokClient`. A record with a `dlq.destination` goes ONLY to
  that destination, so a destination that already accepted the event does not get it twice.
  A record without one (decode_error / invalid_event that failed for every destination) is
  mapped for every destination, like the worker would.
- A record that fails again is written back to the dead-letter topic (same value, key and
  `dlq.original.*` / `dlq.batch_index` headers; new reason, error, code and `failed_at`;
  `dlq.attempts` = previous attempts + this redrive's requests; `dlq.redrive.count` + 1),
  scoped to the destination that failed.
- A record is *handled* when it was delivered, written back and acknowledged by the broker,
  no longer mapped to its destination, or skipped. Only contiguous handled offsets are
  committed (`worker.kafka.offsets.PartitionTracker`), so an interrupted redrive resumes without
  resending what succeeded.

Progress and filters: every filter combination is its own consumer group
(`RedriveFilter.group_id`), so records one filter skips stay available to another. Before
sending, a record is checked against the committed offsets of every other redrive group: if a
group whose filter matches the record has committed past it, that redrive already handled it
and it is skipped ("already redriven"). So a dead letter is redriven once, whichever filters
are used, as long as two redrives do not run at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from worker.config import Config
from worker.core.vocabulary import UNSENDABLE_REASONS, DeadLetterReason, SkipReason
from worker.delivery.factory import build_delivery
from worker.delivery.inflight import Failure, InflightMessage, Parking, PendingEvent
from worker.errors import ConfigError, FatalLatch, WorkerError
from worker.kafka.deadletters import HEADER_PREFIX, DeadLetter, DeadLetterProducer
from worker.kafka.dlq_reader import (
    TOOLS_JOB,
    BoundedReader,
    DeadLetterRecord,
    list_redrive_progress,
)
from worker.kafka.offsets import OffsetLedger
from worker.kafka.preflight import preflight
from worker.kafka.security import client_properties
from worker.kafka.settings import TopicPartitionKey, producer_settings, reader_settings
from worker.mapping.mapper import CONFIG_DEFAULT, EventOutcome, Mapper
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics

GROUP_SUFFIX: Final = "-redrive"
POLL_BATCH: Final = 500
POLL_TIMEOUT_S: Final = 0.2
BACKPRESSURE_SLEEP_S: Final = 0.02
DRAIN_POLL_S: Final = 0.02
# A redrive holds at most this many records in flight (each keeps its bytes).
DEFAULT_MAX_INFLIGHT: Final = 5000


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class RedriveFilter:
    """Which dead letters a redrive sends. None means "any", except that without a reason
    the records that can never succeed (`UNSENDABLE_REASONS`) are left out."""

    reason: str | None = None
    destination: str | None = None

    def matches(self, record: DeadLetterRecord) -> bool:
        if self.reason is None:
            if record.reason in UNSENDABLE_REASONS:
                return False
        elif record.reason != self.reason:
            return False
        return self.destination is None or record.destination == self.destination

    def group_id(self, base: str) -> str:
        """The consumer group keeping this filter's progress on the dead-letter topic:
        `<base>-redrive`, plus `--reason=<R>` and/or `--destination=<D>`."""
        name = base + GROUP_SUFFIX
        if self.reason is not None:
            name += f"--reason={self.reason}"
        if self.destination is not None:
            name += f"--destination={self.destination}"
        return name

    @classmethod
    def from_group_id(cls, base: str, group_id: str) -> RedriveFilter | None:
        """The filter a redrive group id stands for; None if it is not one of `base`'s."""
        prefix = base + GROUP_SUFFIX
        if not group_id.startswith(prefix):
            return None
        m = _GROUP_RE.fullmatch(group_id[len(prefix) :])
        if m is None:
            return None
        return cls(reason=m.group("reason"), destination=m.group("destination"))

    def describe(self) -> str:
        parts = []
        if self.reason is not None:
            parts.append(f"reason={self.reason}")
        if self.destination is not None:
            parts.append(f"destination={self.destination}")
        return ", ".join(parts) if parts else "all dead letters"


_GROUP_RE: Final = re.compile(
    r"(?:--reason=(?P<reason>[a-z_]+))?(?:--destination=(?P<destination>.+))?"
)


def validate_filter(config: Config, reason: str | None, destination: str | None) -> RedriveFilter:
    """Check `--reason` / `--destination` against the known reasons and configured
    destinations; raise ConfigError (exit 2) with one line otherwise."""
    if reason is not None and reason not in {r.value for r in DeadLetterReason}:
        known = ", ".join(DeadLetterReason)
        raise ConfigError(f"--reason: unknown reason {reason!r} (one of: {known})")
    names = [d.name for d in config.destinations]
    if destination is not None and destination not in names:
        raise ConfigError(
            f"--destination: no destination named {destination!r} (configured: {', '.join(names)})"
        )
    return RedriveFilter(reason=reason, destination=destination)


class RedriveLedger:
    """What earlier redrives handled: the committed offsets of every redrive group.

    A record at (partition, offset) was handled by group G when G's filter matches it and G's
    committed offset on that partition is above `offset`.
    """

    def __init__(self, groups: Mapping[str, tuple[RedriveFilter, Mapping[int, int]]]) -> None:
        self._groups = dict(groups)

    @classmethod
    def from_offsets(cls, base: str, offsets: Mapping[str, Mapping[int, int]]) -> RedriveLedger:
        groups: dict[str, tuple[RedriveFilter, Mapping[int, int]]] = {}
        for group_id, committed in offsets.items():
            flt = RedriveFilter.from_group_id(base, group_id)
            if flt is not None:
                groups[group_id] = (flt, committed)
        return cls(groups)

    @classmethod
    def load(cls, config: Config) -> RedriveLedger:
        kafka = config.kafka
        offsets = list_redrive_progress(
            bootstrap_servers=kafka.bootstrap_servers,
            client=client_properties(kafka),
            topic=kafka.dead_letter_topic,
            group_prefix=kafka.group_id + GROUP_SUFFIX,
        )
        return cls.from_offsets(kafka.group_id, offsets)

    @property
    def groups(self) -> dict[str, tuple[RedriveFilter, Mapping[int, int]]]:
        return dict(self._groups)

    def handled_by(self, record: DeadLetterRecord, *, exclude: str | None = None) -> str | None:
        """The redrive group that already handled `record`, or None."""
        for group_id, (flt, committed) in self._groups.items():
            if group_id == exclude:
                continue
            if record.offset < committed.get(record.partition, 0) and flt.matches(record):
                return group_id
        return None


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class RedriveStats:
    """Counts of one redrive run. Every record read ends in exactly one of: delivered,
    failed_again, unmapped, too_old, skipped_filter, skipped_redriven, skipped_unconfigured,
    skipped_reference_only (a letter written without its value: nothing to send); records
    still in flight when a run is interrupted are in none of them."""

    to_read: int = 0
    read: int = 0
    redriven: int = 0
    delivered: int = 0
    failed_again: int = 0
    unmapped: int = 0
    too_old: int = 0  # older than the max age: not sent (TikTok dedups 48 h only), handled
    skipped_filter: int = 0
    skipped_redriven: int = 0
    skipped_unconfigured: dict[str, int] = field(default_factory=dict)
    skipped_reference_only: int = 0
    events_sent: int = 0
    interrupted: bool = False

    @property
    def skipped(self) -> int:
        return (
            self.skipped_filter
            + self.skipped_redriven
            + sum(self.skipped_unconfigured.values())
            + self.skipped_reference_only
        )

    @property
    def inflight(self) -> int:
        return self.redriven - self.delivered - self.failed_again - self.unmapped - self.too_old


class _RecordWork:
    """One dead letter being redriven: the events sent and the failures seen so far."""

    __slots__ = ("failures", "message", "record", "sent", "too_old")

    def __init__(self, record: DeadLetterRecord, message: InflightMessage) -> None:
        self.record = record
        self.message = message
        self.sent = 0
        self.too_old = False
        # (destination, outcome index) -> (outcome, failure): one write-back per pair.
        self.failures: dict[tuple[str | None, int], tuple[EventOutcome, Failure]] = {}

    def fail(self, destination: str | None, outcome: EventOutcome, failure: Failure) -> None:
        self.failures.setdefault((destination, outcome.index), (outcome, failure))


def _age(value: object) -> float | None:
    assert value is None or isinstance(value, int | float)
    return None if value is None else float(value)


# --------------------------------------------------------------------------- the engine


class Redrive:
    """One redrive run. Build with `Redrive.create(...)` inside a running event loop."""

    def __init__(
        self,
        *,
        config: Config,
        flt: RedriveFilter,
        max_records: int | None,
        reader: BoundedReader,
        ledger: RedriveLedger,
        group_id: str,
        metrics: Metrics,
        log: Logger,
        on_progress: Callable[[RedriveStats], None] | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_event_age_s: float | object | None = CONFIG_DEFAULT,
    ) -> None:
        self._config = config
        self._filter = flt
        self._max = max_records
        self._reader = reader
        self._ledger = ledger
        self.group_id = group_id
        self._metrics = metrics
        self._log = log
        self._on_progress = on_progress
        self._max_inflight = max_inflight
        self.stats = RedriveStats(to_read=reader.total)
        self._offsets = OffsetLedger()
        self._works: dict[InflightMessage, _RecordWork] = {}
        self._stop = asyncio.Event()
        self._abandon = asyncio.Event()
        self._fatal = FatalLatch()
        self._fatal.subscribe(self._on_fatal)
        self.ledger_warning: str | None = None
        # `--max-age` overrides tiktok.max_event_age_s (None: no limit).
        self._mapper = (
            Mapper(config)
            if max_event_age_s is CONFIG_DEFAULT
            else Mapper(config, max_event_age_s=_age(max_event_age_s))
        )
        self._destinations = {d.name for d in config.destinations}
        self._delivery = build_delivery(config, metrics=metrics, log=log, on_crash=self._fatal.trip)
        self._sender = self._delivery.sender
        self._dead_letters = DeadLetterProducer(
            config=producer_settings(
                bootstrap_servers=config.kafka.bootstrap_servers,
                client=client_properties(config.kafka),
            ),
            topic=config.kafka.dead_letter_topic,
            metrics=metrics,
            on_fatal=self._fatal.trip,
        )

    @classmethod
    async def create(
        cls,
        config: Config,
        flt: RedriveFilter,
        *,
        max_records: int | None,
        log: Logger,
        on_progress: Callable[[RedriveStats], None] | None = None,
        metrics: Metrics | None = None,
        max_event_age_s: float | object | None = CONFIG_DEFAULT,
    ) -> Redrive:
        """Check Kafka and the topic, load the other redrives' progress and open the reader."""
        if max_records is not None and max_records < 1:
            raise ConfigError("--max: must be >= 1")
        loop = asyncio.get_running_loop()
        kafka = config.kafka
        client = client_properties(kafka)
        await loop.run_in_executor(None, preflight, config, client)
        group_id = flt.group_id(kafka.group_id)
        warning: str | None = None
        try:
            ledger = await loop.run_in_executor(None, RedriveLedger.load, config)
        except WorkerError as exc:
            # Without the other groups' progress a record another filter already redrove
            # may be sent again: harmless for TikTok (event_id dedup), so warn and go on.
            ledger = RedriveLedger({})
            warning = f"{exc}; records redriven under another filter may be sent again"
        reader = BoundedReader(
            config=reader_settings(
                bootstrap_servers=kafka.bootstrap_servers,
                group_id=group_id,
                client=client,
                job=TOOLS_JOB,
            ),
            topic=kafka.dead_letter_topic,
            from_committed=True,
        )
        try:
            await loop.run_in_executor(None, reader.open)
        except BaseException:
            reader.close()
            raise
        try:
            redrive = cls(
                config=config,
                flt=flt,
                max_records=max_records,
                reader=reader,
                ledger=ledger,
                group_id=group_id,
                metrics=metrics if metrics is not None else Metrics(),
                log=log,
                on_progress=on_progress,
                max_event_age_s=max_event_age_s,
            )
        except BaseException:
            reader.close()
            raise
        redrive.ledger_warning = warning
        return redrive

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading and start no new request; requests under way get
        `kafka.drain_timeout_s` to finish. A second call abandons them at once. Abandoned
        records stay uncommitted and are redriven next time."""
        if self._stop.is_set():
            self._abandon.set()
        self._stop.set()

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal.error

    def _on_fatal(self, _exc: BaseException) -> None:
        self._offsets.halt()
        self._stop.set()
        self._abandon.set()

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> RedriveStats:
        """Redrive until the captured ends, `--max`, a stop request or a fatal error."""
        loop = asyncio.get_running_loop()
        kafka = self._config.kafka
        await self._delivery.limiter.start()  # connect before sending (SPEC §5)
        self._dead_letters.start()
        committer = loop.create_task(
            self._offsets.commit_every(kafka.commit_interval_s, self._commit, self._commit_failed)
        )
        try:
            await self._read_loop(loop)
            self._sender.flush()
            await self._drain(kafka.drain_timeout_s)
        finally:
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            await self._sender.close()  # abandons gated or backing-off deliveries
            await self._dead_letters.close(timeout_s=5.0)
            await self._offsets.commit_once(self._commit)  # nothing after a fatal error
            await loop.run_in_executor(None, self._reader.close)
            await self._delivery.close()
        if self.fatal is not None:
            raise WorkerError(str(self.fatal))
        self.stats.interrupted = self.stats.inflight > 0 or not self._finished_reading()
        if self.stats.inflight:
            self._log.warning(
                "redrive stopped with records in flight; they will be redriven next time",
                records=self.stats.inflight,
            )
        self._progress()
        return self.stats

    def _finished_reading(self) -> bool:
        return self._reader.done or self._max_reached()

    def _max_reached(self) -> bool:
        return self._max is not None and self.stats.redriven >= self._max

    async def _read_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stop.is_set() and not self._finished_reading():
            if self.stats.inflight >= self._max_inflight:
                await asyncio.sleep(BACKPRESSURE_SLEEP_S)
                continue
            records = await loop.run_in_executor(
                None, self._reader.poll, POLL_BATCH, POLL_TIMEOUT_S
            )
            for record in records:
                if self._stop.is_set() or self._max_reached():
                    break  # not begun, so not committed: the next run reads it again
                self._take(record)
            self._progress()

    async def _drain(self, stop_timeout_s: float) -> None:
        """Wait until every record taken is handled.

        Without a stop request this waits as long as delivery takes (retries end at
        `tiktok.retry.deadline_s`). After one, no new request is started (the client's gate
        closes); requests already on the wire and dead letters being written get up to
        `stop_timeout_s` to finish, and everything else is abandoned, uncommitted.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while self.stats.inflight and not self._abandon.is_set():
            if self._stop.is_set():
                if deadline is None:
                    self._sender.close_gate()
                    deadline = loop.time() + stop_timeout_s
                quiet = self._sender.on_wire == 0 and self._dead_letters.pending == 0
                if quiet or loop.time() >= deadline:
                    return
            await asyncio.sleep(DRAIN_POLL_S)

    # -- per record ----------------------------------------------------------------------------

    def _take(self, record: DeadLetterRecord) -> None:
        stats = self.stats
        where: TopicPartitionKey = (record.topic, record.partition)
        self._offsets.begin(where, record.offset)
        stats.read += 1
        if not self._filter.matches(record):
            stats.skipped_filter += 1
            self._offsets.finish(where, record.offset)
            return
        if self._ledger.handled_by(record, exclude=self.group_id) is not None:
            stats.skipped_redriven += 1
            self._offsets.finish(where, record.offset)
            return
        if HEADER_PREFIX + "value_omitted" in record.headers:
            # Too large for the dead-letter topic: the source record has the event
            # (dlq.original.*); there is nothing here to send.
            stats.skipped_reference_only += 1
            self._offsets.finish(where, record.offset)
            return
        target = record.destination
        if target is not None and target not in self._destinations:
            stats.skipped_unconfigured[target] = stats.skipped_unconfigured.get(target, 0) + 1
            self._offsets.finish(where, record.offset)
            return
        stats.redriven += 1
        message = InflightMessage(
            owner=self,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            key=record.key,
        )
        work = self._works[message] = _RecordWork(record, message)
        message.add_work()  # held while dispatching, so nothing finishes the record early
        for outcome in self._mapper.map_message(record.value):
            if outcome.skipped == SkipReason.TOO_OLD:
                work.too_old = True
            for mapped in outcome.mapped:
                if target is not None and mapped.destination != target:
                    continue  # that destination already has it (or never failed)
                message.add_work()
                work.sent += 1
                stats.events_sent += 1
                self._sender.add(mapped.key, PendingEvent(message, outcome, mapped))
            for invalid in outcome.invalid:
                if target is not None and invalid.destination not in (None, target):
                    continue
                failure = Failure(invalid.reason, invalid.error, None, 0)
                work.fail(target if target is not None else invalid.destination, outcome, failure)
        message.finish_one()

    # -- WorkOwner: the sender reports here ----------------------------------------------------

    def on_delivered(self, events: Sequence[PendingEvent]) -> None:
        for event in events:
            event.message.finish_one()

    def on_failed(self, events: Sequence[PendingEvent], failure: Failure) -> None:
        for event in events:
            self._works[event.message].fail(event.mapped.destination, event.outcome, failure)
            event.message.finish_one()

    def on_parked(self, events: Sequence[PendingEvent], parking: Parking) -> None:
        # Redrive's sender is built without parking; were it ever to park, the events go
        # back to the dead-letter topic like any other failure.
        reason = (
            DeadLetterReason.AUTH_ERROR
            if parking.failure == "auth_error"
            else DeadLetterReason.RETRIES_EXHAUSTED
        )
        self.on_failed(events, Failure(reason, parking.error, parking.code, parking.attempts))

    def message_finished(self, message: InflightMessage) -> None:
        work = self._works.pop(message)
        if not work.failures:
            if work.sent:
                self.stats.delivered += 1
            elif work.too_old:
                self.stats.too_old += 1
            else:
                self.stats.unmapped += 1
            self._handled(work)
            return
        pending = len(work.failures)

        def written() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                self.stats.failed_again += 1
                self._handled(work)

        record = work.record
        for (destination, _index), (outcome, failure) in work.failures.items():
            letter = DeadLetter(
                redrive_count=record.redrive_count + 1,
                reason=failure.reason,
                error=failure.error,
                original_topic=record.original_topic or record.topic,
                original_partition=(
                    record.original_partition
                    if record.original_partition is not None
                    else record.partition
                ),
                original_offset=(
                    record.original_offset if record.original_offset is not None else record.offset
                ),
                original_timestamp_ms=record.original_timestamp_ms,
                destination=destination,
                code=failure.code,
                attempts=record.attempts + failure.attempts,
                batch_index=outcome.index if outcome.multi else record.batch_index,
            )
            self._dead_letters.send(
                value=outcome.raw if outcome.multi else record.value,
                key=record.key,
                letter=letter,
                on_written=written,
            )

    def _handled(self, work: _RecordWork) -> None:
        record = work.record
        self._offsets.finish((record.topic, record.partition), record.offset)
        self._progress()

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.stats)

    # -- commits -------------------------------------------------------------------------------

    async def _commit(self, offsets: dict[TopicPartitionKey, int]) -> None:
        by_partition = {partition: offset for (_topic, partition), offset in offsets.items()}
        await asyncio.get_running_loop().run_in_executor(None, self._reader.commit, by_partition)

    def _commit_failed(self, exc: Exception) -> None:
        self._log.warning("redrive commit failed", error=str(exc))
