"""Rate limiter units: the key, the local GCRA, the adaptive gate, the limiter on virtual time.

Everything here runs on a virtual clock (no real sleeping), so spacing can be asserted exactly.
Redis behaviour (shared budget, fallback, TLS) is in tests/integration/test_ratelimit_redis.py.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from devkit.ratelimit_driver import max_in_window
from worker.delivery.ratelimit import (
    DEFAULT_HEADROOM,
    AdaptiveGate,
    AdaptiveSettings,
    LocalGcra,
    LocalRateLimiter,
    RedisRateLimiter,
    build_rate_limiter,
    rate_limit_key,
)
from worker.delivery.ratelimit.redis_gcra import connect
from worker.observability.metrics import Metrics

TOKEN = "0123456789abcdef0123456789abcdef01234567"
ENDPOINT = "/open_api/v1.3/event/track/"


class VirtualTime:
    """A clock plus an async sleep that only advance when `run()` says so.

    `run(coros)` runs the coroutines as tasks; whenever every task is blocked on a virtual
    sleep, time jumps to the earliest wake-up. `overshoot` adds lateness to chosen sleeps to
    imitate a stalled process.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.overshoot: Callable[[float], float] = lambda _d: 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wake = self.now + max(0.0, delay) + self.overshoot(delay)
        heapq.heappush(self._sleepers, (wake, next(self._seq), fut))
        await fut

    async def run(self, *coros: Awaitable[Any]) -> list[Any]:
        tasks = [asyncio.ensure_future(c) for c in coros]
        while not all(t.done() for t in tasks):
            for _ in range(20):  # let every runnable task reach its next virtual sleep
                await asyncio.sleep(0)
            if not self._sleepers:
                continue
            wake, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            fut.set_result(None)
        return [t.result() for t in tasks]


# -- key --------------------------------------------------------------------------------------


def test_key_uses_app_id_when_given() -> None:
    key = rate_limit_key(app_id="7012345", access_token=TOKEN, endpoint=ENDPOINT)
    assert key == f"app:7012345:{ENDPOINT}"


def test_key_without_app_id_is_a_short_digest_never_the_token() -> None:
    key = rate_limit_key(app_id=None, access_token=TOKEN, endpoint=ENDPOINT)
    assert TOKEN not in key
    assert TOKEN[:8] not in key
    digest = key.split(":")[1]
    assert len(digest) == 16
    assert int(digest, 16) >= 0
    # Stable across calls (every pod computes the same key) and specific to token and endpoint.
    assert key == rate_limit_key(app_id="", access_token=TOKEN, endpoint=ENDPOINT)
    assert key != rate_limit_key(app_id=None, access_token=TOKEN + "x", endpoint=ENDPOINT)
    assert key != rate_limit_key(app_id=None, access_token=TOKEN, endpoint="/other/")


# -- local GCRA -------------------------------------------------------------------------------


def test_gcra_spaces_reservations_exactly_one_interval_apart() -> None:
    g = LocalGcra(rate=10)
    waits = [g.reserve("k", 5.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert g.pending("k", 5.0) == 5
    assert g.pending("k", 5.25) == 3


def test_gcra_idle_key_starts_now_without_banked_burst() -> None:
    g = LocalGcra(rate=10)
    g.reserve("k", 0.0)
    # After a long idle period there is no saved-up burst: still one slot per interval.
    assert g.reserve("k", 100.0) == 0.0
    assert g.reserve("k", 100.0) == pytest.approx(0.1)


def test_gcra_keys_are_independent() -> None:
    g = LocalGcra(rate=1)
    assert g.reserve("a", 0.0) == 0.0
    assert g.reserve("b", 0.0) == 0.0
    assert g.reserve("a", 0.0) == pytest.approx(1.0)


def test_gcra_burst_allows_that_many_at_once_then_paces() -> None:
    g = LocalGcra(rate=10, burst=3)
    waits = [g.reserve("k", 0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2])


def test_gcra_seed_and_not_before_push_the_schedule() -> None:
    g = LocalGcra(rate=10)
    g.seed("k", 3.0)
    assert g.reserve("k", 1.0) == pytest.approx(2.0)
    assert g.reserve("x", 1.0, not_before=1.5) == pytest.approx(0.5)


def test_gcra_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        LocalGcra(rate=0)
    with pytest.raises(ValueError, match="burst"):
        LocalGcra(rate=1, burst=0)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.integers(min_value=1, max_value=200),
    arrivals=st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=400),
)
def test_gcra_no_one_second_window_exceeds_rate_plus_one(rate: int, arrivals: list[float]) -> None:
    g = LocalGcra(rate=rate)
    releases = [t + g.reserve("k", t) for t in sorted(arrivals)]
    assert max_in_window(releases) <= rate + 1


