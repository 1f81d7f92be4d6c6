"""End-to-end runs: a pre-filled topic → `tiktok-worker run` process(es) → the fake TikTok server.

One run starts N worker processes in a fresh consumer group on a topic that already holds the
whole backlog, waits until the fake server has accepted every TikTok event the mapper makes of
that backlog, and measures at the fake server (its per-request records):

- `events_per_s`: Segment events (Kafka messages) in the topic / (end of the last accepted
  request - arrival of the first accepted request). The window starts at the first acceptance,
  so process start-up and the group join are excluded; it ends when the last event is accepted,
  so it includes the final partial batch's linger (at most `batch_linger_ms`).
- `steady_events_per_s`: the same rate between the 10% and 90% marks of accepted events.
- `events_per_request`: accepted TikTok events / accepted requests.
- `cpu`: CPU seconds of the worker process(es) (main thread = the asyncio loop, other =
  librdkafka and executor threads), the fake server and the broker, from the moment the workers
  were ready to the last acceptance; `events_per_worker_cpu_s` = messages / worker CPU seconds,
  i.e. what the worker delivers per core-second, whatever else competes for the machine.
- `window_cores`: cores used during the acceptance window by each process and by everything
  else on the machine (`others_cores`: other jobs sharing the 2 cores).

The worker is configured like production except: `rate_limit.qps` 100000 with the local
backend (the fake does not throttle; a run with the Redis backend measures its cost),
`logging.level: warning` (at `info` it logs one line per request), and the bench's own group
and topics.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DLQ_TOPIC, BenchEnv, CpuMeter
from devkit.harness import WorkerProcess, metric_value, worker_config, write_config

PRODUCT_TIKTOK = {
    "max_batch_events": 1000,
    "batch_linger_ms": 200,
    "request_timeout_s": 10,
    "max_concurrent_requests": 64,
}
THROUGHPUT_RATE_LIMIT = {"qps": 100000, "backend": "local"}


@dataclass
class WorkerSpec:
    """How the workers of one run are configured (overrides of the product defaults)."""

    processes: int = 1
    tiktok: Mapping[str, Any] | None = None
    rate_limit: Mapping[str, Any] | None = None
    kafka: Mapping[str, Any] | None = None
    log_level: str = "warning"
    # None: the one bench destination; else these (each receives every mapped event).
    destinations: Sequence[Mapping[str, Any]] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "tiktok": {**PRODUCT_TIKTOK, **(self.tiktok or {})},
            "rate_limit": {**THROUGHPUT_RATE_LIMIT, **(self.rate_limit or {})},
            "kafka": dict(self.kafka or {}),
            "log_level": self.log_level,
            "destinations": [d["name"] for d in self.destinations] if self.destinations else 1,
        }


def start_workers(
    env: BenchEnv, *, topic: str, group: str, spec: WorkerSpec, name: str
) -> list[WorkerProcess]:
    """Start `spec.processes` workers in `group` and wait until each answers /readyz."""
    assert env.fake is not None
    assert env.redis is not None
    rate_limit = {**THROUGHPUT_RATE_LIMIT, **(spec.rate_limit or {})}
    workers: list[WorkerProcess] = []
    for index in range(spec.processes):
        config = worker_config(
            bootstrap=env.bootstrap,
            topic=topic,
            dlq_topic=DLQ_TOPIC,
            base_url=env.fake.url,
            group_id=group,
            destinations=spec.destinations,
            redis_url=env.redis.url if rate_limit["backend"] == "redis" else None,
            tiktok={**PRODUCT_TIKTOK, **(spec.tiktok or {})},
            rate_limit=rate_limit,
            kafka={"commit_interval_s": 1.0, **(spec.kafka or {})},
        )
        config["logging"] = {"level": spec.log_level, "format": "json"}
        path = write_config(env.workdir / f"{name}-{index}.yaml", config)
        workers.append(WorkerProcess(path).start())
    for worker in workers:
        worker.wait_ready(90)
    return workers


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


def py_spy_path() -> Path | None:
    """$PY_SPY, else py-spy next to this interpreter, else on PATH (None: not installed)."""
    env = os.environ.get("PY_SPY")
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.executable).parent / "py-spy")
    found = shutil.which("py-spy")
    if found:
        candidates.append(Path(found))
    return next((c for c in candidates if c.is_file()), None)


class Profiler:
    """`py-spy record` (collapsed stacks) attached to one process until `stop()`."""

    def __init__(
        self, pid: int, out: Path, *, log: Path, rate: int = 97, native: bool = False
    ) -> None:
        py_spy = py_spy_path()
        if py_spy is None:
            raise RuntimeError("py-spy not found")
        argv = [str(py_spy), "record", "-p", str(pid), "-o", str(out), "-f", "raw"]
        argv += ["-r", str(rate), "--threads"]
        if native:
            argv.append("--native")
        self.out = out
        self._log = log.open("wb")
        self._proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> Path:
        """SIGINT makes py-spy write its output and exit."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        return self.out


