"""The rate limit as TikTok counts it: by arrival, real workers, a busy machine, a Redis restart.

One run starts N `tiktok-worker run` processes (one consumer group, the Redis rate limiter, one
destination, `max_batch_events: 1` so every event is one request) on a topic that holds more
than they may send, with two busy-loop processes competing for the cores, and records at the
fake Events API when each request *arrived* (`received_mono`, the fake's first look at the
request). Optionally Redis is stopped for a while in the middle of the run and started again
(empty: nothing is persisted), so every worker falls back to its local share and returns.

Figures (whole run, start-up and shut-down included):
- `worst_window`: most arrivals in any closed 1-second window, against `qps + 1` (no Redis
  fault) or `1.1 * qps` (across the restart);
- `budget_used`: arrivals / (qps * seconds) from `SETTLE_S` after the first arrival to the
  stop, while the topic still had a backlog (target >= 0.95).

`duration_s` and the outage times count from the first arrival. The workers are killed at
the end (what they would still send while draining is not part of the measurement).

The fake server stands for TikTok, whose servers our CPU load does not slow down: it runs at
nice -10 (the bench runs as root on the bench machine; otherwise it stays at 0 and says so),
so that a request is timestamped when it arrives, not when the fake gets the CPU back. The
workers, Kafka, Redis and the busy loops all run at the default priority.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.bench_mapping import make_events, recent_day
from bench.common import DLQ_TOPIC, BenchEnv, fill_topic
from devkit.harness import WorkerProcess, metric_value, worker_config, write_config
from devkit.ratelimit_driver import max_in_window

PARTITIONS = 8
# The group settles (every worker joined, partitions spread) within this after the first
# arrival; the share of the budget is measured from then on.
SETTLE_S = 2.0
BUSY_LOOP = "while True: pass"
FAKE_NICE = -10


def page_events(n: int) -> list[bytes]:
    """`n` Segment page calls: each maps to exactly one TikTok event (ViewContent)."""
    out: list[bytes] = []
    seed = 11
    day = recent_day()  # younger than max_event_age_s
    while len(out) < n:
        events = make_events(2 * n, seed=seed, day=day)
        out += [e for e in events if json.loads(e)["type"] == "page"]
        seed += 1
    return out[:n]


def renice_all_threads(pid: int, value: int) -> bool:
    """Set the nice value of every thread of `pid` (Linux: nice is per thread)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
    except (OSError, PermissionError):
        return False
    return True


