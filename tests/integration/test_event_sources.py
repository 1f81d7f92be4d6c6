"""One worker, four event sources: a mixed topic delivered to web, CRM, offline and app
destinations through real Kafka and the fake Events API (which validates each source's body).

Done-when of issue 20: every event reaches its destinations with the right source and id, in
batches that never mix sources or ids, and nothing is dead-lettered.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import (
    FakeTikTokProcess,
    TopicSet,
    WorkerProcess,
    metric_value,
    produce,
    read_topic,
    wait_until,
    worker_config,
    write_config,
)
from tests.test_sources import APP, CRM, OFFLINE, WEB, config, mixed_event
from worker.mapping.mapper import Mapper

pytestmark = pytest.mark.integration

NAMES = ["Order Completed", "Lead Qualified", "Product Added", None, "Signed Up", "Signed In"]


def test_a_mixed_topic_reaches_every_source_in_batches(kafka: Any, tmp_path: Path) -> None:
    topics = TopicSet.create(kafka, "sources", 3)
    topic, dlq = topics.topic, topics.dlq_topic
    events = [mixed_event(NAMES[n % len(NAMES)], n) for n in range(300)]
    dests: list[dict[str, Any]] = [WEB, CRM, OFFLINE, APP]
    # What the worker should send, from the same mapping run in-process.
    mapper = Mapper(config(*dests), now=lambda: 0.0)
    expected: Counter[tuple[str, str, str]] = Counter()
    for event in events:
        (out,) = mapper.map_message(json.dumps(event).encode())
        assert out.invalid == []
        for m in out.mapped:
            expected[(m.key.event_source, m.key.event_source_id, m.event)] += 1
    assert {source for source, _, _ in expected} == {"web", "crm", "offline", "app"}
    with FakeTikTokProcess(tmp_path) as fake:
        cfg = worker_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq_topic=dlq,
            base_url=fake.url,
            group_id=topics.group,
            destinations=dests,
            # mixed_event's timestamp is fixed (2024): no age limit, or all would be too_old.
            tiktok={"batch_linger_ms": 300, "max_batch_events": 50, "max_event_age_s": None},
        )
        worker = WorkerProcess(write_config(tmp_path / "worker.yaml", cfg)).start()
        try:
            worker.wait_ready()
            produce(kafka.bootstrap, topic, [json.dumps(e).encode() for e in events])
            total = sum(expected.values())
            assert wait_until(lambda: len(fake.events()) >= total, 60, 0.5), worker.log_tail()
            got = Counter((e["event_source"], e["pixel"], e["event"]) for e in fake.events())
            assert got == expected
            requests = fake.requests()
            assert all(r["code"] == 0 for r in requests)
            # Batched: fewer requests than events, and some carry many events.
            assert len(requests) < total
            assert max(r["events"] for r in requests) > 1
            text = worker.metrics()
            assert metric_value(text, "tiktok_worker_dead_letters_total") == 0
            for dest in dests:
                labels = {
                    "destination": dest["name"],
                    "event_source": dest.get("event_source", "web"),
                }
                assert metric_value(text, "tiktok_worker_destination_info", labels) == 1
        finally:
            worker.stop()
    assert read_topic(kafka.bootstrap, dlq, idle_s=1.0) == []
