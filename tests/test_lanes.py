"""Lanes (SPEC §4, issue 14) on the real pipeline, sender, limiter, HTTP client and in-process fake
TikTok server of tests/test_pipeline.py's rig: one destination's trouble never slows another,
batches fill while they wait for a slot, request-level errors are not bisected, a poison event
cannot hold its batch, a revoked partition's work is dropped, and a failure while processing
stops everything without a commit past it.

Each test states the defect of issue 14 it covers; each fails on the code before lanes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import worker.delivery.sender as sender_module
from devkit.fake_tiktok.server import FaultSpec
from devkit.sample_events import SampleEvents
from tests.fakes import FakeMessage
from tests.test_pipeline import PIXEL, TOPIC, Rig, messages, order_events
from tests.test_pipeline import rig_factory as rig_factory  # the fixture

PIXEL_B = "C5PIXEL0000000000002"


def two_shops(*, same_app: bool = False) -> list[dict[str, Any]]:
    """`shop-a` and `shop-b`, each taking only the events whose `properties.shop` names it."""
    return [
        {
            "name": "shop-a",
            "pixel_code": PIXEL,
            "access_token": "tok-a",
            "when": 'properties.shop = "a"',
        },
        {
            "name": "shop-b",
            "pixel_code": PIXEL_B,
            "access_token": "tok-a" if same_app else "tok-b",
            "when": 'properties.shop = "b"',
        },
    ]


def orders(count: int, shop: str, prefix: str) -> list[dict[str, Any]]:
    gen = SampleEvents(seed=7, prefix=prefix)
    events = []
    for _ in range(count):
        event = gen.track("Order Completed")
        event["properties"]["shop"] = shop
        events.append(event)
    return events


def accepted(rig: Rig, pixel: str) -> set[str]:
    return {e.event_id for e in rig.fake.events if e.pixel == pixel and e.event_id}


def ids(events: list[dict[str, Any]]) -> set[str]:
    return {e["messageId"] for e in events}


def requests_for(rig: Rig, pixel: str) -> list[Any]:
    return [r for r in rig.fake.state.requests if r.pixel == pixel]


def dead_reasons(rig: Rig) -> list[str]:
    return [headers["dlq.reason"] for _, headers in rig.producer.records]


async def until(predicate: Any, within_s: float = 10) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- defect 1: a paused, failing or slow lane holds nothing another lane needs ------------------


@pytest.mark.parametrize(
    "fault",
    [
        FaultSpec(kind="throttle", retry_after_s=30, pixel=PIXEL),  # 40100 + Retry-After
        FaultSpec(kind="http_503", pixel=PIXEL),
        FaultSpec(kind="timeout", delay_s=30, pixel=PIXEL),  # client times out after 1 s
    ],
    ids=["40100-retry-after", "503", "timeout"],
)
async def test_a_troubled_lane_does_not_hold_up_another(rig_factory: Any, fault: FaultSpec) -> None:
    rig: Rig = await rig_factory(
        destinations=two_shops(),
        max_concurrent_requests=2,
        max_batch_events=5,
        max_backoff_s=30,
        deadline_s=120,
    )
    rig.fake.add_fault(fault)
    troubled = orders(40, "a", "a")
    healthy = orders(40, "b", "b")
    rig.pipeline.on_messages(messages(troubled, partition=0))
    await until(lambda: len(requests_for(rig, PIXEL)) >= 1)
    rig.pipeline.on_messages(messages(healthy, partition=1))
    # Every healthy event arrives while the troubled lane is still held back (its pause,
    # backoff or hanging requests last 30 s).
    assert await until(lambda: accepted(rig, PIXEL_B) == ids(healthy)), rig.fake.stats()
    assert accepted(rig, PIXEL) == set()
    assert rig.pending_commits() == {(TOPIC, 1): 40}


# -- lanes of one app share its budget fairly ---------------------------------------------------


async def test_lanes_of_one_app_take_slots_in_turn(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(
        destinations=two_shops(same_app=True), qps=20, max_batch_events=10, batch_linger_ms=0
    )
    busy = orders(400, "a", "a")  # 40 requests at 20/s
    rig.pipeline.on_messages(messages(busy, partition=0))
    await until(lambda: len(rig.fake.state.requests) >= 2)
    rig.pipeline.on_messages(messages(orders(10, "b", "b"), partition=1))
    assert await until(lambda: len(accepted(rig, PIXEL_B)) == 10)
    order = [r.pixel for r in rig.fake.state.requests]
    first_b = order.index(PIXEL_B)
    # Round robin: shop-b's request comes within a turn or two, not after shop-a's backlog.
    assert first_b <= order.count(PIXEL_B) + 4, order
    assert order.count(PIXEL) < 30


# -- defect 2: batches fill while the lane waits for its slot -----------------------------------


async def test_a_throttled_lane_sends_full_batches(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(qps=1, batch_linger_ms=20)
    events = SampleEvents(seed=9, prefix="t")
    first = [events.track("Order Completed") for _ in range(10)]
    rig.pipeline.on_messages(messages(first))
    await until(lambda: len(rig.fake.state.requests) == 1)
    # 20 small arrivals, each after more than the linger time, while the next slot is ~1 s away.
    offset = len(first)
    for _ in range(20):
        chunk = [events.track("Order Completed") for _ in range(30)]
        rig.pipeline.on_messages(messages(chunk, start=offset))
        offset += len(chunk)
        await asyncio.sleep(0.03)
    await rig.settle()
    sizes = [r.events for r in rig.fake.state.requests]
    assert sum(sizes) == offset
    assert max(sizes[1:]) >= 500, sizes  # one request carried what waited for the slot
    assert len(sizes) <= 4, sizes


# -- defect 3: request-level errors fail the whole batch at once --------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (
            FaultSpec(
                kind="code",
                code=40002,
                message="Invalid value for event_source_id: not a valid string.",
            ),
            "permanent_api_error",
        ),
        (FaultSpec(kind="auth", code=40105), "auth_error"),
    ],
    ids=["40002-event_source_id", "revoked-token"],
)
async def test_request_level_errors_are_not_bisected(
    rig_factory: Any, fault: FaultSpec, reason: str
) -> None:
    rig: Rig = await rig_factory(max_batch_events=64)
    rig.fake.add_fault(fault)
    rig.pipeline.on_messages(messages(order_events(64, "o1")))
    await rig.settle()
    assert len(rig.fake.state.requests) == 1
    assert dead_reasons(rig) == [reason] * 64
    assert rig.pending_commits() == {(TOPIC, 0): 64}


async def test_a_wrong_base_url_is_one_request_for_the_whole_batch(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=32, base_path="/wrong")
    rig.pipeline.on_messages(messages(order_events(32, "o2")))
    await rig.settle()
    assert rig.fake.stats()["requests_total"] == 0  # the track endpoint never saw one
    assert (
        rig.sample(
            "tiktok_worker_requests_total", destination="web-shop", outcome="permanent_error"
        )
        == 1
    )
    assert dead_reasons(rig) == ["permanent_api_error"] * 32


async def test_splitting_stops_when_both_halves_repeat_the_error(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=64)
    rig.fake.add_fault(FaultSpec(kind="code", code=40002, message="Invalid value: bad request."))
    rig.pipeline.on_messages(messages(order_events(64, "o3")))
    await rig.settle()
    assert len(rig.fake.state.requests) == 3  # the batch and its two halves
    assert dead_reasons(rig) == ["permanent_api_error"] * 64


async def test_the_index_in_the_error_text_names_the_event(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=64)
    events = order_events(64, "o4")
    bad = {events[5]["messageId"], events[40]["messageId"]}
    rig.fake.add_fault(FaultSpec(kind="reject_event_ids", event_ids=sorted(bad)))
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert len(rig.fake.state.requests) == 3  # rejected data.5, rejected data.39, accepted
    assert accepted(rig, PIXEL) == ids(events) - bad
    assert {json.loads(v or b"")["messageId"] for v, _ in rig.producer.records} == bad


# -- defect 4: a retryable poison event cannot hold its batch -----------------------------------


async def test_a_retryable_poison_event_is_split_out(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=32, deadline_s=3)
    events = order_events(32, "o5")
    poison = events[17]["messageId"]
    rig.fake.add_fault(FaultSpec(kind="http_500", event_ids=[poison]))
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert accepted(rig, PIXEL) == ids(events) - {poison}
    assert dead_reasons(rig) == ["retries_exhausted"]
    assert rig.pending_commits() == {(TOPIC, 0): 32}


# -- defect 5: Retry-After is capped ------------------------------------------------------------


async def test_a_huge_retry_after_is_capped_not_a_dead_letter(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(deadline_s=5, max_backoff_s=0.2)
    rig.fake.add_fault(FaultSpec(kind="http_429", retry_after_s=7200, count=1))
    events = order_events(5, "o6")
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert accepted(rig, PIXEL) == ids(events)
    assert rig.producer.records == []


# -- defect 6: work of a revoked partition is dropped at once -----------------------------------


async def test_revoke_drops_a_stuck_lanes_work_and_frees_the_bound(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_inflight=4, drain_timeout_s=0.2, max_batch_events=1)
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL, count=1_000_000))
    rig.pipeline.on_messages(messages(order_events(3, "o7"), partition=0))
    await until(lambda: len(rig.fake.state.requests) >= 3)
    assert rig.pipeline.inflight_messages == 3
    offsets = await rig.pipeline.on_revoked([(TOPIC, 0)])
    assert offsets == {}
    assert rig.pipeline.inflight_messages == 0  # its share of the bound is free at once
    await until(lambda: rig.sender.on_wire == 0)  # a request already sent cannot be recalled
    sent = len(rig.fake.state.requests)
    rig.fake.clear_faults()
    fresh = order_events(2, "o8")
    rig.pipeline.on_messages(messages(fresh, partition=1))
    assert not rig.pause.paused
    await rig.settle()
    assert accepted(rig, PIXEL) == ids(fresh)  # only the owned partition's events
    await asyncio.sleep(0.3)  # longer than the backoff: a zombie would have retried by now
    assert len(rig.fake.state.requests) == sent + len(fresh)
    assert rig.producer.records == []  # nothing of the revoked partition dead-lettered


# -- defect 7: an exception stops the worker without committing past the message ----------------


async def test_a_message_that_raises_stops_everything_before_it(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    events = order_events(3, "o9")
    # Offsets going backwards (log truncation) make the ledger raise for the second message.
    batch: list[Any] = [
        FakeMessage(0, 5, messages(events)[0].value()),
        FakeMessage(0, 3, messages(events)[1].value()),
        FakeMessage(0, 6, messages(events)[2].value()),
    ]
    rig.pipeline.on_messages(batch)
    assert rig.fatal.error is not None
    assert "offset 3" in str(rig.fatal.error)
    await asyncio.sleep(0.2)
    assert rig.pending_commits() == {}
    assert await rig.commit_once() == 0
    assert await rig.pipeline.on_revoked([(TOPIC, 0)]) == {}
    assert events[2]["messageId"] not in accepted(rig, PIXEL)  # offset 6 was never begun


async def test_a_crashed_delivery_task_is_fatal(rig_factory: Any, monkeypatch: Any) -> None:
    rig: Rig = await rig_factory()

    def broken(*_args: Any) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(sender_module, "build_body", broken)
    rig.pipeline.on_messages(messages(order_events(2, "o10")))
    assert await until(lambda: rig.fatal.error is not None)
    assert "boom" in str(rig.fatal.error)
    assert rig.pending_commits() == {}


async def test_an_outage_of_the_whole_destination_is_not_split_down_to_single_events(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(max_batch_events=16, deadline_s=1.5)
    rig.fake.add_fault(FaultSpec(kind="http_503"))
    rig.pipeline.on_messages(messages(order_events(16, "outage")))
    await rig.settle()
    sizes = {r.events for r in rig.fake.state.requests}
    # Split once after 3 failures; neither half gets through, so neither splits again.
    assert sizes == {16, 8}
    assert dead_reasons(rig) == ["retries_exhausted"] * 16