def start_busy_loops(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def run_arrival(
    env: BenchEnv,
    *,
    processes: int,
    qps: float,
    duration_s: float,
    busy_loops: int = 2,
    redis_outage: tuple[float, float] | None = None,
    headroom: float | None = None,
    name: str,
) -> dict[str, Any]:
    """One run; `redis_outage=(at_s, down_s)` stops Redis `at_s` after the workers are ready
    and starts it again `down_s` later."""
    assert env.fake is not None
    assert env.redis is not None
    backlog = int(qps * (duration_s + 30) * 1.5)
    topic = env.new_topic(f"arrival-{name}", PARTITIONS)
    fill_topic(env.bootstrap, topic, page_events(backlog))
    group = env.new_group(name)
    fake_reniced = renice_all_threads(env.fake_pid, FAKE_NICE)
    env.fake.reset()
    hogs = start_busy_loops(busy_loops)
    workers: list[WorkerProcess] = []
    marks: dict[str, float] = {}
    try:
        for index in range(processes):
            config = worker_config(
                bootstrap=env.bootstrap,
                topic=topic,
                dlq_topic=DLQ_TOPIC,
                base_url=env.fake.url,
                group_id=group,
                redis_url=env.redis.url,
                tiktok={"max_batch_events": 1, "batch_linger_ms": 50},
                rate_limit={
                    "qps": qps,
                    "expected_replicas": processes,
                    **({} if headroom is None else {"headroom": headroom}),
                },
                kafka={"commit_interval_s": 1.0},
            )
            config["logging"] = {"level": "info", "format": "json"}
            path = write_config(env.workdir / f"{name}-{index}.yaml", config)
            workers.append(WorkerProcess(path).start())  # all together: a cold start under load
        for worker in workers:
            worker.wait_ready(90)
        marks["ready"] = time.monotonic()
        deadline = marks["ready"] + 60
        while env.fake.stats()["accepted_events_total"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: nothing arrived: {workers[0].log_tail()}")
            time.sleep(0.05)
        if redis_outage is not None:
            at_s, down_s = redis_outage
            time.sleep(at_s)
            marks["redis_stop"] = time.monotonic()
            env.redis.stop()
            time.sleep(down_s)
            env.redis.start()
            marks["redis_up"] = time.monotonic()
            time.sleep(max(0.0, duration_s - at_s - down_s))
        else:
            time.sleep(duration_s)
        marks["stop"] = time.monotonic()
        for worker in workers:
            if not worker.running():
                raise RuntimeError(f"{name}: worker exited: {worker.log_tail()}")
        late_slots = sum(
            int(metric_value(w.metrics(), "tiktok_worker_rate_limit_late_slots_total"))
            for w in workers
        )
    finally:
        for worker in workers:  # measured: no need to drain (and 4 drains would take a while)
            worker.kill()
        stop_processes(hogs)
    fallbacks = sum(_count_in_log(w, "rate_limit_fallback_local") for w in workers)
    requests = [r for r in env.fake.requests() if r["http_status"] == 200 and r["code"] == 0]
    return measure(
        requests,
        qps=qps,
        stop=marks["stop"],
        processes=processes,
        busy_loops=busy_loops,
        fake_reniced=fake_reniced,
        marks=marks,
        fallbacks=fallbacks,
        late_slots=late_slots,
        headroom=headroom,
    )


def _count_in_log(worker: WorkerProcess, text: str) -> int:
    try:
        return worker.log_path.read_text(errors="replace").count(text)
    except OSError:
        return -1


def measure(
    requests: Sequence[dict[str, Any]],
    *,
    qps: float,
    stop: float,
    processes: int,
    busy_loops: int,
    fake_reniced: bool,
    marks: dict[str, float],
    fallbacks: int,
    late_slots: int,
    headroom: float | None = None,
) -> dict[str, Any]:
    arrivals = sorted(float(r["received_mono"]) for r in requests)
    if not arrivals:
        raise RuntimeError("no accepted requests recorded")
    first = arrivals[0]
    span_from = first + SETTLE_S
    in_span = sum(1 for t in arrivals if span_from <= t < stop)
    span = stop - span_from
    worst = max_in_window(arrivals)
    worst_at = next(
        t for i, t in enumerate(arrivals) if bisect.bisect_right(arrivals, t + 1.0) - i == worst
    )
    result: dict[str, Any] = {
        "processes": processes,
        "busy_loops": busy_loops,
        "fake_nice": FAKE_NICE if fake_reniced else 0,
        "budget_qps": qps,
        "headroom": "default" if headroom is None else headroom,
        "requests": len(arrivals),
        "worst_window": worst,
        "worst_window_over_budget": round(worst / qps, 3),
        "worst_window_starts_at_s": round(worst_at - first, 2),
        "budget_used": round(in_span / (qps * span), 4) if span > 0 else None,
        "measured_s": round(span, 1),
        "fallback_switches": fallbacks,
        "late_slots_paid": late_slots,
        "ready_to_first_arrival_s": round(first - marks["ready"], 2),
    }
    result["per_second"] = _per_second(arrivals, first)
    if "redis_stop" in marks:
        result["redis_stop_at_s"] = round(marks["redis_stop"] - first, 2)
        result["redis_up_at_s"] = round(marks["redis_up"] - first, 2)
        result["redis_down_s"] = round(marks["redis_up"] - marks["redis_stop"], 2)
        around = [t for t in arrivals if marks["redis_stop"] - 1 <= t < marks["redis_up"] + 4]
        result["worst_window_around_restart"] = max_in_window(around)
    return result


def _per_second(arrivals: Sequence[float], first: float) -> list[int]:
    """Arrivals in each second after the first one (for the record; windows slide)."""
    counts = [0] * (int(arrivals[-1] - first) + 1)
    for t in arrivals:
        counts[int(t - first)] += 1
    return counts
