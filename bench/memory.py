"""Peak RSS of one worker draining a large backlog against a slow fake TikTok server.

The fake holds every request for `slow_delay_s` (its `slow` fault) before answering, so
deliveries, not the consumer, set the pace, and what bounds memory is the worker's
backpressure (`kafka.max_inflight_messages`, pause/resume of partitions) and librdkafka's
pre-fetch queue. The worker runs with product defaults; `/proc/<pid>/status` is sampled every
0.25 s for VmRSS and VmHWM (the kernel's peak), and `/metrics` every second for in-flight
messages and paused partitions. The run ends when every event is accepted or after
`max_seconds`, whichever comes first (the result says which).
"""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path
from typing import Any

from bench.common import BenchEnv
from bench.e2e import WorkerSpec, start_workers, stop_workers
from devkit.harness import metric_value


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run_memory(
    env: BenchEnv,
    *,
    topic: str,
    messages: int,
    expected_events: int,
    slow_delay_s: float,
    max_seconds: float,
    name: str,
    spec: WorkerSpec | None = None,
) -> dict[str, Any]:
    fake = env.fake
    assert fake is not None
    fake.reset()
    fake.fault(kind="slow", delay_s=slow_delay_s)
    spec = spec or WorkerSpec()
    workers = start_workers(env, topic=topic, group=env.new_group(name), spec=spec, name=name)
    worker = workers[0]
    ready = _status_kb(worker.pid)
    timeline: list[list[float]] = []
    inflight_max = 0.0
    paused_seen = 0.0
    accepted = 0
    start = time.monotonic()
    next_metrics = start
    try:
        while True:
            now = time.monotonic()
            status = _status_kb(worker.pid)
            if not worker.running():
                raise RuntimeError(f"{name}: worker exited: {worker.log_tail()}")
            if now >= next_metrics:
                next_metrics = now + 1.0
                accepted = fake.stats()["accepted_events_total"]
                try:
                    text = worker.metrics()
                except (OSError, urllib.error.URLError):
                    text = ""
                inflight = metric_value(text, "tiktok_worker_inflight_messages")
                paused = metric_value(text, "tiktok_worker_paused_partitions")
                inflight_max = max(inflight_max, inflight)
                paused_seen = max(paused_seen, paused)
                timeline.append(
                    [round(now - start, 1), round(status.get("VmRSS", 0) / 1024, 1), accepted]
                )
            if accepted >= expected_events or now - start > max_seconds:
                break
            time.sleep(0.25)
        final = _status_kb(worker.pid)
    finally:
        stop_workers(workers)
        fake.clear_faults()
    elapsed = time.monotonic() - start
    return {
        "backlog_messages": messages,
        "slow_delay_s": slow_delay_s,
        "seconds": round(elapsed, 1),
        "drained": accepted >= expected_events,
        "accepted_events": accepted,
        "messages_done_estimate": round(messages * accepted / expected_events),
        "rss_at_ready_mb": round(ready.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mb": round(final.get("VmHWM", 0) / 1024, 1),
        "final_rss_mb": round(final.get("VmRSS", 0) / 1024, 1),
        "inflight_messages_max": int(inflight_max),
        "paused_partitions_max": int(paused_seen),
        "timeline_s_rss_mb_accepted": timeline,
    }
