"""In-process GCRA scheduler (reservation style), pure and clock-free.

GCRA keeps one number per key, the theoretical arrival time (TAT): the earliest moment the
next request may be sent if no burst is allowed. `reserve()` hands the caller the next free
slot and moves the TAT one emission interval forward, so concurrent callers queue in arrival
order (first come, first served) and nobody has to poll: each caller is told exactly how long
to sleep. With `burst=1` (the default) slots are exactly `1 / rate` apart, so no 1-second
window ever holds more than `rate` requests (+1 when a window edge falls on a slot).

The caller supplies `now` (seconds on any monotonic clock) so the class is deterministic and
trivially testable; the async limiters pass `time.monotonic()`.

A reservation that is not used (the caller was cancelled while sleeping) is simply lost: that
errs on the side of sending less, never more.
"""

from __future__ import annotations

import math


class LocalGcra:
    """Per-key reservation GCRA at `rate` requests per second with a burst of `burst` requests."""

    def __init__(self, *, rate: float, burst: int = 1) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self._interval = 1.0 / rate
        self._burst = burst
        self._tat: dict[str, float] = {}

    @property
    def interval(self) -> float:
        """Seconds between two slots (the emission interval)."""
        return self._interval

    @property
    def rate(self) -> float:
        return 1.0 / self._interval

    def set_rate(self, rate: float) -> None:
        """Change the rate; slots already handed out keep their times."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self._interval = 1.0 / rate

    def reserve(self, key: str, now: float, *, not_before: float | None = None) -> float:
        """Reserve the next slot for `key`; return how many seconds after `now` it starts (>= 0).

        `not_before` (an absolute time on the same clock) keeps the slot at or after that time,
        e.g. while a Retry-After pause is running.
        """
        tat = max(self._tat.get(key, now), now)
        if not_before is not None:
            tat = max(tat, not_before)
        tolerance = (self._burst - 1) * self._interval
        start = max(tat - tolerance, now)
        self._tat[key] = tat + self._interval
        return start - now

    def seed(self, key: str, not_before: float) -> None:
        """Make sure the next slot for `key` is not earlier than `not_before`.

        Used when taking over from another scheduler (Redis) whose slots this process still
        holds, so the two schedules do not overlap.
        """
        self._tat[key] = max(self._tat.get(key, not_before), not_before)

    def pending(self, key: str, now: float) -> int:
        """How many slots of `key` were handed out but start after `now` (not yet used)."""
        tat = self._tat.get(key)
        if tat is None or tat <= now:
            return 0
        return math.ceil((tat - now) / self._interval - 1e-9)

    def known_keys(self) -> list[str]:
        return list(self._tat)

    def forget_idle(self, now: float) -> None:
        """Drop keys whose schedule is in the past (they behave exactly like unknown keys)."""
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
