"""End to end A/B: this checkout's worker against another's, one process, same backlog.

One set of servers (`BenchEnv`) and one topic of `make_events` messages (stamped yesterday);
then `tiktok-worker run` drains it in a fresh group, alternately with the other code (`--base`:
a directory holding a `worker/` package, put first on the workers' PYTHONPATH) and with this
checkout's, the order swapped every pair so drift in the machine's load hits both alike.
Each run is `bench.e2e.run_e2e` (the clock is the fake's accepted requests); the figures are
the medians of events/s, events per worker CPU-second and per main-thread CPU-second, and
their ratio new / base. `--new DIR` takes the new side from DIR instead of this checkout
(edits made meanwhile then stay out of the runs). `--profile PATH` adds one py-spy run of
the new side (summary with `bench/profile.py PATH`).

    git archive main worker | tar -x -C /tmp/base
    flock /tmp/heavy.lock .venv/bin/python bench/ab_e2e.py --base /tmp/base --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.bench_mapping import make_events, recent_day
from bench.common import BenchEnv, fill_topic, log
from bench.e2e import WorkerSpec, run_e2e
from devkit.harness import worker_config, write_config
from worker.config import load_config
from worker.mapping.mapper import Mapper

PARTITIONS = 4
FIGURES = ("events_per_s", "events_per_worker_cpu_s", "events_per_main_thread_cpu_s")


def _expected(env: BenchEnv, topic: str, events: list[bytes]) -> int:
    """TikTok events the workers' configuration makes of `events` (what the run waits for)."""
    assert env.fake is not None
    config = worker_config(
        bootstrap=env.bootstrap, topic=topic, dlq_topic="unused", base_url=env.fake.url
    )
    mapper = Mapper(load_config(str(write_config(env.workdir / "mapper.yaml", config))))
    return sum(len(o.mapped) for raw in events for o in mapper.map_message(raw))


def _worker_package(pythonpath: str | None) -> str:
    """Where a worker process started with `pythonpath` imports `worker` from."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    code = "import worker; print(worker.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd="/", capture_output=True, check=True
    )
    return str(Path(out.stdout.decode().strip()).parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="directory with a worker/")
    parser.add_argument("--new", type=Path, help="directory with a worker/ (default: this one)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="also profile one run of this checkout")
    args = parser.parse_args(argv)
    if not (args.base / "worker" / "__init__.py").is_file():
        print(f"ab_e2e: {args.base} holds no worker/ package", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    path_before = os.environ.get("PYTHONPATH")
    paths = {
        "base": str(args.base.resolve()),
        "new": str(args.new.resolve()) if args.new is not None else path_before,
    }
    packages = {label: _worker_package(path) for label, path in paths.items()}
    if packages["base"] == packages["new"]:
        print(f"ab_e2e: both sides import {packages['new']}", file=sys.stderr)
        return 2
    with BenchEnv() as env:
        events = make_events(args.messages, day=recent_day())
        topic = env.new_topic("ab-events", PARTITIONS)
        fill_topic(env.bootstrap, topic, events)
        expected = _expected(env, topic, events)
        log(f"{len(events)} messages, {expected} TikTok events expected per run")
        for i in range(args.pairs):
            order = ("base", "new") if i % 2 == 0 else ("new", "base")
            for label in order:
                path = paths[label]
                if path is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = path
                result = run_e2e(
                    env,
                    topic=topic,
                    messages=len(events),
                    expected_events=expected,
                    spec=WorkerSpec(processes=1),
                    name=f"{label}-{i}",
                )
                runs[label].append(result)
                log(f"pair {i + 1} {label}: " + ", ".join(f"{k} {result[k]}" for k in FIGURES))
        if paths["new"] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = paths["new"]
        if args.profile is not None:
            run_e2e(
                env,
                topic=topic,
                messages=len(events),
                expected_events=expected,
                spec=WorkerSpec(processes=1),
                name="profile",
                profile_to=args.profile,
            )
    medians = {
        label: {k: statistics.median(r[k] for r in rs) for k in FIGURES}
        for label, rs in runs.items()
    }
    out = {
        "messages": len(events),
        "pairs": args.pairs,
        "packages": packages,
        "median": medians,
        "new_over_base": {k: round(medians["new"][k] / medians["base"][k], 3) for k in FIGURES},
        "runs": {
            label: [
                {**{k: r[k] for k in FIGURES}, "others_cores": r["window_cores"]["others"]}
                for r in rs
            ]
            for label, rs in runs.items()
        },
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
