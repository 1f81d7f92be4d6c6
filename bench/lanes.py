"""Lanes (issue 14): isolation during another destination's outage, and batches under throttling.

Isolation: two destinations on different TikTok apps, `shop-a` taking page views and `shop-b`
the documented track events, one worker with product defaults (the rate limit is lifted as in
the throughput runs). A backlog of `a_messages` page views interleaved with `b_messages` track
events is drained twice, once with the fake answering every `shop-a` request with HTTP 503 and
once without. `shop-b`'s throughput is its accepted events / (last - first acceptance), at the
fake; the figure is the ratio of the two. `a_messages` stays below half of
`max_inflight_messages` (the level at which paused partitions resume): lanes alone keep the
healthy destination flowing only while the destination in trouble holds less than that
(parking, the next issue, removes the limit).

Throttled lane: one destination with `rate_limit.qps` 2 and a backlog; the figure is the median
events per accepted request over `duration_s` (batches are sealed when the slot is granted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.common import DLQ_TOPIC, BenchEnv, fill_topic, log, summary
from bench.e2e import PRODUCT_TIKTOK, THROUGHPUT_RATE_LIMIT
from devkit.harness import WorkerProcess, http_json, wait_until, worker_config, write_config
from devkit.sample_events import DOCUMENTED_TRACK_EVENTS, SampleEvents, encode

PIXEL_A = "C5PIXEL00000000000A1"
PIXEL_B = "C5PIXEL00000000000B2"
PARTITIONS = 4

SHOPS = [
    {
        "name": "shop-a",
        "pixel_code": PIXEL_A,
        "access_token": "bench-token-a-0123456789",
        "when": 'type = "page"',
    },
    {
        "name": "shop-b",
        "pixel_code": PIXEL_B,
        "access_token": "bench-token-b-0123456789",
        "when": 'type = "track"',
    },
]


def _backlog(a_messages: int, b_messages: int) -> list[bytes]:
    gen = SampleEvents(seed=21, prefix="lane")
    names = sorted(DOCUMENTED_TRACK_EVENTS)
    values: list[bytes] = []
    a = b = 0
    while a < a_messages or b < b_messages:
        # Interleaved in proportion, so both lanes have work from the first poll on.
        if b < b_messages and (a >= a_messages or b * a_messages <= a * b_messages):
            values.append(encode(gen.track(names[b % len(names)])))
            b += 1
        else:
            values.append(encode(gen.page()))
            a += 1
    return values


def _start(env: BenchEnv, topic: str, name: str, **overrides: Any) -> WorkerProcess:
    assert env.fake is not None
    config = worker_config(
        bootstrap=env.bootstrap,
        topic=topic,
        dlq_topic=DLQ_TOPIC,
        base_url=env.fake.url,
        group_id=env.new_group(name),
        **overrides,
    )
    config["logging"] = {"level": "warning", "format": "json"}
    worker = WorkerProcess(write_config(env.workdir / f"{name}.yaml", config)).start()
    worker.wait_ready(90)
    return worker


def _accepted_times(env: BenchEnv, pixel: str) -> list[float]:
    assert env.fake is not None
    events = http_json(f"{env.fake.url}/_fake/events?pixel={pixel}", timeout=60)
    return sorted(e["received_at"] for e in events)


def run_isolation(
    env: BenchEnv,
    *,
    a_messages: int,
    b_messages: int,
    outage: bool,
    name: str,
    kafka: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fake = env.fake
    assert fake is not None
    fake.reset()
    if outage:
        fake.fault(kind="http_503", pixel=PIXEL_A)
    topic = env.new_topic(name, PARTITIONS)
    fill_topic(env.bootstrap, topic, _backlog(a_messages, b_messages))
    worker = _start(
        env,
        topic,
        name,
        destinations=SHOPS,
        tiktok={**PRODUCT_TIKTOK, "retry": {"initial_backoff_s": 0.5, "max_backoff_s": 60}},
        rate_limit=THROUGHPUT_RATE_LIMIT,
        kafka=kafka,
    )

    def b_accepted() -> int:  # shop-b's events are the non-page ones
        stats = fake.stats()
        return int(stats["accepted_events_total"]) - int(
            stats["accepted_events_by_name"].get("ViewContent", 0)
        )

    try:
        done = wait_until(lambda: b_accepted() >= b_messages, 300, 0.5)
        times = _accepted_times(env, PIXEL_B)
    finally:
        worker.stop()
        fake.clear_faults()
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "outage": outage,
        "b_events_accepted": len(times),
        "drained": done,
        "span_s": round(span, 3),
        "b_events_per_s": round(len(times) / span) if span > 0 else None,
    }


def run_throttled(
    env: BenchEnv, *, backlog: int, qps: float, duration_s: float, name: str
) -> dict[str, Any]:
    fake = env.fake
    assert fake is not None
    fake.reset()
    topic = env.new_topic(name, PARTITIONS)
    gen = SampleEvents(seed=22, prefix="thr")
    fill_topic(env.bootstrap, topic, (encode(gen.track("Order Completed")) for _ in range(backlog)))
    worker = _start(
        env, topic, name, tiktok=PRODUCT_TIKTOK, rate_limit={"qps": qps, "backend": "local"}
    )
    try:
        time.sleep(duration_s)
        requests = [r for r in fake.requests() if r["code"] == 0]
    finally:
        worker.stop()
    sizes = [r["events"] for r in requests]
    return {
        "qps": qps,
        "requests": len(sizes),
        "events_per_request": summary([float(s) for s in sizes]) if sizes else None,
    }


def alternate_pairs(
    section: str, count: int, run: Callable[[bool, str], dict[str, Any]]
) -> list[dict[str, dict[str, Any]]]:
    """`count` pairs of runs, shop-a healthy then down (`run(outage, name)`), alternating so
    that the slow phases of a shared machine hit both sides."""
    pairs: list[dict[str, dict[str, Any]]] = []
    for i in range(count):
        pair: dict[str, dict[str, Any]] = {}
        for outage in (False, True):
            label = "outage" if outage else "healthy"
            log(f"{section} run {i + 1}: shop-b throughput, shop-a {label}")
            pair[label] = run(outage, f"{section}-{label}-{i}")
            log(f"{section} run {i + 1}: {pair[label]}")
        pairs.append(pair)
    return pairs


def run_lanes(env: BenchEnv, cfg: dict[str, Any]) -> dict[str, Any]:
    """The isolation runs alternate healthy / outage, so slow phases of a shared machine hit
    both; the figure is the ratio of the medians (per-pair ratios are in the results too)."""
    runs = alternate_pairs(
        "lanes",
        cfg["lanes_runs"],
        lambda outage, name: run_isolation(
            env,
            a_messages=cfg["lanes_a_messages"],
            b_messages=cfg["lanes_b_messages"],
            outage=outage,
            name=name,
        ),
    )
    healthy = [float(p["healthy"]["b_events_per_s"] or 0) for p in runs]
    outage = [float(p["outage"]["b_events_per_s"] or 0) for p in runs]
    pairs = [o / h for o, h in zip(outage, healthy, strict=True) if h > 0]
    healthy_s, outage_s = summary(healthy), summary(outage)
    ratio = outage_s["median"] / healthy_s["median"] if healthy_s["median"] else None
    log("lanes: events per request, one lane at 2 requests/s with a backlog")
    throttled = run_throttled(
        env,
        backlog=cfg["lanes_throttle_backlog"],
        qps=2,
        duration_s=cfg["lanes_throttle_s"],
        name="lanes-throttled",
    )
    log(f"lanes: {throttled}")
    return {
        "a_messages": cfg["lanes_a_messages"],
        "b_messages": cfg["lanes_b_messages"],
        "b_events_per_s_healthy": healthy_s,
        "b_events_per_s_outage": outage_s,
        "outage_over_healthy": round(ratio, 3) if ratio is not None else None,
        "pair_ratios": summary(pairs, 3) if pairs else None,
        "runs": runs,
        "throttled": throttled,
    }
