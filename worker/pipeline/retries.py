"""The retry intake: the workers' second consumer, on `kafka.retry_topic` (SPEC §4, Parking).

It runs as its own consumer group (`<group_id>.retry`) with its own pause switch and ledger,
so a backlog of parked events never pauses the source topic, and the source never pauses it.
For each parked record (`worker.kafka.parking.Parked`):

- past `retry.deadline_s` from its first failure: dead-lettered (`auth_error` when the last
  failure was an auth answer, else `retries_exhausted`) with the source record's provenance;
- its destination no longer configured: dead-lettered (`invalid_event`);
- reference-only (the event was too large for the retry topic): dead-lettered reference-only;
- not yet due: held in memory until its due time (`worker.pipeline.due.DueQueue`: records
  that come due together are handed over a slice per turn of the event loop). Held records
  count as in flight, so above `max_inflight_messages` the retry topic is paused until half
  have gone;
- its destination's circuit is open (or half-open with its probe out) and its partition holds
  no other destination's records (`worker.kafka.parking.RetryLayout`): the partition is left
  unread from this record on (the consumer pauses it and seeks back to it) until the circuit
  may be tried again or closes (a record within `max_open_s` of its deadline is read as usual,
  so it is dead-lettered on time). Nothing from that offset on has begun, so the commit stops
  there: the backlog waits in Kafka, not here, and is not read and parked again every pause;
- due while its destination's circuit is open on a shared partition: parked again as it is
  (not mapped, no request) with a due time after the circuit's pause, so it never waits here
  or in the lane and never holds another destination's parked events;
- when the probe is due, one request's worth (`tiktok.max_batch_events`) goes to the lane (on a
  partition of its own whether due or not; the partition is then held again); the rest of a
  shared partition is parked again;
- due otherwise: mapped again for its destination and subscription only and queued in that
  destination's lane, through the same rate limiter (a lane whose circuit opened meanwhile
  parks it again at once). When the destination's circuit closes
  again (a probe succeeded), its records held here, and those read later that were parked
  before it closed, go at once instead of waiting for due times set while it was down.

Its offset finishes like a source message's: delivered, dead-lettered or parked again, with
the broker's acknowledgement. A revoke drops the records still waiting for their due time at
once (the next owner re-reads them) and drains only those already handed to a lane.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from confluent_kafka import Message

from worker.core.vocabulary import DeadLetterReason, SkipReason
from worker.delivery.circuit import CircuitState
from worker.delivery.inflight import InflightMessage, PendingEvent
from worker.delivery.sender import Sender
from worker.errors import FatalLatch, WorkerError
from worker.kafka.consumer import PauseSwitch
from worker.kafka.deadletters import DeadLetterProducer
from worker.kafka.dlq_reader import decode_headers
from worker.kafka.offsets import OffsetLedger
from worker.kafka.parking import PROBE_HEADER, RETRY_PREFIX, Parked, RetryLayout, retry_group_id
from worker.kafka.settings import TopicPartitionKey
from worker.mapping.mapper import Mapper
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics
from worker.pipeline.due import DueQueue
from worker.pipeline.parker import Parker, dead_letter, give_up_reason, unmapped_outcome
from worker.pipeline.pipeline import Pipeline

__all__ = ["PROBE_EVENTS", "PartitionHolder", "RetryIntake", "retry_group_id"]

# Parked events of a destination whose probe is due that go to its lane at once: one full
# request (by default TikTok's batch maximum; the app passes `tiktok.max_batch_events`); the
# others are parked again (or left unread) instead of mapped for nothing.
PROBE_EVENTS = 1000
# A held partition whose circuit has no pause left (its probe is due or out) is released by
# the circuit's next change; this timer only bounds the wait if that change never comes.
HOLD_FALLBACK_S = 1.0

# What `RetryIntake._verdict` decides for a record.
_READ, _PROBE, _HOLD = object(), object(), object()


class PartitionHolder(Protocol):
    """The retry topic's consumer (`worker.kafka.consumer.ConsumerThread`)."""

    def hold(self, key: TopicPartitionKey, offset: int) -> asyncio.Future[bool]: ...

    def release(self, key: TopicPartitionKey) -> None: ...


