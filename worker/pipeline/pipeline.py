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
    paused until half have finished: first by not reading (librdkafka's pre-fetch queue is
    bounded), then, once the pause has lasted ``SOFT_PAUSE_S``, in librdkafka, so that the
    consumer keeps polling and stays in the group (``worker.kafka.consumer``).
    Paused that way for ``shed_after_s`` without a break, every lane is held to its fair share
    of the bound (``Sender.shed``): the events a slow lane holds beyond it are parked, so one
    destination slowed by its own rate limit cannot keep the others waiting.
(f) A revoked partition's work is drained (lanes flushed, deliveries awaited) for at most
    ``drain_timeout_s``; what finished is committed. What did not finish is dropped at once:
    it sends nothing more, dead-letters nothing, and its messages leave the in-flight count;
    the next owner re-reads it. A lost partition's work is dropped without draining.
(g) An unexpected exception while processing a message trips the fatal latch: the rest of the
    consumed batch is not begun, and no offset is committed from then on (not even at the
    revoke of the shutdown), so the failed message is read again by whoever comes next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from confluent_kafka import KafkaError, Message

from worker.core.vocabulary import DeadLetterReason, SkipReason
from worker.delivery.inflight import Failure, InflightMessage, Parking, PendingEvent
from worker.delivery.sender import Sender
from worker.errors import FatalLatch, WorkerError
from worker.kafka.consumer import PauseSwitch
from worker.kafka.deadletters import DeadLetterProducer
from worker.kafka.offsets import OffsetLedger
from worker.kafka.settings import TopicPartitionKey
from worker.mapping.mapper import EventOutcome, InvalidEvent, Mapper
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics
from worker.pipeline.parker import Parker, dead_letter, give_up_reason

DRAIN_POLL_S = 0.02
# How long the in-flight bound may keep the source paused before slow lanes are held to
# their share: far longer than a healthy backlog drain needs to free half the bound.
SHED_AFTER_S = 10.0