# -- adaptive gate ----------------------------------------------------------------------------


def feed(gate: AdaptiveGate, key: str, rate: float, start: float, seconds: float) -> float:
    """Record grants at `rate` per second from `start` for `seconds`; return the end time."""
    n = int(rate * seconds)
    for i in range(n):
        gate.record_grant(key, start + i / rate)
    return start + seconds


def test_gate_is_open_until_throttled() -> None:
    gate = AdaptiveGate(max_rate=100)
    assert gate.cap("k", 0.0) is None
    assert gate.reserve("k", 0.0) == 0.0
    assert gate.reserve("k", 0.0) == 0.0


def test_throttle_halves_the_observed_rate_and_paces_to_it() -> None:
    gate = AdaptiveGate(max_rate=100)
    now = feed(gate, "k", 40, 0.0, 2.0)
    assert gate.observed_rate("k", now) == pytest.approx(40, rel=0.05)
    gate.on_throttled("k", None, now)
    assert gate.cap("k", now) == pytest.approx(20, rel=0.05)
    cap = gate.cap("k", now)
    assert cap is not None
    waits = [gate.reserve("k", now) for _ in range(3)]
    assert waits == pytest.approx([0.0, 1 / cap, 2 / cap])


def test_throttles_of_one_episode_cut_once_later_ones_cut_again() -> None:
    gate = AdaptiveGate(max_rate=100)
    now = feed(gate, "k", 40, 0.0, 2.0)
    for _ in range(50):  # fifty in-flight requests all come back throttled
        gate.on_throttled("k", None, now)
    assert gate.cap("k", now) == pytest.approx(20, rel=0.05)
    later = now + gate.settings.cooldown_s + 0.01
    gate.on_throttled("k", None, later)
    assert gate.cap("k", later) == pytest.approx(10, rel=0.05)


def test_cap_has_a_floor() -> None:
    gate = AdaptiveGate(max_rate=100, settings=AdaptiveSettings(min_rate=2.0))
    now = 0.0
    for _ in range(20):
        gate.on_throttled("k", None, now)
        now += 1.01
    assert gate.cap("k", now - 1.01) == pytest.approx(2.0)


def test_cap_recovers_multiplicatively_and_is_removed_at_max_rate() -> None:
    s = AdaptiveSettings(recovery_per_s=0.25, hold_s=1.0)
    gate = AdaptiveGate(max_rate=100, settings=s)
    now = feed(gate, "k", 80, 0.0, 2.0)
    gate.on_throttled("k", None, now)
    cap0 = gate.cap("k", now)
    assert cap0 == pytest.approx(40, rel=0.05)
    assert gate.cap("k", now + 0.9) == cap0  # held
    assert cap0 is not None
    assert gate.cap("k", now + 3.0) == pytest.approx(cap0 * 1.25**2, rel=0.01)
    # 40 → 100 needs log(2.5)/log(1.25) ≈ 4.1 s of growth after the hold.
    assert gate.cap("k", now + 1.0 + 4.0) is not None
    assert gate.cap("k", now + 1.0 + 4.2) is None
    assert gate.reserve("k", now + 6.0) == 0.0


def test_retry_after_pauses_the_key_and_is_capped() -> None:
    gate = AdaptiveGate(max_rate=100, settings=AdaptiveSettings(max_retry_after_s=30))
    gate.on_throttled("k", 2.5, 10.0)
    assert gate.paused_for("k", 10.0) == pytest.approx(2.5)
    assert gate.paused_for("k", 12.5) == 0.0
    assert gate.paused_for("other", 10.0) == 0.0
    gate.on_throttled("k", 3600, 20.0)
    assert gate.paused_for("k", 20.0) == pytest.approx(30)
    gate.on_throttled("x", math.nan, 20.0)
    assert gate.paused_for("x", 20.0) == 0.0


# -- LocalRateLimiter on virtual time ---------------------------------------------------------


