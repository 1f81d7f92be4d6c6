"""The consumer thread's backpressure: a pause is first kept by not reading, and handed to
librdkafka only once it has lasted `soft_pause_s` (see `worker.kafka.consumer.SOFT_PAUSE_S`
for why: librdkafka notices a resume up to a second late)."""

from __future__ import annotations

import asyncio

from tests.fakes import FakeMessage, consumer_thread, eventually, stop
from worker.kafka.consumer import PauseSwitch
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
