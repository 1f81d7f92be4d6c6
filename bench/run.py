"""`make bench`: throughput, batching, rate-limit precision, memory and latency in one run.

Starts its own Kafka broker, Redis and fake TikTok server on 127.0.0.1 (devkit/infra and
devkit/harness), fills a benchmark topic with a realistic Segment mix (`bench.bench_mapping.
make_events`), and measures, each figure as min/median/max over several runs:

 1. raw ceiling: confluent-kafka batched consume of the topic, no processing (`raw_consume`);
 2. decode-only floor and 3. decode+map, in memory over the same messages (`bench_mapping`);
 4. end to end, 1 and 2 worker processes, backlog drained into the fake (`e2e`), plus one run
    with the Redis rate limiter and one profiled with py-spy (`profile`);
 5. the Segment-style baseline, one request per event (`baseline`);
 6. rate-limit precision for 1, 2 and 4 processes (`bench_ratelimit`, as a subprocess);
 6b. the rate limit by arrival at the fake Events API: 1, 2 and 4 real worker processes on a
    machine loaded by two busy loops, and 4 across a Redis restart (`arrival`);
 7. peak RSS draining a large backlog against a slow fake (`memory`);
 8. produce→acceptance latency at 10% of the measured capacity (`latency`);
 9. lanes: a healthy destination's throughput while another answers 503, as a fraction of
    its throughput without the outage, and events per request of a lane limited to
    2 requests/s with a backlog (`lanes`);
10. parking: the same with a page-view backlog above the in-flight bound, the source group's
    lag during the outage, and the time from the end of the outage to an empty retry backlog
    (`parking`).

Writes bench/results.json and bench/results.md (the table the README quotes); docs/benchmarks.md
explains the method. Figures are reported against the targets of issue #10; nothing fails.

Run: `.venv/bin/python bench/run.py [--quick] [--only SECTIONS] [--out DIR]`
(`--quick` is a 2-3 minute version with smaller topics and fewer runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import bench_mapping
from bench.arrival import run_arrival
from bench.baseline import run_baseline
from bench.common import BenchEnv, fill_topic, log, summary, versions
from bench.e2e import WorkerSpec, py_spy_path, run_e2e
from bench.lanes import run_lanes
from bench.latency import run_latency
from bench.memory import run_memory
from bench.parking import run_parking
from bench.profile import summarise
from bench.raw_consume import raw_consume
from bench.report import TARGETS, derive, markdown
from devkit.harness import destination, worker_config, write_config
from worker.config import load_config
from worker.mapping.mapper import Mapper
from worker.mapping.segment import decode_event

ROOT = Path(__file__).resolve().parents[1]

PARTITIONS = 4
# Issue 18: every event to two destinations (two pixels of the same presets), one process.
TWO_DESTINATIONS = WorkerSpec(
    destinations=[
        destination(),
        destination("web-shop-eu", pixel="BU35TSQHT2A1QT375OMG", token="token-2"),
    ]
)
SECTIONS = (
    "mapping",
    "throughput",
    "redis",
    "profile",
    "baseline",
    "latency",
    "ratelimit",
    "arrival",
    "memory",
    "lanes",
    "parking",
)

FULL: dict[str, Any] = {
    "messages": 300_000,
    "runs": 3,
    "mapping_events": 50_000,
    "mapping_rounds": 5,
    "baseline_messages": 20_000,
    "baseline_runs": 3,
    "ratelimit_runs": 2,
    "ratelimit_duration_s": 10,
    "ratelimit_qps": 200,
    "arrival_qps": 40,
    "arrival_duration_s": 20,
    "arrival_processes": [1, 2, 4],
    "arrival_outage": [8.0, 3.0],
    "arrival_other_headrooms": [0.05],
    "memory_messages": 1_000_000,
    "memory_slow_delay_s": 1.0,
    "memory_max_s": 150,
    "latency_runs": 3,
    "latency_duration_s": 20,
    "lanes_runs": 5,
    "lanes_a_messages": 5_000,
    "lanes_b_messages": 200_000,
    "lanes_throttle_backlog": 20_000,
    "lanes_throttle_s": 10,
    "parking_runs": 3,
    "parking_a_messages": 40_000,
    "parking_b_messages": 60_000,
    "parking_outage_s": 120,
    "parking_backlog_outage_s": 30,
    "parking_steady_rate": 3_000,
}
QUICK: dict[str, Any] = {
    **FULL,
    "messages": 100_000,
    "runs": 2,
    "mapping_events": 20_000,
    "mapping_rounds": 3,
    "baseline_messages": 5_000,
    "baseline_runs": 2,
    "ratelimit_runs": 1,
    "ratelimit_duration_s": 4,
    "arrival_duration_s": 12,
    "arrival_outage": [5.0, 2.0],
    "memory_messages": 200_000,
    "memory_max_s": 20,
    "latency_runs": 1,
    "latency_duration_s": 10,
    "lanes_runs": 2,
    "lanes_b_messages": 30_000,
    "lanes_throttle_s": 6,
    "parking_runs": 1,
    "parking_a_messages": 25_000,
    "parking_b_messages": 30_000,
    "parking_outage_s": 30,
    "parking_backlog_outage_s": 20,
}


class Bench:
    def __init__(self, env: BenchEnv, cfg: dict[str, Any], out: Path) -> None:
        self.env = env
        self.cfg = cfg
        self.out = out
        self.results: dict[str, Any] = {}
        self.events: list[bytes] = []
        self.topic = ""
        self.mapper: Mapper | None = None
        self.expected = 0
        self._memory: tuple[str, int, int] | None = None

    # -- set-up ----------------------------------------------------------------------------

    def prepare(self) -> None:
        n = self.cfg["messages"]
        log(f"generating {n} Segment events (bench_mapping.make_events)")
        # Stamped yesterday: the workers run with the default max_event_age_s (48 h).
        self.events = bench_mapping.make_events(n, day=bench_mapping.recent_day())
        self.topic = self.env.new_topic("bench-events", PARTITIONS)
        count, seconds = fill_topic(self.env.bootstrap, self.topic, self.events)
        log(f"produced {count} messages to {self.topic} in {seconds:.1f}s")
        self.mapper = self._mapper()
        self.expected = self.mapped_count(self.events)
        self.results["topic"] = {
            "partitions": PARTITIONS,
            "messages": count,
            "mean_message_bytes": round(sum(map(len, self.events)) / count),
            "tiktok_events": self.expected,
            "mapped_per_message": round(self.expected / count, 3),
            "generator": "bench/bench_mapping.py make_events (seed 7, stamped yesterday)",
            "destinations": "1 (web-shop, presets: documented)",
        }

    def _mapper(self) -> Mapper:
        """The same mapping configuration the bench workers run with."""
        assert self.env.fake is not None
        config = worker_config(
            bootstrap=self.env.bootstrap,
            topic=self.topic,
            dlq_topic="unused",
            base_url=self.env.fake.url,
        )
        path = write_config(self.env.workdir / "mapper.yaml", config)
        return Mapper(load_config(str(path)))

    def mapped_count(self, values: Sequence[bytes]) -> int:
        assert self.mapper is not None
        mapper = self.mapper
        return sum(len(o.mapped) for raw in values for o in mapper.map_message(raw))

    # -- sections --------------------------------------------------------------------------

    def mapping(self) -> None:
        """(2) and (3): in memory, over the first `mapping_events` messages of the topic."""
        assert self.mapper is not None
        sample = self.events[: self.cfg["mapping_events"]]
        rounds = self.cfg["mapping_rounds"]
        log(f"decode-only and decode+map over {len(sample)} messages x {rounds} rounds")
        self.results["decode_only"] = bench_mapping._rate(decode_event, sample, rounds)
        self.results["decode_map"] = bench_mapping._rate(self.mapper.map_message, sample, rounds)
        self.results["decode_map"]["note"] = (
            "events per CPU-second of the bench process (bench_mapping._rate), "
            "1 destination, documented presets"
        )

    def throughput(self) -> None:
        """(1) raw consume and (4) e2e with 1 and 2 processes, interleaved round by round so
        that every kind of run sees the same background load."""
        raw: list[dict[str, Any]] = []
        one: list[dict[str, Any]] = []
        two: list[dict[str, Any]] = []
        two_destinations: list[dict[str, Any]] = []
        n = len(self.events)
        for i in range(self.cfg["runs"]):
            log(f"round {i + 1}: raw consume")
            raw.append(
                raw_consume(self.env.bootstrap, self.topic, n, group=self.env.new_group("raw"))
            )
            log(f"round {i + 1}: end to end, 1 worker process")
            one.append(self._e2e(WorkerSpec(processes=1), f"e2e1-{i}"))
            log(f"round {i + 1}: end to end, 2 worker processes")
            two.append(self._e2e(WorkerSpec(processes=2), f"e2e2-{i}"))
            log(f"round {i + 1}: end to end, 1 worker process, 2 destinations")
            two_destinations.append(
                self._e2e(TWO_DESTINATIONS, f"e2e1d2-{i}", expected_events=2 * self.expected)
            )
            log(
                f"round {i + 1}: raw {raw[-1]['events_per_s']}/s, 1 proc "
                f"{one[-1]['events_per_s']}/s, 2 proc {two[-1]['events_per_s']}/s"
            )
        self.results["raw_consume"] = {
            "events_per_s": summary([r["events_per_s"] for r in raw]),
            "events_per_cpu_s": summary([r["events_per_cpu_s"] for r in raw]),
            "runs": raw,
        }
        self.results["e2e_1_process"] = self._e2e_summary(one)
        self.results["e2e_2_processes"] = self._e2e_summary(two)
        self.results["e2e_1_process_2_destinations"] = self._e2e_summary(two_destinations)

    def _e2e(self, spec: WorkerSpec, name: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("expected_events", self.expected)
        return run_e2e(
            self.env, topic=self.topic, messages=len(self.events), spec=spec, name=name, **kwargs
        )

    @staticmethod
    def _e2e_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "events_per_s": summary([r["events_per_s"] for r in runs]),
            "steady_events_per_s": summary([r["steady_events_per_s"] or 0 for r in runs]),
            "events_per_worker_cpu_s": summary([r["events_per_worker_cpu_s"] for r in runs]),
            "events_per_main_thread_cpu_s": summary(
                [r["events_per_main_thread_cpu_s"] for r in runs]
            ),
            "events_per_request": summary([r["events_per_request"] for r in runs], 1),
            "worker_main_thread_busy": summary([r["worker_main_thread_busy"] for r in runs], 2),
            "others_cores": summary([r["window_cores"]["others"] for r in runs], 2),
            "worker_cores": summary([r["window_cores"]["worker"] for r in runs], 2),
            "fake_cores": summary([r["window_cores"]["fake"] for r in runs], 2),
            # Worker(s), fake TikTok and broker together: what the run took of the 2 cores.
            "run_cores": summary(
                [
                    sum(r["window_cores"].get(k, 0.0) for k in ("worker", "fake", "kafka"))
                    for r in runs
                ],
                2,
            ),
            "config": runs[0]["spec"] if runs else None,
            "runs": runs,
        }

    def redis(self) -> None:
        log("end to end, 1 worker process, Redis rate limiter (qps 100000)")
        spec = WorkerSpec(rate_limit={"backend": "redis"})
        self.results["e2e_1_process_redis_limiter"] = self._e2e_summary(
            [self._e2e(spec, "e2e-redis")]
        )

    def profile(self) -> None:
        if py_spy_path() is None:
            log("profile: py-spy not installed (.venv/bin/pip install py-spy); skipped")
            self.results["profile"] = {"skipped": "py-spy not installed: pip install py-spy"}
            return
        out = self.out / "profile-e2e.raw"
        log(f"end to end, 1 worker process under py-spy (not counted) -> {out}")
        run = self._e2e(WorkerSpec(), "e2e-profile", profile_to=out)
        self.results["profile"] = {"run": run, "summary": summarise(out, 20), "file": out.name}

    def baseline(self) -> None:
        m = self.cfg["baseline_messages"]
        values = self.events[:m]
        topic = self.env.new_topic("bench-baseline", PARTITIONS)
        fill_topic(self.env.bootstrap, topic, values)
        expected = self.mapped_count(values)
        runs = []
        for i in range(self.cfg["baseline_runs"]):
            log(f"baseline run {i + 1}: one request per event, {m} messages")
            runs.append(
                run_baseline(
                    self.env, topic=topic, messages=m, expected_events=expected, name=f"base-{i}"
                )
            )
            log(f"baseline run {i + 1}: {runs[-1]['events_per_s']}/s")
        self.results["baseline_one_request_per_event"] = {
            **self._e2e_summary(runs),
            "config": WorkerSpec(tiktok={"max_batch_events": 1}).describe(),
        }

    def latency(self) -> None:
        e2e = self.results.get("e2e_1_process")
        capacity = e2e["events_per_s"]["median"] if e2e else 10_000
        rate = max(500.0, 0.1 * capacity)
        runs = []
        for i in range(self.cfg["latency_runs"]):
            log(f"latency run {i + 1}: {rate:.0f} events/s for {self.cfg['latency_duration_s']}s")
            runs.append(
                run_latency(
                    self.env,
                    events=self.events[:50_000],
                    mapped_count=self.mapped_count,
                    rate=rate,
                    duration_s=self.cfg["latency_duration_s"],
                    name=f"lat{i}",
                )
            )
            log(f"latency run {i + 1}: p50 {runs[-1]['p50_ms']} ms, p99 {runs[-1]['p99_ms']} ms")
        self.results["latency"] = {
            "capacity_events_per_s": capacity,
            "rate_events_per_s": round(rate),
            "batch_linger_ms": 200,
            "p50_ms": summary([r["p50_ms"] for r in runs], 1),
            "p99_ms": summary([r["p99_ms"] for r in runs], 1),
            "runs": runs,
        }

    def ratelimit(self) -> None:
        assert self.env.redis is not None
        runs = []
        for i in range(self.cfg["ratelimit_runs"]):
            log(f"rate-limit run {i + 1} (bench/bench_ratelimit.py, processes 1,2,4)")
            proc = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "bench" / "bench_ratelimit.py"),
                    "--qps",
                    str(self.cfg["ratelimit_qps"]),
                    "--duration",
                    str(self.cfg["ratelimit_duration_s"]),
                    "--processes",
                    "1,2,4",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "REDIS_URL": self.env.redis.url},
                timeout=600,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"bench_ratelimit failed: {proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        by_n: dict[int, list[dict[str, Any]]] = {}
        for run in runs:
            for r in run["runs"]:
                by_n.setdefault(r["processes"], []).append(r)
        self.results["ratelimit"] = {
            "budget_qps": self.cfg["ratelimit_qps"],
            "duration_s": self.cfg["ratelimit_duration_s"],
            "by_processes": {
                str(n): {
                    "fraction_of_budget": summary([r["fraction_of_budget"] for r in rs], 4),
                    "worst_window_release": summary([r["worst_window_release"] for r in rs]),
                    "worst_window_arrival": summary([r["worst_window_arrival"] for r in rs]),
                }
                for n, rs in sorted(by_n.items())
            },
            "runs": runs,
        }

    def arrival(self) -> None:
        """(6b) The budget as TikTok counts it (see bench/arrival.py)."""
        qps, duration = self.cfg["arrival_qps"], self.cfg["arrival_duration_s"]
        runs: dict[str, dict[str, Any]] = {}
        for n in self.cfg["arrival_processes"]:
            log(f"arrival: {n} worker process(es), 2 busy loops, {qps:g}/s for {duration}s")
            runs[f"{n}_loaded"] = run_arrival(
                self.env, processes=n, qps=qps, duration_s=duration, name=f"arr{n}"
            )
            log(f"arrival: {runs[f'{n}_loaded']}")
        # The same at other headrooms: what the default must be for the arrival target.
        for headroom in self.cfg["arrival_other_headrooms"]:
            for n in self.cfg["arrival_processes"]:
                log(f"arrival: {n} worker process(es), 2 busy loops, headroom {headroom:g}")
                runs[f"{n}_loaded_h{headroom:g}"] = run_arrival(
                    self.env,
                    processes=n,
                    qps=qps,
                    duration_s=duration,
                    headroom=headroom,
                    name=f"arr{n}h{headroom:g}",
                )
                log(f"arrival: {runs[f'{n}_loaded_h{headroom:g}']}")
        at_s, down_s = self.cfg["arrival_outage"]
        n = max(self.cfg["arrival_processes"])
        log(f"arrival: {n} worker processes, 2 busy loops, Redis down {down_s}s at {at_s}s")
        runs[f"{n}_redis_restart"] = run_arrival(
            self.env,
            processes=n,
            qps=qps,
            duration_s=duration,
            redis_outage=(at_s, down_s),
            name=f"arr{n}r",
        )
        log(f"arrival: {runs[f'{n}_redis_restart']}")
        self.results["arrival"] = {
            "budget_qps": qps,
            "duration_s": duration,
            "headroom": "default (rate_limit.headroom)",
            "runs": runs,
        }

    def _memory_topic(self) -> tuple[str, int, int]:
        """The large backlog: the bench stream repeated up to `memory_messages` (produced once)."""
        if self._memory is None:
            target = self.cfg["memory_messages"]
            n = len(self.events)
            topic = self.env.new_topic("bench-memory", PARTITIONS)
            log(f"memory: producing {target} messages (the bench stream repeated)")
            count, seconds = fill_topic(
                self.env.bootstrap, topic, (self.events[i % n] for i in range(target))
            )
            log(f"memory: {count} messages in {seconds:.1f}s")
            expected = self.expected * (target // n) + self.mapped_count(self.events[: target % n])
            self._memory = (topic, count, expected)
            self.results["memory_backlog_produce_s"] = round(seconds, 1)
        return self._memory

    def memory(self) -> None:
        topic, count, expected = self._memory_topic()
        log(f"memory: draining {count} messages against a slow fake (product defaults)")
        result = run_memory(
            self.env,
            topic=topic,
            messages=count,
            expected_events=expected,
            slow_delay_s=self.cfg["memory_slow_delay_s"],
            max_seconds=self.cfg["memory_max_s"],
            name="memory",
        )
        self.results["memory"] = result
        log(f"memory: peak RSS {result['peak_rss_mb']} MB, drained={result['drained']}")

    def lanes(self) -> None:
        self.results["lanes"] = run_lanes(self.env, self.cfg)

    def parking(self) -> None:
        self.results["parking"] = run_parking(self.env, self.cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-3 minute version")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="results directory")
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' work directory (logs, data)"
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    only = [s for s in (args.only or ",".join(SECTIONS)).split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": cfg,
        "targets": TARGETS,
    }
    with BenchEnv(keep=args.keep) as env:
        results["machine"] = versions()
        bench = Bench(env, cfg, args.out)
        bench.results = results
        if set(only) - {"arrival"}:  # the arrival section fills its own topics
            bench.prepare()
        for section in SECTIONS:
            if section in only:
                getattr(bench, section)()
                results.setdefault("sections_done", []).append(section)
                # A crash later on keeps what was measured so far.
                (args.out / "results.partial.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.partial.json").unlink(missing_ok=True)
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["derived"] = derive(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    log(f"done in {results['duration_s']:.0f}s: {args.out / 'results.json'}, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
