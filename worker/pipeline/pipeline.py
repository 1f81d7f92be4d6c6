"""The asyncio pipeline: consumed message → map → batch → send → finish → commit.

Invariants (enforced here and tested in ``tests/test_pipeline.py``):

(a) An offset is committed only when every message at or below it in its partition is
    finished: all of its TikTok events delivered (code 0), or dead-lettered *and acknowledged
    by the broker*, or the message skipped. A message finishes only when its last unit of
    work does (``worker.delivery.inflight``); commit arithmetic lives in ``worker.kafka.offsets``.
(b) The committed value is the next offset to read (contiguous finished offset + 1).
(c) Delivery is at least once: after a crash or rebalance, work finished but not yet committed
    is done again. TikTok deduplicates on ``event_id`` (the Segment ``messageId``).
(d) Bad input never stops the worker: every undecodable or invalid event is dead-lettered with
    a reason. But if the dead-letter topic itself cannot be written, the worker stops (fatal)
    without committing the affected offsets.
(e) Memory is bounded: above ``max_inflight_messages`` unfinished messages every partition is
    paused (the consumer keeps polling, so it stays in the group) until half have finished.
(f) A revoked partition's work is drained (open batches flushed, deliveries awaited) for at
    most ``drain_timeout_s``; what finished is committed, the rest is re-read by its next owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from confluent_kafka import KafkaError, Message

from worker.core.vocabulary import DeadLetterReason, SkipReason
from worker.delivery.batcher import Batcher
from worker.delivery.inflight import InflightMessage, PendingEvent
from worker.delivery.sender import Failure
from worker.kafka.deadletters import DeadLetter, DeadLetterProducer
from worker.kafka.offsets import PartitionTracker
from worker.kafka.settings import TopicPartitionKey
from worker.mapping.mapper import EventOutcome, InvalidEvent, Mapper
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics

DRAIN_POLL_S = 0.02


class Committer(Protocol):
    """The consumer side the pipeline needs: commits and pause/resume (thread-safe)."""

    def commit(self, offsets: dict[TopicPartitionKey, int]) -> asyncio.Future[None]: ...

    def set_paused(self, paused: bool) -> None: ...


class Pipeline:
    """Receives consumed messages on the event loop and drives them to a committable state."""

    def __init__(
        self,
        *,
        mapper: Mapper,
        batcher: Batcher,
        dead_letters: DeadLetterProducer,
        metrics: Metrics,
        log: Logger,
        max_inflight_messages: int,
        drain_timeout_s: float,
    ) -> None:
        self._mapper = mapper
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._log = log
        self._max_inflight = max_inflight_messages
        self._resume_below = max_inflight_messages // 2
        self._drain_timeout_s = drain_timeout_s
        self._trackers: dict[TopicPartitionKey, PartitionTracker] = {}
        self._inflight = 0
        self._paused = False
        self._committer: Committer | None = None
        self._batcher = batcher
        self._mapped_counts: dict[tuple[str, str], int] = {}
        self._skipped_counts: dict[SkipReason, int] = {}
        self.fatal: BaseException | None = None
        self.fatal_event = asyncio.Event()
        self.messages_finished = 0

    def attach(self, committer: Committer) -> None:
        self._committer = committer

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    @property
    def inflight_messages(self) -> int:
        return self._inflight

    # -- consumer callbacks (event loop) -------------------------------------------------------

    def on_messages(self, messages: Sequence[Message]) -> None:
        consumed: dict[str, int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._log.warning("consume error", error=err.str())
                continue
            topic = msg.topic()
            partition = msg.partition()
            offset = msg.offset()
            if topic is None or partition is None or offset is None:  # only on error events
                continue
            consumed[topic] = consumed.get(topic, 0) + 1
            self._process(msg, topic, partition, offset)
        for topic, count in consumed.items():
            self._metrics.messages_consumed.labels(topic=topic).inc(count)
        self._flush_counts()
        self._metrics.inflight_messages.set(self._inflight)
        if not self._paused and self._inflight >= self._max_inflight:
            self._set_paused(True)

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        for key in partitions:
            old = self._trackers.get(key)
            if old is not None:
                old.revoked = True
            self._trackers[key] = PartitionTracker()

    async def on_revoked(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Drain the revoked partitions' work (bounded) and return their commit offsets."""
        self._batcher.flush()
        trackers = {k: t for k in partitions if (t := self._trackers.get(k)) is not None}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout_s
        while (
            any(t.inflight for t in trackers.values())
            and loop.time() < deadline
            and self.fatal is None  # after a fatal error nothing more will finish: don't wait
        ):
            await asyncio.sleep(DRAIN_POLL_S)
        offsets: dict[TopicPartitionKey, int] = {}
        abandoned = 0
        for key, tracker in trackers.items():
            tracker.revoked = True
            abandoned += tracker.inflight
            committable = tracker.committable()
            if committable is not None:
                offsets[key] = committable
            if self._trackers.get(key) is tracker:
                del self._trackers[key]
        if abandoned:
            self._log.warning(
                "drain timed out; unfinished work left to the next owner", messages=abandoned
            )
        return offsets

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        for key in partitions:
            tracker = self._trackers.pop(key, None)
            if tracker is not None:
                tracker.revoked = True

    def on_fatal(self, error: BaseException) -> None:
        if self.fatal is None:
            self.fatal = error
            self._log.error("fatal error; stopping", error=str(error))
        self.fatal_event.set()

    # -- commits -----------------------------------------------------------------------------

    def pending_commits(self) -> dict[TopicPartitionKey, int]:
        offsets: dict[TopicPartitionKey, int] = {}
        for key, tracker in self._trackers.items():
            offset = tracker.pending_commit()
            if offset is not None:
                offsets[key] = offset
        return offsets

    async def commit_once(self) -> int:
        """Commit every partition whose finished prefix moved; returns partitions committed."""
        if self._committer is None or self.fatal is not None:
            return 0
        offsets = self.pending_commits()
        if not offsets:
            return 0
        trackers = {k: self._trackers[k] for k in offsets}
        await self._committer.commit(offsets)
        for key, offset in offsets.items():
            trackers[key].mark_committed(offset)
        return len(offsets)

    async def run_committer(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._metrics.inflight_messages.set(self._inflight)
            try:
                await self.commit_once()
            except Exception as exc:  # retried at the next interval; at-least-once holds
                self._log.warning("commit failed", error=str(exc))

    # -- per message ---------------------------------------------------------------------------

    def _process(self, msg: Message, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        tracker = self._trackers.get(key)
        if tracker is None:  # assignment is announced before messages; defensive only
            tracker = self._trackers[key] = PartitionTracker()
        tracker.begin(offset)
        outcomes = self._mapper.map_message(msg.value())
        work = sum(len(o.mapped) + len(o.invalid) for o in outcomes)
        if work == 0:  # nothing to send or dead-letter: finished right away
            for outcome in outcomes:
                self._count_skip(outcome)
            tracker.finish(offset)
            self.messages_finished += 1
            return
        self._inflight += 1
        _ts_type, timestamp_ms = msg.timestamp()
        inflight = InflightMessage(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms if timestamp_ms > 0 else None,
            key=msg.key(),
            tracker=tracker,
            on_finished=self._message_finished,
        )
        # One unit per event outcome plus one held while dispatching, so nothing finishes the
        # message before all of its work is registered.
        inflight.add_work(1 + work)
        mapped_counts = self._mapped_counts
        batcher_add = self._batcher.add
        for outcome in outcomes:
            for mapped in outcome.mapped:
                label = (mapped.destination, mapped.event)
                mapped_counts[label] = mapped_counts.get(label, 0) + 1
                batcher_add(mapped.key, PendingEvent(inflight, outcome, mapped))
            for invalid in outcome.invalid:
                self._dead_letter_invalid(inflight, outcome, invalid)
            self._count_skip(outcome)
        inflight.finish_one()

    def _message_finished(self, message: InflightMessage) -> None:
        self._inflight -= 1
        self.messages_finished += 1
        if not message.tracker.revoked:
            message.tracker.finish(message.offset)
        if self._paused and self._inflight <= self._resume_below:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        if self._committer is not None:
            self._committer.set_paused(paused)
        self._log.info("backpressure " + ("on" if paused else "off"), inflight=self._inflight)

    def _count_skip(self, outcome: EventOutcome) -> None:
        if outcome.skipped is not None:
            counts = self._skipped_counts
            counts[outcome.skipped] = counts.get(outcome.skipped, 0) + 1

    def _flush_counts(self) -> None:
        """Add the per-batch event counts to the counters (one locked inc per label set)."""
        for (destination, event), count in self._mapped_counts.items():
            self._metrics.events_mapped.labels(destination=destination, event=event).inc(count)
        for reason, count in self._skipped_counts.items():
            self._metrics.events_skipped.labels(reason=reason).inc(count)
        self._mapped_counts.clear()
        self._skipped_counts.clear()

    # -- outcomes ------------------------------------------------------------------------------

    def on_delivered(self, events: Sequence[PendingEvent]) -> None:
        counts: dict[str, int] = {}
        for event in events:
            counts[event.mapped.destination] = counts.get(event.mapped.destination, 0) + 1
            event.message.finish_one()
        for destination, count in counts.items():
            self._metrics.events_delivered.labels(destination=destination).inc(count)

    def on_failed(self, events: Sequence[PendingEvent], failure: Failure) -> None:
        self._log.warning(
            "dead-lettering events",
            reason=failure.reason,
            destination=events[0].mapped.destination if events else None,
            events=len(events),
            code=failure.code,
            attempts=failure.attempts,
            error=failure.error,
        )
        for event in events:
            self._dead_letter(
                event.message,
                event.outcome,
                reason=failure.reason,
                error=failure.error,
                destination=event.mapped.destination,
                code=failure.code,
                attempts=failure.attempts,
            )

    def _dead_letter_invalid(
        self, message: InflightMessage, outcome: EventOutcome, invalid: InvalidEvent
    ) -> None:
        self._dead_letter(
            message,
            outcome,
            reason=invalid.reason,
            error=invalid.error,
            destination=invalid.destination,
        )

    def _dead_letter(
        self,
        message: InflightMessage,
        outcome: EventOutcome,
        *,
        reason: DeadLetterReason,
        error: str,
        destination: str | None,
        code: int | None = None,
        attempts: int = 0,
    ) -> None:
        """Write the event's own bytes with its provenance; the ack finishes one unit of work."""
        letter = DeadLetter(
            reason=reason,
            error=error,
            original_topic=message.topic,
            original_partition=message.partition,
            original_offset=message.offset,
            original_timestamp_ms=message.timestamp_ms,
            destination=destination,
            code=code,
            attempts=attempts,
            batch_index=outcome.index if outcome.multi else None,
        )
        self._dead_letters.send(
            value=outcome.raw, key=message.key, letter=letter, on_written=message.finish_one
        )
