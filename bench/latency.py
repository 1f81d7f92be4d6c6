"""Latency from produce to acceptance by the fake TikTok server, at a paced fraction of capacity.

A fresh topic, one worker (product defaults: `max_batch_events` 1000, `batch_linger_ms` 200),
already running and assigned before timing starts (a warm-up stream of `warm-*` events must be
accepted first). Then a paced producer sends `rate` Segment events/s for `duration_s`, each
with `messageId` `lat-<n>`, and records `time.time()` at each `produce()` call; the fake
records `received_at` (Unix time when the request carrying the event arrived) per accepted
event_id, so latency = received_at - produce time, on one machine clock. The producer uses
`linger.ms=1`, so its own batching adds at most about 1 ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from confluent_kafka import Producer

from bench.common import BenchEnv, percentile
from bench.e2e import WorkerSpec, start_workers, stop_workers

TICK_S = 0.005


def _relabel(values: Sequence[bytes], prefix: str) -> list[bytes]:
    out = []
    for i, raw in enumerate(values):
        event = msgspec.json.decode(raw)
        event["messageId"] = f"{prefix}-{i}"
        out.append(msgspec.json.encode(event))
    return out


def _paced_produce(
    producer: Producer, topic: str, values: Sequence[bytes], rate: float, sent: dict[str, float]
) -> float:
    """Produce `values` at `rate`/s; returns the achieved rate."""
    ids = [msgspec.json.decode(v)["messageId"] for v in values]
    start = time.perf_counter()
    for i, value in enumerate(values):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > TICK_S:
            producer.poll(0)
            time.sleep(delay)
        sent[ids[i]] = time.time()
        while True:
            try:
                producer.produce(topic, value=value)
                break
            except BufferError:
                producer.poll(0.01)
    elapsed = time.perf_counter() - start
    producer.flush(30)
    return len(values) / elapsed if elapsed > 0 else 0.0


def run_latency(
    env: BenchEnv,
    *,
    events: Sequence[bytes],
    mapped_count: Callable[[Sequence[bytes]], int],
    rate: float,
    duration_s: float,
    name: str,
    warmup_s: float = 2.0,
    spec: WorkerSpec | None = None,
) -> dict[str, Any]:
    """One paced run; returns p50/p90/p99/max latency in ms over the `lat-*` events."""
    fake = env.fake
    assert fake is not None
    n_warm = max(1, int(rate * warmup_s))
    n_measured = int(rate * duration_s)
    pool = list(events)
    while len(pool) < n_warm + n_measured:
        pool += events
    warm = _relabel(pool[:n_warm], f"warm-{name}")
    measured = _relabel(pool[n_warm : n_warm + n_measured], f"lat-{name}")
    expected_warm = mapped_count(warm)
    expected = mapped_count(measured)
    topic = env.new_topic("bench-latency", 4)
    fake.reset()
    workers = start_workers(
        env, topic=topic, group=env.new_group(name), spec=spec or WorkerSpec(), name=name
    )
    producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 1, "acks": "1"})
    sent: dict[str, float] = {}
    try:
        _paced_produce(producer, topic, warm, rate, sent)
        deadline = time.monotonic() + 60
        while fake.stats()["accepted_events_total"] < expected_warm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: warm-up events not accepted within 60s")
            time.sleep(0.1)
        sent.clear()
        achieved = _paced_produce(producer, topic, measured, rate, sent)
        deadline = time.monotonic() + 60
        while fake.stats()["accepted_events_total"] < expected_warm + expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: measured events not all accepted within 60s")
            time.sleep(0.1)
        accepted = fake.events()
        requests = fake.requests()
    finally:
        stop_workers(workers)
    latencies = sorted(
        (e["received_at"] - sent[e["event_id"]]) * 1000
        for e in accepted
        if e["event_id"] in sent and not e["duplicate"]
    )
    measured_requests = [r for r in requests if r["events"] and r["code"] == 0]
    return {
        "rate_events_per_s": round(rate),
        "achieved_rate": round(achieved),
        "duration_s": duration_s,
        "events": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p90_ms": round(percentile(latencies, 90), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "events_per_request": round(
            sum(r["events"] for r in measured_requests) / max(1, len(measured_requests)), 1
        ),
    }
