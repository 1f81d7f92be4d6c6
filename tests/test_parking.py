"""Parking (SPEC §4): in-memory retries then the retry topic, the circuit per destination, the
retry intake, deadlines and reference-only records. Real mapper, lanes, sender, HTTP client
and the in-process fake TikTok; the producers and the consumer are in-memory stand-ins."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from devkit.fake_tiktok.server import FakeTikTok, FaultSpec
from devkit.sample_events import encode
from tests.fakes import consumer_thread, stop
from tests.fakes import eventually as fakes_eventually
from tests.test_pipeline import config_for, order_events
from worker.core.vocabulary import DeadLetterReason
from worker.delivery.client import TikTokClient
from worker.delivery.factory import build_routes, parking_policy
from worker.delivery.inflight import Parking, PendingEvent
from worker.delivery.ratelimit import build_rate_limiter
from worker.delivery.sender import LanePolicy, RetryPolicy, Sender
from worker.errors import FatalLatch
from worker.kafka.consumer import PauseSwitch
from worker.kafka.deadletters import DeadLetter, DeadLetterProducer
from worker.kafka.offsets import OffsetLedger
from worker.kafka.parking import (
    PROBE_HEADER,
    Parked,
    RetryLayout,
    RetryProducer,
    iso,
    parse_iso,
    partition_for,
)
from worker.kafka.settings import TopicPartitionKey
from worker.mapping.mapper import Mapper
from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics
from worker.pipeline import retries
from worker.pipeline.parker import Parker, ParkingRules
from worker.pipeline.pipeline import Pipeline
from worker.pipeline.retries import PartitionHolder, RetryIntake

SOURCE = "segment"
RETRY = "retry"
PIXEL_A = "C5PIXELAAAAAAAAAAAA1"
PIXEL_B = "C5PIXELBBBBBBBBBBBB2"
DESTINATIONS = [
    {"name": "shop-a", "pixel_code": PIXEL_A, "access_token": "tok-a"},
    {"name": "shop-b", "pixel_code": PIXEL_B, "access_token": "tok-b"},
]


@dataclass
class Record:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: dict[str, str]
    partition: int | None


@dataclass
class Producer:
    """librdkafka's Producer for what AckedProducer calls; acks on poll unless held."""

    topic_max_bytes: int | None = None
    records: list[Record] = field(default_factory=list)
    held: list[tuple[Callable[[Any, Any], None], Any]] = field(default_factory=list)
    auto_ack: bool = True

    def produce(
        self,
        topic: str,
        *,
        value: Any,
        key: Any,
        headers: Any,
        on_delivery: Any,
        partition: int | None = None,
    ) -> None:
        err = None
        if self.topic_max_bytes is not None and len(value or b"") > self.topic_max_bytes:
            err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        else:
            decoded = {k: v.decode() for k, v in headers}
            self.records.append(Record(topic, value, key, decoded, partition))
        self.held.append((on_delivery, err))

    def poll(self, _timeout: float = 0) -> int:
        if self.auto_ack:
            self.ack()
        return 0

    def ack(self) -> None:
        held, self.held = self.held, []
        for callback, err in held:
            callback(err, None)

    def flush(self, _timeout: float = 0) -> int:
        return 0


class Message:
    def __init__(self, record: Record, offset: int, topic: str = RETRY) -> None:
        self._record, self._offset, self._topic = record, offset, topic

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._record.partition or 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._record.value

    def key(self) -> bytes | None:
        return self._record.key

    def headers(self) -> list[tuple[str, bytes]]:
        return [(k, v.encode()) for k, v in self._record.headers.items()]

    def timestamp(self) -> tuple[int, int]:
        return (1, 1764072000000)


def kafka(messages: list[Message]) -> list[Any]:
    """Stand-ins where the pipeline takes confluent_kafka messages."""
    return list(messages)


def source_message(offset: int, event: dict[str, Any]) -> Message:
    return Message(Record(SOURCE, encode(event), b"user-1", {}, 0), offset, topic=SOURCE)


@dataclass
class Rig:
    fake: FakeTikTok
    pipeline: Pipeline
    intake: RetryIntake
    sender: Sender
    retry: Producer
    dlq: Producer
    ledger: OffsetLedger
    retry_ledger: OffsetLedger
    metrics: Metrics
    fatal: FatalLatch
    source_pause: PauseSwitch

    async def feed_source(self, events: list[dict[str, Any]], chunk: int = 5) -> None:
        """Hand `events` to the pipeline as a consumer would: never while it is paused."""
        for start in range(0, len(events), chunk):
            while self.source_pause.paused:
                await asyncio.sleep(0.01)
            part = events[start : start + chunk]
            self.pipeline.on_messages(
                kafka([source_message(start + i, e) for i, e in enumerate(part)])
            )
            await asyncio.sleep(0)

    def parked(self) -> list[Record]:
        return [r for r in self.retry.records if PROBE_HEADER not in r.headers]

    def dead(self) -> list[Record]:
        return self.dlq.records

    def pixels(self, pixel: str) -> list[str]:
        return [e.event_id or "" for e in self.fake.events if e.pixel == pixel]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def circuit_state(self, destination: str) -> float:
        return self.sample("tiktok_worker_destination_circuit_state", destination=destination)

    async def open_circuit_a(self) -> None:
        """shop-a answers 503 from now on; one source event (offset 0) opens its circuit
        (with `failure_threshold=1`)."""
        self.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_A))
        self.pipeline.on_messages(kafka([source_message(0, order_events(1, "a")[0])]))
        await eventually(lambda: self.circuit_state("shop-a") == 2)

    async def feed_back_until(self, done: Callable[[], bool], rounds: int = 50) -> None:
        """Hand the parked records back, new ones each round, until `done()` (a record still
        parked again because its circuit is open comes back in a later round)."""
        start = 0
        for _ in range(rounds):
            if done():
                return
            start = self.feed_back(start)
            await asyncio.sleep(0.1)

    def feed_back(self, start: int = 0) -> int:
        """Hand the parked records from `start` on to the intake; returns the next start."""
        records = self.parked()
        messages = [Message(r, i) for i, r in enumerate(records) if i >= start]
        self.intake.on_messages(kafka(messages))
        return len(records)


