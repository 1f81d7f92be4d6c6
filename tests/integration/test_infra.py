"""The test infrastructure itself: real Kafka, Redis and Prometheus behave as later tests need.

Kafka: a consumer group resumes exactly from committed offsets; the broker keeps its data
and committed offsets across a clean restart and across SIGKILL on the same address.
Redis: same URL after a restart. Prometheus: scrapes a live /metrics endpoint, evaluates
rules, answers queries. Missing infrastructure fails with a how-to, never skips.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from devkit.infra import InfraError, require
from devkit.infra.external import ExternalKafka
from devkit.infra.kafka import KafkaEndpoint, kafka_libs_dir
from devkit.infra.prometheus import PrometheusError, promtool_check_rules
from devkit.infra.redis_server import RedisEndpoint

pytestmark = pytest.mark.integration

PARTITIONS = 3


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce `values` round-robin over the partitions and wait for every ack."""
    errors: list[Any] = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i, value in enumerate(values):
        producer.produce(
            topic,
            value=value,
            partition=i % PARTITIONS,
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0, "messages still queued after 30s"
    assert errors == []


def group_consumer(bootstrap: str, group: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    return consumer


def consume(consumer: Consumer, count: int, *, timeout: float = 30.0) -> list[Any]:
    """Poll until `count` messages arrived (fails after `timeout` seconds with what came)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        got.append(msg)
    assert len(got) == count, f"got {len(got)} of {count} messages in {timeout}s"
    return got


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = probe.committed(parts, timeout=10)
    finally:
        probe.close()
    return sum(max(tp.offset, 0) for tp in committed)


def values(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


# -- Kafka ----------------------------------------------------------------------------------------


def test_topic_fixture_gives_a_fresh_three_partition_topic(
    kafka: KafkaEndpoint, topic: str
) -> None:
    md = kafka.admin().list_topics(topic=topic, timeout=10).topics[topic]
    assert md.error is None
    assert sorted(md.partitions) == [0, 1, 2]
    assert all(p.leader >= 0 for p in md.partitions.values())


def test_consumer_group_resumes_exactly_from_committed_offsets(
    kafka_bootstrap: str, topic: str
) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = values("first", 30)
    produce(kafka_bootstrap, topic, first)

    consumer = group_consumer(kafka_bootstrap, group, topic)
    got = consume(consumer, len(first))
    consumer.commit(asynchronous=False)
    consumer.close()
    assert sorted(m.value() for m in got) == sorted(first)
    assert committed_total(kafka_bootstrap, group, topic) == len(first)

    second = values("second", 12)
    produce(kafka_bootstrap, topic, second)
    consumer = group_consumer(kafka_bootstrap, group, topic)
    try:
        # Within a partition order is kept: had the group restarted before its committed
        # offsets, old messages would arrive before the new ones.
        got = consume(consumer, len(second))
    finally:
        consumer.close()
    assert sorted(m.value() for m in got) == sorted(second)


def test_broker_keeps_data_and_offsets_across_restart_and_kill(
    kafka: KafkaEndpoint, topic: str
) -> None:
    bootstrap = kafka.bootstrap
    group = f"g-{uuid.uuid4().hex[:8]}"
    before = values("before", 9)
    produce(bootstrap, topic, before)
    consumer = group_consumer(bootstrap, group, topic)
    consume(consumer, len(before))
    consumer.commit(asynchronous=False)
    consumer.close()

    kafka.restart()  # clean stop (SIGTERM) and start
    assert kafka.bootstrap == bootstrap
    after_restart = values("after-restart", 6)
    produce(bootstrap, topic, after_restart)

    kafka.kill()  # as a crash would
    kafka.start()
    assert kafka.bootstrap == bootstrap
    after_kill = values("after-kill", 3)
    produce(bootstrap, topic, after_kill)

    # Every message ever produced is still there ...
    reader = group_consumer(bootstrap, f"g-{uuid.uuid4().hex[:8]}", topic)
    try:
        everything = consume(reader, len(before) + len(after_restart) + len(after_kill))
    finally:
        reader.close()
    assert sorted(m.value() for m in everything) == sorted(before + after_restart + after_kill)

    # ... and the group's committed offsets survived: it resumes after `before`.
    consumer = group_consumer(bootstrap, group, topic)
    try:
        resumed = consume(consumer, len(after_restart) + len(after_kill))
    finally:
        consumer.close()
    assert sorted(m.value() for m in resumed) == sorted(after_restart + after_kill)


def test_external_stand_in_offers_topics_but_refuses_lifecycle(kafka: KafkaEndpoint) -> None:
    ext = ExternalKafka(kafka.bootstrap, source="test")
    ext.wait_ready(timeout=10)
    name = f"ext-{uuid.uuid4().hex[:8]}"
    ext.create_topic(name, partitions=2)
    assert name in ext.topics()
    ext.delete_topic(name)
    assert name not in ext.topics()
    with pytest.raises(InfraError, match="not started by devkit/infra"):
        ext.restart()


def test_missing_kafka_jars_fail_with_how_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAFKA_LIBS", raising=False)
    monkeypatch.setenv("TIKTOK_WORKER_CACHE", str(tmp_path))
    with pytest.raises(InfraError, match=r"jars not found .*make setup"):
        kafka_libs_dir()


def test_missing_binary_fails_not_skips() -> None:
    with pytest.raises(pytest.fail.Exception, match="no-such-server-xyz not found: run it"):
        require("no-such-server-xyz", "run it")


# -- Redis ----------------------------------------------------------------------------------------


def test_redis_same_url_after_restart(redis: RedisEndpoint, redis_url: str) -> None:
    key = f"k-{uuid.uuid4().hex}"
    with redis.client() as client:
        assert client.set(key, "v1")
        assert client.get(key) == b"v1"

    redis.restart()
    assert redis.url == redis_url
    with redis.client() as client:
        assert client.get(key) is None  # nothing is persisted
        assert client.set(key, "v2")
        assert client.get(key) == b"v2"


def test_redis_with_password(redis_factory: Any) -> None:
    server = redis_factory(password="s3cret/+")
    assert "s3cret" not in server.display_url
    with server.client() as client:
        assert client.ping()
    server.stop()
    assert not server.ping()


# -- Prometheus -----------------------------------------------------------------------------------


@pytest.fixture
def metrics_endpoint() -> Iterator[tuple[str, Gauge, Counter]]:
    """A prometheus_client /metrics server on a free loopback port."""
    registry = CollectorRegistry()
    gauge = Gauge("infra_demo_value", "a value the test sets", registry=registry)
    counter = Counter("infra_demo_events", "events the test counts", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}", gauge, counter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


RULES = """\
groups:
  - name: infra-test
    rules:
      - record: infra_demo:doubled
        expr: infra_demo_value * 2
      - alert: InfraDemoHigh
        expr: infra_demo_value > 40
        labels: {severity: warning}
        annotations: {summary: demo value is high}
"""


def test_prometheus_scrapes_and_evaluates_rules(
    prometheus_factory: Any, metrics_endpoint: tuple[str, Gauge, Counter], tmp_path: Path
) -> None:
    target, gauge, counter = metrics_endpoint
    gauge.set(42)
    counter.inc(5)
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    assert "SUCCESS" in promtool_check_rules(rules)

    prom = prometheus_factory(targets=[target], rule_files=[rules])
    prom.wait_for_target_up(timeout=30)
    assert prom.wait_for_value('infra_demo_value{job="tiktok-worker"}') == 42.0
    assert prom.wait_for_value("infra_demo_events_total") == 5.0
    assert prom.wait_for_value("infra_demo:doubled") == 84.0
    health = {r["name"]: r["health"] for g in prom.rule_groups() for r in g["rules"]}
    assert health["infra_demo:doubled"] == "ok"
    deadline = time.monotonic() + 30
    while not any(a["labels"]["alertname"] == "InfraDemoHigh" for a in prom.alerts()):
        assert time.monotonic() < deadline, "alert InfraDemoHigh never became active"
        time.sleep(0.2)

    gauge.set(7)
    assert prom.wait_for_value("infra_demo_value", lambda v: v == 7.0) == 7.0
    with pytest.raises(PrometheusError, match="parse error"):
        prom.query("sum(")


def test_promtool_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: r\n        expr: sum(\n")
    with pytest.raises(InfraError, match="promtool check rules failed"):
        promtool_check_rules(bad)
