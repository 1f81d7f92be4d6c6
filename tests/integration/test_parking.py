"""Parking end to end (SPEC §4): real Kafka, the worker as a process, the fake TikTok server.

Two destinations get every mapped event. One of them is down (503s, or a revoked token) for
longer than it takes to fill `max_inflight_messages`; the other must keep receiving events and
the source topic's committed offsets must reach the head meanwhile. The failing destination's
events wait in the retry topic and arrive after it recovers; nothing is lost (also under
kill -9) and the healthy destination gets nothing twice. Small `in_memory_s`, `open_s` and
deadlines keep every test short.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from devkit.harness import (
    committed_offsets,
    destination,
    headers_of,
    metric_value,
    read_topic,
    wait_until,
)
from tests.integration.test_delivery import Scenario
from tests.integration.test_delivery import scenario as scenario  # the fixture

pytestmark = pytest.mark.integration

PIXEL_UP = "C5PIXELUP00000000001"
PIXEL_DOWN = "C5PIXELDOWN000000002"
UP = destination("up-shop", pixel=PIXEL_UP)
DOWN = destination("down-shop", pixel=PIXEL_DOWN)
BOUND = 200  # max_inflight_messages: the outage lasts far longer than it takes to fill it


def parking_config(*, deadline_s: float = 120, in_memory_s: float = 1) -> dict[str, Any]:
    return {
        "destinations": [UP, DOWN],
        "kafka": {"max_inflight_messages": BOUND},
        "tiktok": {
            "max_batch_events": 50,
            "retry": {
                "initial_backoff_s": 0.05,
                "max_backoff_s": 0.5,
                "in_memory_s": in_memory_s,
                "deadline_s": deadline_s,
            },
            "circuit": {"failure_threshold": 3, "open_s": 1, "max_open_s": 2},
        },
    }


def ids_at(s: Scenario, pixel: str) -> Counter[str]:
    return Counter(e["event_id"] for e in s.fake.events() if e["pixel"] == pixel)


def committed_total(s: Scenario, group: str, topic: str) -> int:
    offsets = committed_offsets(s.kafka.bootstrap, group, topic)
    return sum(o for o in offsets.values() if o > 0)


def produced_messages(s: Scenario) -> int:
    return len(s.produced) + len(s.malformed)


def parked_total(text: str) -> float:
    return metric_value(text, "tiktok_worker_events_parked_total", {"destination": "down-shop"})


def test_a_destination_down_parks_while_the_other_flows_and_offsets_reach_the_head(
    scenario: Any,
) -> None:
    s: Scenario = scenario(partitions=3)
    s.fake.fault(kind="http_503", pixel=PIXEL_DOWN)
    s.produce_events(1500)
    expected = s.expected_ids()
    worker = s.start_worker(**parking_config())
    # While the destination is down: the other one gets everything, and the consumer group's
    # committed offsets reach the head of the source topic (parked counts as finished).
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_UP)), 90), worker.log_tail()
    assert wait_until(lambda: committed_total(s, s.group, s.topic) == produced_messages(s), 60)
    assert ids_at(s, PIXEL_DOWN) == Counter()
    text = worker.metrics()
    assert (
        metric_value(text, "tiktok_worker_destination_circuit_state", {"destination": "down-shop"})
        >= 1
    )
    assert (
        metric_value(text, "tiktok_worker_destination_circuit_state", {"destination": "up-shop"})
        == 0
    )
    assert parked_total(text) >= len(expected)
    # Recovery: the parked events arrive, none lost, and the healthy one got nothing twice.
    s.fake.clear_faults()
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_DOWN)), 90), worker.log_tail()
    up = ids_at(s, PIXEL_UP)
    assert set(up) == expected
    assert max(up.values()) == 1
    assert s.dead_letters() == []
    # The retry backlog empties: the intake's group commits the whole retry topic.
    retry_topic = s.retry_topic
    parked_records = len(read_topic(s.kafka.bootstrap, retry_topic, idle_s=1.0))
    assert wait_until(
        lambda: committed_total(s, s.group + ".retry", retry_topic) >= parked_records, 30
    )
    assert worker.terminate() == 0


def test_a_down_destination_with_its_own_retry_partition_is_not_read_back_every_pause(
    scenario: Any,
) -> None:
    # Two retry partitions for two destinations: down-shop has partition 0 to itself, so
    # while it is down the intake leaves that partition unread instead of reading its backlog
    # back and parking it again at the end of every circuit pause (1-2 s here).
    s: Scenario = scenario(partitions=2)  # and two retry partitions
    s.fake.fault(kind="http_503", pixel=PIXEL_DOWN)
    s.produce_events(1500)
    expected = s.expected_ids()
    worker = s.start_worker(**parking_config())
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_UP)), 90), worker.log_tail()
    assert wait_until(lambda: parked_total(worker.metrics()) >= len(expected), 30)
    time.sleep(10)  # several pauses and probes
    records = [
        r
        for r in read_topic(s.kafka.bootstrap, s.retry_topic, idle_s=1.0)
        if "retry.destination" in headers_of(r)  # not the start-up check's probe record
    ]
    assert {r.partition() for r in records} == {0}
    # Each probe reads back one request's worth (max_batch_events 50) and parks it again;
    # reading the whole backlog back every pause would have parked it several times over.
    assert len(expected) <= len(records) < 1.5 * len(expected)
    assert ids_at(s, PIXEL_DOWN) == Counter()
    s.fake.clear_faults()
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_DOWN)), 90), worker.log_tail()
    assert max(ids_at(s, PIXEL_UP).values()) == 1
    assert s.dead_letters() == []
    parked_records = len(read_topic(s.kafka.bootstrap, s.retry_topic, idle_s=1.0))
    assert wait_until(
        lambda: committed_total(s, s.group + ".retry", s.retry_topic) >= parked_records, 30
    )
    assert worker.terminate() == 0


def test_past_the_deadline_parked_events_are_dead_lettered(scenario: Any) -> None:
    s: Scenario = scenario(partitions=2)
    s.fake.fault(kind="http_503", pixel=PIXEL_DOWN)
    s.produce_events(300)
    expected = s.expected_ids()
    worker = s.start_worker(**parking_config(deadline_s=6, in_memory_s=0.5))

    def all_dead() -> bool:
        text = worker.metrics()
        labels = {"reason": "retries_exhausted", "destination": "down-shop"}
        return metric_value(text, "tiktok_worker_dead_letters_total", labels) >= len(expected)

    assert wait_until(all_dead, 90), worker.log_tail()
    assert worker.terminate() == 0
    letters = s.dead_letters()
    dead_ids: set[str] = set()
    for msg in letters:
        headers = headers_of(msg)
        assert headers["dlq.reason"] == "retries_exhausted"
        assert headers["dlq.destination"] == "down-shop"
        assert headers["dlq.original.topic"] == s.topic  # never the retry topic
        dead_ids.add(json.loads(msg.value())["messageId"])
    assert dead_ids == expected
    assert set(ids_at(s, PIXEL_UP)) == expected
    assert ids_at(s, PIXEL_DOWN) == Counter()


def test_kill_9_while_events_are_parked_loses_nothing(scenario: Any) -> None:
    s: Scenario = scenario(partitions=2)
    s.fake.fault(kind="http_503", pixel=PIXEL_DOWN)
    s.produce_events(800)
    expected = s.expected_ids()
    first = s.start_worker(**parking_config())
    assert wait_until(lambda: parked_total(first.metrics()) >= len(expected), 90), first.log_tail()
    assert wait_until(lambda: committed_total(s, s.group, s.topic) == produced_messages(s), 60)
    first.kill()
    s.fake.clear_faults()
    second = s.start_worker(**parking_config())
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_DOWN)), 90), second.log_tail()
    assert set(ids_at(s, PIXEL_UP)) == expected
    assert s.dead_letters() == []
    assert second.terminate() == 0


def test_a_revoked_token_parks_until_it_is_fixed(scenario: Any) -> None:
    s: Scenario = scenario(partitions=2)
    s.fake.fault(kind="auth", pixel=PIXEL_DOWN, code=40001)
    s.produce_events(500)
    expected = s.expected_ids()
    worker = s.start_worker(**parking_config())
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_UP)), 90), worker.log_tail()
    assert wait_until(lambda: parked_total(worker.metrics()) >= len(expected), 60)
    assert wait_until(lambda: committed_total(s, s.group, s.topic) == produced_messages(s), 60)
    text = worker.metrics()
    auth = {"destination": "down-shop", "outcome": "auth_error"}
    assert metric_value(text, "tiktok_worker_requests_total", auth) >= 1
    # Requests stop while the circuit is open: far fewer auth answers than events.
    assert metric_value(text, "tiktok_worker_requests_total", auth) < len(expected)
    s.fake.clear_faults()  # the token is fixed
    assert wait_until(lambda: expected <= set(ids_at(s, PIXEL_DOWN)), 90), worker.log_tail()
    assert s.dead_letters() == []
    assert wait_until(
        lambda: (
            metric_value(
                worker.metrics(),
                "tiktok_worker_destination_circuit_state",
                {"destination": "down-shop"},
            )
            == 0
        ),
        30,
    )
    assert max(ids_at(s, PIXEL_UP).values()) == 1
    assert worker.terminate() == 0
