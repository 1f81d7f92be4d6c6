"""Where a worker's CPU time goes: summarise `py-spy record -f raw --threads` output.

The raw format is one collapsed stack per line (`thread (tid): name;frame;...;frame count`),
root first. py-spy samples only threads that are running (not idle), so shares are shares of
CPU time. The summary has:

- `threads_pct`: share of samples per thread, and of that how much was a blocking wait
  (librdkafka's threads are native and invisible to py-spy). py-spy's idle filter drops a
  thread sleeping in epoll, but counts timed lock and condition waits (the consumer thread's
  hand-off semaphore, executor threads) as active, so those are reported apart;
- `buckets`: main-thread samples by pipeline stage: each sample goes to the stage of its
  deepest frame that names one (so hashing inside mapping counts as hashing), and only
  samples in none of them go to the asyncio loop / other;
- `self` and `inclusive`: the top functions by own time and by time including callees.

Run: `.venv/bin/python bench/profile.py PROFILE.raw [--top N]` (prints JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LINE_NO = re.compile(r":\d+\)$")

# (stage, path fragments naming it), most specific first within a sample. Fragments match
# py-spy's "func (path:line)" frames; the worker's modules by their package paths.
_STAGE_PATHS: list[tuple[str, tuple[str, ...]]] = [
    ("PII hashing and normalisation", ("worker/mapping/hashing.py", "hashlib", "phonenumbers")),
    ("JSON decode (msgspec, worker/mapping/segment.py)", ("worker/mapping/segment.py",)),
    ("event encode and request body (worker/mapping/body.py)", ("worker/mapping/body.py",)),
    (
        "mapping: routing, triggers, field extraction, coercion",
        ("worker/mapping/", "<worker.mapping.codegen>", "<worker.mapping.routes>"),
    ),
    ("metrics (prometheus_client)", ("prometheus_client", "worker/observability/metrics.py")),
    ("logging (structlog)", ("structlog", "worker/observability/logs.py")),
    ("rate limiter", ("worker/delivery/ratelimit/",)),
    (
        "HTTP client (aiohttp, worker/delivery/client.py)",
        ("aiohttp", "worker/delivery/client.py", "yarl", "multidict"),
    ),
    (
        "delivery bookkeeping (sender, circuit)",
        ("worker/delivery/sender.py", "worker/delivery/circuit.py", "worker/delivery/codes.py"),
    ),
    ("lanes (worker/delivery/lanes.py)", ("worker/delivery/lanes.py",)),
    (
        "pipeline bookkeeping (pipeline, inflight, offsets)",
        ("worker/pipeline/", "worker/delivery/inflight.py", "worker/kafka/offsets.py"),
    ),
    ("Kafka hand-off (worker/kafka/consumer.py)", ("worker/kafka/consumer.py",)),
    (
        "dead-letter and retry producers",
        ("worker/kafka/deadletters.py", "worker/kafka/parking.py", "worker/kafka/acked.py"),
    ),
    ("health / metrics HTTP server", ("worker/observability/health.py",)),
]
_STAGES: list[tuple[str, Callable[[str], bool]]] = [
    (stage, lambda f, parts=parts: any(p in f for p in parts)) for stage, parts in _STAGE_PATHS
]
_LOOP = "asyncio event loop (scheduling, selectors, sockets)"
# Leaf frames of a thread that is blocked, not computing.
_WAITS = (
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
    "_worker (concurrent/futures/thread.py",
    "select (selectors.py",
)


def is_wait(frames: list[str]) -> bool:
    return bool(frames) and frames[-1].startswith(_WAITS)


def _frame_key(frame: str) -> str:
    return _LINE_NO.sub(")", frame)


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread name, frames root→leaf, samples) per collapsed stack."""
    out: list[tuple[str, list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            thread = thread.split(":", 1)[1].strip() if ":" in thread else thread
            frames = frames[1:]
        else:
            thread = "?"
        out.append((thread, frames, int(count)))
    return out


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, test in _STAGES:
            if test(frame):
                return stage
    if any("asyncio/" in f or "selectors.py" in f for f in frames):
        return _LOOP
    return "other"


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    stacks = parse(path)
    total = sum(c for _, _, c in stacks)
    threads: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    main_total = 0
    for thread, frames, count in stacks:
        threads[thread] += count
        if is_wait(frames):
            waits[thread] += count
            continue
        if thread != "MainThread":
            continue
        main_total += count
        buckets[stage_of(frames)] += count
        if frames:
            self_time[_frame_key(frames[-1])] += count
        for key in {_frame_key(f) for f in frames}:
            inclusive[key] += count

    def share(counter: Counter[str], of: int, n: int | None = None) -> list[list[Any]]:
        return [[k, round(100 * v / of, 1)] for k, v in counter.most_common(n)] if of else []

    skip = ("<module>", "main (worker/cli.py)", "run (", "Runner.run", "BaseEventLoop.run")
    inclusive_top = Counter(
        {k: v for k, v in inclusive.items() if not k.startswith(skip) and "_run_once" not in k}
    )
    return {
        "samples": total,
        "main_thread_samples": main_total,
        "threads_pct": [
            [name, round(100 * n / total, 1), round(100 * waits[name] / total, 1)]
            for name, n in threads.most_common()
        ],
        "threads_pct_columns": ["thread", "all samples", "of which blocking waits"],
        "main_thread_stages_pct": share(buckets, main_total),
        "self_pct": share(self_time, main_total, top),
        "inclusive_pct": share(inclusive_top, main_total, top),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(json.dumps(summarise(args.profile, args.top), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