async def eventually(check: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., Any]]:
    closers: list[Any] = []

    async def make(
        *,
        in_memory_s: float = 0.1,
        deadline_s: float = 30.0,
        failure_threshold: int = 2,
        open_s: float = 0.3,
        dlq_max_bytes: int | None = None,
        retry_max_bytes: int | None = None,
        probe_events: int = retries.PROBE_EVENTS,
        holder: PartitionHolder | None = None,
        max_inflight: int = 1000,
        shed_after_s: float | None = None,
        lane_events: int = 100,
        lane_concurrency: int = 4,
        destinations: list[dict[str, str]] | None = None,
    ) -> Rig:
        chosen = destinations or DESTINATIONS
        fake = FakeTikTok()
        url = await fake.start()
        closers.append(fake.stop)
        config = config_for(
            url,
            destinations=chosen,
            retry={
                "initial_backoff_s": 0.01,
                "max_backoff_s": 0.05,
                "in_memory_s": in_memory_s,
                "deadline_s": deadline_s,
            },
            circuit={
                "failure_threshold": failure_threshold,
                "open_s": open_s,
                "max_open_s": open_s * 4,
            },
        )
        metrics = Metrics()
        log = get_logger("test")
        fatal = FatalLatch()
        client = TikTokClient(base_url=url, timeout_s=1, max_connections=8)
        limiter = build_rate_limiter(
            backend="local",
            qps=1000,
            redis_url="redis://unused",
            expected_replicas=1,
            metrics=metrics,
        )
        sender = Sender(
            client=client,
            limiter=limiter,
            routes=build_routes(config),
            retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=deadline_s),
            lanes=LanePolicy(
                max_events=lane_events,
                linger_s=0.02,
                concurrency=lane_concurrency,
                max_concurrent_requests=8,
            ),
            metrics=metrics,
            log=log,
            on_crash=fatal.trip,
            parking=parking_policy(config),
        )
        dlq = Producer(topic_max_bytes=dlq_max_bytes)
        retry = Producer(topic_max_bytes=retry_max_bytes)
        dead_letters = DeadLetterProducer(
            config={}, topic="dlq", metrics=metrics, on_fatal=fatal.trip, producer=dlq
        )
        retry_producer = RetryProducer(
            config={},
            topic=RETRY,
            metrics=metrics,
            on_fatal=fatal.trip,
            producer=retry,
            partitions=4,
            destinations=[d["name"] for d in chosen],
        )
        for producer in (dead_letters, retry_producer):
            producer.start()
            closers.append(producer.close)
        closers.extend([sender.close, client.close, limiter.close])
        parker = Parker(
            retry=retry_producer,
            dead_letters=dead_letters,
            rules=ParkingRules(deadline_s=deadline_s, initial_backoff_s=0.01, max_backoff_s=0.05),
            log=log,
        )
        mapper = Mapper(config)
        ledger, retry_ledger = OffsetLedger(), OffsetLedger()
        common: dict[str, Any] = {
            "mapper": mapper,
            "sender": sender,
            "dead_letters": dead_letters,
            "fatal": fatal,
            "metrics": metrics,
            "log": log,
            "max_inflight_messages": max_inflight,
            "drain_timeout_s": 2.0,
            "parker": parker,
        }
        source_pause = PauseSwitch()
        pipeline = Pipeline(ledger=ledger, pause=source_pause, shed_after_s=shed_after_s, **common)
        intake = RetryIntake(
            ledger=retry_ledger,
            pause=PauseSwitch(),
            destinations=[d["name"] for d in chosen],
            layout=retry_producer.layout,
            probe_events=probe_events,
            **common,
        )
        if holder is not None:
            intake.attach(holder)
        closers.append(intake.close)
        pipeline.on_assigned([(SOURCE, 0)])
        intake.on_assigned([(RETRY, 0)])
        return Rig(
            fake,
            pipeline,
            intake,
            sender,
            retry,
            dlq,
            ledger,
            retry_ledger,
            metrics,
            fatal,
            source_pause,
        )

    yield make
    for close in reversed(closers):
        await close()


