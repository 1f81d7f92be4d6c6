"""Where a parked event goes: the retry topic with a due time, or past its deadline the
dead-letter topic. Shared by the pipeline (fresh events) and the retry intake (parked events
that failed again), so both count the deadline from the same first failure.

Due time: now + the larger of the sender's hint (the circuit's pause, or the backoff the
in-memory retry stopped at) and a back-off that doubles with every parking
(`initial_backoff_s` * 2^parks, capped at `max_backoff_s`), so a destination that keeps failing
is not hammered through the retry topic; stretched by a random 0-50 % so that what was parked
during one pause does not all come due at one instant. An event whose next try would fall after
`retry.deadline_s` from its first failure is dead-lettered now (`auth_error` when the last
failure was an auth answer, else `retries_exhausted`).

Provenance: a fresh event's source record is its own message; an event read back from the
retry topic keeps the `retry.original.*` of the record it came from, so a dead letter always
points at the source topic, never at the retry topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import random as random_fraction

import msgspec

from worker.core.vocabulary import DeadLetterReason
from worker.delivery.inflight import InflightMessage, Parking, PendingEvent
from worker.kafka.deadletters import DeadLetter, DeadLetterProducer
from worker.kafka.parking import Parked, RetryProducer
from worker.mapping.mapper import EventOutcome
from worker.observability.logs import Logger

__all__ = [
    "DUE_SPREAD",
    "Parker",
    "ParkingRules",
    "Provenance",
    "give_up_reason",
    "provenance",
    "unmapped_outcome",
]

# Each parked event's pause is stretched by a random fraction up to this (see `Parker._spread`).
DUE_SPREAD = 0.5


def give_up_reason(failure: str) -> DeadLetterReason:
    """The dead-letter reason of an event that ran out of time, by its last failure's kind."""
    if failure == "auth_error":
        return DeadLetterReason.AUTH_ERROR
    return DeadLetterReason.RETRIES_EXHAUSTED


def unmapped_outcome(value: bytes | None) -> EventOutcome:
    """A parked record's bytes as an outcome, for dead-lettering it without mapping it."""
    return EventOutcome(0, False, value or b"", None, [], [], None)


@dataclass(frozen=True, slots=True)
class ParkingRules:
    deadline_s: float
    initial_backoff_s: float
    max_backoff_s: float

    def backoff(self, parks: int) -> float:
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2 ** min(parks, 30)))


@dataclass(frozen=True, slots=True)
class Provenance:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    batch_index: int | None


def provenance(message: InflightMessage, outcome: EventOutcome) -> Provenance:
    """The source record of an event, also when it was read back from the retry topic."""
    prior: Parked | None = message.parked
    if prior is not None:
        return Provenance(
            prior.original_topic,
            prior.original_partition,
            prior.original_offset,
            prior.original_timestamp_ms,
            prior.batch_index,
        )
    return Provenance(
        message.topic,
        message.partition,
        message.offset,
        message.timestamp_ms,
        outcome.index if outcome.multi else None,
    )


