"""`make chaos`: run the chaos suite and write the figures to docs/reliability.md.

    python devkit/chaos/run.py --long              # a few minutes; writes docs/reliability.md
    python devkit/chaos/run.py --defaults          # issue 14's done-when, product defaults
    python devkit/chaos/run.py --short             # the `make test` scenario, printed only
    python devkit/chaos/run.py --long --duration 120 --seed 3 --no-write

`--long` and `--defaults` each replace their own section of docs/reliability.md.

Starts its own Kafka broker and Redis (it stops and kills them on purpose), the fake TikTok
server and three workers (see devkit/chaos/harness.py). Exit status 0 when nothing was lost
and nothing was wrongly dead-lettered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from devkit.chaos.harness import FAILOVER_CLIENT_SETTINGS, ChaosPlan, ChaosResult, ChaosRun
from devkit.infra.kafka import KafkaServer, kafka_version
from devkit.infra.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]

REPORT = REPO / "docs" / "reliability.md"
REPORT_MARKER = "<!-- chaos results: written by devkit/chaos/run.py -->"
DEFAULTS_MARKER = "<!-- chaos results, product defaults: written by devkit/chaos/run.py -->"
# Plan name -> (marker, heading) of its section in docs/reliability.md, in document order.
SECTIONS = {
    "long": (REPORT_MARKER, "Latest `make chaos` run"),
    "defaults": (DEFAULTS_MARKER, "Latest product-defaults run (`run.py --defaults`)"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}){mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    redis_v = next((p.split("=", 1)[1] for p in redis if p.startswith("v=")), "?")
    return f"Apache Kafka {kafka_version()} (KRaft, 1 node), Redis {redis_v}"


def commit() -> str:
    res = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    head = res.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "worker"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{head} (with uncommitted changes in worker/)" if dirty else head


def results_markdown(result: ChaosResult, revision: str) -> str:
    r = result
    drain = f"{r.drain_s:.1f} s" if r.drain_s is not None else "did not drain"
    faults = "<br>".join(f"{k} x {v}" for k, v in sorted(r.faults.items()))
    applied = ", ".join(f"{k} {v}" for k, v in sorted(r.fake_faults_applied.items()))
    exits = ", ".join(f"{k} x {v}" for k, v in sorted(r.worker_exits.items())) or "none"
    misfiled = len(r.rejected_not_dead_lettered) + len(r.rejected_wrong_reason)
    fallback = "yes" if r.fallback_seen else "no"
    if not any(o.target == "redis" for o in r.plan.outages):
        fallback = "n/a (no Redis outage in this plan)"
    rows = [
        ("Result", "**PASS**" if r.ok else "**FAIL**" + _why(r)),
        ("Date (UTC)", r.started_at),
        ("Commit", revision),
        ("Machine", machine()),
        ("Servers", versions()),
        ("Plan", "<br>".join(r.plan.describe())),
        ("Messages produced", f"{r.messages_produced:,}"),
        ("Events to deliver (mapped)", f"{r.events_expected:,}"),
        ("Malformed messages", f"{r.malformed_produced:,}"),
        ("Faults injected", faults),
        ("Fake TikTok requests / faulted", f"{r.fake_requests:,} / "
         f"{sum(r.fake_faults_applied.values()):,} ({applied})"),
        ("Worker starts", f"{r.worker_starts} (exits not caused by kill -9: {exits})"),
        ("**Lost**", f"**{len(r.lost)}**"),
        ("**Wrongly dead-lettered**", f"**{len(r.wrongly_dead_lettered)}**"),
        ("Malformed not dead-lettered / wrong reason",
         f"{r.malformed_lost} / {r.malformed_wrong_reason}"),
        ("Duplicates (redeliveries, deduplicated by TikTok on event_id)",
         f"{r.duplicates:,} ({r.duplicates / max(r.events_expected, 1):.1%} of events)"),
        ("Accepted by TikTok (unique / with redeliveries)",
         f"{r.accepted_unique:,} / {r.accepted_total:,}"),
        ("Events invalid for TikTok: produced / dead-lettered otherwise or not at all / "
         "accepted", f"{r.rejected_produced:,} / {misfiled:,} / {r.rejected_accepted:,}"),
        ("Dead letters", f"{r.dead_letters:,}"),
        ("**Drain time after the last fault**", f"**{drain}**"),
        ("Requests to TikTok / faulted / answered 40002",
         f"{r.fake_requests:,} / {r.fault_share:.1%} / {r.share_40002:.1%}"),
        ("Events per accepted request (median)", f"{r.median_events_per_accepted_request:g}"),
        ("Exit status after SIGTERM", ", ".join(str(c) for c in r.final_exit_codes)),
        ("Offsets committed to the end of the topic", "yes" if r.offsets_committed_to_end
         else "no"),
        ("Rate-limit fallback seen during a Redis outage", fallback),
        ("Wall time", f"{r.wall_s:.0f} s"),
    ]  # fmt: skip
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    timeline = "\n".join(r.timeline)
    if r.plan.product_defaults:
        config = (
            "Worker settings: the product defaults; the config sets only the addresses, "
            "topics, group, destination, metrics port and JSON logs."
        )
    else:
        settings = ", ".join(f"`{k}={v}`" for k, v in FAILOVER_CLIENT_SETTINGS.items())
        config = (
            f"Worker settings beyond the test defaults: `kafka.client` {settings}; "
            "`rate_limit.backend: redis`; `tiktok.retry.deadline_s: 900`."
        )
    marker, heading = SECTIONS.get(r.plan.name, (REPORT_MARKER, "Latest `make chaos` run"))
    return (
        f"{marker}\n\n## {heading}\n\n{table}\n\n{config}\n\n"
        f"<details><summary>Timeline</summary>\n\n```\n{timeline}\n```\n\n</details>\n"
    )


def _why(r: ChaosResult) -> str:
    reasons = []
    if r.lost:
        reasons.append(f"{len(r.lost)} lost")
    if r.rejected_not_dead_lettered or r.rejected_wrong_reason or r.rejected_accepted:
        reasons.append("events invalid for TikTok not dead-lettered as permanent_api_error")
    if r.wrongly_dead_lettered:
        reasons.append(f"{len(r.wrongly_dead_lettered)} wrongly dead-lettered")
    if r.malformed_lost or r.malformed_wrong_reason:
        reasons.append("malformed input not dead-lettered as expected")
    if r.drain_s is None:
        reasons.append("did not drain")
    if r.crashes:
        reasons.append(f"{sum(r.crashes.values())} worker crash(es), see Worker starts")
    if r.final_exit_codes != [0] * r.plan.workers:
        reasons.append("a worker did not exit 0 on SIGTERM")
    return " (" + "; ".join(reasons) + ")" if reasons else ""


def write_report(result: ChaosResult, revision: str, path: Path = REPORT) -> None:
    """Replace this plan's results section of docs/reliability.md (the text from its marker
    to the next section's marker or the end); the other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Reliability\n"
    found = sorted((text.index(m), name) for name, (m, _) in SECTIONS.items() if m in text)
    head = text[: found[0][0]] if found else text
    sections = {
        name: text[pos : found[i + 1][0] if i + 1 < len(found) else len(text)].strip()
        for i, (pos, name) in enumerate(found)
    }
    sections[result.plan.name] = results_markdown(result, revision).strip()
    body = "\n\n".join(sections[name] for name in SECTIONS if name in sections)
    path.write_text(head.rstrip() + "\n\n" + body + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--long", action="store_true", help="the long run (default)")
    mode.add_argument("--short", action="store_true", help="the short run of make test")
    mode.add_argument(
        "--defaults", action="store_true", help="issue 14's done-when with the product defaults"
    )
    parser.add_argument("--duration", type=float, help="fault window in seconds (not --short)")
    parser.add_argument("--seed", type=int, help="random seed (kills, events)")
    parser.add_argument("--no-write", action="store_true", help="do not write the report")
    parser.add_argument("--workdir", type=Path, help="where logs go (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.short:
        plan = ChaosPlan.short(**({"seed": args.seed} if args.seed is not None else {}))
    elif args.defaults:
        kw: dict[str, float | int] = {}
        if args.seed is not None:
            kw["seed"] = args.seed
        if args.duration is not None:
            kw["duration_s"] = args.duration
        plan = ChaosPlan.defaults(**kw)  # type: ignore[arg-type]
    else:
        kwargs: dict[str, float | int] = {}
        if args.seed is not None:
            kwargs["seed"] = args.seed
        if args.duration is not None:
            kwargs["duration_s"] = args.duration
        plan = ChaosPlan.long(**kwargs)  # type: ignore[arg-type]
    revision = commit()  # what runs is the tree as it is now
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"chaos-{plan.name}-"))
    print(f"chaos: {plan.name} run, logs in {workdir}", flush=True)
    for line in plan.describe():
        print(f"  {line}", flush=True)
    kafka = KafkaServer(workdir=workdir / "kafka")
    redis = RedisServer(workdir=workdir / "redis")
    try:
        kafka.start()
        redis.start()
        result = ChaosRun(plan, kafka=kafka, redis=redis, workdir=workdir / "run").run()
    finally:
        redis.stop()
        kafka.stop()
    print("timeline:\n  " + "\n  ".join(result.timeline), flush=True)
    print(result.summary(), flush=True)
    if not args.short and not args.no_write:
        write_report(result, revision)
        print(f"chaos: results written to {REPORT.relative_to(REPO)} "
              f"({dt.datetime.now(dt.UTC):%Y-%m-%d})")  # fmt: skip
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