def local_limiter(vt: VirtualTime, qps: float, metrics: Metrics | None = None) -> LocalRateLimiter:
    return LocalRateLimiter(qps=qps, metrics=metrics or Metrics(), clock=vt.clock, sleep=vt.sleep)


async def test_concurrent_acquires_are_paced_and_served_in_turn() -> None:
    vt = VirtualTime()
    metrics = Metrics()
    limiter = local_limiter(vt, qps=20, metrics=metrics)
    releases: list[tuple[float, int]] = []

    async def worker(wid: int) -> None:
        for _ in range(10):
            await limiter.acquire("k")
            releases.append((vt.now, wid))

    await vt.run(*(worker(i) for i in range(4)))
    times = [t for t, _ in releases]
    assert len(times) == 40
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.05)
    assert max(gaps) == pytest.approx(0.05)
    assert max_in_window(times) <= 21
    # FIFO reservations: once all four queue, each gets one of every four consecutive slots
    # (worker 0 took the first, free slot without waiting and queued again at once, so it is
    # also the first to finish its ten).
    for i in range(1, 33):
        assert sorted(w for _, w in releases[i : i + 4]) == [0, 1, 2, 3]
    hist = metrics.registry.get_sample_value("tiktok_worker_rate_limit_wait_seconds_count")
    assert hist == 40


async def test_acquire_returns_the_time_waited() -> None:
    vt = VirtualTime()
    limiter = local_limiter(vt, qps=4)
    waited = await vt.run(*(limiter.acquire("k") for _ in range(3)))
    assert sorted(waited) == pytest.approx([0.0, 0.25, 0.5])


async def test_throttled_lowers_the_rate_and_it_recovers() -> None:
    vt = VirtualTime()
    limiter = local_limiter(vt, qps=50)
    releases: list[float] = []
    stop_at = vt.now + 12.0
    throttle_at = vt.now + 2.0
    throttled = False

    async def worker() -> None:
        nonlocal throttled
        while vt.now < stop_at:
            await limiter.acquire("k")
            releases.append(vt.now)
            if not throttled and vt.now >= throttle_at:
                throttled = True
                limiter.throttled("k", None)

    await vt.run(*(worker() for _ in range(4)))

    def rate(a: float, b: float) -> float:
        return sum(1 for t in releases if throttle_at + a <= t < throttle_at + b) / (b - a)

    assert rate(-2.0, 0.0) == pytest.approx(50, rel=0.05)
    assert rate(0.1, 1.0) == pytest.approx(25, rel=0.1)  # halved, held for hold_s
    assert rate(8.0, 10.0) == pytest.approx(50, rel=0.05)  # recovered


async def test_retry_after_holds_every_request_of_the_key() -> None:
    vt = VirtualTime()
    limiter = local_limiter(vt, qps=100)
    start = vt.now
    limiter.throttled("k", 1.5)
    waited = await vt.run(limiter.acquire("k"), limiter.acquire("other"))
    assert waited[0] == pytest.approx(1.5)
    assert waited[1] == 0.0
    assert vt.now == pytest.approx(start + 1.5)


async def test_a_request_after_a_long_stall_goes_at_once_and_leaves_a_gap() -> None:
    vt = VirtualTime()
    limiter = local_limiter(vt, qps=10)
    await vt.run(limiter.acquire("k"))  # slot at t0; next slot at t0 + 0.1
    t0 = vt.now
    stalls = iter([0.5])  # the next sleep wakes 0.5 s late (five slots later)
    vt.overshoot = lambda _d: next(stalls, 0.0)
    await vt.run(limiter.acquire("k"))
    assert vt.now == pytest.approx(t0 + 0.6)  # no second wait for the late request
    assert limiter.late_slots_paid == 1
    # The paid slot (t0 + 0.6) is the one empty slot ahead in the schedule.
    assert limiter._gcra.pending("k", vt.now) == 1


async def test_ordinary_lateness_is_never_paid() -> None:
    vt = VirtualTime()
    limiter = LocalRateLimiter(
        qps=10, headroom=0.1, metrics=Metrics(), clock=vt.clock, sleep=vt.sleep
    )
    vt.overshoot = lambda _d: 0.05
    await vt.run(*(limiter.acquire("k") for _ in range(5)))
    assert limiter.late_slots_paid == 0