def dead_letter(
    dead_letters: DeadLetterProducer,
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
    source = provenance(message, outcome)
    prior: Parked | None = message.parked
    letter = DeadLetter(
        reason=reason,
        error=error,
        original_topic=source.topic,
        original_partition=source.partition,
        original_offset=source.offset,
        original_timestamp_ms=source.timestamp_ms,
        destination=destination,
        code=code,
        attempts=attempts,
        batch_index=source.batch_index,
        value_omitted=prior.value_omitted if prior is not None else None,
    )
    dead_letters.send(
        value=outcome.raw if letter.value_omitted is None else None,
        key=message.key,
        letter=letter,
        on_written=message.finish_one,
    )


class Parker:
    """Parks events (or dead-letters them past their deadline)."""

    def __init__(
        self,
        *,
        retry: RetryProducer,
        dead_letters: DeadLetterProducer,
        rules: ParkingRules,
        log: Logger,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = random_fraction,
    ) -> None:
        self._retry = retry
        self._dead_letters = dead_letters
        self._rules = rules
        self._log = log
        self._clock = clock
        self._random = random

    @property
    def rules(self) -> ParkingRules:
        return self._rules

    def _due(
        self, now: float, pause: float, first_failed_at: float, spread: float | None = None
    ) -> float:
        """`now + pause` stretched by up to `DUE_SPREAD` of the pause, never past the deadline:
        events parked during one circuit pause would otherwise all come due at the instant it
        ends, and the retry intake would re-park or map thousands at once while the other
        destinations wait for the CPU. `spread` (a random fraction) is drawn once per batch:
        batches are spread, and the records of one batch keep sharing their header encoding."""
        fraction = self._random() if spread is None else spread
        due = now + pause * (1.0 + DUE_SPREAD * fraction)
        return min(due, first_failed_at + self._rules.deadline_s - 0.001)

    def park_all(self, events: Sequence[PendingEvent], parking: Parking) -> None:
        """Park a failed batch: one clock reading and one spread, so its records share their
        times (and the encoding of the headers they share)."""
        now = self._clock()
        spread = self._random()
        for event in events:
            self.park(event, parking, now=now, spread=spread)

    def park(
        self,
        event: PendingEvent,
        parking: Parking,
        *,
        now: float | None = None,
        spread: float | None = None,
    ) -> None:
        message = event.message
        if message.dropped:
            return
        prior: Parked | None = message.parked
        if now is None:
            now = self._clock()
        if prior is not None:
            first = prior.first_failed_at
        else:
            first = parking.first_failed_at if parking.first_failed_at is not None else now
        attempts = (prior.attempts if prior is not None else 0) + parking.attempts
        parks = (prior.parks if prior is not None else 0) + 1
        pause = max(parking.retry_in_s, self._rules.backoff(parks - 1))
        destination = event.mapped.destination
        if now + pause >= first + self._rules.deadline_s:
            # The next try would come after the deadline: give up now.
            dead_letter(
                self._dead_letters,
                message,
                event.outcome,
                reason=give_up_reason(parking.failure),
                error=parking.error,
                destination=destination,
                code=parking.code,
                attempts=attempts,
            )
            return
        due = self._due(now, pause, first, spread)
        source = provenance(message, event.outcome)
        parked = Parked(
            destination=destination,
            subscription=event.mapped.subscription,
            reason=parking.reason,
            failure=parking.failure,
            error=parking.error,
            code=parking.code,
            attempts=attempts,
            parks=parks,
            first_failed_at=first,
            parked_at=now,
            due_at=due,
            original_topic=source.topic,
            original_partition=source.partition,
            original_offset=source.offset,
            original_timestamp_ms=source.timestamp_ms,
            batch_index=source.batch_index,
            value_omitted=prior.value_omitted if prior is not None else None,
        )
        self._retry.park(
            value=None if parked.value_omitted is not None else event.outcome.raw,
            key=message.key,
            parked=parked,
            on_written=message.finish_one,
        )

    def park_again(self, message: InflightMessage, value: bytes | None, retry_in_s: float) -> None:
        """A parked record due while its destination's circuit is still open: back to the
        retry topic as it is, not mapped again and with no request (its attempts, error and
        provenance unchanged), due after the circuit's pause; past the deadline it is
        dead-lettered instead. The write's acknowledgement finishes one unit of work."""
        prior: Parked = message.parked
        now = self._clock()
        parks = prior.parks + 1
        pause = max(retry_in_s, self._rules.backoff(parks - 1))
        if now + pause >= prior.first_failed_at + self._rules.deadline_s:
            dead_letter(
                self._dead_letters,
                message,
                unmapped_outcome(value),
                reason=give_up_reason(prior.failure),
                error=prior.error,
                destination=prior.destination,
                code=prior.code,
                attempts=prior.attempts,
            )
            return
        due = self._due(now, pause, prior.first_failed_at)
        parked = msgspec.structs.replace(
            prior, reason="circuit_open", parks=parks, parked_at=now, due_at=due
        )
        self._retry.park(value=value, key=message.key, parked=parked, on_written=message.finish_one)
