"""A circuit breaker per destination (SPEC §4, `tiktok.circuit.*`).

`failure_threshold` consecutive failed requests (retryable, throttled past the in-memory
window, or auth/permission) open the circuit. While it is open the destination's events are
parked at once, without a request. After `open_s` the next batch is let through as the one
probe (half-open): an answer from TikTok that is not a failure closes the circuit, a failure
opens it again for twice as long (up to `max_open_s`). A probe that never reports (its
partition was revoked mid-way) is replaced after one open period, so the circuit cannot stay
half-open for ever.

The clock is injectable and monotonic; `retry_at_wall` converts "when may this destination be
tried again" to wall time for the due time of parked records.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Circuit", "CircuitPolicy", "CircuitState", "Verdict"]


class CircuitState(enum.IntEnum):
    """The values of `tiktok_worker_destination_circuit_state`."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Verdict(enum.Enum):
    SEND = "send"  # closed: send as usual
    PROBE = "probe"  # this request is the one probe of a half-open circuit
    PARK = "park"  # open (or a probe is out): park without a request


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    failure_threshold: int
    open_s: float
    max_open_s: float


class Circuit:
    """The breaker of one destination. Not thread-safe: used on the event loop only."""

    __slots__ = (
        "_clock",
        "_failures",
        "_on_change",
        "_open_for",
        "_open_until",
        "_policy",
        "_probe_since",
        "destination",
        "state",
    )

    def __init__(
        self,
        destination: str,
        policy: CircuitPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, CircuitState], None] | None = None,
    ) -> None:
        self.destination = destination
        self._policy = policy
        self._clock = clock
        self._on_change = on_change
        self.state = CircuitState.CLOSED
        self._failures = 0
        self._open_for = policy.open_s
        self._open_until = 0.0
        self._probe_since = 0.0

    def allow(self) -> Verdict:
        """May a request be sent now? PROBE moves the circuit to half-open."""
        if self.state is CircuitState.CLOSED:
            return Verdict.SEND
        now = self._clock()
        if self.state is CircuitState.OPEN:
            if now < self._open_until:
                return Verdict.PARK
        elif now - self._probe_since < self._open_for:  # half-open, its probe still out
            return Verdict.PARK
        self._probe_since = now
        self._set(CircuitState.HALF_OPEN)
        return Verdict.PROBE

    def succeeded(self) -> None:
        """TikTok answered and the answer was not a failure of the destination."""
        self._failures = 0
        self._open_for = self._policy.open_s
        self._set(CircuitState.CLOSED)

    def failed(self) -> None:
        """One failed request (retryable, auth, or throttled past the in-memory window)."""
        if self.state is CircuitState.HALF_OPEN:
            # The probe failed: stay away twice as long as last time.
            self._open_for = min(self._open_for * 2, self._policy.max_open_s)
            self._open(self._open_for)
            return
        if self.state is CircuitState.OPEN:
            return  # a request that started before the circuit opened
        self._failures += 1
        if self._failures >= self._policy.failure_threshold:
            self._open(self._open_for)

    def probe_unused(self) -> None:
        """The probe was granted but nothing was sent (its events were dropped)."""
        if self.state is CircuitState.HALF_OPEN:
            self._open_until = self._clock()
            self._set(CircuitState.OPEN)

    @property
    def longest_pause_s(self) -> float:
        """The longest it ever stays open (`max_open_s`)."""
        return self._policy.max_open_s

    def retry_in(self) -> float:
        """Seconds until this destination may be tried again (0 when closed)."""
        now = self._clock()
        if self.state is CircuitState.OPEN:
            return max(0.0, self._open_until - now)
        if self.state is CircuitState.HALF_OPEN:
            return max(0.0, self._probe_since + self._open_for - now)
        return 0.0

    def retry_at_wall(self, *, wall: Callable[[], float] = time.time) -> float:
        return wall() + self.retry_in()

    def _open(self, duration: float) -> None:
        self._failures = 0
        self._open_until = self._clock() + duration
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is self.state:
            return
        self.state = state
        if self._on_change is not None:
            self._on_change(self.destination, state)