async def test_a_busy_loop_does_not_shrink_the_budget() -> None:
    """Issue 16: with the loop blocked 30 % of the time, late wake-ups paid an extra slot each.

    The loop is blocked 20 ms of every 66 ms: the pod cannot release all of its schedule, but
    it takes nothing out of the schedule that it does not send.
    """
    vt = VirtualTime(start=0.0)
    limiter = LocalRateLimiter(
        qps=1000, headroom=DEFAULT_HEADROOM, metrics=Metrics(), clock=vt.clock, sleep=vt.sleep
    )

    def blocked(delay: float) -> float:
        wake = vt.now + delay
        phase = wake % 0.066
        return 0.02 - phase if phase < 0.02 else 0.0

    vt.overshoot = blocked
    granted = 0

    async def worker() -> None:
        nonlocal granted
        while vt.now < 3.0:
            await limiter.acquire("k")
            granted += 1

    await vt.run(*(worker() for _ in range(64)))  # the sender's default in-flight bound
    assert limiter.late_slots_paid == 0
    assert granted >= 0.5 * 3.0 * limiter.rate  # what the loop has time for, none of it paid


async def test_after_a_stall_late_slots_are_not_followed_by_early_ones() -> None:
    """The event loop stalls from 0.1 s to 0.3 s: the slots at 0.125 and 0.25 wake together.

    The releases after the stall go in slot order, each (1 - c) x the slot gap after the
    previous one (c = (headroom - 0.02) / (1 - headroom)), not bunched, and nothing is paid.
    """
    vt = VirtualTime(start=0.0)
    # Schedule 8/s (qps 10, headroom 0.2): slots 0, 0.125, 0.25, 0.375, 0.5.
    limiter = LocalRateLimiter(
        qps=10, headroom=0.2, metrics=Metrics(), clock=vt.clock, sleep=vt.sleep
    )

    def stall(delay: float) -> float:
        wake = vt.now + delay
        return 0.3 - wake if 0.1 <= wake < 0.3 else 0.0

    vt.overshoot = stall
    releases: list[float] = []

    async def one() -> None:
        await limiter.acquire("k")
        releases.append(vt.now)

    await vt.run(*(one() for _ in range(5)))
    # Spacing (1 - c) x 0.125 s with c = 0.18 / 0.8: the catch-up the headroom leaves spare.
    assert sorted(releases) == pytest.approx([0.0, 0.3, 0.396875, 0.49375, 0.590625])
    assert limiter.late_slots_paid == 0


async def test_one_late_wake_up_after_a_pause_in_demand_is_not_handed_on() -> None:
    """With the Redis limiter one worker sent a request about every 100 ms at a budget of
    100,000/s. A lane asks for its next slot as soon as its request is out, and the store's
    slot is a little ahead, so each request sleeps briefly. After a pause in demand (a batch
    lingering 0.2 s) one such sleep woke late behind a consumed batch; the release was then
    paced by the whole gap since the previous slot, and each request's delay widened the next
    gap as much. Slots asked for far apart are paced by the schedule's interval at most.
    """
    vt = VirtualTime(start=0.0)

    class StoreLimiter(LocalRateLimiter):
        async def _reserve_shared(self, key: str) -> tuple[float, float]:
            return 0.0002, self._gcra.interval  # the store's slot: a little ahead

    limiter = StoreLimiter(
        qps=100_000, headroom=DEFAULT_HEADROOM, metrics=Metrics(), clock=vt.clock, sleep=vt.sleep
    )
    releases: list[float] = []
    late = iter([0.03])  # the slot sleep after the pause wakes 30 ms late

    async def one_lane() -> None:
        await limiter.acquire("k")
        releases.append(vt.now)
        await vt.sleep(0.2)  # the next batch lingers
        vt.overshoot = lambda _d: next(late, 0.0)
        for _ in range(10):  # then batches are full: one request right after the other
            await limiter.acquire("k")
            releases.append(vt.now)

    await vt.run(one_lane())
    assert releases[1] == pytest.approx(0.2302, abs=0.001)  # the late one
    assert releases[-1] - releases[1] < 0.01  # 10 slots at 100,000/s, not 10 x 0.2 s