def ids(events: list[dict[str, Any]]) -> set[str]:
    return {e["messageId"] for e in events}


async def test_a_failing_destination_is_parked_while_the_other_flows_and_offsets_finish(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_A))
    events = order_events(20)
    rig.pipeline.on_messages(kafka([source_message(i, e) for i, e in enumerate(events)]))
    # Every offset finishes: B delivered them, A's copies are parked (acknowledged).
    await eventually(lambda: rig.ledger.pending() == {(SOURCE, 0): 20})
    assert set(rig.pixels(PIXEL_B)) == ids(events)
    assert rig.pixels(PIXEL_A) == []
    parked = rig.parked()
    assert {json.loads(r.value or b"")["messageId"] for r in parked} == ids(events)
    assert {r.headers["retry.destination"] for r in parked} == {"shop-a"}
    assert {r.partition for r in parked} == {0}  # shop-a sorts first: partition 0 of 4
    first = Parked.from_headers(parked[0].headers)
    assert first.failure == "retryable"
    assert first.original_topic == SOURCE
    assert first.due_at > first.parked_at >= first.first_failed_at
    assert all(r.key == b"user-1" for r in parked)
    # Requests stopped once the circuit opened: far fewer than one per event.
    failed = rig.sample(
        "tiktok_worker_requests_total", destination="shop-a", outcome="retryable_error"
    )
    assert 2 <= failed < 20
    assert rig.sample("tiktok_worker_destination_circuit_state", destination="shop-a") == 2
    assert rig.sample("tiktok_worker_destination_circuit_state", destination="shop-b") == 0
    parked_total = sum(
        rig.sample("tiktok_worker_events_parked_total", destination="shop-a", reason=r)
        for r in ("retryable", "circuit_open")
    )
    assert parked_total == 20
    assert rig.dead() == []


async def test_parked_events_are_delivered_when_due_to_their_destination_only(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_A))
    events = order_events(6)
    rig.pipeline.on_messages(kafka([source_message(i, e) for i, e in enumerate(events)]))
    await eventually(lambda: len(rig.parked()) == 6)
    rig.fake.clear_faults()
    # The circuit may still be open when a record comes due: it is parked again with a later
    # due time (no request) until the probe succeeds.
    await rig.feed_back_until(lambda: set(rig.pixels(PIXEL_A)) == ids(events))
    assert set(rig.pixels(PIXEL_A)) == ids(events)
    assert sorted(rig.pixels(PIXEL_B)) == sorted(ids(events))  # never twice
    assert rig.dead() == []
    await eventually(lambda: rig.intake.inflight_messages == 0)
    assert rig.retry_ledger.pending() == {(RETRY, 0): len(rig.parked())}


async def test_a_record_not_yet_due_is_held_without_a_request(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    event = order_events(1)[0]
    now = time.time()
    parked = _parked("shop-a", first=now - 1, due=now + 0.5)
    rig.retry.records.append(Record(RETRY, encode(event), None, _text(parked), 0))
    rig.feed_back()
    await asyncio.sleep(0.2)
    assert rig.intake.waiting == 1
    assert rig.sample("tiktok_worker_parked_waiting_events") == 1
    # The source topics' in-flight gauge (backpressure) is not the intake's.
    others = order_events(2, "other")
    rig.pipeline.on_messages(kafka([source_message(i, e) for i, e in enumerate(others)]))
    assert rig.sample("tiktok_worker_inflight_messages") == 2
    rig.feed_back(1)  # an empty hand-over still runs the intake's bookkeeping
    assert rig.sample("tiktok_worker_inflight_messages") == 2
    assert rig.fake.events == []
    assert rig.retry_ledger.pending() == {}
    await eventually(lambda: event["messageId"] in rig.pixels(PIXEL_A))
    await eventually(lambda: rig.retry_ledger.pending() == {(RETRY, 0): 1})
    assert event["messageId"] not in rig.pixels(PIXEL_B)
    assert rig.sample("tiktok_worker_parked_waiting_events") == 0


async def test_the_intake_finishing_a_record_leaves_the_source_in_flight_gauge_alone(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(in_memory_s=30, failure_threshold=1000)
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_B))  # retried in memory: held
    stuck = order_events(3, "stuck")
    rig.pipeline.on_messages(kafka([source_message(i, e) for i, e in enumerate(stuck)]))
    gauge = "tiktok_worker_inflight_messages"
    assert rig.sample(gauge) == 3
    event = order_events(1, "parked")[0]
    now = time.time()
    parked = _parked("shop-a", first=now - 1, due=now - 0.1)
    rig.retry.records.append(Record(RETRY, encode(event), None, _text(parked), 0))
    rig.feed_back(len(rig.parked()) - 1)
    await eventually(lambda: event["messageId"] in rig.pixels(PIXEL_A))
    await eventually(lambda: rig.intake.inflight_messages == 0)
    assert rig.sample(gauge) == 3  # still the source's three, not the intake's zero


