"""Adaptive slow-down after TikTok throttles this worker (40100 / HTTP 429).

The shared limit (Redis or local) is what the operator configured; TikTok may still throttle
(the configured qps is wrong, another system uses the same app, Redis is down and the
fallback guess is too high). This controller is an extra, per-key, per-worker gate a request
must pass *before* it asks the shared limiter for a slot:

- Multiplicative decrease: on a throttle signal the worker's cap becomes `decrease_factor`
  times the rate it actually achieved over the last `window_s` seconds (or times the current
  cap, whichever is lower), floored at `min_rate`. Signals arriving within `cooldown_s` of the
  last decrease belong to the same episode (many in-flight requests are rejected together)
  and do not cut again.
- Recovery: after `hold_s` the cap grows multiplicatively by `recovery_per_s` per second
  (continuously); once it reaches `max_rate` (the configured qps) the cap is removed.
- Retry-After: every request of the key waits until the pause (capped at
  `max_retry_after_s`) has passed.

All methods take `now` (seconds, monotonic) so the controller is deterministic under test.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """Tuning of the adaptive gate; the defaults halve on throttle and recover in seconds."""

    decrease_factor: float = 0.5
    min_rate: float = 1.0
    cooldown_s: float = 1.0
    hold_s: float = 1.0
    recovery_per_s: float = 0.25
    window_s: float = 2.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.decrease_factor < 1:
            raise ValueError("decrease_factor must be in (0, 1)")
        if not self.min_rate > 0:
            raise ValueError("min_rate must be > 0")
        if not self.recovery_per_s > 0:
            raise ValueError("recovery_per_s must be > 0")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")


@dataclass(slots=True)
class _KeyState:
    grants: deque[float] = field(default_factory=deque)
    cap: float | None = None  # req/s right after the last decrease; None = no cap
    decreased_at: float = -math.inf
    paused_until: float = -math.inf
    next_at: float = -math.inf  # next free slot under the cap (reservation pacing)


class AdaptiveGate:
    """Per-key AIMD-style cap (multiplicative both ways) plus Retry-After pauses."""

    def __init__(self, *, max_rate: float, settings: AdaptiveSettings | None = None) -> None:
        if not max_rate > 0:
            raise ValueError("max_rate must be > 0")
        self._max_rate = max_rate
        self._s = settings if settings is not None else AdaptiveSettings()
        self._state: dict[str, _KeyState] = {}

    @property
    def settings(self) -> AdaptiveSettings:
        return self._s

    def _key(self, key: str) -> _KeyState:
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = _KeyState()
        return st

    def cap(self, key: str, now: float) -> float | None:
        """The current cap of `key` in requests/s, or None when the worker is not slowed down."""
        st = self._state.get(key)
        if st is None or st.cap is None:
            return None
        grow_for = now - st.decreased_at - self._s.hold_s
        if grow_for <= 0:
            return st.cap
        cap = st.cap * math.exp(math.log1p(self._s.recovery_per_s) * grow_for)
        if cap >= self._max_rate:
            st.cap = None  # fully recovered
            return None
        return cap

    def observed_rate(self, key: str, now: float) -> float:
        """Grants per second for `key` over the last `window_s` seconds."""
        st = self._state.get(key)
        if st is None:
            return 0.0
        self._trim(st, now)
        return len(st.grants) / self._s.window_s

    def paused_for(self, key: str, now: float) -> float:
        """Seconds left of a Retry-After pause for `key` (0 when none)."""
        st = self._state.get(key)
        return 0.0 if st is None else max(0.0, st.paused_until - now)

    def on_throttled(self, key: str, retry_after_s: float | None, now: float) -> None:
        """TikTok throttled a request of `key`: pause for Retry-After and cut the cap."""
        st = self._key(key)
        if retry_after_s is not None and retry_after_s > 0 and math.isfinite(retry_after_s):
            pause = min(retry_after_s, self._s.max_retry_after_s)
            st.paused_until = max(st.paused_until, now + pause)
        if now - st.decreased_at < self._s.cooldown_s:
            return  # same episode: the in-flight requests of one burst all come back throttled
        current = self.cap(key, now)
        observed = self.observed_rate(key, now)
        base = current if current is not None else self._max_rate
        if observed > 0:
            base = min(base, observed)
        st.cap = max(self._s.min_rate, base * self._s.decrease_factor)
        st.decreased_at = now

    def reserve(self, key: str, now: float) -> float:
        """Reserve passage through the gate; return seconds to wait from `now` (>= 0).

        Call `paused_for()` first (and sleep) if a pause may be running; this reserves a slot
        under the cap, or returns 0 at once when there is no cap.
        """
        cap = self.cap(key, now)
        if cap is None:
            return 0.0
        # Same reservation pacing as the shared GCRA (no burst): slots 1/cap apart, FIFO.
        st = self._key(key)
        start = max(st.next_at, now)
        st.next_at = start + 1.0 / cap
        return start - now

    def record_grant(self, key: str, now: float) -> None:
        """A request of `key` was let through at `now` (feeds `observed_rate`)."""
        st = self._key(key)
        st.grants.append(now)
        self._trim(st, now)

    def _trim(self, st: _KeyState, now: float) -> None:
        horizon = now - self._s.window_s
        while st.grants and st.grants[0] <= horizon:
            st.grants.popleft()
