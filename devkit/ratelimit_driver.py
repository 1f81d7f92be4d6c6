"""A stand-in worker pod for the rate-limiter tests and benchmark, plus the shared helpers.

Run as a script (one process = one pod, its own event loop and limiter):

    python devkit/ratelimit_driver.py --url http://127.0.0.1:P/hit --redis-url redis://... \\
        --qps 50 --replicas 4 --worker 0 --start-at <unix time> --duration 20

It starts at `--start-at` (wall clock, so several processes start together), runs
`--concurrency` tasks that each loop `acquire(key)` → POST to `--url` until the deadline,
reports TikTok-style throttling (`{"code": 40100}`) to the limiter, and prints one JSON summary
line on stdout. Each POST carries the worker id and the current value of the fallback gauge,
so the recording server knows who sent what, in which mode.

Imported (by the tests and `bench/bench_ratelimit.py`): `RecordingServer`, the fake endpoint
that timestamps every request on one clock, `run_drivers()`, which runs N of these processes
against one, and `max_in_window`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from worker.delivery.ratelimit import DEFAULT_HEADROOM, AdaptiveSettings, build_rate_limiter
from worker.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve()
STARTUP_S = 3.0  # time for driver processes to import and connect before the common start
THROTTLED_BODY = {"code": 40100, "message": "Too many requests. Please retry in some time."}


@dataclass(frozen=True, slots=True)
class Hit:
    """One request: arrival time at the server, release time at the sender, sender, mode.

    Both times are `time.monotonic()`, which on Linux is one system-wide clock, so release
    times of different processes compare directly.
    """

    t: float
    released: float
    worker: int
    fallback: bool
    throttled: bool


class RecordingServer:
    """POST /hit → `{"code": 0}` (or 40100 while throttling); records every request."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        # [from, until) on time.monotonic(): answer 40100 to requests arriving in it.
        self.throttle_window = (0.0, 0.0)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hit"

    async def _hit(self, request: web.Request) -> web.Response:
        now = time.monotonic()  # first thing: the arrival time is what TikTok would count
        body = await request.json()
        throttled = self.throttle_window[0] <= now < self.throttle_window[1]
        self.hits.append(Hit(now, float(body["ts"]), int(body["w"]), bool(body["fb"]), throttled))
        return web.json_response(THROTTLED_BODY if throttled else {"code": 0})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hit", self._hit)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = _bound_port(site)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes the bound port only through the asyncio server
    sockets = getattr(server, "sockets", None)
    assert sockets, "the site is not listening"
    return int(sockets[0].getsockname()[1])


def max_in_window(times: Sequence[float], width: float = 1.0) -> int:
    """The largest number of `times` inside any closed window [t, t + width]."""
    ts = sorted(times)
    best = 0
    for i, t in enumerate(ts):
        best = max(best, bisect.bisect_right(ts, t + width) - i)
    return best


def count_between(times: Sequence[float], start: float, end: float) -> int:
    """How many of `times` fall in [start, end)."""
    return sum(1 for t in times if start <= t < end)


@dataclass
class DriverRun:
    """What the server recorded and what each driver reported."""

    hits: list[Hit]
    summaries: list[dict[str, Any]]
    stderr: list[str]
    start: float  # time.monotonic() of the common start

    def released(self, worker: int | None = None) -> list[float]:
        return sorted(h.released for h in self.hits if worker is None or h.worker == worker)

    def arrived(self) -> list[float]:
        return sorted(h.t for h in self.hits)


async def run_drivers(
    *,
    processes: int,
    redis_url: str,
    qps: float,
    replicas: int,
    duration: float,
    during: Callable[[RecordingServer, float], Awaitable[None]] | None = None,
    extra: Sequence[str] = (),
) -> DriverRun:
    """Run `processes` driver pods on one fresh key against a new RecordingServer.

    They start together `STARTUP_S` seconds from now; `during(server, start)` runs meanwhile
    (to stop Redis, inject throttling, ...). A driver that fails raises AssertionError with its
    stderr.
    """
    server = RecordingServer()
    await server.start()
    start_wall = time.time() + STARTUP_S
    start = time.monotonic() + STARTUP_S
    key = f"app:run-{uuid.uuid4().hex[:8]}:/open_api/v1.3/event/track/"
    procs: list[asyncio.subprocess.Process] = []
    try:
        for worker in range(processes):
            argv = [
                str(DRIVER),
                "--url", server.url,
                "--redis-url", redis_url,
                "--qps", str(qps),
                "--replicas", str(replicas),
                "--worker", str(worker),
                "--key", key,
                "--start-at", repr(start_wall),
                "--duration", str(duration),
                *extra,
            ]  # fmt: skip
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    *argv,
                    cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        outputs = [asyncio.ensure_future(p.communicate()) for p in procs]
        if during is not None:
            await during(server, start)
        done = await asyncio.wait_for(asyncio.gather(*outputs), timeout=STARTUP_S + duration + 30)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await server.stop()
    stderr = [err.decode(errors="replace") for _, err in done]
    for p, err in zip(procs, stderr, strict=True):
        assert p.returncode == 0, f"driver exited with {p.returncode}:\n{err[-3000:]}"
    summaries = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in done]
    return DriverRun(server.hits, summaries, stderr, start)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    metrics = Metrics()
    limiter = build_rate_limiter(
        backend=args.backend,
        qps=args.qps,
        redis_url=args.redis_url,
        expected_replicas=args.replicas,
        metrics=metrics,
        redis_timeout_s=args.redis_timeout,
        probe_interval_s=args.probe_interval,
        adaptive=AdaptiveSettings(recovery_per_s=args.recovery_per_s),
        late_tolerance_s=args.late_tolerance,
        headroom=args.headroom,
    )
    await limiter.start()
    key = args.key
    sent = throttled = 0
    deadline = args.start_at + args.duration

    def fallback() -> int:
        value = metrics.registry.get_sample_value("tiktok_worker_rate_limit_fallback")
        return int(value or 0)

    async def loop(session: aiohttp.ClientSession) -> None:
        nonlocal sent, throttled
        while True:
            await limiter.acquire(key)
            released = time.monotonic()
            if time.time() >= deadline:
                return
            hit = {"w": args.worker, "fb": fallback(), "ts": released}
            async with session.post(args.url, json=hit) as r:
                body = await r.json()
            sent += 1
            if body.get("code") == 40100:
                throttled += 1
                limiter.throttled(key, None)

    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(loop(session) for _ in range(args.concurrency)))
    finally:
        await limiter.close()
    return {
        "worker": args.worker,
        "sent": sent,
        "throttled": throttled,
        "fallback": fallback(),
        "late_slots_paid": getattr(limiter, "late_slots_paid", 0),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--backend", default="redis", choices=["redis", "local"])
    p.add_argument("--qps", type=float, required=True)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--key", default="app:bench:/open_api/v1.3/event/track/")
    p.add_argument("--start-at", type=float, default=0.0, help="unix time to start")
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--redis-timeout", type=float, default=0.25)
    p.add_argument("--probe-interval", type=float, default=0.25)
    p.add_argument("--recovery-per-s", type=float, default=0.25)
    p.add_argument("--late-tolerance", type=float, default=None, help="default: from headroom")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM)
    args = p.parse_args(argv)
    if args.start_at <= 0:
        args.start_at = time.time()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    summary = asyncio.run(_run(_parse(argv)))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
