"""Every metric of SPEC §7 exists with its name, type and labels, and moves as expected for each
outcome: on the real mapper, batcher, sender, HTTP client and in-process fake TikTok server of
tests/test_pipeline.py's rig, on the real consumer thread over a fake consumer, and on the lag
monitor over a fake admin client.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from confluent_kafka import KafkaException
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devkit.fake_tiktok.server import FaultSpec
from devkit.sample_events import SampleEvents, encode
from tests.fakes import FakeAdmin, FakeMessage, consumer_thread, eventually, stop
from tests.test_pipeline import TOPIC, Rig, messages, order_events
from tests.test_pipeline import rig_factory as rig_factory  # the fixture
from worker import __version__
from worker.kafka.consumer import PauseSwitch
from worker.kafka.lag import LagMonitor, compute_lag
from worker.observability.logs import get_logger
from worker.observability.metrics import (
    COMMIT_RESULTS,
    DLQ_REASONS,
    REBALANCE_KINDS,
    REQUEST_OUTCOMES,
    SKIP_REASONS,
    Metrics,
)

# SPEC §7: family (as exposed) -> (type, labels).
SPEC_METRICS = {
    "tiktok_worker_messages_consumed_total": ("counter", {"topic"}),
    "tiktok_worker_events_mapped_total": ("counter", {"destination", "event"}),
    "tiktok_worker_events_skipped_total": ("counter", {"reason"}),
    "tiktok_worker_events_delivered_total": ("counter", {"destination"}),
    "tiktok_worker_dead_letters_total": ("counter", {"reason", "destination"}),
    "tiktok_worker_requests_total": ("counter", {"destination", "outcome"}),
    "tiktok_worker_request_duration_seconds": ("histogram", {"destination"}),
    "tiktok_worker_batch_events": ("histogram", {"destination"}),
    "tiktok_worker_rate_limit_wait_seconds": ("histogram", set()),
    "tiktok_worker_rate_limit_fallback": ("gauge", set()),
    "tiktok_worker_inflight_messages": ("gauge", set()),
    "tiktok_worker_paused_partitions": ("gauge", set()),
    "tiktok_worker_lane_inflight_events": ("gauge", {"destination"}),
    "tiktok_worker_consumer_lag_messages": ("gauge", {"topic", "partition"}),
    "tiktok_worker_last_commit_timestamp_seconds": ("gauge", set()),
    "tiktok_worker_build_info": ("gauge", {"version"}),
    "tiktok_worker_destination_circuit_state": ("gauge", {"destination"}),
    "tiktok_worker_events_parked_total": ("counter", {"destination", "reason"}),
}
WEB = "web-shop"


def exposition(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Family name as written in `# TYPE` -> (type, label names seen on its samples)."""
    text = generate_latest(metrics.registry).decode()
    types = {
        parts[2]: parts[3]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and (parts := line.split())
    }
    out: dict[str, tuple[str, set[str]]] = {name: (kind, set()) for name, kind in types.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = next(n for n in types if sample.name.startswith(n))
            out[name][1].update(set(sample.labels) - {"le"})
    return out


def populate_every_family(m: Metrics) -> None:
    m.messages_consumed.labels(topic="t").inc()
    m.lane_inflight_events.labels(destination=WEB).set(1)
    m.events_mapped.labels(destination=WEB, event="PlaceAnOrder").inc()
    m.events_skipped.labels(reason="no_match").inc()
    m.events_delivered.labels(destination=WEB).inc()
    m.dead_letters.labels(reason="decode_error", destination="").inc()
    m.requests.labels(destination=WEB, outcome="success").inc()
    m.request_duration.labels(destination=WEB).observe(0.1)
    m.batch_events.labels(destination=WEB).observe(3)
    m.retries.labels(destination=WEB).inc()
    m.consumer_lag.labels(topic="t", partition="0").set(5)
    m.commits.labels(result="ok").inc()
    m.rebalances.labels(kind="assign").inc()
    m.circuit_state.labels(destination=WEB).set(2)
    m.events_parked.labels(destination=WEB, reason="circuit_open").inc()


def test_every_spec_metric_is_exposed_with_its_name_type_and_labels() -> None:
    metrics = Metrics()
    populate_every_family(metrics)
    exposed = exposition(metrics)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in exposed, f"{name} missing from the exposition"
        assert exposed[name] == (kind, labels), name
    text = generate_latest(metrics.registry).decode()
    assert f'tiktok_worker_build_info{{version="{__version__}"}} 1.0' in text
    assert "_created" not in text


def test_no_unexpected_families_and_every_one_is_prefixed() -> None:
    metrics = Metrics()
    populate_every_family(metrics)
    exposed = {n: v for n, v in exposition(metrics).items() if not n.startswith("process_")}
    assert all(name.startswith("tiktok_worker_") for name in exposed)
    extras = set(exposed) - set(SPEC_METRICS)
    # The operator extras documented in docs/operations.md, and nothing else.
    assert extras == {
        "tiktok_worker_retries_total",
        "tiktok_worker_assigned_partitions",
        "tiktok_worker_commits_total",
        "tiktok_worker_rebalances_total",
        "tiktok_worker_destination_info",
        "tiktok_worker_parked_waiting_events",
        "tiktok_worker_parked_backlog_messages",
        "tiktok_worker_rate_limit_late_slots_total",
    }


def test_process_metrics_are_exposed_on_the_workers_registry() -> None:
    # Issue 19 / SPEC §7: CPU, resident memory and open fds of the worker process itself.
    exposed = exposition(Metrics())
    for name, kind in (
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ):
        assert exposed.get(name, ("missing",))[0] == kind, name
    text = generate_latest(Metrics().registry).decode()
    rss = next(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "process_resident_memory_bytes"
    )
    assert rss > 1_000_000  # a real reading of this process, not a placeholder


def test_every_skip_reason_is_emitted_and_documented() -> None:
    # Issue 19: a documented label value the worker never emits misleads dashboards/alerts.
    from pathlib import Path

    from worker.config import parse_config
    from worker.mapping.mapper import Mapper

    mapper = Mapper(
        parse_config("destinations: [{name: web-shop, pixel_code: P, access_token: t}]\n")
    )
    produces = {  # reason -> a message that is skipped with it
        "no_match": b'{"type": "identify", "userId": "u"}',
        "too_old": b'{"type": "page", "timestamp": "2001-01-01T00:00:00Z"}',
    }
    assert set(produces) == set(SKIP_REASONS)
    for reason, message in produces.items():
        (outcome,) = mapper.map_message(message)
        assert outcome.skipped == reason
    # An unknown Segment type is invalid (dead-lettered), never a skip.
    (outcome,) = mapper.map_message(b'{"type": "screenview"}')
    assert outcome.skipped is None
    assert outcome.invalid
    ops = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    line = next(x for x in ops.splitlines() if x.startswith("- `events_skipped_total{reason}`"))
    documented = re.findall(r"`([a-z_]+)`", line.split(":", 1)[1].split("(")[0])
    assert set(documented) == set(SKIP_REASONS)


def test_destination_info_joins_each_destination_to_its_event_source() -> None:
    metrics = Metrics()
    metrics.describe_destinations({"web-shop": "web", "stores": "offline", "mobile": "app"})
    text = generate_latest(metrics.registry).decode()
    for name, source in (("web-shop", "web"), ("stores", "offline"), ("mobile", "app")):
        line = f'tiktok_worker_destination_info{{destination="{name}",event_source="{source}"}} 1.0'
        assert line in text


def sample(rig: Rig, name: str, **labels: str) -> float:
    return rig.sample(name, **labels)


def requests(rig: Rig, outcome: str) -> float:
    return sample(rig, "tiktok_worker_requests_total", destination=WEB, outcome=outcome)


def dead(rig: Rig, reason: str, destination: str = WEB) -> float:
    return sample(rig, "tiktok_worker_dead_letters_total", reason=reason, destination=destination)


def delivered(rig: Rig) -> float:
    return sample(rig, "tiktok_worker_events_delivered_total", destination=WEB)


async def test_success(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.pipeline.on_messages(messages(order_events(5)))
    assert sample(rig, "tiktok_worker_inflight_messages") == 5
    await rig.settle()
    assert sample(rig, "tiktok_worker_messages_consumed_total", topic=TOPIC) == 5
    mapped = sample(rig, "tiktok_worker_events_mapped_total", destination=WEB, event="PlaceAnOrder")
    assert mapped == 5
    assert delivered(rig) == 5
    assert requests(rig, "success") == 1
    assert sample(rig, "tiktok_worker_batch_events_count", destination=WEB) == 1
    assert sample(rig, "tiktok_worker_batch_events_sum", destination=WEB) == 5
    assert sample(rig, "tiktok_worker_request_duration_seconds_count", destination=WEB) == 1
    assert sample(rig, "tiktok_worker_request_duration_seconds_sum", destination=WEB) > 0
    assert sample(rig, "tiktok_worker_rate_limit_wait_seconds_count") == 1
    assert sample(rig, "tiktok_worker_retries_total", destination=WEB) == 0
    assert sum(dead(rig, reason, d) for reason in DLQ_REASONS for d in (WEB, "")) == 0


async def test_throttled_then_accepted(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="throttle", count=1))
    rig.pipeline.on_messages(messages(order_events(3)))
    await rig.settle()
    assert requests(rig, "throttled") == 1
    assert requests(rig, "success") == 1
    assert sample(rig, "tiktok_worker_retries_total", destination=WEB) == 1
    assert delivered(rig) == 3


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (FaultSpec(kind="http_500", count=2), "retryable_error"),
        (FaultSpec(kind="http_429", count=2), "throttled"),
        (FaultSpec(kind="disconnect", count=2), "connection_error"),
        (FaultSpec(kind="timeout", count=1, delay_s=1.5), "timeout"),
    ],
)
async def test_retryable_outcomes_are_counted_then_delivered(
    rig_factory: Any,
    fault: FaultSpec,
    outcome: str,
) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(fault)
    rig.pipeline.on_messages(messages(order_events(2)))
    await rig.settle()
    expected = fault.count or 1
    assert requests(rig, outcome) == expected
    assert sample(rig, "tiktok_worker_retries_total", destination=WEB) == expected
    assert requests(rig, "success") == 1
    assert delivered(rig) == 2
    assert sum(dead(rig, reason) for reason in DLQ_REASONS) == 0


