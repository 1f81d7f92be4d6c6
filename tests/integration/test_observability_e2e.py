"""Observability end to end: the worker as a process on real Kafka, the fake TikTok server, and a
real Prometheus scraping it.

- Every expression of the Grafana dashboard and of the alert rules runs against Prometheus'
  HTTP API: none errors, and the throughput, request, dead-letter and lag panels return data;
  the alert rules load and evaluate without error, and one of them goes pending on real data.
- Consumer lag equals what Kafka says (high watermark - committed offset) for a backlog the
  worker cannot deliver, also while its partitions are paused and before anything is committed.
- /readyz follows the Kafka connection: 503 soon after the broker stops, 200 after it returns.
- The worker's log lines are JSON, one summary per request, without the token or raw PII.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from devkit import harness
from devkit.harness import (
    TOKEN,
    WorkerProcess,
    committed_offsets,
    metric_value,
    produce,
    stopping_all,
    wait_until,
)
from devkit.infra.kafka import KafkaEndpoint
from devkit.infra.prometheus import PrometheusServer
from devkit.sample_events import MALFORMED_VALUES, SampleEvents, encode
from tests.dashboard_exprs import (
    DATA_PANELS,
    RULES,
    dashboard_expressions,
    metric_names,
    rule_expressions,
)

pytestmark = pytest.mark.integration

# The alert rules select the worker by job name; the chart's job contains the chart name.
JOB = "tiktok-conversions-worker"
LAG = "tiktok_worker_consumer_lag_messages"


class Stack(harness.Stack):
    """Topics on one broker, a fake TikTok server and one worker process."""

    def __init__(self, kafka: KafkaEndpoint, tmp_path: Path, *, partitions: int = 3) -> None:
        super().__init__(kafka, tmp_path, prefix="obs", partitions=partitions)
        self.events = SampleEvents(seed=11, prefix=self.topic.replace("-", ""))
        self.produced: list[dict[str, Any]] = []

    @property
    def worker(self) -> WorkerProcess | None:
        return self.workers[-1] if self.workers else None

    def produce(self, events: list[dict[str, Any]], extra: Sequence[bytes] = ()) -> None:
        self.produced.extend(events)
        produce(self.kafka.bootstrap, self.topic, [*map(encode, events), *extra], key_every=13)

    def orders(self, count: int) -> list[dict[str, Any]]:
        return [self.events.track("Order Completed") for _ in range(count)]

    def metrics(self) -> str:
        assert self.worker is not None
        return self.worker.metrics()

    def log_sources(self) -> list[tuple[str, Path]]:
        return [("worker", self.worker.log_path)] if self.worker is not None else []


@pytest.fixture
def stack(kafka: KafkaEndpoint, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    def make(broker: KafkaEndpoint | None = None, **kwargs: Any) -> Stack:
        return Stack(broker or kafka, tmp_path, **kwargs)

    with stopping_all(make) as tracked:
        yield tracked


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def lag_by_partition(text: str, topic: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith(LAG + "{") and f'topic="{topic}"' in line:
            labels, _, value = line.rpartition(" ")
            partition = int(labels.split('partition="')[1].split('"')[0])
            out[partition] = int(float(value))
    return out


def kafka_lag(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """What Kafka itself says: high watermark minus the group's committed offset (0 if none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4()}"})
    try:
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()
    committed = committed_offsets(bootstrap, group, topic)
    return {p: high - max(committed.get(p, 0), 0) for p, high in highs.items()}


# -------------------------------------------------------------------------- consumer lag


def test_consumer_lag_matches_kafka_while_paused_and_before_the_first_commit(
    stack: Callable[..., Stack],
) -> None:
    s = stack()
    s.fake.fault(kind="http_503")  # nothing is delivered, nothing committed: the lag is a backlog
    s.produce(s.orders(240))
    worker = s.start_worker(
        kafka={"max_inflight_messages": 30},
        tiktok={
            "max_batch_events": 10,
            # Nothing is parked (no circuit opening, no end to in-memory retries): the
            # backlog must stay a backlog for the lag to be measured while paused.
            "retry": {
                "initial_backoff_s": 0.2,
                "max_backoff_s": 0.5,
                "in_memory_s": 600,
                "deadline_s": 600,
            },
            "circuit": {"failure_threshold": 1_000_000},
        },
    )

    def matches() -> bool:
        try:
            truth = kafka_lag(s.kafka.bootstrap, s.group, s.topic, 3)
        except KafkaException:  # e.g. NOT_COORDINATOR while __consumer_offsets is being created
            return False
        return lag_by_partition(s.metrics(), s.topic) == truth

    # Nothing committed yet: librdkafka's statistics would report no lag at all.
    assert wait_until(matches, 30, 1.0), (lag_by_partition(s.metrics(), s.topic), worker.log_tail())
    assert sum(lag_by_partition(s.metrics(), s.topic).values()) == 240
    assert metric_value(s.metrics(), "tiktok_worker_paused_partitions") > 0
    assert metric_value(s.metrics(), "tiktok_worker_last_commit_timestamp_seconds") == 0

    # More arrives while the partitions are paused (librdkafka's high watermark is frozen then).
    s.produce(s.orders(60))
    assert wait_until(matches, 30, 1.0), lag_by_partition(s.metrics(), s.topic)
    assert sum(lag_by_partition(s.metrics(), s.topic).values()) == 300

    # TikTok recovers: everything is delivered and committed, and the lag drains to zero.
    s.fake.clear_faults()
    assert wait_until(lambda: set(lag_by_partition(s.metrics(), s.topic).values()) == {0}, 60), (
        lag_by_partition(s.metrics(), s.topic),
        worker.log_tail(),
    )
    assert metric_value(s.metrics(), "tiktok_worker_last_commit_timestamp_seconds") > 0

    # A new backlog on top of committed offsets.
    s.fake.fault(kind="http_503")
    s.produce(s.orders(45))
    assert wait_until(matches, 30, 1.0), lag_by_partition(s.metrics(), s.topic)
    assert sum(lag_by_partition(s.metrics(), s.topic).values()) == 45