@settings(max_examples=40, deadline=None)
@given(
    rate=st.integers(min_value=2, max_value=50),
    stalls=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.5), st.floats(min_value=0.0, max_value=0.4)),
        min_size=1,
        max_size=8,
    ),
)
def test_loop_stalls_never_overfill_a_window(rate: int, stalls: list[tuple[float, float]]) -> None:
    """Event-loop stalls (every sleep that would end inside one wakes at its end) still never
    put more than rate + 1 releases in 1 s, with the default headroom."""

    async def scenario() -> list[float]:
        vt = VirtualTime(start=0.0)
        limiter = LocalRateLimiter(
            qps=rate, headroom=DEFAULT_HEADROOM, metrics=Metrics(), clock=vt.clock, sleep=vt.sleep
        )

        def overshoot(delay: float) -> float:
            wake = vt.now + delay
            for start, length in stalls:
                if start <= wake < start + length:
                    return start + length - wake
            return 0.0

        vt.overshoot = overshoot
        releases: list[float] = []

        async def worker() -> None:
            while vt.now < 4.0:
                await limiter.acquire("k")
                releases.append(vt.now)

        await vt.run(*(worker() for _ in range(3)))
        return releases

    releases = asyncio.run(scenario())
    assert max_in_window(releases) <= rate + 1


async def test_local_backend_never_reports_fallback() -> None:
    metrics = Metrics()
    limiter = build_rate_limiter(
        backend="local", qps=5, redis_url="redis://unused", expected_replicas=3, metrics=metrics
    )
    assert isinstance(limiter, LocalRateLimiter)
    assert await limiter.acquire("k") >= 0.0
    assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
    await limiter.close()


def test_unknown_backend_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match=r"rate_limit\.backend"):
        build_rate_limiter(
            backend="memcached", qps=5, redis_url="", expected_replicas=1, metrics=Metrics()
        )


async def test_redis_backend_keeps_tls_and_password_from_the_url() -> None:
    limiter = build_rate_limiter(
        backend="redis",
        qps=100,
        redis_url="rediss://:s3cr%40t@redis.example:6380/2?ssl_cert_reqs=none",
        expected_replicas=4,
        metrics=Metrics(),
    )
    assert isinstance(limiter, RedisRateLimiter)
    # qps / expected_replicas, below the budget by the headroom, until the first assignment
    assert limiter.fallback_rate == pytest.approx(25 * (1 - DEFAULT_HEADROOM))
    limiter.set_share(3, 8)  # a rebalance: 3 of the 8 source partitions
    assert limiter.fallback_rate == pytest.approx(100 * (1 - DEFAULT_HEADROOM) * 3 / 8)
    limiter.set_share(8, 8)  # the only pod left
    assert limiter.fallback_rate == pytest.approx(100 * (1 - DEFAULT_HEADROOM))
    limiter.set_share(0, 8)  # nothing assigned: a trickle, never zero
    assert 0 < limiter.fallback_rate < 100 / 8 / 10
    await limiter.close()
    client = connect("rediss://user:s3cr%40t@redis.example:6380/2", timeout_s=0.2)
    pool = client.connection_pool
    kw = pool.connection_kwargs
    assert pool.connection_class is SSLConnection
    assert (kw["username"], kw["password"], kw["db"]) == ("user", "s3cr@t", 2)
    assert (kw["host"], kw["port"]) == ("redis.example", 6380)
    assert kw["socket_timeout"] == 0.2
    assert kw["socket_connect_timeout"] == 0.2
    assert kw["retry"].get_retries() == 1  # one retry on a closed connection, then fall back
    await client.aclose()


async def test_sentinel_url_names_the_sentinels_master_and_db() -> None:
    client = connect(
        "redis+sentinel://:s3cr%40t@10.0.0.1:26379,sentinel-b:26380/mymaster/3", timeout_s=0.2
    )
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    kw = pool.connection_kwargs
    assert (kw["password"], kw["db"], kw["socket_timeout"]) == ("s3cr@t", 3, 0.2)
    sentinels = pool.sentinel_manager.sentinels
    hosts = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ]
    assert hosts == [("10.0.0.1", 26379), ("sentinel-b", 26380)]
    # The password is the master's; the sentinels are asked without one unless told to.
    assert all(s.connection_pool.connection_kwargs.get("password") is None for s in sentinels)
    await client.aclose()
    with pytest.raises(ValueError, match="master name"):
        connect("redis+sentinel://10.0.0.1:26379", timeout_s=0.2)
    with pytest.raises(ValueError, match="host:port"):
        connect("redis+sentinel://10.0.0.1/mymaster", timeout_s=0.2)
