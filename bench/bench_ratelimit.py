"""How well N worker processes share one Redis rate-limit budget.

For 1, 2 and 4 processes (devkit/ratelimit_driver.py, each its own interpreter, event loop and
RedisRateLimiter on one key), runs a backlogged load against a budget of `--qps` for
`--duration` seconds and measures at a fake endpoint that timestamps every request:

- `fraction_of_budget`: requests released in the run / (qps * duration);
- `worst_window_release`: most requests in any closed 1-second window, by the time the
  limiter released them (the limiter's own guarantee: <= qps + 1);
- `worst_window_arrival`: the same by arrival at the fake server (adds this machine's
  scheduling noise on the request path);
- per-process shares, and slots left empty to make up for late wake-ups (`late_slots_paid`).

Redis: `REDIS_URL`, else a private `redis-server` (devkit/infra). Prints one JSON object.
Run: `.venv/bin/python bench/bench_ratelimit.py [--qps 200] [--duration 10] [--processes 1,2,4]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from devkit.infra.redis_server import RedisServer
from devkit.ratelimit_driver import count_between, max_in_window, run_drivers

ROOT = Path(__file__).resolve().parents[1]


async def measure(
    *, processes: int, redis_url: str, qps: float, duration: float, extra: list[str]
) -> dict[str, Any]:
    run = await run_drivers(
        processes=processes,
        redis_url=redis_url,
        qps=qps,
        replicas=processes,
        duration=duration,
        extra=extra,
    )
    released = run.released()
    in_run = count_between(released, run.start, run.start + duration + 1e-3)
    return {
        "processes": processes,
        "requests": len(released),
        "achieved_rps": round(in_run / duration, 2),
        "fraction_of_budget": round(in_run / (qps * duration), 4),
        "worst_window_release": max_in_window(released),
        "worst_window_arrival": max_in_window(run.arrived()),
        "per_process_share": [
            round(len(run.released(w)) / max(1, len(released)), 3) for w in range(processes)
        ],
        "late_slots_paid": sum(int(s["late_slots_paid"]) for s in run.summaries),
        "fallback_requests": sum(1 for h in run.hits if h.fallback),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    extra = [] if args.late_tolerance is None else ["--late-tolerance", str(args.late_tolerance)]
    external = os.environ.get("REDIS_URL")
    server: RedisServer | None = None
    if external:
        redis_url, source = external, "REDIS_URL"
    else:
        server = RedisServer(workdir=Path(tempfile.mkdtemp(prefix="bench-redis-")))
        await asyncio.to_thread(server.start)
        redis_url, source = server.url, "redis-server (devkit/infra)"
    try:
        runs = []
        for n in counts:
            print(f"bench_ratelimit: {n} process(es), {args.duration}s ...", file=sys.stderr)
            runs.append(
                await measure(
                    processes=n,
                    redis_url=redis_url,
                    qps=args.qps,
                    duration=args.duration,
                    extra=extra,
                )
            )
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
    return {
        "benchmark": "ratelimit",
        "redis": source,
        "budget_qps": args.qps,
        "duration_s": args.duration,
        "late_tolerance_s": args.late_tolerance,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--qps", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--processes", default="1,2,4")
    p.add_argument(
        "--late-tolerance",
        type=float,
        default=None,
        help="seconds a process may wake after its slot before paying a slot (library default)",
    )
    result = asyncio.run(main_async(p.parse_args(argv)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
