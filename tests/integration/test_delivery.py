"""Delivery guarantees end to end: real Kafka, the worker as a process, the fake TikTok server.

Every test reconciles by Segment messageId: each event that maps to TikTok is either accepted
by the fake or in the dead-letter topic with the expected reason, and nothing else is
dead-lettered.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import (
    TOKEN,
    Stack,
    committed_offsets,
    destination,
    headers_of,
    metric_value,
    produce,
    read_topic,
    stopping_all,
    wait_until,
)
from devkit.sample_events import DOCUMENTED_TRACK_EVENTS, MALFORMED_VALUES, SampleEvents, encode

pytestmark = pytest.mark.integration


def mapped_by_documented_preset(event: dict[str, Any]) -> bool:
    if event["type"] == "page":
        return True
    return event["type"] == "track" and event["event"] in DOCUMENTED_TRACK_EVENTS


class Scenario(Stack):
    """Topics, a fake TikTok server and worker processes for one test."""

    def __init__(
        self, kafka: Any, tmp_path: Path, *, partitions: int = 3, fake_args: tuple[str, ...] = ()
    ):
        super().__init__(
            kafka,
            tmp_path,
            prefix="segment",
            partitions=partitions,
            retry_partitions=2,
            fake_args=fake_args,
        )
        self.produced: list[dict[str, Any]] = []
        self.malformed: list[bytes] = []

    def produce_events(self, count: int, *, seed: int = 1, malformed_every: int = 0) -> None:
        gen = SampleEvents(seed=seed, prefix=f"s{seed}")
        values: list[bytes] = []
        for i, event in enumerate(gen.stream(count)):
            self.produced.append(event)
            values.append(encode(event))
            if malformed_every and i % malformed_every == 0:
                bad = MALFORMED_VALUES[(i // malformed_every) % len(MALFORMED_VALUES)]
                self.malformed.append(bad)
                values.append(bad)
        produce(self.kafka.bootstrap, self.topic, values, key_every=97)

    def expected_ids(self) -> set[str]:
        return {e["messageId"] for e in self.produced if mapped_by_documented_preset(e)}

    def dead_letters(self) -> list[Any]:
        return read_topic(self.kafka.bootstrap, self.dlq_topic, idle_s=1.0)

    def settled(self, extra_dlq: int = 0) -> bool:
        accepted = set(self.fake.event_ids())
        pending = self.expected_ids() - accepted
        return len(pending) <= extra_dlq and self._dlq_count() >= self.malformed_letters() + len(
            pending
        )

    def malformed_letters(self) -> int:
        """Dead letters the malformed messages make: one per event inside each of them."""
        return sum(len(json.loads(v)) if v.startswith(b"[") else 1 for v in self.malformed)

    def _dlq_count(self) -> int:
        text = "".join(w.metrics() for w in self.workers if w.running())
        return int(metric_value(text, "tiktok_worker_dead_letters_total"))


@pytest.fixture
def scenario(kafka: Any, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    with stopping_all(functools.partial(Scenario, kafka, tmp_path)) as make:
        yield make


def reconcile(s: Scenario, dead: list[Any]) -> tuple[set[str], Counter[str]]:
    """Returns ids lost (neither accepted nor dead-lettered) and the dead-letter reasons."""
    accepted = set(s.fake.event_ids())
    dead_ids: set[str] = set()
    reasons: Counter[str] = Counter()
    for msg in dead:
        headers = headers_of(msg)
        reasons[headers["dlq.reason"]] += 1
        with contextlib.suppress(ValueError, KeyError, TypeError):
            dead_ids.add(json.loads(msg.value())["messageId"])
    lost = s.expected_ids() - accepted - dead_ids
    return lost, reasons


def test_zero_loss_under_faults(scenario: Any) -> None:
    s: Scenario = scenario()
    s.produce_events(3000, malformed_every=300)
    rejected = [e["messageId"] for e in s.produced if mapped_by_documented_preset(e)][::250]
    s.fake.fault(kind="reject_event_ids", event_ids=rejected)
    s.fake.fault(kind="http_500", count=5)
    s.fake.fault(kind="throttle", count=5)
    s.fake.fault(kind="timeout", count=2)
    worker = s.start_worker(tiktok={"request_timeout_s": 1, "max_batch_events": 200})
    assert wait_until(lambda: s.settled(extra_dlq=len(rejected)), 90, 0.5), worker.log_tail()
    assert worker.terminate() == 0
    dead = s.dead_letters()
    lost, reasons = reconcile(s, dead)
    assert lost == set()
    assert reasons["permanent_api_error"] == len(rejected)
    assert reasons["decode_error"] + reasons["invalid_event"] == s.malformed_letters()
    assert sum(reasons.values()) == len(rejected) + s.malformed_letters()  # nothing else
    accepted = Counter(s.fake.event_ids())
    assert not set(rejected) & set(accepted)
    # The permanent error was isolated by bisection, not by dead-lettering whole batches.
    for msg in dead:
        h = headers_of(msg)
        assert set(h) >= {
            "dlq.reason",
            "dlq.error",
            "dlq.original.topic",
            "dlq.original.partition",
            "dlq.original.offset",
            "dlq.original.timestamp",
            "dlq.destination",
            "dlq.attempts",
            "dlq.failed_at",
        }
        assert h["dlq.original.topic"] == s.topic
        if h["dlq.reason"] == "permanent_api_error":
            assert h["dlq.tiktok.code"] == "40002"
            assert h["dlq.destination"] == "web-shop"
    # All offsets committed after a clean stop.
    ends = {p: n for p, n in _end_offsets(s).items()}
    assert committed_offsets(s.kafka.bootstrap, s.group, s.topic) == ends


def _end_offsets(s: Scenario) -> dict[int, int]:
    records = read_topic(s.kafka.bootstrap, s.topic, idle_s=0.5)
    ends: dict[int, int] = {}
    for msg in records:
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)
    return ends


def test_kill_9_and_restart_loses_nothing(scenario: Any) -> None:
    s: Scenario = scenario()
    s.produce_events(4000)
    s.fake.fault(kind="slow", delay_s=0.1)  # keep the stream going long enough to kill mid-way
    # A killed member keeps its partitions until its session times out: keep that short.
    fast_failover = {"client": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}}
    first = s.start_worker(
        kafka=fast_failover, tiktok={"max_batch_events": 50, "max_concurrent_requests": 1}
    )
    assert wait_until(lambda: len(s.fake.event_ids()) > 300, 60), first.log_tail()
    first.kill()
    delivered_before_restart = len(set(s.fake.event_ids()))
    assert delivered_before_restart < len(s.expected_ids())  # it really died mid-stream
    s.fake.clear_faults()
    s.start_worker(kafka=fast_failover)
    assert wait_until(lambda: s.settled(), 90, 0.5)
    lost, reasons = reconcile(s, s.dead_letters())
    assert lost == set()
    assert sum(reasons.values()) == 0


def test_second_worker_joins_mid_stream(scenario: Any) -> None:
    s: Scenario = scenario(partitions=4)
    s.produce_events(4000)
    s.fake.fault(kind="slow", delay_s=0.05)
    first = s.start_worker(tiktok={"max_batch_events": 50})
    assert wait_until(lambda: len(s.fake.event_ids()) > 200, 60), first.log_tail()
    second = s.start_worker(tiktok={"max_batch_events": 50})
    assert wait_until(
        lambda: metric_value(second.metrics(), "tiktok_worker_assigned_partitions") > 0, 60
    ), second.log_tail()
    s.fake.clear_faults()
    assert wait_until(lambda: s.settled(), 90, 0.5)
    assigned = [metric_value(w.metrics(), "tiktok_worker_assigned_partitions") for w in s.workers]
    assert all(a >= 1 for a in assigned)
    assert sum(assigned) == 4
    lost, reasons = reconcile(s, s.dead_letters())
    assert lost == set()
    assert sum(reasons.values()) == 0


def test_sigterm_drains_and_commits_only_finished_work(scenario: Any) -> None:
    s: Scenario = scenario()
    s.produce_events(3000)
    s.fake.fault(kind="slow", delay_s=0.2)
    worker = s.start_worker(
        kafka={"drain_timeout_s": 1},  # less than the backlog needs: work is left unfinished
        tiktok={"max_batch_events": 20, "max_concurrent_requests": 2},
    )
    assert wait_until(lambda: len(s.fake.event_ids()) > 100, 60), worker.log_tail()
    assert worker.terminate(timeout=40) == 0
    accepted = set(s.fake.event_ids())
    assert len(accepted) < len(s.expected_ids())  # stopped mid-stream
    committed = committed_offsets(s.kafka.bootstrap, s.group, s.topic)
    # Every mapped event below a committed offset was accepted by the fake.
    by_position = {}
    for msg in read_topic(s.kafka.bootstrap, s.topic, idle_s=0.5):
        event = json.loads(msg.value())
        by_position[(msg.partition(), msg.offset())] = event
    below = [
        e
        for (p, o), e in by_position.items()
        if committed.get(p, -1) > o and mapped_by_documented_preset(e)
    ]
    assert below, "nothing was committed before the stop"
    assert all(e["messageId"] in accepted for e in below)
    assert "worker stopped" in worker.log_path.read_text()


def test_failing_pixel_does_not_hold_up_another(scenario: Any) -> None:
    s: Scenario = scenario(fake_args=("--token", TOKEN))
    s.produce_events(2000)
    good = destination("good-shop")
    bad = destination("bad-shop", pixel="C5PIXEL0000000000002", token="revoked-token-000")
    worker = s.start_worker(destinations=[good, bad])
    expected = s.expected_ids()
    assert wait_until(lambda: expected <= set(s.fake.event_ids()), 60), worker.log_tail()
    assert wait_until(
        lambda: (
            metric_value(
                worker.metrics(),
                "tiktok_worker_dead_letters_total",
                {"reason": "auth_error", "destination": "bad-shop"},
            )
            >= len(expected)
        ),
        60,
    ), worker.log_tail()
    assert worker.terminate() == 0
    reasons = Counter(headers_of(m)["dlq.reason"] for m in s.dead_letters())
    assert reasons == Counter({"auth_error": len(expected)})
    pixels = {e["pixel"] for e in s.fake.events()}
    assert pixels == {"C5PIXEL0000000000001"}


def test_backpressure_bounds_inflight_work(scenario: Any) -> None:
    s: Scenario = scenario()
    s.produce_events(20000)
    s.fake.fault(kind="slow", delay_s=0.3)
    bound = 1000
    worker = s.start_worker(
        kafka={"max_inflight_messages": bound},
        tiktok={"max_batch_events": 100, "max_concurrent_requests": 2},
    )
    peaks: list[float] = []
    paused_seen = False

    def observe() -> bool:
        nonlocal paused_seen
        text = worker.metrics()
        peaks.append(metric_value(text, "tiktok_worker_inflight_messages"))
        paused_seen = paused_seen or metric_value(text, "tiktok_worker_paused_partitions") > 0
        return paused_seen and len(peaks) > 20

    assert wait_until(observe, 60, 0.2), worker.log_tail()
    # Up to two consume() batches (2000 messages each) may land after the pause request.
    assert max(peaks) <= bound + 2 * 2000
    s.fake.clear_faults()
    assert wait_until(lambda: s.settled(), 120, 0.5)
    assert worker.terminate() == 0