async def test_held_records_go_at_once_when_their_destination_recovers(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(failure_threshold=1, open_s=0.2)
    held = order_events(1, "held")[0]
    now = time.time()
    parked = _parked("shop-a", first=now - 1, due=now + 60)  # due long after the test ends
    rig.retry.records.append(Record(RETRY, encode(held), None, _text(parked), 0))
    await rig.open_circuit_a()
    rig.feed_back()
    await eventually(lambda: rig.intake.waiting >= 1)
    rig.fake.clear_faults()
    await asyncio.sleep(0.3)  # past open_s: the next batch is the probe
    rig.pipeline.on_messages(kafka([source_message(1, order_events(1, "b")[0])]))
    await eventually(lambda: rig.circuit_state("shop-a") == 0)
    await eventually(lambda: held["messageId"] in rig.pixels(PIXEL_A), within_s=5)
    assert rig.pixels(PIXEL_A).count(held["messageId"]) == 1


async def test_a_record_due_while_its_circuit_is_open_is_parked_again_as_it_is(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(failure_threshold=1, open_s=5)
    await rig.open_circuit_a()
    requests = rig.fake.state.requests_total
    before = len(rig.parked())
    now = time.time()
    # Not valid JSON: mapping it again would dead-letter it, so a re-park proves it was not.
    parked = _parked("shop-a", first=now - 1, due=now - 0.1)
    rig.retry.records.append(Record(RETRY, b"{not json", b"k", _text(parked), 0))
    rig.feed_back(before)
    await eventually(lambda: len(rig.parked()) == before + 2)
    again = rig.parked()[-1]
    assert again.value == b"{not json"
    assert again.key == b"k"
    assert again.partition == 0
    headers = Parked.from_headers(again.headers)
    assert (headers.parks, headers.attempts, headers.reason) == (2, 3, "circuit_open")
    assert headers.first_failed_at == pytest.approx(parked.first_failed_at, abs=0.001)
    assert headers.error == parked.error
    # Due after the circuit's pause (5 s), not after the backoff of the rig (50 ms at most).
    assert headers.due_at - headers.parked_at > 4
    assert rig.fake.state.requests_total == requests  # no request
    assert rig.dead() == []
    await eventually(lambda: rig.intake.inflight_messages == 0)


async def test_when_the_probe_is_due_one_requests_worth_goes_to_the_lane(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(failure_threshold=1, open_s=0.3, probe_events=3)
    await rig.open_circuit_a()
    await asyncio.sleep(0.35)  # the pause is over: the next request is the probe
    before = len(rig.parked())
    now = time.time()
    for offset in range(10):
        # Not valid JSON: what goes to the lane is mapped and dead-lettered, so the dead
        # letters count the records handed over and the parked records those that were not.
        parked = msgspec.structs.replace(
            _parked("shop-a", first=now - 1, due=now - 0.1), original_offset=offset
        )
        rig.retry.records.append(Record(RETRY, b"{not json", b"k", _text(parked), 0))
    rig.feed_back(before)
    await eventually(lambda: len(rig.dead()) == 3 and len(rig.parked()) == before + 10 + 7)
    again = [Parked.from_headers(r.headers) for r in rig.parked()[before + 10 :]]
    assert {p.parks for p in again} == {2}
    assert sorted(p.original_offset for p in again) == list(range(3, 10))


async def test_a_lane_slower_than_its_input_is_held_to_its_share_while_the_other_flows(
    rig_factory: Any,
) -> None:
    # shop-a answers after 0.6 s, one request of 5 events at a time: far slower than its input.
    # The in-flight bound (20 messages) fills with its events; after `shed_after_s` paused it
    # is held to its share (20 // 2 lanes = 10 events) and the rest of its events are
    # parked, so shop-b gets every event long before shop-a could have taken them.
    rig: Rig = await rig_factory(
        max_inflight=20,
        shed_after_s=0.3,
        lane_events=5,
        lane_concurrency=1,
        failure_threshold=1000,
        in_memory_s=30,
    )
    rig.fake.add_fault(FaultSpec(kind="slow", pixel=PIXEL_A, delay_s=0.6))
    events = order_events(200)
    feeding = asyncio.ensure_future(rig.feed_source(events))
    await eventually(lambda: set(rig.pixels(PIXEL_B)) == ids(events), within_s=8)
    await feeding
    assert len(rig.pixels(PIXEL_A)) < 100  # it could not have kept up with its input
    shed = [Parked.from_headers(r.headers) for r in rig.parked()]
    assert shed
    assert {(p.destination, p.reason) for p in shed} == {("shop-a", "throttled")}
    # Nothing lost: each of shop-a's events is delivered or parked (the oldest ones stayed).
    await eventually(lambda: rig.ledger.pending() == {(SOURCE, 0): len(events)}, within_s=15)
    delivered = set(rig.pixels(PIXEL_A))
    parked_ids = {json.loads(r.value or b"")["messageId"] for r in rig.parked()}
    assert delivered | parked_ids == ids(events)
    assert not delivered & parked_ids
    assert sorted(rig.pixels(PIXEL_B)) == sorted(ids(events))  # never twice


async def test_a_single_slow_lane_is_plain_backpressure_and_nothing_is_shed(
    rig_factory: Any,
) -> None:
    one = [{"name": "shop-a", "pixel_code": PIXEL_A, "access_token": "tok-a"}]
    rig: Rig = await rig_factory(
        max_inflight=20, shed_after_s=0.2, lane_events=5, lane_concurrency=1, destinations=one
    )
    rig.fake.add_fault(FaultSpec(kind="slow", pixel=PIXEL_A, delay_s=0.5))
    events = order_events(40)
    await rig.feed_source(events)
    await eventually(lambda: set(rig.pixels(PIXEL_A)) == ids(events), within_s=15)
    assert rig.parked() == []


class RecordingHolder:
    """Stands in for the retry topic's consumer: records holds and releases."""

    def __init__(self) -> None:
        self.holds: list[tuple[TopicPartitionKey, int]] = []
        self.releases: list[TopicPartitionKey] = []
        self.futures: list[asyncio.Future[bool]] = []

    def hold(self, key: TopicPartitionKey, offset: int) -> asyncio.Future[bool]:
        self.holds.append((key, offset))
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def release(self, key: TopicPartitionKey) -> None:
        self.releases.append(key)


def parked_record(offset: int, *, destination: str = "shop-a", partition: int = 0) -> Message:
    now = time.time()
    parked = msgspec.structs.replace(
        _parked(destination, first=now - 1, due=now - 0.1), original_offset=offset
    )
    event = order_events(1, f"held-{destination}-{offset}")[0]
    return Message(Record(RETRY, encode(event), b"k", _text(parked), partition), offset)


async def test_a_down_destinations_own_partition_is_left_unread_until_it_may_be_tried(
    rig_factory: Any,
) -> None:
    holder = RecordingHolder()
    rig: Rig = await rig_factory(failure_threshold=1, open_s=0.5, probe_events=3, holder=holder)
    rig.intake.on_assigned([(RETRY, 1)])
    await rig.open_circuit_a()
    await eventually(lambda: len(rig.parked()) == 1)  # the source event that failed
    requests = rig.fake.state.requests_total
    parked_before = len(rig.parked())
    # shop-a alone is parked in partition 0 (of 4): its records are neither begun nor parked
    # again; shop-b's partition 1 is read as usual.
    rig.intake.on_messages(kafka([parked_record(o) for o in range(5, 10)]))
    rig.intake.on_messages(kafka([parked_record(20, destination="shop-b", partition=1)]))
    assert holder.holds == [((RETRY, 0), 5)]
    await eventually(lambda: rig.retry_ledger.pending() == {(RETRY, 1): 21})
    assert len(rig.parked()) == parked_before
    assert rig.fake.state.requests_total == requests + 1  # shop-b's record only
    assert rig.intake.inflight_messages == 0
    # Records of the held partition read before the hold took effect are ignored too.
    rig.intake.on_messages(kafka([parked_record(11)]))
    holder.futures[0].set_result(True)
    await asyncio.sleep(0)
    assert holder.releases == []
    # When the pause is over the partition is read again from offset 5 on: one request's
    # worth (3) goes to the lane as the probe, whether due or not, then it is held again.
    rig.fake.clear_faults()
    await eventually(lambda: holder.releases == [(RETRY, 0)], within_s=2)
    rig.intake.on_messages(kafka([parked_record(o) for o in range(5, 12)]))
    assert holder.holds[-1] == ((RETRY, 0), 8)
    holder.futures[-1].set_result(True)
    await eventually(lambda: rig.circuit_state("shop-a") == 0)
    assert len(rig.pixels(PIXEL_A)) >= 3
    # The circuit closed: released at once, and the rest is delivered.
    await eventually(lambda: holder.releases == [(RETRY, 0)] * 2)
    rig.intake.on_messages(kafka([parked_record(o) for o in range(8, 12)]))
    await eventually(lambda: rig.retry_ledger.pending().get((RETRY, 0)) == 12)
    assert sorted(rig.pixels(PIXEL_A)) == sorted(
        f"held-shop-a-{o}-00000001" for o in range(5, 12)
    )  # each once (the source event itself stays parked: it is not fed back here)
    assert rig.dead() == []


async def test_a_record_near_its_deadline_is_not_held_but_dead_lettered_on_time(
    rig_factory: Any,
) -> None:
    # Its deadline (5 s after its first failure, 4.5 s ago) falls within the circuit's longest
    # pause (30 s, up to 120 s): holding the partition would dead-letter it a pause late, so it
    # is read as usual and dead-lettered at its deadline.
    holder = RecordingHolder()
    rig: Rig = await rig_factory(failure_threshold=1, open_s=30, deadline_s=5, holder=holder)
    await rig.open_circuit_a()
    now = time.time()
    record = Record(RETRY, b"{}", b"k", _text(_parked("shop-a", first=now - 4.5, due=now)), 0)
    rig.intake.on_messages(kafka([Message(record, 5)]))
    # (The source event itself was dead-lettered at once: a 30 s pause is past its deadline.)
    await eventually(lambda: rig.retry_ledger.pending() == {(RETRY, 0): 6}, within_s=3)
    letters = [d for d in rig.dead() if d.headers["dlq.original.offset"] == "41"]
    assert [d.headers["dlq.reason"] for d in letters] == ["retries_exhausted"]
    assert holder.holds == []


async def test_a_rewind_that_did_not_take_effect_stops_the_worker_without_committing_past(
    rig_factory: Any,
) -> None:
    holder = RecordingHolder()
    rig: Rig = await rig_factory(failure_threshold=1, open_s=0.2, holder=holder)
    await rig.open_circuit_a()
    rig.intake.on_messages(kafka([parked_record(o) for o in range(5, 8)]))
    holder.futures[0].set_result(True)
    await eventually(lambda: holder.releases == [(RETRY, 0)], within_s=2)
    rig.intake.on_messages(kafka([parked_record(6)]))  # the read resumed past offset 5
    assert rig.fatal.error is not None
    assert "after a rewind to 5" in str(rig.fatal.error)
    assert rig.retry_ledger.pending() == {}


async def test_the_consumer_holds_a_partition_apart_from_the_pause_switch() -> None:
    pause = PauseSwitch()
    thread, fake, _sink = consumer_thread(Metrics(), pause=pause)
    thread.start()
    try:
        assert await fakes_eventually(lambda: len(thread.assignment()) == 2)
        held = await asyncio.wait_for(thread.hold(("segment", 1), 42), 5)
        assert held is True
        assert fake.seeks == [("segment", 1, 42)]
        assert fake.paused == {("segment", 1)}
        # The pause switch pauses the rest; switched off, the held partition stays paused.
        pause.paused = True
        assert await fakes_eventually(lambda: fake.paused == {("segment", 0), ("segment", 1)})
        pause.paused = False
        assert await fakes_eventually(lambda: fake.paused == {("segment", 1)})
        thread.release(("segment", 1))
        assert await fakes_eventually(lambda: fake.paused == set())
    finally:
        await stop(thread, fake)


async def test_a_partition_paused_when_revoked_is_read_again_when_assigned_again() -> None:
    # librdkafka keeps the pause of a partition revoked and assigned again to the same
    # consumer; the consumer thread had forgotten it, so it was never resumed (a held retry
    # partition, or a source partition paused by backpressure, stayed unread for good).
    pause = PauseSwitch()
    thread, fake, _sink = consumer_thread(Metrics(), pause=pause)
    thread.start()
    try:
        assert await fakes_eventually(lambda: len(thread.assignment()) == 2)
        assert await asyncio.wait_for(thread.hold(("segment", 1), 7), 5) is True
        pause.paused = True
        assert await fakes_eventually(lambda: fake.paused == {("segment", 0), ("segment", 1)})
        fake.reassign = [TopicPartition("segment", 0), TopicPartition("segment", 1)]
        assert await fakes_eventually(lambda: not fake.reassign)
        pause.paused = False
        assert await fakes_eventually(lambda: fake.paused == set())
    finally:
        await stop(thread, fake)


async def test_a_hold_asked_for_a_partition_no_longer_assigned_is_dropped() -> None:
    thread, fake, _sink = consumer_thread(Metrics())
    thread.start()
    try:
        assert await fakes_eventually(lambda: len(thread.assignment()) == 2)
        held = await asyncio.wait_for(thread.hold(("segment", 7), 3), 5)
        assert held is False
        assert fake.seeks == []
    finally:
        await stop(thread, fake)


async def test_past_the_deadline_a_parked_event_is_dead_lettered_with_its_provenance(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(deadline_s=5)
    event = order_events(1)[0]
    now = time.time()
    auth = _parked("shop-a", first=now - 6, due=now, failure="auth_error", code=40105)
    flaky = _parked("shop-b", first=now - 6, due=now)
    for parked in (auth, flaky):
        rig.retry.records.append(Record(RETRY, encode(event), b"k", _text(parked), 0))
    rig.feed_back()
    await eventually(lambda: len(rig.dead()) == 2)
    reasons = {r.headers["dlq.destination"]: r.headers["dlq.reason"] for r in rig.dead()}
    assert reasons == {"shop-a": "auth_error", "shop-b": "retries_exhausted"}
    letter = rig.dead()[0]
    assert letter.value == encode(event)
    assert letter.headers["dlq.original.topic"] == SOURCE
    assert letter.headers["dlq.original.offset"] == "41"
    assert letter.headers["dlq.tiktok.code"] == "40105"
    assert rig.fake.events == []
    await eventually(lambda: rig.retry_ledger.pending() == {(RETRY, 0): 2})


async def test_the_next_try_after_the_deadline_dead_letters_instead_of_parking(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(deadline_s=0.3, in_memory_s=0.05)
    rig.fake.add_fault(FaultSpec(kind="http_500", pixel=PIXEL_A))
    rig.pipeline.on_messages(kafka([source_message(0, order_events(1)[0])]))
    start = 0
    for _ in range(40):
        if rig.dead():
            break
        start = rig.feed_back(start)
        await asyncio.sleep(0.05)
    assert [r.headers["dlq.reason"] for r in rig.dead()] == ["retries_exhausted"]
    assert rig.dead()[0].headers["dlq.original.topic"] == SOURCE
    assert rig.dead()[0].headers["dlq.destination"] == "shop-a"


async def test_auth_errors_park_at_once_and_open_the_circuit(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(failure_threshold=1, open_s=0.2)
    rig.fake.add_fault(FaultSpec(kind="auth", pixel=PIXEL_A, code=40105))
    events = order_events(3)
    rig.pipeline.on_messages(kafka([source_message(i, e) for i, e in enumerate(events)]))
    await eventually(lambda: len(rig.parked()) == 3)
    assert {r.headers["retry.failure"] for r in rig.parked()} == {"auth_error"}
    assert rig.sample("tiktok_worker_destination_circuit_state", destination="shop-a") == 2
    assert (
        rig.sample("tiktok_worker_requests_total", destination="shop-a", outcome="auth_error") == 1
    )
    # The token is fixed: the parked events arrive once the circuit lets a probe through.
    rig.fake.clear_faults()
    await rig.feed_back_until(lambda: set(rig.pixels(PIXEL_A)) == ids(events))
    assert set(rig.pixels(PIXEL_A)) == ids(events)
    assert rig.sample("tiktok_worker_destination_circuit_state", destination="shop-a") == 0


async def test_a_dead_letter_too_large_for_its_topic_is_written_reference_only(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(dlq_max_bytes=10)
    rig.pipeline.on_messages(kafka([source_message(0, {"not": "an event" * 10})]))
    await eventually(lambda: rig.ledger.pending() == {(SOURCE, 0): 1})
    (letter,) = rig.dead()
    assert letter.value is None
    assert int(letter.headers["dlq.value_omitted"]) > 10
    assert letter.headers["dlq.original.offset"] == "0"
    assert rig.fatal.error is None


async def test_a_parked_event_too_large_for_the_retry_topic_is_parked_reference_only(
    rig_factory: Any,
) -> None:
    rig: Rig = await rig_factory(retry_max_bytes=10)
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_A))
    rig.pipeline.on_messages(kafka([source_message(0, order_events(1)[0])]))
    await eventually(lambda: rig.ledger.pending() == {(SOURCE, 0): 1})
    (record,) = rig.parked()
    assert record.value is None
    assert int(record.headers["retry.value_omitted"]) > 10
    # When it comes due it cannot be delivered: a reference-only dead letter says where it is.
    rig.feed_back()
    await eventually(lambda: len(rig.dead()) == 1)
    letter = rig.dead()[0]
    assert letter.value is None
    assert letter.headers["dlq.value_omitted"] == record.headers["retry.value_omitted"]
    assert letter.headers["dlq.original.topic"] == SOURCE


async def test_probe_records_and_unreadable_parked_records(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.retry.records.append(Record(RETRY, None, None, {PROBE_HEADER: "1"}, 0))
    rig.retry.records.append(Record(RETRY, b"{}", None, {"retry.destination": "shop-a"}, 0))
    rig.intake.on_messages(kafka([Message(r, i) for i, r in enumerate(rig.retry.records)]))
    await eventually(lambda: len(rig.dead()) == 1)
    assert rig.dead()[0].headers["dlq.reason"] == "decode_error"
    assert "retry.reason" in rig.dead()[0].headers["dlq.error"]
    await eventually(lambda: rig.retry_ledger.pending() == {(RETRY, 0): 2})


async def test_a_refused_parked_record_stops_the_worker(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.retry.produce = _raise  # type: ignore[method-assign]
    rig.fake.add_fault(FaultSpec(kind="http_503", pixel=PIXEL_A))
    rig.pipeline.on_messages(kafka([source_message(0, order_events(1)[0])]))
    await eventually(lambda: rig.fatal.error is not None)
    assert "retry topic" in str(rig.fatal.error)
    assert rig.ledger.pending() == {}


def _raise(*_args: Any, **_kwargs: Any) -> None:
    raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))


def test_header_times_are_written_and_read_like_datetime() -> None:
    rng = random.Random(5)
    for _ in range(20_000):
        ts = rng.uniform(0, 4e9)
        if rng.random() < 0.3:
            ts = round(ts, 3)
        expected = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
        assert iso(ts) == expected.replace("+00:00", "Z")
        assert parse_iso(iso(ts)) == dt.datetime.fromisoformat(expected).timestamp()
    assert parse_iso("2026-12-01T10:00:00+02:00") == parse_iso("2026-12-01T08:00:00.000Z")
    assert parse_iso("2026-12-01T08:00:00") == parse_iso("2026-12-01T08:00:00.000Z")
    with pytest.raises(ValueError, match="Invalid isoformat"):
        parse_iso("2026-12-01T08:00:00.0x0Z")


def test_parked_headers_round_trip_and_name_what_is_missing() -> None:
    parked = _parked("shop-a", first=1000.25, due=1060.5, failure="throttled", code=40100)
    assert Parked.from_headers(_text(parked)) == parked
    # The shared part of the headers is cached per batch: records that differ in it, or only
    # in their provenance, each still read back as themselves.
    other = _parked("shop-b", first=2000.5, due=2060.75)
    sibling = msgspec.structs.replace(parked, original_offset=42, batch_index=3)
    for record in (parked, other, sibling, parked, sibling):
        assert Parked.from_headers(_text(record)) == record
    with pytest.raises(ValueError, match=r"retry\.due_at missing"):
        Parked.from_headers({k: v for k, v in _text(parked).items() if k != "retry.due_at"})
    with pytest.raises(ValueError, match=r"retry\.attempts is not an integer"):
        Parked.from_headers({**_text(parked), "retry.attempts": "x"})


def test_dead_letter_headers_mark_reference_only_letters() -> None:
    letter = DeadLetter(
        reason=DeadLetterReason.RETRIES_EXHAUSTED,
        error="e",
        original_topic="t",
        original_partition=0,
        original_offset=1,
        original_timestamp_ms=None,
        value_omitted=123,
    )
    headers = {k: v for k, v in letter.headers() if isinstance(v, bytes)}
    assert headers["dlq.value_omitted"] == b"123"


def test_parking_rules_back_off_with_each_parking() -> None:
    rules = ParkingRules(deadline_s=100, initial_backoff_s=1, max_backoff_s=5)
    assert [rules.backoff(n) for n in range(5)] == [1, 2, 4, 5, 5]


def _parked(
    destination: str,
    *,
    first: float,
    due: float,
    failure: str = "retryable",
    code: int | None = None,
) -> Parked:
    return Parked(
        destination=destination,
        subscription=None,
        reason="retryable",
        failure=failure,
        error="http_503: HTTP 503, unavailable",
        code=code,
        attempts=3,
        parks=1,
        first_failed_at=first,
        parked_at=first,
        due_at=due,
        original_topic=SOURCE,
        original_partition=0,
        original_offset=41,
        original_timestamp_ms=1764072000000,
    )


def _text(parked: Parked) -> dict[str, str]:
    return {k: v.decode() for k, v in parked.headers()}


def test_in_memory_retrying_is_capped_at_the_deadline() -> None:
    config = config_for(
        "http://127.0.0.1:9", retry={"in_memory_s": 30, "deadline_s": 5}, circuit={"open_s": 2}
    )
    policy = parking_policy(config)
    assert policy.in_memory_s == 5
    assert (policy.circuit.failure_threshold, policy.circuit.open_s) == (5, 2)


def test_a_parked_batch_shares_one_due_time_so_its_headers_are_encoded_once() -> None:
    written: list[Parked] = []

    class Retry:
        def park(self, *, value: Any, key: Any, parked: Parked, on_written: Any) -> None:
            written.append(parked)

    draws = iter([0.2, 0.9])
    parker = Parker(
        retry=cast(Any, Retry()),
        dead_letters=cast(Any, None),
        rules=ParkingRules(deadline_s=100, initial_backoff_s=1, max_backoff_s=60),
        log=get_logger("test"),
        clock=lambda: 1000.0,
        random=lambda: next(draws),
    )

    def event(offset: int) -> PendingEvent:
        message = SimpleNamespace(
            dropped=False, parked=None, key=None, topic=SOURCE, partition=0, offset=offset,
            timestamp_ms=None, finish_one=lambda: None,
        )  # fmt: skip
        outcome = SimpleNamespace(raw=b"{}", index=0, multi=False)
        mapped = SimpleNamespace(destination="shop-a", subscription=None)
        return cast(PendingEvent, SimpleNamespace(message=message, outcome=outcome, mapped=mapped))

    parking = Parking("retryable", "retryable", "HTTP 503", None, 1, 990.0, 10.0)
    parker.park_all([event(o) for o in range(3)], parking)
    parker.park_all([event(o) for o in range(3, 5)], parking)
    assert [p.due_at for p in written] == [1011.0] * 3 + [1014.5] * 2  # one draw per batch
    assert written[0].headers()[:10] == written[2].headers()[:10]


def test_the_retry_layout_gives_each_destination_its_own_partition_when_there_are_enough() -> None:
    own = RetryLayout(["shop-b", "shop-a", "shop-c"], 4)
    assert [own.partition(d) for d in ("shop-a", "shop-b", "shop-c")] == [0, 1, 2]
    assert [own.sole_destination(p) for p in range(4)] == ["shop-a", "shop-b", "shop-c", None]
    shared = RetryLayout(["shop-b", "shop-a", "shop-c"], 2)
    assert [shared.partition(d) for d in ("shop-a", "shop-b", "shop-c")] == [0, 1, 0]
    assert [shared.sole_destination(p) for p in range(2)] == [None, "shop-b"]
    assert own.partition("gone-shop") == partition_for("gone-shop", 4)  # not configured


def test_due_times_spread_over_half_a_pause_and_never_past_the_deadline() -> None:
    rules = ParkingRules(deadline_s=100, initial_backoff_s=1, max_backoff_s=60)
    draws = iter([0.0, 1.0, 0.5, 1.0])
    parker = Parker(
        retry=cast(Any, None),
        dead_letters=cast(Any, None),
        rules=rules,
        log=get_logger("test"),
        clock=lambda: 1000.0,
        random=lambda: next(draws),
    )
    assert parker._due(1000.0, 10.0, 1000.0) == 1010.0
    assert parker._due(1000.0, 10.0, 1000.0) == 1015.0
    assert parker._due(1000.0, 10.0, 1000.0) == 1012.5
    assert parker._due(1000.0, 80.0, 1000.0) == pytest.approx(1099.999)