# -------------------------------------------------------------------------- readiness


def test_readyz_follows_the_kafka_connection(
    kafka_factory: Callable[..., Any], stack: Callable[..., Stack]
) -> None:
    # kafka_factory first: fixtures stop in reverse order, so the worker stops before its broker.
    broker = kafka_factory()
    s = stack(broker)
    worker = s.start_worker()
    base = f"http://127.0.0.1:{worker.http_port}"
    assert http_status(base + "/readyz") == 200
    assert http_status(base + "/healthz") == 200

    broker.stop()
    assert wait_until(lambda: http_status(base + "/readyz") == 503, 30, 0.2), worker.log_tail()
    assert http_status(base + "/healthz") == 200  # not connected is not stuck: no restart
    assert worker.running()

    broker.start()
    assert wait_until(lambda: http_status(base + "/readyz") == 200, 60, 0.2), worker.log_tail()
    # And it works again: an event produced now is delivered.
    event = s.orders(1)
    s.produce(event)
    assert wait_until(lambda: event[0]["messageId"] in s.fake.event_ids(), 30), worker.log_tail()


# -------------------------------------------------------------------------- Prometheus


def test_dashboard_and_alert_expressions_on_a_real_prometheus(
    stack: Callable[..., Stack], prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    s = stack()
    worker = s.start_worker(tiktok={"max_batch_events": 20})
    prom = prometheus_factory(
        targets=[f"127.0.0.1:{worker.http_port}"], rule_files=[RULES], job=JOB
    )
    prom.wait_for_target_up(30)

    # Traffic in waves, so that counters move between scrapes and rates are not zero.
    rejected: list[str] = []
    for wave in range(5):
        events = s.orders(30) + [s.events.page() for _ in range(10)]
        events += [s.events.track("Product Viewed") for _ in range(5)]  # skipped: no_match
        if wave == 1:
            rejected.append(events[0]["messageId"])
            s.fake.fault(kind="reject_event_ids", event_ids=rejected)
        s.produce(events, extra=list(MALFORMED_VALUES[:2]))
        consumed = len(s.produced) + 2 * (wave + 1)
        prom.wait_for_value(f"sum(tiktok_worker_messages_consumed_total) >= {consumed}", timeout=20)
    prom.wait_for_value(
        'sum(tiktok_worker_dead_letters_total{reason="permanent_api_error"})', lambda v: v >= 1
    )
    prom.wait_for_value(f"count({LAG})", lambda v: v == 3)

    # Every dashboard expression parses; the panels that matter show data.
    empty: list[str] = []
    for title, expr in dashboard_expressions():
        result = prom.query(expr)["result"]  # raises PrometheusError on a bad expression
        if title in DATA_PANELS and not any(_has_value(r) for r in result):
            empty.append(f"{title}: {expr}")
    assert empty == [], empty

    # Every alert expression parses and evaluates on the live series.
    for _name, expr in rule_expressions():
        prom.query(expr)

    # Every metric the dashboard and the rules read is one the running worker exposes.
    exposed = {line.split()[2] for line in s.metrics().splitlines() if line.startswith("# TYPE ")}
    exposed_samples = exposed | {
        n + suffix for n in exposed for suffix in ("_bucket", "_sum", "_count")
    }
    used = {n for _, e in [*dashboard_expressions(), *rule_expressions()] for n in metric_names(e)}
    assert used - exposed_samples - {"up"} == set()

    # The rule group loads, every rule evaluates without error...
    def rules_evaluated() -> bool:
        groups = [g for g in prom.rule_groups() if g["name"] == JOB]
        return bool(groups) and all(r.get("health") == "ok" for r in groups[0]["rules"])

    assert wait_until(rules_evaluated, 20, 0.5), prom.rule_groups()
    rules = next(g for g in prom.rule_groups() if g["name"] == JOB)["rules"]
    assert {r["name"] for r in rules} == {name for name, _ in rule_expressions()}
    assert all(not r.get("lastError") for r in rules)
    # ... and selects this worker: 2 of 45 messages per wave are dead letters (> 1%).
    assert wait_until(
        lambda: any(
            a["labels"]["alertname"] == "TiktokWorkerDeadLetterRateHigh" for a in prom.alerts()
        ),
        20,
        0.5,
    ), prom.alerts()

    _check_worker_log(s, worker)


def _has_value(series: dict[str, Any]) -> bool:
    value = float(series["value"][1])
    return not math.isnan(value)


def _check_worker_log(s: Stack, worker: WorkerProcess) -> None:
    text = worker.log_path.read_text(errors="replace")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    requests = [line for line in lines if line["event"] == "tiktok request"]
    assert requests, text[-2000:]
    for line in requests:
        assert {"destination", "events", "outcome", "http_status", "code", "attempt"} <= set(line)
        assert {"latency_ms", "batch_id", "level", "timestamp"} <= set(line)
    assert {line["outcome"] for line in requests} >= {"success", "permanent_error"}
    lowered = text.lower()
    assert TOKEN.lower() not in lowered
    for event in s.produced:
        traits = event["context"]["traits"]
        assert traits["email"].lower() not in lowered
        assert traits["phone"] not in text
        assert f'"{event["userId"]}"' not in text
    assert "lovelace" not in lowered