class Pipeline:
    """Receives consumed messages on the event loop and drives them to a committable state."""

    def __init__(
        self,
        *,
        mapper: Mapper,
        sender: Sender,
        dead_letters: DeadLetterProducer,
        ledger: OffsetLedger,
        pause: PauseSwitch,
        fatal: FatalLatch,
        metrics: Metrics,
        log: Logger,
        max_inflight_messages: int,
        drain_timeout_s: float,
        parker: Parker | None = None,
        shed_after_s: float | None = None,
    ) -> None:
        self._mapper = mapper
        self._sender = sender
        self._dead_letters = dead_letters
        self._parker = parker
        self._ledger = ledger
        self._pause = pause
        self._fatal = fatal
        self._metrics = metrics
        self._log = log
        self._max_inflight = max_inflight_messages
        self._resume_below = max_inflight_messages // 2
        self._drain_timeout_s = drain_timeout_s
        self._shed_after_s = shed_after_s
        self._shed_timer: asyncio.TimerHandle | None = None
        # Unfinished messages by partition and offset: what a revoke or loss drops.
        self._open: dict[TopicPartitionKey, dict[int, InflightMessage]] = {}
        self._inflight = 0
        self._mapped_counts: dict[tuple[str, str], int] = {}
        self._skipped_counts: dict[SkipReason, int] = {}
        self.messages_finished = 0
        fatal.subscribe(self._on_fatal_tripped)

    @property
    def inflight_messages(self) -> int:
        return self._inflight

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal.error

    # -- consumer callbacks (event loop) -------------------------------------------------------

    def on_messages(self, messages: Sequence[Message]) -> None:
        consumed: dict[str, int] = {}
        for msg in messages:
            if self._fatal.error is not None:
                break  # nothing after a failed message is begun (invariant g)
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
            try:
                self._process(msg, (topic, partition), offset)
            except Exception as exc:
                self._fatal.trip(
                    WorkerError(
                        f"processing {topic}[{partition}] offset {offset} failed: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )
        for topic, count in consumed.items():
            self._metrics.messages_consumed.labels(topic=topic).inc(count)
        self._flush_counts()
        self._show_inflight()
        if not self._pause.paused and self._inflight >= self._max_inflight:
            self._set_paused(True)

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._drop(partitions)  # leftovers of an earlier generation, if any
        self._ledger.assign(partitions)

    async def on_revoked(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Drain the revoked partitions' work (bounded), drop the rest, return commit offsets."""
        self._sender.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout_s
        while (
            self._draining(partitions)
            and loop.time() < deadline
            and self._fatal.error is None  # after a fatal error nothing more will finish
        ):
            await asyncio.sleep(DRAIN_POLL_S)
        offsets = self._ledger.release(partitions)
        dropped = self._drop(partitions)
        if dropped:
            self._log.warning(
                "drain timed out; unfinished work dropped for the next owner", messages=dropped
            )
        return offsets

    def _show_inflight(self) -> None:
        """The in-flight gauge is the source topics' (the retry intake keeps out of it)."""
        self._metrics.inflight_messages.set(self._inflight)

    def _draining(self, partitions: Sequence[TopicPartitionKey]) -> int:
        """Messages of `partitions` a revoke waits for."""
        return self._ledger.inflight(partitions)

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._ledger.release(partitions)
        dropped = self._drop(partitions)
        if dropped:
            self._log.warning("partitions lost; unfinished work dropped", messages=dropped)

    def on_fatal(self, error: BaseException) -> None:
        self._fatal.trip(error)

    def _on_fatal_tripped(self, error: BaseException) -> None:
        self._ledger.halt()
        self._log.error("fatal error; stopping", error=str(error))

    def _drop(self, partitions: Sequence[TopicPartitionKey]) -> int:
        """Drop every unfinished message of `partitions`; frees their share of the bounds."""
        dropped = 0
        for key in partitions:
            messages = self._open.pop(key, None)
            if not messages:
                continue
            for message in messages.values():
                message.dropped = True
            dropped += len(messages)
        if dropped:
            self._inflight -= dropped
            self._sender.purge()
            self._show_inflight()
            if self._pause.paused and self._inflight <= self._resume_below:
                self._set_paused(False)
        return dropped

    # -- per message ---------------------------------------------------------------------------

    def _process(self, msg: Message, key: TopicPartitionKey, offset: int) -> None:
        # Mapped before the offset is begun: if this raises, the fatal latch halts the ledger,
        # so the offset is never committed either way.
        outcomes = self._mapper.map_message(msg.value())
        if len(outcomes) == 1:  # one event per message: no generator
            work = len(outcomes[0].mapped) + len(outcomes[0].invalid)
        else:
            work = sum(len(o.mapped) + len(o.invalid) for o in outcomes)
        if work == 0:  # nothing to send or dead-letter: finished right away
            for outcome in outcomes:
                self._count_skip(outcome)
            self._ledger.skip(key, offset)
            self.messages_finished += 1
            return
        self._ledger.begin(key, offset)
        self._inflight += 1
        _ts_type, timestamp_ms = msg.timestamp()
        # One unit of work per event outcome plus one held while dispatching, so nothing
        # finishes the message before all of its work is registered. (Positional: the
        # fields' order, owner topic partition offset timestamp_ms key remaining.)
        inflight = InflightMessage(
            self,
            key[0],
            key[1],
            offset,
            timestamp_ms if timestamp_ms > 0 else None,
            msg.key(),
            1 + work,
        )
        open_messages = self._open.get(key)
        if open_messages is None:
            open_messages = self._open[key] = {}
        open_messages[offset] = inflight
        mapped_counts = self._mapped_counts
        sender_add = self._sender.add
        for outcome in outcomes:
            for mapped in outcome.mapped:
                label = (mapped.destination, mapped.event)
                mapped_counts[label] = mapped_counts.get(label, 0) + 1
                sender_add(mapped.key, PendingEvent(inflight, outcome, mapped))
            for invalid in outcome.invalid:
                self._dead_letter_invalid(inflight, outcome, invalid)
            self._count_skip(outcome)
        inflight.finish_one()

    def message_finished(self, message: InflightMessage) -> None:
        """A message's last unit of work finished (`InflightMessage.finish_one`). Deliveries
        finish theirs through `_messages_finished`, which must do the same per message."""
        key = (message.topic, message.partition)
        open_messages = self._open.get(key)
        if open_messages is not None:
            open_messages.pop(message.offset, None)
        self._inflight -= 1
        # Kept current here too: once the input stops, no consumed batch would update it, and
        # the gauge showed the last batch's figure (10,002 on a drained worker) for good.
        self._show_inflight()
        self.messages_finished += 1
        self._ledger.finish(key, message.offset)
        if self._pause.paused and self._inflight <= self._resume_below:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self._pause.paused = paused
        self._log.info("backpressure " + ("on" if paused else "off"), inflight=self._inflight)
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        if paused and self._shed_after_s is not None:
            loop = asyncio.get_running_loop()
            self._shed_timer = loop.call_later(self._shed_after_s, self._shed_if_still_paused)

    def _shed_if_still_paused(self) -> None:
        """Paused for `shed_after_s` without a break: hold each lane to its fair share of the
        bound (invariant e); look again after as long while still paused."""
        self._shed_timer = None
        if not self._pause.paused or self._shed_after_s is None:
            return
        lanes = self._sender.lane_count
        if lanes >= 2:  # one lane alone is plain backpressure: nobody else is waiting
            self._sender.shed(max(1, self._max_inflight // lanes))
        loop = asyncio.get_running_loop()
        self._shed_timer = loop.call_later(self._shed_after_s, self._shed_if_still_paused)

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
        """One accepted request: `finish_one` for each event, with the messages it finishes
        handed to the ledger together (one call per partition, not one per message)."""
        counts: dict[str, int] = {}
        finished: list[InflightMessage] = []
        for event in events:
            destination = event.mapped.destination
            counts[destination] = counts.get(destination, 0) + 1
            message = event.message
            if message.dropped:
                continue
            message.remaining -= 1
            if message.remaining == 0:
                finished.append(message)
            elif message.remaining < 0:  # pragma: no cover - a bug, never silently tolerated
                raise AssertionError(f"offset {message.offset} finished more often than begun")
        if finished:
            self._messages_finished(finished)
        for destination, count in counts.items():
            self._metrics.events_delivered.labels(destination=destination).inc(count)

    def _messages_finished(self, messages: list[InflightMessage]) -> None:
        """`message_finished` for several messages at once."""
        by_key: dict[TopicPartitionKey, list[int]] = {}
        open_by_key = self._open
        for message in messages:
            key = (message.topic, message.partition)
            offsets = by_key.get(key)
            if offsets is None:
                offsets = by_key[key] = []
            offsets.append(message.offset)
            open_messages = open_by_key.get(key)
            if open_messages is not None:
                open_messages.pop(message.offset, None)
        self._inflight -= len(messages)
        self._show_inflight()  # as in message_finished
        self.messages_finished += len(messages)
        for key, offsets in by_key.items():
            self._ledger.finish_many(key, offsets)
        if self._pause.paused and self._inflight <= self._resume_below:
            self._set_paused(False)

    def on_failed(self, events: Sequence[PendingEvent], failure: Failure) -> None:
        events = [e for e in events if not e.message.dropped]
        if not events:
            return
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

    def on_parked(self, events: Sequence[PendingEvent], parking: Parking) -> None:
        parker = self._parker
        if parker is None:  # built without a retry topic: parking means giving up
            reason = give_up_reason(parking.failure)
            self.on_failed(events, Failure(reason, parking.error, parking.code, parking.attempts))
            return
        parker.park_all(events, parking)

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
        dead_letter(
            self._dead_letters,
            message,
            outcome,
            reason=reason,
            error=error,
            destination=destination,
            code=code,
            attempts=attempts,
        )
