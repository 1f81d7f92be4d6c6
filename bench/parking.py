"""Parking (issue 15): a healthy destination during another's outage, source lag, recovery.

Two destinations on different TikTok apps, `shop-a` taking page views and `shop-b` the
documented track events (the lanes section's setup), one worker with product defaults except
the circuit's pauses (`open_s` 5, `max_open_s` 20, so the recovery figure is not dominated by
the 30-300 s default probe interval) and the lifted rate limit of the throughput runs. A
backlog of `a_messages` page views interleaved with `b_messages` track events, with
`a_messages` above `kafka.max_inflight_messages` (20000): without parking the outage would
pause every partition once the bound fills.

Each run drains the backlog twice, with and without the fake answering every `shop-a` request
with HTTP 503. Figures:

- `outage_over_healthy`: shop-b's throughput (accepted events / (last - first acceptance), at
  the fake) with the outage, over its throughput without it;
- `source_lag`: the source group's lag (messages - committed offsets), sampled every second
  during the outage: its maximum, and its value when shop-b's last event was accepted and
  `lag_zero_after_s` (seconds from the worker's start until the committed offsets reached the
  head while shop-a was still down);
- `recovery_to_empty_s`: the outage ends (`outage_s` after the start at the earliest, and only
  once the source lag is zero); the time from then until every shop-a event was accepted, that
  is until the retry backlog is empty.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Producer

from bench.common import DLQ_TOPIC, BenchEnv, fill_topic, log, percentile, summary
from bench.e2e import PRODUCT_TIKTOK, THROUGHPUT_RATE_LIMIT
from bench.lanes import PIXEL_A, PIXEL_B, SHOPS, _accepted_times, _backlog, alternate_pairs
from devkit.harness import (
    WorkerProcess,
    committed_offsets,
    http_json,
    wait_until,
    worker_config,
    write_config,
)

PARTITIONS = 4
CIRCUIT = {"failure_threshold": 5, "open_s": 5, "max_open_s": 20}


def _start(env: BenchEnv, topic: str, group: str, name: str) -> WorkerProcess:
    assert env.fake is not None
    # A retry topic per run: a new group would otherwise read the parked records of the
    # runs before (in production the retry group, and so its offsets, stay the same).
    retry_topic = env.new_topic(name + "-retry", PARTITIONS)
    config = worker_config(
        bootstrap=env.bootstrap,
        topic=topic,
        dlq_topic=DLQ_TOPIC,
        base_url=env.fake.url,
        group_id=group,
        destinations=SHOPS,
        tiktok={
            **PRODUCT_TIKTOK,
            "retry": {"initial_backoff_s": 0.5, "max_backoff_s": 60},
            "circuit": CIRCUIT,
        },
        rate_limit=THROUGHPUT_RATE_LIMIT,
        kafka={"retry_topic": retry_topic},
    )
    config["logging"] = {"level": "warning", "format": "json"}
    worker = WorkerProcess(write_config(env.workdir / f"{name}.yaml", config)).start()
    worker.wait_ready(90)
    return worker


def _lag(env: BenchEnv, group: str, topic: str, total: int) -> int:
    try:
        committed = committed_offsets(env.bootstrap, group, topic)
    except Exception:  # a coordinator moving: no sample this time
        return -1
    return total - sum(o for o in committed.values() if o > 0)


def run_outage(
    env: BenchEnv, *, a_messages: int, b_messages: int, outage: bool, outage_s: float, name: str
) -> dict[str, Any]:
    fake = env.fake
    assert fake is not None
    fake.reset()
    if outage:
        fake.fault(kind="http_503", pixel=PIXEL_A)
    topic = env.new_topic(name, PARTITIONS)
    total, _ = fill_topic(env.bootstrap, topic, _backlog(a_messages, b_messages))
    group = env.new_group(name)
    started = time.monotonic()
    worker = _start(env, topic, group, name)

    def accepted(view_content: bool) -> int:
        stats = fake.stats()
        pages = int(stats["accepted_events_by_name"].get("ViewContent", 0))
        return pages if view_content else int(stats["accepted_events_total"]) - pages

    def a_unique() -> int:  # shop-a's distinct events (a resent one counts once)
        return len({e["event_id"] for e in fake.events() if e["pixel"] == PIXEL_A})

    lags: list[int] = []
    lag_at_b_done: int | None = None
    lag_zero_after_s: float | None = None
    result: dict[str, Any] = {"outage": outage}
    try:
        deadline = started + 600
        while time.monotonic() < deadline:
            lag = _lag(env, group, topic, total)
            if lag >= 0:
                lags.append(lag)
                if lag == 0 and lag_zero_after_s is None:
                    lag_zero_after_s = time.monotonic() - started
            b_done = accepted(False) >= b_messages
            if b_done and lag_at_b_done is None:
                lag_at_b_done = lag
            if not outage and b_done:
                break
            if b_done and lag == 0 and time.monotonic() - started >= outage_s:
                break
            time.sleep(1.0)
        times = _accepted_times(env, PIXEL_B)
        if outage:
            result["a_accepted_during_outage"] = accepted(True)
            fake.clear_faults()
            recovered = time.monotonic()
            result["outage_lasted_s"] = round(recovered - started, 1)
            drained = wait_until(
                lambda: accepted(True) >= a_messages and a_unique() >= a_messages, 600, 0.5
            )
            result["recovery_to_empty_s"] = (
                round(time.monotonic() - recovered, 1) if drained else None
            )
            result["a_accepted"] = accepted(True)
            result["a_distinct"] = a_unique()
    finally:
        worker.stop()
        fake.clear_faults()
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    result.update(
        {
            "b_events_accepted": len(times),
            "span_s": round(span, 3),
            "b_events_per_s": round(len(times) / span) if span > 0 else None,
            "source_lag_max": max(lags) if lags else None,
            "source_lag_when_b_done": lag_at_b_done,
            "lag_zero_after_s": round(lag_zero_after_s, 1) if lag_zero_after_s else None,
        }
    )
    return result


def run_steady(
    env: BenchEnv, *, rate: int, duration_s: float, outage: bool, name: str
) -> dict[str, Any]:
    """A steady stream for `duration_s`, shop-a down (503) for all of it or not at all.

    `rate` messages/s in the backlog's mix (40 % page views for shop-a, 60 % track events for
    shop-b), produced from the bench process in 50 ms steps. shop-b's figures count the events
    produced after a 10 s warm-up (the circuit opens, the first parkings) until the end of the
    stream: accepted events per second over that window, and each event's produce→acceptance
    latency. The source group's lag is sampled every second. After the stream ends the outage
    ends too; `recovery_to_empty_s` is the time until every shop-a event was accepted."""
    fake = env.fake
    assert fake is not None
    fake.reset()
    if outage:
        fake.fault(kind="http_503", pixel=PIXEL_A)
    total = int(rate * duration_s)
    a_total = total * 2 // 5
    values = _backlog(a_total, total - a_total)
    topic = env.new_topic(name, PARTITIONS)
    group = env.new_group(name)
    worker = _start(env, topic, group, name)
    producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 5, "acks": "1"})
    b_ids: dict[str, float] = {}  # shop-b event id -> produce time (unix), after the warm-up
    warm_up_s, step_s = 10.0, 0.05
    lags: list[int] = []
    try:
        started = time.time()
        next_lag = started + 1
        sent = 0
        while sent < total:
            now = time.time()
            due = min(total, int((now - started) * rate))
            for value in values[sent:due]:
                producer.produce(topic, value=value)
                if now - started >= warm_up_s and b'"type":"track"' in value:
                    b_ids[_message_id(value)] = now
            sent = max(sent, due)
            producer.poll(0)
            if now >= next_lag:
                next_lag += 1
                producer.flush(5)
                lag = _lag(env, group, topic, sent)
                if lag >= 0:
                    lags.append(lag)
            time.sleep(max(0.0, started + (sent / rate) + step_s - time.time()))
        producer.flush(30)
        ended = time.time()
        b_done = wait_until(
            lambda: len(set(b_ids) & _accepted_ids(env, PIXEL_B)) >= len(b_ids), 120, 1.0
        )
        accepted = {e["event_id"]: e["received_at"] for e in _events(env, PIXEL_B)}
        result: dict[str, Any] = {"outage": outage, "b_window_events": len(b_ids)}
        latencies = sorted(accepted[i] - t for i, t in b_ids.items() if i in accepted)
        # p99 per 10 s of the stream (by produce time): a stall shows where it happened.
        by_window: dict[int, list[float]] = {}
        for i, t in b_ids.items():
            if i in accepted:
                by_window.setdefault(int((t - started) // 10), []).append(accepted[i] - t)
        p99_by_10s = [round(percentile(sorted(v), 99), 2) for _, v in sorted(by_window.items())]
        in_window = sum(1 for i in b_ids if i in accepted and accepted[i] <= ended)
        window_s = ended - started - warm_up_s
        result.update(
            {
                "b_all_delivered": b_done,
                "b_events_per_s": round(in_window / window_s) if window_s > 0 else None,
                "b_offered_per_s": round(len(b_ids) / window_s) if window_s > 0 else None,
                "b_latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
                "b_latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
                "b_latency_p99_by_10s": p99_by_10s,
                "source_lag_max": max(lags) if lags else None,
            }
        )
        if outage:
            fake.clear_faults()
            recovered = time.monotonic()
            drained = wait_until(lambda: len(_accepted_ids(env, PIXEL_A)) >= a_total, 300, 1.0)
            result["recovery_to_empty_s"] = (
                round(time.monotonic() - recovered, 1) if drained else None
            )
    finally:
        worker.stop()
        fake.clear_faults()
    return result


def _message_id(value: bytes) -> str:
    start = value.index(b'"messageId":"') + len(b'"messageId":"')
    return value[start : value.index(b'"', start)].decode()


def _events(env: BenchEnv, pixel: str) -> list[dict[str, Any]]:
    assert env.fake is not None
    events: list[dict[str, Any]] = http_json(
        f"{env.fake.url}/_fake/events?pixel={pixel}", timeout=60
    )
    return events


def _accepted_ids(env: BenchEnv, pixel: str) -> set[str]:
    return {e["event_id"] for e in _events(env, pixel)}


def run_parking(env: BenchEnv, cfg: dict[str, Any]) -> dict[str, Any]:
    ratios: list[float] = []
    recoveries: list[float] = []
    runs = alternate_pairs(
        "parking",
        cfg["parking_runs"],
        lambda outage, name: run_outage(
            env,
            a_messages=cfg["parking_a_messages"],
            b_messages=cfg["parking_b_messages"],
            outage=outage,
            outage_s=cfg["parking_backlog_outage_s"],
            name=name,
        ),
    )
    for pair in runs:
        with_outage = pair["outage"]["b_events_per_s"]
        without = pair["healthy"]["b_events_per_s"]
        if with_outage and without:
            ratios.append(with_outage / without)
        if pair["outage"].get("recovery_to_empty_s") is not None:
            recoveries.append(pair["outage"]["recovery_to_empty_s"])
    log(f"parking steady stream: {cfg['parking_steady_rate']} messages/s")
    steady: dict[str, Any] = alternate_pairs(
        "parking-steady",
        1,
        lambda outage, name: run_steady(
            env,
            rate=cfg["parking_steady_rate"],
            duration_s=cfg["parking_outage_s"],
            outage=outage,
            name=name,
        ),
    )[0]
    healthy_rate = steady["healthy"].get("b_events_per_s")
    outage_rate = steady["outage"].get("b_events_per_s")
    if healthy_rate and outage_rate:
        steady["outage_over_healthy"] = round(outage_rate / healthy_rate, 3)
    return {
        "steady": steady,
        "a_messages": cfg["parking_a_messages"],
        "b_messages": cfg["parking_b_messages"],
        "circuit": CIRCUIT,
        "outage_over_healthy": summary(ratios, 3) if ratios else None,
        "recovery_to_empty_s": summary(recoveries, 1) if recoveries else None,
        "runs": runs,
    }


__all__ = ["PIXEL_A", "PIXEL_B", "run_parking"]
