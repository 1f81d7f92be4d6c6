"""The limiters the sender uses: local, and Redis with a local fallback.

`acquire(key)` lets one request through in three steps, each a reservation followed by one
sleep (never a polling loop):

1. a Retry-After pause of the key, if TikTok asked for one;
2. the adaptive gate (this worker's cap after throttling), if the worker is slowed down;
3. the shared schedule: Redis (all pods) or the local GCRA (this process).

The gate comes before the shared schedule so that a slowed-down worker does not reserve
shared slots it would then leave unused while it waits for its own cap.

Redis failover (`RedisRateLimiter`): any Redis error or timeout (short socket timeouts; only a
connection the server closed is retried once, on a fresh one) switches the whole limiter to a
local GCRA at `qps / expected_replicas`, sets the fallback gauge to 1 and logs once. The
request that saw the error is then scheduled locally, so no request ever goes out unmetered.
While in fallback no request touches Redis; a background probe runs the real script every
`probe_interval_s` and, once Redis answers, charges the local slots still pending to the shared
key (so the shared schedule accounts for them), switches back, sets the gauge to 0 and logs
once. Entering fallback, the local schedule starts after the last Redis slot this worker holds,
so the two schedules do not overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from worker.delivery.ratelimit.adaptive import AdaptiveGate, AdaptiveSettings
from worker.delivery.ratelimit.gcra import LocalGcra
from worker.delivery.ratelimit.redis_gcra import RedisGcra, RedisUnavailable
from worker.observability.metrics import Metrics

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_stdlib_log = logging.getLogger("worker.delivery.ratelimit")
_PROBE_KEY = "probe"
# Below 1, to leave room for the error of the slot estimate (half the Redis round trip).
_LATE_FRACTION = 0.75
DEFAULT_LATE_TOLERANCE_S = 0.005


class _Log:
    """Structlog-style `info`/`warning(event, **fields)` on the given logger, else stdlib."""

    def __init__(self, logger: Any | None) -> None:
        self._logger = logger

    def info(self, event: str, **fields: Any) -> None:
        if self._logger is not None:
            self._logger.info(event, **fields)
        else:
            _stdlib_log.info("%s %s", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._logger is not None:
            self._logger.warning(event, **fields)
        else:
            _stdlib_log.warning("%s %s", event, fields)


class _Limiter:
    """Pause → adaptive gate → shared slot; the common part of both limiters."""

    def __init__(
        self,
        *,
        qps: float,
        metrics: Metrics,
        adaptive: AdaptiveSettings | None,
        late_tolerance_s: float,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps!r}")
        self._qps = qps
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._late_tolerance_s = late_tolerance_s
        self._gate = AdaptiveGate(max_rate=qps, settings=adaptive)
        self.late_slots_paid = 0

    @property
    def gate(self) -> AdaptiveGate:
        return self._gate

    async def _reserve_shared(self, key: str) -> tuple[float, float]:
        """Reserve one shared slot: (seconds until it starts, current slot interval)."""
        raise NotImplementedError

    async def acquire(self, key: str) -> float:
        """Wait until one request of `key` may be sent; return the seconds waited.

        Observes `rate_limit_wait_seconds`. Cancelling the call while it waits gives up the
        slot (the budget is under-used, never exceeded).
        """
        start = self._clock()
        # A pause can be extended by a throttle signal that arrives while we sleep.
        while (pause := self._gate.paused_for(key, self._clock())) > 0:
            await self._sleep(pause)
        gate_wait = self._gate.reserve(key, self._clock())
        if gate_wait > 0:
            await self._sleep(gate_wait)
        await self._wait_for_shared_slot(key)
        end = self._clock()
        self._gate.record_grant(key, end)
        waited = max(0.0, end - start)
        self._metrics.rate_limit_wait.observe(waited)
        return waited

    async def _wait_for_shared_slot(self, key: str) -> None:
        """Reserve a shared slot and sleep until it starts; pay for the slot if woken late.

        A process that wakes up well after its slot (CPU starvation, a CFS-quota stall, a long
        GC pause, a busy event loop) sends its request in time that belongs to later slots,
        which are used on time by others: a 1-second window could then hold more than
        qps + 1 requests. Lateness below one interval cannot do that; beyond it, the late
        request still goes at once (no second wait, no cascade of missed slots) but the
        process reserves one more slot that nobody uses: that gap lies within the queue depth
        ahead, so every window gaining the late request also holds the gap, and the bound
        stays qps + 1 (while queue depth plus lateness stay under a second). The cost is one
        slot per late request, like dropping the late slot, without delaying the request.

        Lateness up to `late_tolerance_s` (default 5 ms) is accepted without paying: a few ms
        of event-loop lag is normal, and at high qps it adds at most qps * late_tolerance_s
        requests to a window (0.5 % at the default).
        """
        before = self._clock()
        wait, interval = await self._reserve_shared(key)
        after = self._clock()
        # The slot was computed while the call was in flight: take the midpoint, so neither
        # the request's nor the reply's trip (or a stall while reading it) moves the slot.
        slot = (before + after) / 2 + wait
        if slot > after:
            await self._sleep(slot - after)
        late = self._clock() - slot
        if late > max(self._late_tolerance_s, interval * _LATE_FRACTION):
            self.late_slots_paid += 1
            await self._reserve_shared(key)  # the gap that makes up for this late request

    def throttled(self, key: str, retry_after_s: float | None) -> None:
        """TikTok answered 40100/429 for `key`: slow this worker down, honour Retry-After."""
        self._gate.on_throttled(key, retry_after_s, self._clock())

    async def close(self) -> None:
        return None


class LocalRateLimiter(_Limiter):
    """In-process limiter: a GCRA at `qps` per key for this process alone."""

    def __init__(
        self,
        *,
        qps: float,
        metrics: Metrics,
        burst: int = 1,
        adaptive: AdaptiveSettings | None = None,
        late_tolerance_s: float = DEFAULT_LATE_TOLERANCE_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            qps=qps,
            metrics=metrics,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
            clock=clock,
            sleep=sleep,
        )
        self._gcra = LocalGcra(rate=qps, burst=burst)
        metrics.rate_limit_fallback.set(0)

    async def _reserve_shared(self, key: str) -> tuple[float, float]:
        return self._gcra.reserve(key, self._clock()), self._gcra.interval


class RedisRateLimiter(_Limiter):
    """Limiter shared by every pod through Redis, with a local fallback at qps / replicas."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        qps: float,
        expected_replicas: int,
        metrics: Metrics,
        logger: Any | None = None,
        burst: int = 1,
        probe_interval_s: float = 1.0,
        adaptive: AdaptiveSettings | None = None,
        late_tolerance_s: float = DEFAULT_LATE_TOLERANCE_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            qps=qps,
            metrics=metrics,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
            clock=clock,
            sleep=sleep,
        )
        if expected_replicas < 1:
            raise ValueError(f"expected_replicas must be >= 1, got {expected_replicas!r}")
        self._redis = RedisGcra(client=client, qps=qps, burst=burst)
        self._shared_interval = 1.0 / qps
        self._fallback_gcra = LocalGcra(rate=qps / expected_replicas, burst=burst)
        self._log = _Log(logger)
        self._probe_interval_s = probe_interval_s
        self._in_fallback = False
        self._probe_task: asyncio.Task[None] | None = None
        self._handover: asyncio.Event | None = None
        self._closed = False
        # Per key: the start of the latest Redis slot this worker holds (local clock).
        self._last_redis_slot: dict[str, float] = {}
        metrics.rate_limit_fallback.set(0)

    @property
    def in_fallback(self) -> bool:
        return self._in_fallback

    @property
    def fallback_rate(self) -> float:
        return self._fallback_gcra.rate

    async def _reserve_shared(self, key: str) -> tuple[float, float]:
        if self._handover is not None:
            await self._handover.wait()
        if not self._in_fallback:
            try:
                wait = await self._redis.reserve(key)
            except RedisUnavailable as exc:
                self._enter_fallback(str(exc))
            else:
                if not self._in_fallback:
                    self._last_redis_slot[key] = self._clock() + wait
                    return wait, self._shared_interval
                # Redis answered, but another call already switched to fallback: use the
                # Redis slot anyway (it is a valid slot) and remember it for the hand-over.
                self._fallback_gcra.seed(key, self._clock() + wait + self._fallback_gcra.interval)
                return wait, self._shared_interval
        return self._fallback_gcra.reserve(key, self._clock()), self._fallback_gcra.interval

    def _enter_fallback(self, reason: str) -> None:
        if self._in_fallback or self._closed:
            return
        self._in_fallback = True
        now = self._clock()
        # Start each local schedule after the last Redis slot this worker still holds, so the
        # requests already scheduled by Redis and the local ones do not bunch up.
        for key, slot in self._last_redis_slot.items():
            self._fallback_gcra.seed(key, max(now, slot + self._fallback_gcra.interval))
        self._last_redis_slot.clear()
        self._metrics.rate_limit_fallback.set(1)
        self._log.warning(
            "rate_limit_fallback_local",
            reason=reason,
            fallback_qps=round(self._fallback_gcra.rate, 3),
        )
        self._probe_task = asyncio.get_running_loop().create_task(
            self._probe_until_back(), name="ratelimit-redis-probe"
        )

    async def _probe_until_back(self) -> None:
        # Pooled connections to a Redis that went away are dead (or, after a restart, closed by
        # the server); start the probe and the return on fresh connections.
        with contextlib.suppress(Exception):
            await self._redis.client.connection_pool.disconnect()
        while self._in_fallback and not self._closed:
            await self._sleep(self._probe_interval_s)
            try:
                await self._redis.reserve(_PROBE_KEY, cost=0)
            except Exception:  # RedisUnavailable, or anything else: the probe must not die
                continue
            if await self._hand_back():
                self._log.info("rate_limit_redis_restored")

    async def _hand_back(self) -> bool:
        """Charge the local slots still pending to the shared keys, then leave fallback.

        Acquirers wait (briefly: one script call per key, bounded by the socket timeout) so
        that no new local slot is handed out after the count and no Redis slot is handed out
        before the charge. Returns False, staying in fallback, if Redis fails meanwhile.
        """
        handover = self._handover = asyncio.Event()
        try:
            now = self._clock()
            local = self._fallback_gcra
            charges = {k: local.pending(k, now) for k in local.known_keys()}
            for key, cost in charges.items():
                if cost > 0:
                    await self._redis.reserve(key, cost=cost)
        except Exception:  # RedisUnavailable, or anything else: stay in fallback, probe again
            return False
        else:
            self._fallback_gcra.forget_idle(self._clock())
            self._in_fallback = False
            self._metrics.rate_limit_fallback.set(0)
            return True
        finally:
            self._handover = None
            handover.set()

    async def close(self) -> None:
        """Stop the probe and close the Redis connection pool."""
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._redis.client.aclose()
