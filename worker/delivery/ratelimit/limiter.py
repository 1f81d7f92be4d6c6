"""The limiters the sender uses: local, and Redis with a local fallback.

`acquire(key)` lets one request through in three steps, each a reservation followed by one
sleep (never a polling loop):

1. a Retry-After pause of the key, if TikTok asked for one;
2. the adaptive gate (this worker's cap after throttling), if the worker is slowed down;
3. the shared schedule: Redis (all pods) or the local GCRA (this process).

The gate comes before the shared schedule so that a slowed-down worker does not reserve
shared slots it would then leave unused while it waits for its own cap.

Counted by arrival (SPEC §5). The schedule runs at `qps * (1 - headroom)`: a slot released on
time reaches TikTok a little later (a busy event loop, the request's own trip), and the
headroom is what keeps those late arrivals inside the budget. After a stall a process carries
its lateness on to its next slots and sheds it at the rate the headroom leaves spare, so a
late slot is never followed by an early one (no burst after a stall, and no slot paid for it).
Only a stall beyond `late_tolerance_s` (0.25 s) pays one empty slot per late request.

Redis (`RedisRateLimiter`):
- `start()` connects and loads the script before the worker takes work (readiness waits);
  it retries for a while and only then starts in fallback.
- Each pod keeps at most `max_ahead` reserved, not yet started slots per key. When every pod
  wants more than it gets, the shared queue therefore holds the same number of slots for each
  (equal shares); a pod gets more only when the others leave slots unused.
- A slow answer is asked again once with a longer timeout (`RedisGcra`); a second failure, or
  any connection error, switches the limiter to a local GCRA at this pod's share of the
  schedule: `qps' * assigned / total` partitions of the source topics (`set_share`, fed by the
  consumer's rebalance callbacks), `qps' / expected_replicas` until the first assignment. The
  fallback gauge is 1 and the switch is logged once. A background probe runs the real script
  every `probe_interval_s`; once Redis answers it charges the local slots still pending to the
  shared key, switches back, sets the gauge to 0 and logs once. For a grace period after that
  the pod also stays within its local share, so pods whose probe has not yet seen Redis come
  back (and still send at their share) are not crowded by this one taking the whole schedule.
  Entering fallback, the local schedule starts after the last Redis slot this worker holds, so
  the two schedules do not overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
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
# Measured by `make bench` (section `arrival`, see README "Rate limit"): with 1, 2 and 4 workers
# and two busy-loop processes on 2 cores, 0.05 kept the worst 1-second window by arrival at
# 39 of 40 (within qps + 1, also across a Redis restart) and used 0.949-0.951 of the budget;
# 0.1 used 0.90; 0.04 sheds the lateness of a stall too slowly (one run used 0.82).
DEFAULT_HEADROOM = 0.05
# A wake-up this late after its slot pays one slot (see _wait_for_shared_slot).
DEFAULT_LATE_TOLERANCE_S = 0.25
_MIN_CATCH_UP = 0.01
# Timer jitter below this is not carried on to the next release (see _release_shaped).
_JITTER_S = 0.02
# Reserved, not yet started slots per key and pod: this pod's share of this much of the
# schedule, at least 2 (together the pods hold about this much of the schedule).
_AHEAD_S = 0.25
STARTUP_TIMEOUT_S = 15.0
# After Redis returns, the pod keeps to its local share this many probe intervals (+1 s).
_RETURN_GRACE_PROBES = 2


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


class _Ahead:
    """A FIFO semaphore whose size is read from `limit()` (it follows the pod's share)."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if not self._waiters and self._held < self._limit():
            self._held += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        self._held -= 1
        while self._waiters and self._held < self._limit():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._held += 1
                waiter.set_result(None)


class _Limiter:
    """Pause → adaptive gate → shared slot → paced release; the common part of both limiters."""

    def __init__(
        self,
        *,
        qps: float,
        headroom: float,
        metrics: Metrics,
        adaptive: AdaptiveSettings | None,
        late_tolerance_s: float | None,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps!r}")
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
        self._qps = qps
        self._rate = qps * (1.0 - headroom)  # the schedule, below the budget by the headroom
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._late_tolerance_s = (
            DEFAULT_LATE_TOLERANCE_S if late_tolerance_s is None else late_tolerance_s
        )
        self._gate = AdaptiveGate(max_rate=self._rate, settings=adaptive)
        # Per key: (slot, release time) of this process's last release, and the future the
        # next slot's release waits for (releases go in slot order); see _wait_for_shared_slot.
        self._released: dict[str, tuple[float, float]] = {}
        self._turns: dict[str, asyncio.Future[None]] = {}
        # Lateness shed per second of schedule: what the headroom leaves spare once the timer
        # jitter that is not carried (_JITTER_S per second at most) is set aside. The floor
        # keeps headroom 0 from carrying lateness for ever (the rate is then <= qps / 0.99).
        self._catch_up = max((headroom - _JITTER_S) / (1.0 - headroom), _MIN_CATCH_UP)
        self.late_slots_paid = 0

    @property
    def gate(self) -> AdaptiveGate:
        return self._gate

    @property
    def rate(self) -> float:
        """The schedule: `qps * (1 - headroom)` requests per second per key."""
        return self._rate

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    def set_share(self, assigned: int, total: int) -> None:
        """This pod's share of the source partitions (only the Redis fallback uses it)."""
        return None

    async def _reserve_shared(self, key: str) -> tuple[float, float]:
        """Reserve one shared slot: (seconds until it starts, current slot interval)."""
        raise NotImplementedError

    async def _charge_shared(self, key: str) -> float:
        """Take one slot out of the shared schedule without waiting for it (a payment).

        Returns the slot interval.
        """
        return (await self._reserve_shared(key))[1]

    def _local_cap_wait(self, key: str) -> float:
        """Seconds to wait for an extra local cap before reserving a shared slot (0: none)."""
        return 0.0

    def _ahead(self, key: str) -> _Ahead | None:
        """The bound on this process's reserved, not yet released slots of `key` (None: none)."""
        return None

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
        """Reserve a shared slot, sleep until it starts, release it shaped; pay if very late.

        The store computed the slot at some moment of the call: wake at the latest moment it
        can be (never early), judge lateness from the middle of the call (best estimate).

        Shaping: a process that wakes late (CPU starvation, a busy event loop, a GC pause)
        would release its overdue slots at once and the following ones on time, packing more
        than a second's worth into the second after the stall. Instead this process releases
        its slots of a key in slot order, each at least `(1 - c)` times the slot gap (at
        most the schedule's interval) after the previous release, with
        `c = (headroom - 0.02) / (1 - headroom)`: after a stall the requests run late and
        catch up at the rate the headroom leaves spare, so a late slot is never followed by an
        early one and the arrival rate stays within `qps` at every time scale.
        Lateness costs latency, not budget.

        Payment: when the release would be more than `late_tolerance_s` (default 0.25 s)
        after the slot (a long stall, or a process stalled more often than the headroom can
        make up), the request goes at once instead, takes one more slot out of the shared
        schedule and leaves it empty. The gap lies within the queue ahead, so every window that
        gains the late request also holds the gap. One slot per such request; nothing for
        ordinary lateness.
        """
        ahead = self._ahead(key)
        if ahead is not None:
            await ahead.acquire()  # held until the slot starts
        turn = self._turns.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns[key] = mine
        try:
            # Checked here, after the wait for `ahead`: requests that queued for it while the
            # cap did not apply are capped all the same.
            cap_wait = self._local_cap_wait(key)
            if cap_wait > 0:
                await self._sleep(cap_wait)
            before = self._clock()
            wait, interval = await self._reserve_shared(key)
            after = self._clock()
            slot = (before + after) / 2 + wait
            if wait > 0:
                await self._sleep(wait)
            woke_late = self._clock() - (after + wait)
            if ahead is not None:
                ahead.release()
                ahead = None
            if turn is not None:
                await asyncio.shield(turn)  # the previous slot of this key goes first
            await self._release_shaped(key, slot, woke_late, interval)
        finally:
            if not mine.done():
                mine.set_result(None)
            if self._turns.get(key) is mine:
                del self._turns[key]
            if ahead is not None:
                ahead.release()

    async def _release_shaped(
        self, key: str, slot: float, woke_late: float, interval: float
    ) -> None:
        now = self._clock()
        release = now
        previous = self._released.get(key)
        if previous is not None:
            prev_slot, prev_release = previous
            if woke_late > _JITTER_S and prev_release > now - woke_late:
                # The loop was blocked until now: the previous request, released during the
                # block, may only have gone out now.
                prev_release = now
            # Pacing spreads slots that queued back to back; slots further apart than the
            # schedule's interval were asked for that far apart (no queue). A lane asks for its
            # next slot once its request is out, so pacing by the whole gap handed each
            # request's delay on to the next: with Redis, after one late wake-up, one worker
            # sent a request about every 100 ms at a budget of 100,000/s.
            gap = min(slot - prev_slot, interval)
            if 0 <= gap < 1.0:  # a window of 1 s can hold both
                release = max(now, prev_release + (1.0 - self._catch_up) * gap)
        if release - slot > self._late_tolerance_s:
            # Too far behind: one empty slot taken out of the schedule buys one slot interval
            # of catch-up, so this request may go that much earlier than the pacing says.
            self.late_slots_paid += 1
            self._metrics.rate_limit_late_slots.inc()
            interval = await self._charge_shared(key)
            release = max(now, release - interval)
        if release > now:
            await self._sleep(release - now)
        # The next release is paced from this one as it happened if a stall delayed it; a
        # few ms of timer jitter are left to the headroom (fed back, they would add up).
        actual = self._clock()
        self._released[key] = (slot, actual if actual - release > _JITTER_S else release)

    def throttled(self, key: str, retry_after_s: float | None) -> None:
        """TikTok answered 40100/429 for `key`: slow this worker down, honour Retry-After."""
        self._gate.on_throttled(key, retry_after_s, self._clock())

    async def close(self) -> None:
        return None


class LocalRateLimiter(_Limiter):
    """In-process limiter: a GCRA at `qps * (1 - headroom)` per key for this process alone."""

    def __init__(
        self,
        *,
        qps: float,
        metrics: Metrics,
        headroom: float = 0.0,
        burst: int = 1,
        adaptive: AdaptiveSettings | None = None,
        late_tolerance_s: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            qps=qps,
            headroom=headroom,
            metrics=metrics,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
            clock=clock,
            sleep=sleep,
        )
        self._gcra = LocalGcra(rate=self._rate, burst=burst)
        metrics.rate_limit_fallback.set(0)

    async def _reserve_shared(self, key: str) -> tuple[float, float]:
        return self._gcra.reserve(key, self._clock()), self._gcra.interval


class RedisRateLimiter(_Limiter):
    """Limiter shared by every pod through Redis, with a local fallback at this pod's share."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        qps: float,
        expected_replicas: int,
        metrics: Metrics,
        headroom: float = 0.0,
        logger: Any | None = None,
        burst: int = 1,
        probe_interval_s: float = 1.0,
        adaptive: AdaptiveSettings | None = None,
        late_tolerance_s: float | None = None,
        patient_client: aioredis.Redis | None = None,
        max_ahead: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            qps=qps,
            headroom=headroom,
            metrics=metrics,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
            clock=clock,
            sleep=sleep,
        )
        if expected_replicas < 1:
            raise ValueError(f"expected_replicas must be >= 1, got {expected_replicas!r}")
        self._redis = RedisGcra(client=client, qps=self._rate, burst=burst, patient=patient_client)
        self._shared_interval = 1.0 / self._rate
        self._fallback_gcra = LocalGcra(rate=self._rate / expected_replicas, burst=burst)
        self._fixed_ahead = max_ahead
        self._share = 1.0 / expected_replicas
        self._ahead_slots: dict[str, _Ahead] = {}
        self._log = _Log(logger)
        self._probe_interval_s = probe_interval_s
        self._in_fallback = False
        self._ready = False
        self._probe_task: asyncio.Task[None] | None = None
        self._handover: asyncio.Event | None = None
        self._closed = False
        self._cap_until = -math.inf
        # Per key: the start of the latest Redis slot this worker holds (local clock).
        self._last_redis_slot: dict[str, float] = {}
        metrics.rate_limit_fallback.set(0)

    @property
    def in_fallback(self) -> bool:
        return self._in_fallback

    @property
    def fallback_rate(self) -> float:
        return self._fallback_gcra.rate

    @property
    def ready(self) -> bool:
        """True once `start()` has connected (or given up and started in fallback)."""
        return self._ready

    @property
    def slow_retries(self) -> int:
        """Script calls asked again with the longer timeout after a slow answer."""
        return self._redis.slow_retries

    async def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Connect and load the script; retry for `timeout_s`, then start in fallback.

        The worker calls this before it takes work and reports not-ready meanwhile, so a
        slow start (a busy machine, Redis starting too) delays work instead of sending it
        unshared.
        """
        deadline = self._clock() + timeout_s
        delay = 0.1
        error = ""
        while not self._closed:
            try:
                await self._redis.load()
            except RedisUnavailable as exc:
                error = str(exc)
            else:
                self._ready = True
                self._log.info("rate_limit_redis_connected")
                return
            if self._clock() + delay > deadline:
                break
            await self._sleep(delay)
            delay = min(1.0, delay * 2)
        self._enter_fallback(f"not reachable at start-up: {error}")
        self._ready = True

    def set_share(self, assigned: int, total: int) -> None:
        """Fallback rate from now on: the schedule times `assigned / total` partitions.

        With nothing assigned the pod has no work of its own; it keeps a trickle (1 % of its
        even share) rather than a zero rate, for redelivered or draining requests.
        """
        if total <= 0 or assigned < 0:
            return
        self._share = min(assigned, total) / total
        rate = self._rate * min(assigned, total) / total
        rate = max(rate, self._rate / total / 100)
        if not math.isclose(rate, self._fallback_gcra.rate):
            self._fallback_gcra.set_rate(rate)
            self._log.info(
                "rate_limit_share",
                assigned_partitions=assigned,
                total_partitions=total,
                fallback_qps=round(rate, 3),
            )

    @property
    def max_ahead(self) -> int:
        """Slots of a key this pod may hold reserved and not yet started."""
        if self._fixed_ahead is not None:
            return self._fixed_ahead
        return max(2, math.ceil(self._rate * self._share * _AHEAD_S))

    def _ahead(self, key: str) -> _Ahead | None:
        ahead = self._ahead_slots.get(key)
        if ahead is None:
            ahead = self._ahead_slots[key] = _Ahead(lambda: self.max_ahead)
        return ahead

    def _local_cap_wait(self, key: str) -> float:
        now = self._clock()
        if self._in_fallback or now >= self._cap_until:
            return 0.0
        return self._fallback_gcra.reserve(key, now)

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

    async def _charge_shared(self, key: str) -> float:
        if not self._in_fallback:
            try:
                await self._redis.reserve(key)
            except RedisUnavailable as exc:
                self._enter_fallback(str(exc))
            else:
                return self._shared_interval
        self._fallback_gcra.reserve(key, self._clock())
        return self._fallback_gcra.interval

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
        for client in self._redis.clients:
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect()
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
            self._in_fallback = False
            # Other pods may still be in fallback until their own probe sees Redis: keep to
            # this pod's share for a while (the local schedule goes on where it was).
            self._cap_until = self._clock() + (_RETURN_GRACE_PROBES * self._probe_interval_s + 1.0)
            self._metrics.rate_limit_fallback.set(0)
            return True
        finally:
            self._handover = None
            handover.set()

    async def close(self) -> None:
        """Stop the probe and close the Redis connection pools."""
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()
