"""The shared rate limiter against a real redis-server (SPEC §5, issue 5).

Multi-process tests start `devkit/ratelimit_driver.py` pods (each its own interpreter, event
loop and RedisRateLimiter) that POST to a RecordingServer in this process. Each request
carries the moment the limiter released it (`time.monotonic()`, one clock for every process on
Linux) and the server records that and its arrival time. Window bounds are asserted on the
release times: that is what the limiter controls. Arrival times add this machine's scheduling
noise (a stall of the recording server bunches requests that were sent on time); they are
reported in the assertion messages and by `bench/bench_ratelimit.py`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import (
    FakeTikTokProcess,
    TopicSet,
    WorkerProcess,
    metric_value,
    produce,
    wait_until,
    worker_config,
    write_config,
)
from devkit.infra.procs import free_port, port_open
from devkit.infra.redis_server import RedisEndpoint, RedisServer
from devkit.ratelimit_driver import (
    RecordingServer,
    count_between,
    max_in_window,
    run_drivers,
)
from devkit.sample_events import DOCUMENTED_TRACK_EVENTS, SampleEvents, encode
from worker.delivery.ratelimit import DEFAULT_HEADROOM, RedisGcra, RedisRateLimiter
from worker.delivery.ratelimit.redis_gcra import connect
from worker.observability.metrics import Metrics

pytestmark = pytest.mark.integration


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


# -- the shared budget ------------------------------------------------------------------------


async def test_four_processes_share_one_budget_fairly(redis_url: str) -> None:
    q, duration = 50, 20.0
    run = await run_drivers(processes=4, redis_url=redis_url, qps=q, replicas=4, duration=duration)
    released = run.released()
    note = (
        f"{len(released)} requests, per worker {[s['sent'] for s in run.summaries]}, "
        f"worst window at release {max_in_window(released)}, "
        f"at arrival {max_in_window(run.arrived())}, "
        f"late slots paid {[s['late_slots_paid'] for s in run.summaries]}"
    )
    assert max_in_window(released) <= q + 1, note
    # The schedule holds back the default headroom (10 %) for arrival jitter.
    assert len(released) >= 0.85 * q * duration, note
    for worker in range(4):
        assert len(run.released(worker)) >= 0.15 * len(released), note
    assert not any(h.fallback for h in run.hits), "Redis was up: no request may be in fallback"


async def test_script_reserves_consecutive_slots_on_redis_clock(redis_url: str) -> None:
    client = connect(redis_url, timeout_s=1.0)
    try:
        gcra = RedisGcra(client=client, qps=10)
        key = f"slots-{uuid.uuid4().hex[:8]}"
        waits = [await gcra.reserve(key) for _ in range(5)]
        # Slots are 100 ms apart on Redis's clock; the calls themselves take a few ms.
        for i, wait in enumerate(waits):
            assert i * 0.1 - 0.05 < wait <= i * 0.1 + 1e-6, waits
        assert await gcra.reserve(key, cost=0) == pytest.approx(0.5, abs=0.05)
        ttl_ms = await client.pttl(gcra.redis_key(key))
        assert 1000 < ttl_ms <= 1500 + 10  # state expires soon after the schedule is idle
        stats = await client.info("commandstats")
        assert "cmdstat_evalsha" in stats  # the script is cached and run by SHA
    finally:
        await client.aclose()


# -- Redis failure ----------------------------------------------------------------------------


class RecordingLogger:
    """A structlog-style logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.records.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append(("warning", event, fields))

    def events(self) -> list[str]:
        return [event for _, event, _ in self.records]


