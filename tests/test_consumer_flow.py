"""How the consumer thread paces the pipeline.

- Backpressure: a pause is first kept by not reading, and handed to librdkafka only once it
  has lasted `soft_pause_s` (see `worker.kafka.consumer.SOFT_PAUSE_S` for why: librdkafka
  notices a resume up to a second late).
- Hand-over: consumed batches reach the pipeline in consumed order, one per event-loop turn,
  each waiting at most `MAX_DEFERRALS` turns while `defer_while` (the sender's
  `requests_ready`) says requests are ready to start.
"""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import TopicPartition

from tests.fakes import FakeMessage, consumer_thread, eventually, stop
from worker.kafka.consumer import MAX_DEFERRALS, PauseSwitch
from worker.observability.metrics import Metrics


def _paused_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("tiktok_worker_paused_partitions")


async def test_a_short_pause_stops_reading_without_pausing_librdkafka() -> None:
    metrics = Metrics()
    pause = PauseSwitch()
    thread, fake, sink = consumer_thread(metrics, pause=pause, soft_pause_s=30)
    thread.start()
    try:
        assert await eventually(lambda: len(thread.assignment()) == 2)
        pause.paused = True
        assert await eventually(lambda: _paused_gauge(metrics) == 2)
        fake.feed([FakeMessage(0, offset) for offset in range(3)])
        await asyncio.sleep(0.3)
        assert sink.messages == []  # nothing was taken while paused
        assert fake.paused == set()  # and librdkafka was never told
        pause.paused = False
        assert await eventually(lambda: len(sink.messages) == 3, within_s=1)
        assert await eventually(lambda: _paused_gauge(metrics) == 0)
        assert fake.paused == set()
    finally:
        await stop(thread, fake)


async def test_a_long_pause_is_handed_to_librdkafka_and_undone_on_resume() -> None:
    metrics = Metrics()
    pause = PauseSwitch()
    thread, fake, sink = consumer_thread(metrics, pause=pause, soft_pause_s=0.2)
    thread.start()
    try:
        assert await eventually(lambda: len(thread.assignment()) == 2)
        pause.paused = True
        await asyncio.sleep(0.1)
        assert fake.paused == set()
        assert await eventually(lambda: fake.paused == {("segment", 0), ("segment", 1)})
        assert _paused_gauge(metrics) == 2
        pause.paused = False
        assert await eventually(lambda: fake.paused == set())
        assert await eventually(lambda: _paused_gauge(metrics) == 0)
        # A new pause starts its own soft period.
        pause.paused = True
        await asyncio.sleep(0.05)
        assert fake.paused == set()
        fake.feed([FakeMessage(1, 9)])
        await asyncio.sleep(0.05)
        assert sink.messages == []
        pause.paused = False
        assert await eventually(lambda: len(sink.messages) == 1, within_s=1)
    finally:
        await stop(thread, fake)


async def test_batches_wait_a_bounded_number_of_turns_and_keep_their_order() -> None:
    seen_before: list[int] = []  # how many messages the pipeline had at each consultation

    def requests_ready() -> bool:
        seen_before.append(len(sink.messages))
        return True  # always: only the bound lets batches through

    thread, fake, sink = consumer_thread(Metrics(), defer_while=requests_ready, batch_size=1)
    fake.feed([FakeMessage(0, offset) for offset in range(6)])
    thread.start()
    try:
        assert await eventually(lambda: len(sink.messages) == 6)
        assert [m.offset() for m in sink.messages] == list(range(6))
        # Each batch (one message here) was held back exactly MAX_DEFERRALS turns.
        assert all(seen_before.count(n) == MAX_DEFERRALS for n in range(6))
    finally:
        await stop(thread, fake)


async def test_batches_go_straight_through_when_no_request_is_ready() -> None:
    consulted: list[bool] = []

    def requests_ready() -> bool:
        consulted.append(False)
        return False

    thread, fake, sink = consumer_thread(Metrics(), defer_while=requests_ready, batch_size=1)
    fake.feed([FakeMessage(0, offset) for offset in range(4)])
    thread.start()
    try:
        assert await eventually(lambda: len(sink.messages) == 4)
        assert [m.offset() for m in sink.messages] == list(range(4))
        assert len(consulted) == 4  # asked once per batch, never deferred
    finally:
        await stop(thread, fake)


async def test_a_batch_arriving_while_another_waits_does_not_overtake_it() -> None:
    calls: list[None] = []

    def requests_ready() -> bool:
        # Slow enough that the thread hands over the next batch meanwhile; true and false in
        # turn, so a batch arriving on a "false" would overtake one held back on a "true".
        time.sleep(0.002)
        calls.append(None)
        return len(calls) % 2 == 1

    thread, fake, sink = consumer_thread(Metrics(), defer_while=requests_ready, batch_size=1)
    fake.feed([FakeMessage(0, offset) for offset in range(8)])
    thread.start()
    try:
        assert await eventually(lambda: len(sink.messages) == 8)
        assert [m.offset() for m in sink.messages] == list(range(8))
    finally:
        await stop(thread, fake)


async def test_a_revoke_is_handled_after_the_batches_consumed_before_it() -> None:
    consulted: list[None] = []

    def requests_ready() -> bool:
        consulted.append(None)
        time.sleep(0.02)  # 16 turns of this: the revoke comes while the batch is held back
        return True

    thread, fake, sink = consumer_thread(Metrics(), defer_while=requests_ready, batch_size=1)
    fake.feed([FakeMessage(0, 0)])
    thread.start()
    try:
        assert await eventually(lambda: len(consulted) > 0)  # the batch is being held back
        fake.reassign = [TopicPartition("segment", 0), TopicPartition("segment", 1)]
        assert await eventually(lambda: "revoked" in sink.calls)
        assert len(consulted) < MAX_DEFERRALS  # the revoke did come while it was held back
        assert sink.calls[:2] == ["messages", "revoked"]
    finally:
        await stop(thread, fake)
