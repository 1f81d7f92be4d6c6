"""The pipeline's invariants (see ``worker.pipeline.pipeline``), on the real mapper, batcher,
sender, HTTP client and an in-process fake TikTok server; Kafka is replaced by in-memory stand-ins
so every interleaving is under the test's control.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from devkit.fake_tiktok.server import FakeTikTok, FaultSpec
from devkit.sample_events import SampleEvents, encode
from tests.fakes import (
    FakeCommitter,
    FakeKafkaConsumer,
    FakeMessage,
    FakeProducer,
    eventually,
    stop,
)
from worker.config import Config, parse_config
from worker.delivery.client import TikTokClient
from worker.delivery.factory import build_routes, lane_share
from worker.delivery.inflight import InflightMessage, PendingEvent
from worker.delivery.ratelimit import build_rate_limiter
from worker.delivery.sender import LanePolicy, RetryPolicy, Sender
from worker.errors import FatalLatch
from worker.kafka.consumer import ConsumerThread, PauseSwitch
from worker.kafka.deadletters import DeadLetterProducer
from worker.kafka.offsets import OffsetLedger
from worker.mapping.mapper import MappedEvent, Mapper
from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics
from worker.pipeline.pipeline import Pipeline

TOPIC = "segment"
PIXEL = "C5PIXEL0000000000001"


@dataclass
class Rig:
    pipeline: Pipeline
    fake: FakeTikTok
    producer: FakeProducer
    committer: FakeCommitter
    metrics: Metrics
    sender: Sender
    ledger: OffsetLedger
    pause: PauseSwitch
    fatal: FatalLatch

    def pending_commits(self) -> dict[tuple[str, int], int]:
        return self.ledger.pending()

    async def commit_once(self) -> int:
        return await self.ledger.commit_once(self.committer.commit)

    async def settle(self, within_s: float = 10) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self.pipeline.inflight_messages and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def config_for(
    url: str, *, destinations: list[dict[str, Any]] | None = None, **tiktok: Any
) -> Config:
    text = json.dumps(
        {
            "tiktok": {"base_url": url, "batch_linger_ms": 20, "request_timeout_s": 1, **tiktok},
            "rate_limit": {"backend": "local", "qps": 1000},
            "destinations": destinations
            or [{"name": "web-shop", "pixel_code": PIXEL, "access_token": "tok-1"}],
        }
    )
    return parse_config(text)


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., Any]]:
    made: list[Rig] = []
    fakes: list[FakeTikTok] = []
    closers: list[Any] = []

    async def make(
        *,
        max_inflight: int = 1000,
        deadline_s: float = 30,
        drain_timeout_s: float = 5,
        qps: float = 1000,
        max_backoff_s: float = 0.05,
        max_concurrent_requests: int = 4,
        destinations: list[dict[str, Any]] | None = None,
        base_path: str = "",
        **tiktok: Any,
    ) -> Rig:
        fake = FakeTikTok()
        fakes.append(fake)
        url = await fake.start()
        url += base_path
        config = config_for(url, destinations=destinations, **tiktok)
        metrics = Metrics()
        log = get_logger("test")
        producer = FakeProducer()
        committer = FakeCommitter()
        fatal = FatalLatch()
        pause = PauseSwitch()
        ledger = OffsetLedger()
        client = TikTokClient(base_url=url, timeout_s=1, max_connections=8)
        limiter = build_rate_limiter(
            backend="local",
            qps=qps,
            redis_url="redis://unused",
            expected_replicas=1,
            metrics=metrics,
        )
        sender = Sender(
            client=client,
            limiter=limiter,
            routes=build_routes(config),
            retry=RetryPolicy(
                initial_backoff_s=0.01, max_backoff_s=max_backoff_s, deadline_s=deadline_s
            ),
            lanes=LanePolicy(
                max_events=config.tiktok.max_batch_events,
                linger_s=config.tiktok.batch_linger_ms / 1000,
                concurrency=lane_share(
                    config.tiktok.lane_concurrency, max_concurrent_requests, config
                ),
                max_concurrent_requests=max_concurrent_requests,
            ),
            metrics=metrics,
            log=log,
            on_crash=fatal.trip,
        )
        dead_letters = DeadLetterProducer(
            config={}, topic="dlq", metrics=metrics, on_fatal=fatal.trip, producer=producer
        )
        dead_letters.start()
        closers.extend([sender.close, client.close, limiter.close, dead_letters.close])
        pipeline = Pipeline(
            mapper=Mapper(config),
            sender=sender,
            dead_letters=dead_letters,
            ledger=ledger,
            pause=pause,
            fatal=fatal,
            metrics=metrics,
            log=log,
            max_inflight_messages=max_inflight,
            drain_timeout_s=drain_timeout_s,
        )
        pipeline.on_assigned([(TOPIC, 0), (TOPIC, 1)])
        rig = Rig(pipeline, fake, producer, committer, metrics, sender, ledger, pause, fatal)
        made.append(rig)
        return rig

    yield make
    for close in closers:
        await close()
    for fake in fakes:
        await fake.stop()


def order_events(count: int, prefix: str = "m") -> list[dict[str, Any]]:
    gen = SampleEvents(seed=3, prefix=prefix)
    return [gen.track("Order Completed") for _ in range(count)]


def messages(events: list[dict[str, Any]], partition: int = 0, start: int = 0) -> list[Any]:
    return [FakeMessage(partition, start + i, encode(e)) for i, e in enumerate(events)]


async def test_commits_only_after_delivery(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=0.3))
    rig.pipeline.on_messages(messages(order_events(5)))
    await asyncio.sleep(0.1)  # batch sent, response not back yet
    assert rig.pending_commits() == {}
    await rig.settle()
    assert rig.pending_commits() == {(TOPIC, 0): 5}
    assert await rig.commit_once() == 1
    assert rig.committer.commits == [{(TOPIC, 0): 5}]
    assert await rig.commit_once() == 0  # nothing moved since


async def test_inflight_gauge_falls_to_zero_when_the_input_stops(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=0.2))
    rig.pipeline.on_messages(messages(order_events(5)))
    assert rig.sample("tiktok_worker_inflight_messages") == 5
    await rig.settle()  # delivered; nothing more is consumed
    assert rig.pipeline.inflight_messages == 0
    assert rig.sample("tiktok_worker_inflight_messages") == 0


async def test_requests_ready_while_a_whole_batch_waits_for_a_free_permit(
    rig_factory: Any,
) -> None:
    # The source consumer holds consumed batches back while this is true (ConsumerThread's
    # defer_while), so it must turn false once the request is out or no permit is free.
    rig: Rig = await rig_factory(max_batch_events=2, lane_concurrency=1, batch_linger_ms=10_000)
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=0.5, count=1))
    assert not rig.sender.requests_ready()
    rig.pipeline.on_messages(messages(order_events(1)))
    assert not rig.sender.requests_ready()  # half a batch: it lingers
    rig.pipeline.on_messages(messages(order_events(1, "n"), start=1))
    assert rig.sender.requests_ready()  # a whole batch and a free permit
    assert await eventually(lambda: rig.sender.on_wire == 1, within_s=2)
    assert not rig.sender.requests_ready()  # sent
    rig.pipeline.on_messages(messages(order_events(2, "o"), start=2))
    assert not rig.sender.requests_ready()  # a whole batch, but the only permit is taken
    await rig.settle()
    assert len(rig.fake.events) == 4


async def test_out_of_order_completion_commits_the_contiguous_prefix(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=1)
    events = order_events(3)
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=0.5, event_ids=None, count=1))
    rig.pipeline.on_messages(messages(events[:1]))  # offset 0: its request is slow
    await asyncio.sleep(0.05)
    rig.pipeline.on_messages(messages(events[1:], start=1))  # offsets 1, 2: fast
    await asyncio.sleep(0.3)
    assert {e.event_id for e in rig.fake.events} == {e["messageId"] for e in events[1:]}
    assert rig.pending_commits() == {}  # offset 0 still in flight
    await rig.settle()
    assert rig.pending_commits() == {(TOPIC, 0): 3}


async def test_dead_letter_must_be_acknowledged_before_commit(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.producer.auto_ack = False
    batch: list[Any] = [FakeMessage(1, 0, b"not json"), *messages(order_events(1), 1, 1)]
    rig.pipeline.on_messages(batch)
    await asyncio.sleep(0.2)
    assert len(rig.producer.records) == 1
    value, headers = rig.producer.records[0]
    assert value == b"not json"
    assert headers["dlq.reason"] == "decode_error"
    assert headers["dlq.original.partition"] == "1"
    assert headers["dlq.original.offset"] == "0"
    assert rig.pending_commits() == {}  # delivered offset 1 waits for offset 0's DLQ ack
    rig.producer.ack()
    assert rig.pending_commits() == {(TOPIC, 1): 2}
    assert (
        rig.sample("tiktok_worker_dead_letters_total", reason="decode_error", destination="") == 1
    )


async def test_dead_letter_failure_is_fatal_and_never_committed(rig_factory: Any) -> None:
    from confluent_kafka import KafkaError

    rig: Rig = await rig_factory()
    rig.producer.auto_ack = False
    rig.producer.fail_with = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
    batch: list[Any] = [FakeMessage(0, 0, b"{")]
    rig.pipeline.on_messages(batch)
    rig.producer.ack()
    assert rig.pipeline.fatal is not None
    assert "dead-letter topic" in str(rig.pipeline.fatal)
    assert rig.pending_commits() == {}
    assert await rig.commit_once() == 0


async def test_permanent_error_is_bisected_to_the_offending_event(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_batch_events=16)
    events = order_events(16)
    bad = events[11]["messageId"]
    rig.fake.add_fault(FaultSpec(kind="reject_event_ids", event_ids=[bad]))
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    accepted = {e.event_id for e in rig.fake.events}
    assert accepted == {e["messageId"] for e in events} - {bad}
    assert len(rig.producer.records) == 1
    value, headers = rig.producer.records[0]
    assert json.loads(value or b"")["messageId"] == bad
    assert headers["dlq.reason"] == "permanent_api_error"
    assert headers["dlq.tiktok.code"] == "40002"
    assert rig.pending_commits() == {(TOPIC, 0): 16}


async def test_retryable_errors_are_retried_until_accepted(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    rig.fake.add_fault(FaultSpec(kind="http_503", count=2))
    rig.fake.add_fault(FaultSpec(kind="throttle", count=1))
    events = order_events(4)
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert {e.event_id for e in rig.fake.events} == {e["messageId"] for e in events}
    assert rig.producer.records == []
    assert rig.sample("tiktok_worker_retries_total", destination="web-shop") == 3
    assert (
        rig.sample("tiktok_worker_requests_total", destination="web-shop", outcome="throttled") == 1
    )


async def test_retries_stop_at_the_deadline(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(deadline_s=0.3)
    rig.fake.add_fault(FaultSpec(kind="http_500"))
    rig.pipeline.on_messages(messages(order_events(3)))
    await rig.settle()
    reasons = [h["dlq.reason"] for _, h in rig.producer.records]
    assert reasons == ["retries_exhausted"] * 3
    assert all(int(h["dlq.attempts"]) >= 2 for _, h in rig.producer.records)
    assert rig.pending_commits() == {(TOPIC, 0): 3}


async def test_backpressure_pauses_and_resumes(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_inflight=10)
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=0.2, count=1))
    rig.pipeline.on_messages(messages(order_events(12)))
    assert rig.pause.paused
    await rig.settle()
    assert not rig.pause.paused


async def test_revoke_drains_and_returns_finished_offsets(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(batch_linger_ms=5000)  # only the revoke's flush sends them
    rig.pipeline.on_messages(messages(order_events(3)))
    offsets = await rig.pipeline.on_revoked([(TOPIC, 0)])
    assert offsets == {(TOPIC, 0): 3}
    assert len(rig.fake.events) == 3
    assert rig.pending_commits() == {}  # the partition is no longer ours


async def test_revoke_timeout_returns_only_the_finished_prefix(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(drain_timeout_s=0.3, max_batch_events=1)
    events = order_events(3)
    rig.pipeline.on_messages(messages(events[:2]))
    await rig.settle()
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=5))
    rig.pipeline.on_messages(messages(events[2:], start=2))
    offsets = await rig.pipeline.on_revoked([(TOPIC, 0)])
    assert offsets == {(TOPIC, 0): 2}


async def test_a_request_accepted_after_its_partition_was_dropped_changes_nothing(
    rig_factory: Any,
) -> None:
    # on_delivered finishes a request's messages together (issue 18): dropped ones stay out.
    rig: Rig = await rig_factory(drain_timeout_s=0.2, max_batch_events=2)
    events = order_events(4)
    # Only partition 0's request is slow: the two requests go out together, and a fault for
    # whichever reached the fake first sometimes slowed partition 1's instead.
    slow = [events[0]["messageId"]]
    rig.fake.add_fault(FaultSpec(kind="slow", delay_s=1.0, count=1, event_ids=slow))
    rig.pipeline.on_messages(messages(events[:2]))  # partition 0: on the wire, slow
    rig.pipeline.on_messages(messages(events[2:], partition=1))
    assert await eventually(lambda: rig.pending_commits().get((TOPIC, 1)) == 2)
    offsets = await rig.pipeline.on_revoked([(TOPIC, 0)])
    assert offsets == {}
    assert rig.pipeline.inflight_messages == 0  # dropped at once
    finished = rig.pipeline.messages_finished
    assert await eventually(lambda: len(rig.fake.events) == 4)  # the slow request went through
    await asyncio.sleep(0.05)
    assert rig.pipeline.inflight_messages == 0
    assert rig.pipeline.messages_finished == finished
    assert rig.pending_commits() == {(TOPIC, 1): 2}
    # The sender leaves dropped events out of on_delivered; on_delivered checks again.
    dropped = InflightMessage(rig.pipeline, TOPIC, 0, 0, None, None, 1, dropped=True)
    mapped = MappedEvent("web-shop", "s", "E", None, "m", b"{}")  # type: ignore[arg-type]
    rig.pipeline.on_delivered([PendingEvent(dropped, None, mapped)])  # type: ignore[arg-type]
    assert (dropped.remaining, rig.pipeline.inflight_messages) == (1, 0)
    assert rig.pipeline.messages_finished == finished


async def test_skipped_events_finish_immediately(rig_factory: Any) -> None:
    rig: Rig = await rig_factory()
    gen = SampleEvents(seed=5)
    rig.pipeline.on_messages(messages([gen.identify(), gen.identify()]))
    assert rig.pending_commits() == {(TOPIC, 0): 2}
    assert rig.sample("tiktok_worker_events_skipped_total", reason="no_match") == 2


async def test_events_older_than_max_age_are_skipped_as_too_old(rig_factory: Any) -> None:
    rig: Rig = await rig_factory(max_event_age_s=4 * 3600)
    old = SampleEvents(seed=6, base=dt.datetime.now(dt.UTC) - dt.timedelta(hours=5))
    fresh = SampleEvents(seed=6, prefix="fresh")
    events = [old.track("Order Completed"), fresh.track("Order Completed")]
    rig.pipeline.on_messages(messages(events))
    await rig.settle()
    assert rig.pending_commits() == {(TOPIC, 0): 2}  # the skipped one is finished too
    assert [e.event_id for e in rig.fake.events] == [events[1]["messageId"]]
    assert rig.sample("tiktok_worker_events_skipped_total", reason="too_old") == 1


async def test_consumer_thread_hands_messages_to_the_pipeline(rig_factory: Any) -> None:
    """The real hand-off: batches consumed on the Kafka thread reach `Pipeline.on_messages` on
    the event loop (call_soon_threadsafe, bounded by the hand-off semaphore), are delivered or
    dead-lettered, and the revoke at close commits them through the thread."""
    rig: Rig = await rig_factory()
    events = order_events(40)
    fed = [*messages(events[:25], 0), FakeMessage(0, 25, b"not json"), *messages(events[25:], 1)]
    made: list[FakeKafkaConsumer] = []

    def factory(config: dict[str, Any]) -> FakeKafkaConsumer:
        made.append(FakeKafkaConsumer(config, [(TOPIC, 0), (TOPIC, 1)]))
        made[0].feed(fed)
        return made[0]

    thread = ConsumerThread(
        config={"group.id": "g"},
        topics=[TOPIC],
        loop=asyncio.get_running_loop(),
        sink=rig.pipeline,
        metrics=rig.metrics,
        log=get_logger("test"),
        drain_timeout_s=5,
        pause=rig.pause,
        batch_size=4,  # about a dozen hand-offs, at most MAX_UNPROCESSED_BATCHES ahead
        consumer_factory=factory,
    )
    thread.start()
    try:
        assert await eventually(lambda: rig.pipeline.messages_finished == len(fed), within_s=20)
    finally:
        await stop(thread, made[0])
    delivered = sorted(e.event_id or "" for e in rig.fake.events)
    assert delivered == sorted(e["messageId"] for e in events)
    assert [value for value, _ in rig.producer.records] == [b"not json"]
    assert rig.sample("tiktok_worker_messages_consumed_total", topic=TOPIC) == len(fed)
    assert [sorted(commit) for commit in made[0].commits] == [[(TOPIC, 0, 26), (TOPIC, 1, 15)]]
    assert made[0].queued.empty()