async def test_fallback_in_process_gauge_logs_and_return(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(password="rl-test-pw")
    metrics, log = Metrics(), RecordingLogger()
    limiter = RedisRateLimiter(
        client=connect(server.url, timeout_s=0.2),
        qps=100,
        expected_replicas=4,
        metrics=metrics,
        logger=log,
        probe_interval_s=0.1,
    )

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback")

    try:
        for _ in range(5):
            await limiter.acquire("k")
        assert gauge() == 0
        await asyncio.to_thread(server.stop)
        t0 = time.monotonic()
        await asyncio.gather(*(limiter.acquire("k") for _ in range(11)))
        elapsed = time.monotonic() - t0
        assert gauge() == 1
        # Never unmetered: 11 requests at the fallback rate 100 / 4 = 25/s take >= 10/25 s.
        assert elapsed >= 10 / 25 - 0.01
        await asyncio.to_thread(server.start)  # same port, empty data, empty script cache
        deadline = time.monotonic() + 5
        while gauge() != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gauge() == 0
        assert not limiter.in_fallback
        await limiter.acquire("k")  # the script is loaded again transparently (NOSCRIPT)
        assert log.events() == ["rate_limit_fallback_local", "rate_limit_redis_restored"]
        assert "rl-test-pw" not in repr(log.records)
    finally:
        await limiter.close()


async def test_slow_redis_counts_as_down(redis_url: str) -> None:
    metrics, log = Metrics(), RecordingLogger()
    limiter = RedisRateLimiter(
        client=connect(redis_url, timeout_s=0.15),
        qps=50,
        expected_replicas=2,
        metrics=metrics,
        logger=log,
        probe_interval_s=0.1,
    )
    admin = connect(redis_url, timeout_s=2.0)
    try:
        await limiter.acquire("slow")
        await admin.client_pause(1200, all=True)  # Redis stops answering
        t0 = time.monotonic()
        await limiter.acquire("slow")
        assert time.monotonic() - t0 < 1.0  # gave up after the socket timeout, did not wait
        assert limiter.in_fallback
        deadline = time.monotonic() + 5
        while limiter.in_fallback and time.monotonic() < deadline:
            await limiter.acquire("slow")
        assert not limiter.in_fallback  # answered again after the pause
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
        assert log.events() == ["rate_limit_fallback_local", "rate_limit_redis_restored"]
    finally:
        await admin.aclose()
        await limiter.close()


async def test_redis_stopped_mid_run_falls_back_per_worker_then_returns(
    redis_factory: Callable[..., RedisServer],
) -> None:
    redis = redis_factory(password="rl-test-pw")
    q, replicas, duration = 40, 4, 12.0
    fallback_qps = q / replicas
    marks: dict[str, float] = {}

    async def outage(_server: RecordingServer, start: float) -> None:
        await sleep_until(start + 4.0)
        marks["stop"] = time.monotonic()
        await asyncio.to_thread(redis.stop)
        await sleep_until(start + 8.0)
        await asyncio.to_thread(redis.start)
        marks["up"] = time.monotonic()

    run = await run_drivers(
        processes=4,
        redis_url=redis.url,
        qps=q,
        replicas=replicas,
        duration=duration,
        during=outage,
    )
    stop, up, end = marks["stop"], marks["up"], run.start + duration
    settle = 0.5  # slots reserved from Redis before the stop are still being used
    down = [h for h in run.hits if stop + settle <= h.released < up]
    assert down
    assert all(h.fallback for h in down), "the gauge is 1 while Redis is down"
    for worker in range(4):
        during_outage = [t for t in run.released(worker) if stop + settle <= t < up]
        note = f"worker {worker}: {len(during_outage)} requests while Redis was down"
        assert max_in_window(during_outage) <= fallback_qps + 1, note
        assert len(during_outage) >= 0.8 * fallback_qps * (up - stop - settle - 1), note
    # After its return each worker keeps to its local share for 2 probe intervals + 1 s.
    back = [h for h in run.hits if h.released >= up + 2.5]
    assert back
    assert not any(h.fallback for h in back), "back on Redis: gauge 0"
    back_times = sorted(h.released for h in back)
    assert max_in_window(back_times) <= q + 1
    assert len(back_times) >= 0.75 * q * (end - up - 2.5)
    assert all(s["fallback"] == 0 for s in run.summaries)
    for err in run.stderr:  # logged once each way, per worker
        assert err.count("rate_limit_fallback_local") == 1, err[-2000:]
        assert err.count("rate_limit_redis_restored") == 1, err[-2000:]
        assert "rl-test-pw" not in err


# -- adaptive slow-down -----------------------------------------------------------------------


async def test_throttle_responses_slow_workers_down_then_they_recover(redis_url: str) -> None:
    q, duration = 40, 10.0
    marks: dict[str, float] = {}

    async def throttle(server: RecordingServer, start: float) -> None:
        await sleep_until(start + 3.0)
        now = time.monotonic()
        marks["throttle"] = now
        server.throttle_window = (now, now + 0.3)

    run = await run_drivers(
        processes=2, redis_url=redis_url, qps=q, replicas=2, duration=duration, during=throttle
    )
    t = marks["throttle"]
    released = run.released()

    def rate(a: float, b: float) -> float:
        return count_between(released, t + a, t + b) / (b - a)

    rates = {"before": rate(-1.5, 0.0), "slowed": rate(0.5, 1.5), "after": rate(5.5, 7.0)}
    assert all(s["throttled"] >= 1 for s in run.summaries), run.summaries
    assert rates["before"] >= 0.8 * q, rates  # the schedule is 0.9 q (headroom)
    assert rates["slowed"] <= 0.65 * q, rates
    assert rates["after"] >= 0.8 * q, rates


# -- TLS and password -------------------------------------------------------------------------


class TlsRedisServer(RedisServer):
    """redis-server with TLS only (`--port 0 --tls-port`), a password and a self-signed cert."""

    def __init__(self, *, workdir: Path, password: str) -> None:
        super().__init__(workdir=workdir, password=password)
        self.cert = workdir / "redis.crt"
        self.key = workdir / "redis.key"

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--port") + 1] = "0"
        return [
            *argv,
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.cert),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.cert.exists():
            openssl = [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(self.key), "-out", str(self.cert), "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ]  # fmt: skip
            subprocess.run(
                openssl,
                check=True,
                capture_output=True,
                timeout=60,
            )
        super().start()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Any:
    server = TlsRedisServer(workdir=tmp_path / "tls-redis", password="tls-pw")
    server.start()
    yield server
    server.stop()


async def test_rediss_url_with_password_uses_tls(tls_redis: RedisEndpoint) -> None:
    metrics = Metrics()
    limiter = RedisRateLimiter(
        client=connect(tls_redis.url, timeout_s=1.0),
        qps=20,
        expected_replicas=2,
        metrics=metrics,
    )
    try:
        waited = [await limiter.acquire("tls") for _ in range(3)]
        assert not limiter.in_fallback
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
        assert sum(waited) >= 2 * 0.05 - 0.02  # paced by Redis at 20/s
    finally:
        await limiter.close()
    # A wrong password is an unusable Redis: the limiter falls back rather than let it through.
    wrong = tls_redis.url.replace(":tls-pw@", ":wrong@")
    metrics = Metrics()
    limiter = RedisRateLimiter(
        client=connect(wrong, timeout_s=1.0), qps=20, expected_replicas=2, metrics=metrics
    )
    try:
        await limiter.acquire("tls")
        assert limiter.in_fallback
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 1
    finally:
        await limiter.close()


# -- rate_limit.redis_password (issue 19) -----------------------------------------------------

AWKWARD_PASSWORD = "p@ss:w/rd%40#?"  # every character a URL treats specially


@pytest.mark.parametrize("form", ["redis_password", "percent-encoded-url"])
async def test_a_password_with_url_characters_reaches_redis(
    redis_factory: Callable[..., RedisServer], form: str
) -> None:
    from urllib.parse import quote

    from worker.config import masked, parse_config
    from worker.delivery.ratelimit import build_rate_limiter

    server = redis_factory(password=AWKWARD_PASSWORD)
    plain = f"redis://127.0.0.1:{server.port}/0"
    if form == "redis_password":
        rate_limit = f"{{redis_url: '{plain}', redis_password: '${{RP}}'}}"
    else:
        encoded = f"redis://:{quote(AWKWARD_PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
        rate_limit = f"{{redis_url: '{encoded}'}}"
    config = parse_config(
        f"rate_limit: {rate_limit}\ndestinations: [{{name: a, pixel_code: P, access_token: t}}]\n",
        environ={"RP": AWKWARD_PASSWORD},
    )
    shown = str(masked(config)["rate_limit"])
    assert AWKWARD_PASSWORD not in shown
    assert quote(AWKWARD_PASSWORD, safe="") not in shown
    metrics = Metrics()
    limiter = build_rate_limiter(
        backend="redis",
        qps=100,
        redis_url=config.rate_limit.redis_url,
        redis_password=config.rate_limit.redis_password,
        expected_replicas=1,
        metrics=metrics,
    )
    try:
        for _ in range(3):
            await limiter.acquire(f"pw-{form}")
        # Authenticated: the slots came from Redis (no fallback) and its key is there.
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
        with server.client() as c:
            assert any(f"pw-{form}" in k.decode() for k in c.keys("*"))
    finally:
        await limiter.close()


# -- start-up, slow answers, fair shares (issue 16) -------------------------------------------


def redis_limiter(
    url: str,
    *,
    qps: float,
    expected_replicas: int = 4,
    timeout_s: float = 0.15,
    patient_s: float | None = 1.0,
    probe_interval_s: float = 0.1,
    metrics: Metrics | None = None,
    log: RecordingLogger | None = None,
) -> RedisRateLimiter:
    return RedisRateLimiter(
        client=connect(url, timeout_s=timeout_s),
        patient_client=connect(url, timeout_s=patient_s) if patient_s else None,
        qps=qps,
        headroom=DEFAULT_HEADROOM,
        expected_replicas=expected_replicas,
        metrics=metrics or Metrics(),
        logger=log,
        probe_interval_s=probe_interval_s,
    )


async def test_startup_with_redis_down_falls_back_at_the_expected_share_then_the_assigned_one(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """The start-up case of issue 16: no request before the limiter has tried Redis, and a
    pod that starts without it sends at its share, first of the replicas, then of the
    partitions it is assigned, until Redis answers."""
    server = redis_factory(password="rl-test-pw")
    await asyncio.to_thread(server.stop)
    metrics, log = Metrics(), RecordingLogger()
    limiter = redis_limiter(server.url, qps=40, expected_replicas=4, metrics=metrics, log=log)
    schedule = 40 * (1 - DEFAULT_HEADROOM)
    try:
        assert not limiter.ready  # /readyz says not ready: the worker takes no work yet
        await limiter.start(timeout_s=0.5)
        assert limiter.ready
        assert limiter.in_fallback
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 1
        assert limiter.fallback_rate == pytest.approx(schedule / 4)
        limiter.set_share(1, 8)  # the first assignment: 1 of 8 partitions
        assert limiter.fallback_rate == pytest.approx(schedule / 8)
        limiter.set_share(4, 8)  # a rebalance after another pod left
        assert limiter.fallback_rate == pytest.approx(schedule / 2)
        for _ in range(3):
            await limiter.acquire("k")
        assert limiter.in_fallback
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 5
        while limiter.in_fallback and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not limiter.in_fallback
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
        await limiter.acquire("k")
        events = log.events()
        assert events[0] == "rate_limit_fallback_local"
        assert events[-1] == "rate_limit_redis_restored"
        assert "rl-test-pw" not in repr(log.records)
    finally:
        await limiter.close()


async def test_slow_redis_at_startup_and_one_slow_answer_are_not_an_outage(
    redis_url: str,
) -> None:
    """Under load the first answer can be slow: start-up waits and retries, a slow answer is
    asked again with the longer timeout; neither switches to the local fallback."""
    metrics, log = Metrics(), RecordingLogger()
    limiter = redis_limiter(
        redis_url, qps=50, timeout_s=0.15, patient_s=2.0, metrics=metrics, log=log
    )
    admin = connect(redis_url, timeout_s=3.0)
    try:
        await admin.client_pause(600, all=True)  # slower than the short timeout
        await limiter.start(timeout_s=5.0)
        assert limiter.ready
        assert not limiter.in_fallback
        await limiter.acquire("slow-start")
        await admin.client_pause(400, all=True)  # one slow answer mid-run
        await limiter.acquire("slow-start")
        assert limiter.slow_retries >= 1
        assert not limiter.in_fallback
        assert metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback") == 0
        assert log.events() == ["rate_limit_redis_connected"]
    finally:
        await admin.aclose()
        await limiter.close()


async def test_pods_that_all_want_more_get_equal_shares(redis_url: str) -> None:
    """Each pod keeps a bounded number of reservations ahead, so a pod with more waiting
    requests does not crowd out one with fewer; when a pod leaves its share unused, the
    other one gets it."""
    key = f"fair-{uuid.uuid4().hex[:8]}"
    busy = redis_limiter(redis_url, qps=40)
    modest = redis_limiter(redis_url, qps=40)
    grants = {"busy": 0, "modest": 0}
    stop_at = time.monotonic() + 4.0

    async def worker(name: str, limiter: RedisRateLimiter, pause: float = 0.0) -> None:
        while time.monotonic() < stop_at:
            await limiter.acquire(key)
            grants[name] += 1
            if pause:
                await asyncio.sleep(pause)

    try:
        await asyncio.gather(busy.start(), modest.start())
        tasks = [worker("busy", busy) for _ in range(24)]
        tasks += [worker("modest", modest) for _ in range(4)]
        await asyncio.gather(*tasks)
        total = grants["busy"] + grants["modest"]
        assert grants["modest"] >= 0.4 * total, grants  # 24 against 4 waiting, still ~half
        # The modest pod now wants one request a second: the busy one gets the rest.
        grants.update(busy=0, modest=0)
        stop_at = time.monotonic() + 3.0
        await asyncio.gather(
            *(worker("busy", busy) for _ in range(24)), worker("modest", modest, pause=1.0)
        )
        assert grants["modest"] <= 4, grants
        assert grants["busy"] >= 0.8 * 3.0 * busy.rate, grants
        assert not busy.in_fallback
        assert not modest.in_fallback
    finally:
        await busy.close()
        await modest.close()


# -- Redis Sentinel -----------------------------------------------------------------------------


def _start_sentinel(conf: Path, log_file: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=log_file, stderr=subprocess.STDOUT
    )


async def test_sentinel_url_reaches_the_master_sentinel_names(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """`redis+sentinel://` asks a real redis-sentinel for the master and runs the script there."""
    master = redis_factory()
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # sentinel rewrites its config file: it must be writable
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\n"
        f"sentinel monitor rl-master 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds rl-master 1000\n"
    )
    log_file = (tmp_path / "sentinel.log").open("wb")
    sentinel = await asyncio.to_thread(_start_sentinel, conf, log_file)
    limiter: RedisRateLimiter | None = None
    try:
        deadline = time.monotonic() + 10
        while not port_open(port) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        metrics, log = Metrics(), RecordingLogger()
        limiter = redis_limiter(
            f"redis+sentinel://127.0.0.1:{port}/rl-master/0", qps=20, metrics=metrics, log=log
        )
        await limiter.start(timeout_s=5.0)
        assert not limiter.in_fallback
        assert log.events() == ["rate_limit_redis_connected"]
        for _ in range(3):
            await limiter.acquire("via-sentinel")
        assert not limiter.in_fallback
        keys = await asyncio.to_thread(master.client().keys, "tiktok_worker:ratelimit:*")
        assert b"tiktok_worker:ratelimit:via-sentinel" in keys  # the master holds the schedule
    finally:
        if limiter is not None:
            await limiter.close()
        sentinel.terminate()
        sentinel.wait(10)
        log_file.close()


# -- the worker process: no work before the limiter is connected, share from the assignment ---


def _readyz(worker: WorkerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{worker.http_port}/readyz", timeout=2
        ) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()
    except OSError:
        return 0, ""


def test_worker_takes_no_work_before_redis_answers_then_follows_its_assignment(
    kafka: Any, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    redis = redis_factory()
    redis.stop()
    topics = TopicSet.create(kafka, "rl-start", 3)
    topic, dlq = topics.topic, topics.dlq_topic
    fake = FakeTikTokProcess(tmp_path).start()
    events = list(SampleEvents(seed=5, prefix="rl").stream(30))
    produce(kafka.bootstrap, topic, [encode(e) for e in events])
    expected = {e["messageId"] for e in events if e["type"] == "page"} | {
        e["messageId"]
        for e in events
        if e["type"] == "track" and e["event"] in DOCUMENTED_TRACK_EVENTS
    }
    config = worker_config(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq_topic=dlq,
        base_url=fake.url,
        group_id=topics.group,
        redis_url=redis.url,
        rate_limit={"qps": 200, "expected_replicas": 2},
    )
    worker = WorkerProcess(write_config(tmp_path / "worker.yaml", config)).start()
    try:
        assert wait_until(lambda: _readyz(worker)[0] == 503, 30)
        status, body = _readyz(worker)
        assert (status, body) == (503, "connecting to the rate-limit store")
        assert fake.stats()["accepted_events_total"] == 0  # nothing taken, nothing sent
        redis.start()
        worker.wait_ready(30)
        assert wait_until(lambda: expected <= set(fake.event_ids()), 60)
        text = worker.metrics()
        assert metric_value(text, "tiktok_worker_rate_limit_fallback") == 0
    finally:
        worker.stop()
        fake.stop()
    log = worker.log_path.read_text()
    assert "rate_limit_redis_connected" in log
    assert "rate_limit_fallback_local" not in log
    # The consumer told the limiter its share on every change: all 3 partitions once assigned,
    # none once revoked at the stop.
    shares = [
        (entry["assigned_partitions"], entry["total_partitions"])
        for entry in (json.loads(line) for line in log.splitlines() if "rate_limit_share" in line)
    ]
    assert shares == [(3, 3), (0, 3)]