def run_e2e(
    env: BenchEnv,
    *,
    topic: str,
    messages: int,
    expected_events: int,
    spec: WorkerSpec,
    name: str,
    timeout_s: float = 600,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One run; see the module docstring for what is measured."""
    fake = env.fake
    assert fake is not None
    assert env.kafka is not None
    fake.reset()
    group = env.new_group(name)
    workers = start_workers(env, topic=topic, group=group, spec=spec, name=name)
    pids = {"worker": [w.pid for w in workers], "fake": [env.fake_pid]}
    if env.kafka.pid is not None:
        pids["kafka"] = [env.kafka.pid]
    whole = CpuMeter(pids)
    whole.start()
    window = CpuMeter(pids)
    profiler = (
        Profiler(workers[0].pid, profile_to, log=env.workdir / f"{name}-py-spy.log")
        if profile_to is not None
        else None
    )
    deadline = time.monotonic() + timeout_s
    accepted = 0
    started = False
    try:
        while True:
            stats = fake.stats()
            accepted = stats["accepted_events_total"]
            if accepted > 0 and not started:
                window.start()
                started = True
            if accepted >= expected_events:
                break
            if stats["rejected_requests"]:
                raise RuntimeError(f"{name}: the fake rejected requests: {stats}")
            for worker in workers:
                if not worker.running():
                    raise RuntimeError(f"{name}: worker exited: {worker.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {accepted}/{expected_events} events after timeout")
            time.sleep(0.05)
        cpu_whole = whole.stop()
        cpu_window = window.stop()
        revokes = sum(_revokes(w) for w in workers)
    finally:
        if profiler is not None:
            profiler.stop()
        stop_workers(workers)
    requests = [r for r in fake.requests() if r["http_status"] == 200 and r["code"] == 0]
    result = measure_requests(requests, messages=messages)
    worker_cpu = cpu_whole["cpu_s"]["worker"]
    result.update(
        processes=spec.processes,
        spec=spec.describe(),
        accepted_events=accepted,
        partition_revokes=revokes,
        cpu_s=cpu_whole["cpu_s"],
        events_per_worker_cpu_s=round(messages / (worker_cpu["main"] + worker_cpu["other"])),
        events_per_main_thread_cpu_s=round(messages / worker_cpu["main"]),
        window_cores={**cpu_window["cores"], "others": cpu_window["others_cores"]},
        worker_main_thread_busy=round(
            cpu_window["cpu_s"]["worker"]["main"] / spec.processes / cpu_window["wall_s"], 2
        ),
    )
    if accepted != expected_events:
        result["note"] = f"accepted {accepted} events, expected {expected_events}"
    return result


def _revokes(worker: WorkerProcess) -> int:
    """Partition revocations the worker went through (0: the run had no rebalance)."""
    try:
        text = worker.metrics()
    except OSError:
        return -1
    return int(metric_value(text, "tiktok_worker_rebalances_total", {"kind": "revoke"}))


def measure_requests(requests: Sequence[Mapping[str, Any]], *, messages: int) -> dict[str, Any]:
    """Throughput figures from the fake's accepted-request records (see module docstring)."""
    if not requests:
        raise RuntimeError("no accepted requests recorded")
    ordered = sorted(requests, key=lambda r: r["received_unix"])
    first = ordered[0]["received_unix"]
    last = max(r["received_unix"] + r["latency_s"] for r in ordered)
    events = [r["events"] for r in ordered]
    total = sum(events)
    window = last - first
    # Steady state: between the arrivals of the requests that carry the 10% and 90% marks.
    lo_mark, hi_mark = 0.1 * total, 0.9 * total
    cumulative = 0
    t_lo = t_hi = None
    n_lo = n_hi = 0
    for r in ordered:
        cumulative += r["events"]
        if t_lo is None and cumulative >= lo_mark:
            t_lo, n_lo = r["received_unix"], cumulative
        if t_hi is None and cumulative >= hi_mark:
            t_hi, n_hi = r["received_unix"], cumulative
    steady = None
    if t_lo is not None and t_hi is not None and t_hi > t_lo:
        # TikTok events/s scaled to Segment events/s by the run's mapped ratio.
        steady = (n_hi - n_lo) / (t_hi - t_lo) * messages / total
    return {
        "messages": messages,
        "tiktok_events": total,
        "requests": len(ordered),
        "window_s": round(window, 3),
        "events_per_s": round(messages / window) if window > 0 else None,
        "tiktok_events_per_s": round(total / window) if window > 0 else None,
        "steady_events_per_s": round(steady) if steady else None,
        "events_per_request": round(total / len(ordered), 1),
        "full_batches": sum(1 for e in events if e >= 1000),
    }