class RetryIntake(Pipeline):
    """Delivers parked events when due, each to its own destination."""

    def __init__(
        self,
        *,
        mapper: Mapper,
        sender: Sender,
        dead_letters: DeadLetterProducer,
        parker: Parker,
        destinations: Sequence[str],
        ledger: OffsetLedger,
        pause: PauseSwitch,
        fatal: FatalLatch,
        metrics: Metrics,
        log: Logger,
        max_inflight_messages: int,
        drain_timeout_s: float,
        layout: RetryLayout | None = None,
        probe_events: int = PROBE_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            mapper=mapper,
            sender=sender,
            dead_letters=dead_letters,
            ledger=ledger,
            pause=pause,
            fatal=fatal,
            metrics=metrics,
            log=log,
            max_inflight_messages=max_inflight_messages,
            drain_timeout_s=drain_timeout_s,
            parker=parker,
        )
        self._deadline_s = parker.rules.deadline_s
        self._destinations = frozenset(destinations)
        self._clock = clock
        # Records read before their due time: the queue holds them, `_values` their values.
        self._held: DueQueue[InflightMessage] = DueQueue(self._due, clock=clock)
        self._values: dict[InflightMessage, bytes | None] = {}
        # When each destination's circuit last closed here (wall time): a record parked
        # before that need not wait for its due time.
        self._closed_at: dict[str, float] = {}
        # Parked events handed to a lane since its circuit last changed, while not closed.
        self._probe_events: dict[str, int] = {}
        self._probe_limit = probe_events
        # Partitions left unread while their one destination is down (`_hold`): the holds
        # not yet applied by the consumer (their records are ignored), the holds (destination
        # and the deadline of the record held at), and the offset each must be read from again.
        self._layout = layout
        self._holder: PartitionHolder | None = None
        self._hold_futures: dict[TopicPartitionKey, asyncio.Future[bool]] = {}
        self._holds: dict[TopicPartitionKey, tuple[str, float]] = {}
        self._release_timers: dict[TopicPartitionKey, asyncio.TimerHandle] = {}
        self._rewound_to: dict[TopicPartitionKey, int] = {}
        sender.watch_circuits(self._circuit_changed)

    @property
    def waiting(self) -> int:
        """Parked events read and held until their due time."""
        return len(self._held)

    # -- per record ----------------------------------------------------------------------------

    def _process(self, msg: Message, key: TopicPartitionKey, offset: int) -> None:
        if key in self._hold_futures or key in self._holds:
            return  # read before its partition was held: read again when it is released
        expected = self._rewound_to.pop(key, None)
        if expected is not None and offset != expected:
            # The rewind did not take effect: beginning this record would let the commit pass
            # the records skipped since `expected` (they are read again after a restart).
            raise WorkerError(f"{key[0]}[{key[1]}] read at {offset} after a rewind to {expected}")
        headers = decode_headers(msg.headers())
        if PROBE_HEADER in headers:  # the start-up check's write: nothing to do
            self._ledger.skip(key, offset)
            self.messages_finished += 1
            return
        parked: Parked | None = None
        unreadable = ""
        try:
            parked = Parked.from_headers(headers)
        except ValueError as exc:
            unreadable = str(exc)
        verdict = self._verdict(key, parked) if parked is not None else _READ
        if verdict is _HOLD:
            assert parked is not None
            self._hold(key, offset, parked.destination, parked.first_failed_at + self._deadline_s)
            return
        self._ledger.begin(key, offset)
        _ts_type, timestamp_ms = msg.timestamp()
        message = InflightMessage(
            owner=self,
            topic=key[0],
            partition=key[1],
            offset=offset,
            timestamp_ms=timestamp_ms if timestamp_ms > 0 else None,
            key=msg.key(),
        )
        self._inflight += 1
        self._open.setdefault(key, {})[offset] = message
        message.add_work(1)  # held until the record is dispatched or given up
        value = msg.value()
        if parked is None:
            self._give_up(
                message,
                value,
                DeadLetterReason.DECODE_ERROR,
                f"unreadable parked record: {unreadable}",
                headers.get(RETRY_PREFIX + "destination") or None,
            )
            return
        message.parked = parked
        now = self._clock()
        if now >= parked.first_failed_at + self._deadline_s:
            reason = give_up_reason(parked.failure)
            self._give_up(message, value, reason, parked.error, parked.destination, parked)
            return
        if parked.destination not in self._destinations:
            error = f"destination {parked.destination!r} is no longer configured"
            reason = DeadLetterReason.INVALID_EVENT
            self._give_up(message, value, reason, error, parked.destination, parked)
            return
        if parked.value_omitted is not None:
            error = "too large for the retry topic, not delivered: " + parked.error
            reason = DeadLetterReason.RETRIES_EXHAUSTED
            self._give_up(message, None, reason, error, parked.destination, parked)
            return
        delay = parked.due_at - now
        if (
            delay <= 0
            or verdict is _PROBE
            or parked.parked_at < self._closed_at.get(parked.destination, 0.0)
        ):
            self._dispatch(message, value)
            return
        self._values[message] = value
        self._held.add(message, parked.due_at)
        self._metrics.parked_waiting.inc()

    # -- a down destination's own partition is left unread ---------------------------------------

    def attach(self, holder: PartitionHolder) -> None:
        """The retry topic's consumer, once built: it holds and releases partitions."""
        self._holder = holder

    def _verdict(self, key: TopicPartitionKey, parked: Parked) -> object:
        """_HOLD: the record's destination is down and the partition holds no other
        destination's records, so reading on would only park them again; _PROBE: its probe
        is due and this record goes to its lane (not held to its due time); else _READ."""
        destination = parked.destination
        if (
            self._holder is None
            or self._layout is None
            or self._layout.sole_destination(key[1]) != destination
            or not self._ledger.owns(key)
        ):
            return _READ
        circuit = self._sender.circuit(destination)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return _READ
        retry_in = circuit.retry_in()
        if parked.first_failed_at + self._deadline_s <= self._clock() + max(
            retry_in, circuit.longest_pause_s
        ):
            # It may run out before the destination is tried again: read as usual (held in
            # memory until due), so it is dead-lettered at its deadline, not a pause later.
            return _READ
        if retry_in <= 0 and self._probe_events.get(destination, 0) < self._probe_limit:
            return _PROBE
        return _HOLD

    def _hold(
        self, key: TopicPartitionKey, offset: int, destination: str, deadline_at: float
    ) -> None:
        """Leave partition `key` unread from `offset` on until the destination may be tried
        again (or its circuit closes), or the record at `offset` reaches its deadline
        (`deadline_at`, wall time: it is then dead-lettered on time, not a pause later).
        Nothing from `offset` on has begun, so the commit stops at `offset`: the records stay
        in Kafka, not in memory, and cost nothing meanwhile."""
        assert self._holder is not None
        self._holds[key] = (destination, deadline_at)
        future = self._holder.hold(key, offset)
        self._hold_futures[key] = future
        future.add_done_callback(lambda done: self._hold_applied(key, offset, done))
        self._arm_release(key, destination)
        self._log.debug("retry partition held", partition=key[1], destination=destination)

    def _hold_applied(
        self, key: TopicPartitionKey, offset: int, future: asyncio.Future[bool]
    ) -> None:
        if self._hold_futures.get(key) is not future:
            return  # dropped meanwhile (revoke, loss, shutdown)
        del self._hold_futures[key]
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._fatal.trip(
                WorkerError(f"rewinding {key[0]}[{key[1]}] to offset {offset} failed: {error}")
            )
        elif future.result():
            self._rewound_to[key] = offset

    def _arm_release(self, key: TopicPartitionKey, destination: str) -> None:
        """Release the partition when the destination may be tried again."""
        timer = self._release_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        circuit = self._sender.circuit(destination)
        wait = circuit.retry_in() if circuit is not None else 0.0
        # No pause left (the probe is due, or out with its events): the circuit's change
        # releases it; the timer only makes sure it is never held for good.
        delay = wait + 0.01 if wait > 0 else HOLD_FALLBACK_S
        held = self._holds.get(key)
        if held is not None:
            delay = min(delay, max(0.01, held[1] - self._clock() + 0.01))
        loop = asyncio.get_running_loop()
        self._release_timers[key] = loop.call_later(delay, self._release, key)

    def _release(self, key: TopicPartitionKey) -> None:
        if self._holds.pop(key, None) is None:
            return
        timer = self._release_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        assert self._holder is not None
        self._holder.release(key)

    def _forget_holds(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """The consumer forgets its holds of revoked or lost partitions; so does the intake."""
        for key in partitions:
            self._rewound_to.pop(key, None)
            self._hold_futures.pop(key, None)
            self._holds.pop(key, None)
            timer = self._release_timers.pop(key, None)
            if timer is not None:
                timer.cancel()

    def _give_up(
        self,
        message: InflightMessage,
        value: bytes | None,
        reason: DeadLetterReason,
        error: str,
        destination: str | None,
        parked: Parked | None = None,
    ) -> None:
        dead_letter(
            self._dead_letters,
            message,
            unmapped_outcome(value),
            reason=reason,
            error=error,
            destination=destination,
            code=parked.code if parked is not None else None,
            attempts=parked.attempts if parked is not None else 0,
        )

    def _due(self, message: InflightMessage) -> None:
        value = self._values.pop(message, None)
        self._metrics.parked_waiting.dec()
        if message.dropped:
            return
        try:
            self._dispatch(message, value)
        except Exception as exc:
            self._fatal.trip(
                WorkerError(
                    f"processing {message.topic}[{message.partition}] offset {message.offset} "
                    f"failed: {type(exc).__name__}: {exc}"
                )
            )

    def _circuit_changed(self, destination: str, state: CircuitState) -> None:
        """A destination is back: its partition is read again, and its parked events held
        here need not wait for their due times (those were set while it was down): they go to
        its lane at once. Still down: its held partition waits for the new pause."""
        self._probe_events.pop(destination, None)
        held = [key for key, (owner, _deadline) in self._holds.items() if owner == destination]
        for key in held:
            if state is CircuitState.CLOSED:
                self._release(key)
            else:
                self._arm_release(key, destination)
        if state is not CircuitState.CLOSED:
            return
        self._closed_at[destination] = self._clock()
        released = [m for m in self._held if m.parked.destination == destination]
        for message in released:
            self._held.release(message)  # handed over a slice per turn, never from in here
        if released:
            self._log.info(
                "circuit closed: parked events released",
                destination=destination,
                events=len(released),
            )

    def _dispatch(self, message: InflightMessage, value: bytes | None) -> None:
        """Map the event again for its own destination and subscription; queue it in its lane.
        While the destination's circuit is open it goes back to the retry topic as it is."""
        parked: Parked = message.parked
        circuit = self._sender.circuit(parked.destination)
        if circuit is not None and circuit.state is not CircuitState.CLOSED and self._parker:
            # Mapping it only for the lane to park it again costs more than the parking.
            retry_in = circuit.retry_in()
            if retry_in > 0:  # open, or half-open with its probe still out
                self._parker.park_again(message, value, retry_in)
                return
            # The probe is due: one request's worth goes to the lane (the probe is among
            # them); the rest, all due at this same moment, wait for the next pause.
            sent = self._probe_events.get(parked.destination, 0)
            if sent >= self._probe_limit:
                self._parker.park_again(message, value, 0.0)
                return
            self._probe_events[parked.destination] = sent + 1
        for outcome in self._mapper.map_message(value):
            for mapped in outcome.mapped:
                if mapped.destination != parked.destination:
                    continue  # another destination already has it
                if parked.subscription and mapped.subscription != parked.subscription:
                    continue
                message.add_work(1)
                self._sender.add(mapped.key, PendingEvent(message, outcome, mapped))
            for invalid in outcome.invalid:
                if invalid.destination in (None, parked.destination):
                    message.add_work(1)
                    self._dead_letter_invalid(message, outcome, invalid)
        if message.remaining == 1:  # maps to nothing any more (config changed, too old)
            no_match = SkipReason.NO_MATCH
            self._skipped_counts[no_match] = self._skipped_counts.get(no_match, 0) + 1
            self._flush_counts()
        message.finish_one()

    def _show_inflight(self) -> None:
        # `tiktok_worker_inflight_messages` is the source topics' backpressure; parked records
        # held here show in `tiktok_worker_parked_waiting_events` instead.
        return

    # -- revoke and loss -------------------------------------------------------------------------

    def _draining(self, partitions: Sequence[TopicPartitionKey]) -> int:
        # Records waiting for their due time would only time the drain out: they are dropped
        # (the next owner re-reads them); only those already in a lane are waited for.
        wanted = set(partitions)
        waiting = sum(1 for m in self._held if (m.topic, m.partition) in wanted)
        return self._ledger.inflight(partitions) - waiting

    def _drop(self, partitions: Sequence[TopicPartitionKey]) -> int:
        self._forget_holds(partitions)
        wanted = set(partitions)
        for message in [m for m in self._held if (m.topic, m.partition) in wanted]:
            self._held.remove(message)
            self._values.pop(message, None)
            self._metrics.parked_waiting.dec()
        return super()._drop(partitions)

    async def close(self) -> None:
        """Cancel every timer (shutdown after the consumer closed)."""
        self._forget_holds(list(self._holds) + list(self._hold_futures))
        self._metrics.parked_waiting.dec(len(self._held))
        self._held.clear()
        self._values.clear()