async def test_permanent_error_counts_each_bisected_request_and_one_dead_letter(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory()
    events = order_events(4)
    rig.fake.add_fault(FaultSpec(kind="reject_event_ids", event_ids=[events[3]["messageId"]]))
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    # The error text names data.3: that event is dead-lettered, [0,1,2] resent at once.
    assert requests(rig, "permanent_error") == 1
    assert requests(rig, "success") == 1
    assert dead(rig, "permanent_api_error") == 1
    assert delivered(rig) == 3
    assert sample(rig, "tiktok_worker_batch_events_sum", destination=WEB) == 4 + 3


async def test_auth_error_dead_letters_the_whole_batch(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="auth"))
    rig.pipeline.on_messages(messages(order_events(3)))
    await rig.settle()
    assert requests(rig, "auth_error") == 1
    assert dead(rig, "auth_error") == 3
    assert delivered(rig) == 0


async def test_retries_exhausted(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(deadline_s=0.3)
    rig.fake.add_fault(FaultSpec(kind="http_500"))
    rig.pipeline.on_messages(messages(order_events(2)))
    await rig.settle()
    assert dead(rig, "retries_exhausted") == 2
    assert requests(rig, "retryable_error") >= 2
    assert requests(rig, "success") == 0


async def test_bad_input_is_dead_lettered_by_reason_without_a_destination(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory()
    too_large = encode({**order_events(1)[0], "properties": {"blob": "x" * (1 << 20)}})
    bad: list[Any] = [
        FakeMessage(0, 0, b"not json"),
        FakeMessage(0, 1, b'["a", "b"]'),  # two elements, neither a Segment event
        FakeMessage(0, 2, too_large),
    ]
    rig.pipeline.on_messages(bad)
    await rig.settle()
    assert dead(rig, "decode_error", "") == 1
    assert dead(rig, "invalid_event", "") == 2
    assert dead(rig, "event_too_large", "") == 1
    assert sample(rig, "tiktok_worker_messages_consumed_total", topic=TOPIC) == 3
    assert requests(rig, "success") == 0


async def test_skipped_and_mapped_per_tiktok_event(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    gen = SampleEvents(seed=5)
    events = [
        gen.track("Product Viewed"),  # not in the documented presets
        gen.identify(),
        gen.page(),
        gen.track("Checkout Started"),
        gen.track("Order Completed"),
    ]
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert sample(rig, "tiktok_worker_events_skipped_total", reason="no_match") == 2

    def mapped(event: str) -> float:
        return sample(rig, "tiktok_worker_events_mapped_total", destination=WEB, event=event)

    assert [mapped(e) for e in ("ViewContent", "InitiateCheckout", "PlaceAnOrder")] == [1, 1, 1]
    assert delivered(rig) == 3


def test_label_vocabularies_are_the_documented_values() -> None:
    """The enums are a SPEC interface (`dlq.reason`, metric labels): pinned here, not derived."""
    assert DLQ_REASONS == (
        "decode_error",
        "invalid_event",
        "event_too_large",
        "permanent_api_error",
        "auth_error",
        "retries_exhausted",
    )
    assert SKIP_REASONS == ("no_match", "too_old")
    assert REQUEST_OUTCOMES == (
        "success",
        "throttled",
        "retryable_error",
        "timeout",
        "connection_error",
        "permanent_error",
        "auth_error",
    )
    assert (COMMIT_RESULTS, REBALANCE_KINDS) == (("ok", "error"), ("assign", "revoke", "lost"))


async def test_label_values_stay_in_bounded_sets(rig_factory: Any) -> None:
    """Whatever the input (random names, ids, garbage), labels come from fixed vocabularies."""
    rig: Rig = await rig_factory()
    gen = SampleEvents(seed=9)
    values: list[bytes] = []
    for i in range(60):
        event = gen.mixed()
        if i % 3 == 0:
            event = {**gen.track(), "event": f"Custom {i} {event['messageId']}"}
        values.append(encode(event))
    values += [b"{", b"[1, 2]", b'{"type": "alias"}', b'{"type": 1}']
    rig.fake.add_fault(FaultSpec(kind="http_500", count=1))
    batch: list[Any] = [FakeMessage(1, i, v) for i, v in enumerate(values)]
    rig.pipeline.on_messages(batch)
    await rig.settle()
    vocab = {
        "destination": {WEB, ""},
        "reason": set(DLQ_REASONS) | set(SKIP_REASONS),
        "outcome": set(REQUEST_OUTCOMES),
        "topic": {TOPIC},
        "event": {"ViewContent", "InitiateCheckout", "Search", "AddPaymentInfo", "PlaceAnOrder"},
        "result": set(COMMIT_RESULTS),
        "kind": set(REBALANCE_KINDS),
        "version": {__version__},
    }
    seen = 0
    for family in rig.metrics.registry.collect():
        for s in family.samples:
            for label, value in s.labels.items():
                if label != "le":
                    assert value in vocab[label], (s.name, label, value)
                    seen += 1
    assert seen > 10


# -------------------------------------------------------------------------- consumer thread


async def test_consumer_thread_metrics_assign_pause_commit_revoke() -> None:
    metrics = Metrics()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    pause = PauseSwitch()
    thread, fake, _sink = consumer_thread(metrics, pause=pause)
    thread.start()
    try:
        assert await eventually(lambda: value("tiktok_worker_assigned_partitions") == 2)
        assert value("tiktok_worker_rebalances_total", kind="assign") == 1
        assert value("tiktok_worker_last_commit_timestamp_seconds") == 0

        pause.paused = True
        assert await eventually(lambda: value("tiktok_worker_paused_partitions") == 2)
        assert fake.paused == {("segment", 0), ("segment", 1)}
        pause.paused = False
        assert await eventually(lambda: value("tiktok_worker_paused_partitions") == 0)

        before = time.time()
        await asyncio.wait_for(thread.commit({("segment", 0): 7}), 5)
        assert fake.commits == [[("segment", 0, 7)]]
        assert value("tiktok_worker_commits_total", result="ok") == 1
        committed_at = value("tiktok_worker_last_commit_timestamp_seconds")
        assert committed_at is not None
        assert committed_at >= before

        fake.fail_commits = True
        with pytest.raises(KafkaException):
            await asyncio.wait_for(thread.commit({("segment", 1): 3}), 5)
        assert value("tiktok_worker_commits_total", result="error") == 1
        assert value("tiktok_worker_last_commit_timestamp_seconds") == committed_at
        fake.fail_commits = False
        metrics.consumer_lag.labels(topic="segment", partition="1").set(4)
    finally:
        await stop(thread, fake)
    assert value("tiktok_worker_rebalances_total", kind="revoke") == 1
    assert value("tiktok_worker_assigned_partitions") == 0
    # A revoked partition's lag series goes with it.
    assert value("tiktok_worker_consumer_lag_messages", topic="segment", partition="1") is None


# -------------------------------------------------------------------------- consumer lag


@pytest.mark.parametrize(
    ("latest", "earliest", "committed", "reset_to_latest", "lag"),
    [
        (100, 0, 40, False, 60),
        (100, 0, 100, False, 0),
        (100, 0, None, False, 100),  # nothing committed, auto.offset.reset=earliest
        (100, 30, None, False, 70),  # ... only what retention kept
        (100, 0, None, True, 0),  # nothing committed, auto.offset.reset=latest
        (100, 50, 10, False, 50),  # committed offset deleted by retention: reset to earliest
        (100, 0, 120, False, 0),  # never negative
    ],
)
def test_compute_lag(
    latest: int, earliest: int, committed: int | None, reset_to_latest: bool, lag: int
) -> None:
    got = compute_lag(
        latest=latest, earliest=earliest, committed=committed, reset_to_latest=reset_to_latest
    )
    assert got == lag


async def test_lag_monitor_sets_and_removes_series() -> None:
    metrics = Metrics()
    admin = FakeAdmin()
    held = [("t", 0), ("t", 1)]
    admin.latest = {("t", 0): 100, ("t", 1): 50}
    admin.earliest = {("t", 0): 0, ("t", 1): 10}
    admin.committed = {("t", 0): 90}  # partition 1 never committed
    monitor = LagMonitor(
        admin=admin, group_id="g", partitions=lambda: held, metrics=metrics, log=get_logger("t")
    )

    def lag(partition: int) -> float | None:
        return metrics.registry.get_sample_value(
            "tiktok_worker_consumer_lag_messages", {"topic": "t", "partition": str(partition)}
        )

    assert await monitor.measure_once() == {("t", 0): 10, ("t", 1): 40}
    assert (lag(0), lag(1)) == (10, 40)

    admin.down = True  # Kafka unreachable: the last values stay
    assert await monitor.measure_once() == {}
    assert (lag(0), lag(1)) == (10, 40)

    admin.down = False
    held = [("t", 1)]  # partition 0 was revoked
    admin.committed[("t", 1)] = 45
    assert await monitor.measure_once() == {("t", 1): 5}
    assert (lag(0), lag(1)) == (None, 5)
