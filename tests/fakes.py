"""In-memory stand-ins to run `worker.kafka.consumer.ConsumerThread` without a broker.

`FakeKafkaConsumer` plays confluent_kafka.Consumer for the calls the thread makes: the first
`consume()` assigns `partitions`; `consume()` returns nothing, and blocks while `gate` is clear
(a stuck consumer loop); `commit()` records or raises when `fail_commits` is set; `close()`
revokes the assignment like librdkafka does. `RecordingSink` is the pipeline side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from worker.kafka.consumer import ConsumerThread, PauseSwitch, TopicPartitionKey
from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics


class FakeKafkaConsumer:
    def __init__(self, config: dict[str, Any], partitions: Sequence[TopicPartitionKey]) -> None:
        self.config = config
        self.partitions = [TopicPartition(t, p) for t, p in partitions]
        self.gate = threading.Event()
        self.gate.set()
        self.fail_commits = False
        self.commits: list[list[tuple[str, int, int]]] = []
        self.paused: set[TopicPartitionKey] = set()
        self._callbacks: dict[str, Callable[..., None]] = {}
        self._assigned = False

    # The callbacks the thread registered in the config (error_cb, stats_cb).
    def error(self, code: int) -> None:
        self.config["error_cb"](KafkaError(code))

    def stats(self, stats: dict[str, Any]) -> None:
        self.config["stats_cb"](json.dumps(stats))

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        self._callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if not self._assigned:
            self._assigned = True
            self._callbacks["on_assign"](self, self.partitions)
        self.gate.wait()
        time.sleep(min(timeout, 0.01))
        return []

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.fail_commits:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return (0, 100)

    def close(self) -> None:
        if self._assigned:
            self._callbacks["on_revoke"](self, self.partitions)


class RecordingSink:
    def __init__(self) -> None:
        self.assigned: list[TopicPartitionKey] = []
        self.revoked: list[TopicPartitionKey] = []
        self.fatal: list[BaseException] = []

    def on_messages(self, messages: Sequence[Any]) -> None:
        pass

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.assigned.extend(partitions)

    async def on_revoked(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        self.revoked.extend(partitions)
        return {}

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        pass

    def on_fatal(self, error: BaseException) -> None:
        self.fatal.append(error)


def consumer_thread(
    metrics: Metrics,
    partitions: Sequence[TopicPartitionKey] = (("segment", 0), ("segment", 1)),
    pause: PauseSwitch | None = None,
) -> tuple[ConsumerThread, FakeKafkaConsumer, RecordingSink]:
    """A ConsumerThread on the running loop over a fake consumer (not started)."""
    made: list[FakeKafkaConsumer] = []

    def factory(config: dict[str, Any]) -> FakeKafkaConsumer:
        made.append(FakeKafkaConsumer(config, partitions))
        return made[0]

    sink = RecordingSink()
    thread = ConsumerThread(
        config={"group.id": "g"},
        topics=["segment"],
        loop=asyncio.get_running_loop(),
        sink=sink,
        metrics=metrics,
        log=get_logger("test"),
        drain_timeout_s=1,
        pause=pause if pause is not None else PauseSwitch(),
        consumer_factory=factory,
    )
    return thread, made[0], sink


async def stop(thread: ConsumerThread, fake: FakeKafkaConsumer) -> None:
    """Stop the thread (unblocking a stuck consume) and wait until it has closed."""
    thread.stop()
    fake.gate.set()
    await asyncio.get_running_loop().run_in_executor(None, thread.closed.wait, 10)


async def eventually(predicate: Callable[[], bool], within_s: float = 5) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
