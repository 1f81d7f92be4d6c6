"""In-memory stand-ins for the Kafka clients, so unit tests run without a broker.

- `FakeMessage`: a consumed record (the pipeline's input, a dead letter for the reader).
- `FakeProducer`: the dead-letter producer's librdkafka Producer; holds delivery reports until
  the test releases them (`ack`) or fails them (`fail_with`).
- `FakeCommitter`: what the pipeline commits through (the consumer thread's `commit`).
- `FakeAdmin`: an AdminClient answering ListOffsets/OffsetFetch from dicts (`down` fails all).
- `FakeKafkaConsumer` / `RecordingSink` / `consumer_thread()`: run
  `worker.kafka.consumer.ConsumerThread` without a broker.

`FakeKafkaConsumer` plays confluent_kafka.Consumer for the calls the thread makes: the first
`consume()` assigns `partitions`; `consume()` returns what `feed()` queued, and blocks while
`gate` is clear (a stuck consumer loop); `commit()` records or raises when `fail_commits` is
set; `close()` revokes the assignment like librdkafka does. `RecordingSink` is the pipeline side.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from worker.kafka.consumer import ConsumerThread, PauseSwitch
from worker.kafka.settings import TopicPartitionKey
from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics


class FakeMessage:
    """The parts of confluent_kafka.Message the pipeline and the dead-letter reader use."""

    def __init__(
        self,
        partition: int = 0,
        offset: int = 0,
        value: bytes | None = b"{}",
        *,
        topic: str = "segment",
        key: bytes | None = None,
        headers: Any = None,
        timestamp_ms: int = 1764072000000,
    ) -> None:
        self._partition, self._offset, self._value = partition, offset, value
        self._topic, self._key, self._headers = topic, key, headers
        self._timestamp_ms = timestamp_ms

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> Any:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp_ms)


@dataclass
class FakeProducer:
    """Holds delivery reports until the test releases them (``ack``) or fails them."""

    records: list[tuple[bytes | None, dict[str, str]]] = field(default_factory=list)
    held: list[Callable[[Any, Any], None]] = field(default_factory=list)
    auto_ack: bool = True
    fail_with: Any = None

    def produce(self, topic: str, *, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        self.records.append((value, {k: v.decode() for k, v in headers}))
        self.held.append(on_delivery)

    def poll(self, _timeout: float = 0) -> int:
        if self.auto_ack:
            self.ack()
        return 0

    def ack(self) -> None:
        held, self.held = self.held, []
        for callback in held:
            callback(self.fail_with, None)

    def flush(self, _timeout: float = 0) -> int:
        return 0


@dataclass
class FakeCommitter:
    commits: list[dict[tuple[str, int], int]] = field(default_factory=list)

    def commit(self, offsets: dict[tuple[str, int], int]) -> asyncio.Future[None]:
        self.commits.append(dict(offsets))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _Offset:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class _Committed:
    def __init__(self, partitions: list[Any]) -> None:
        self.topic_partitions = partitions


class FakeAdmin:
    """ListOffsets/OffsetFetch answered from dicts; `down` fails every request."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, int], int] = {}
        self.earliest: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.down = False

    def poll(self, _timeout: float) -> int:
        return 0

    @staticmethod
    def _future(value: Any = None, error: BaseException | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
        return future

    def list_offsets(self, request: dict[Any, Any], **_kw: Any) -> dict[Any, Future[Any]]:
        out = {}
        for tp, spec in request.items():
            table = self.latest if "Latest" in type(spec).__name__ else self.earliest
            key = (tp.topic, tp.partition)
            out[tp] = (
                self._future(error=KafkaException(KafkaError(KafkaError._TRANSPORT)))
                if self.down or key not in table
                else self._future(_Offset(table[key]))
            )
        return out

    def list_consumer_group_offsets(self, request: list[Any], **_kw: Any) -> dict[str, Any]:
        group = request[0]
        if self.down:
            error = KafkaException(KafkaError(KafkaError._TRANSPORT))
            return {group.group_id: self._future(error=error)}
        partitions = []
        for tp in group.topic_partitions:
            tp.offset = self.committed.get((tp.topic, tp.partition), -1001)
            partitions.append(tp)
        return {group.group_id: self._future(_Committed(partitions))}


class FakeKafkaConsumer:
    def __init__(self, config: dict[str, Any], partitions: Sequence[TopicPartitionKey]) -> None:
        self.config = config
        self.partitions = [TopicPartition(t, p) for t, p in partitions]
        self.gate = threading.Event()
        self.gate.set()
        self.fail_commits = False
        self.commits: list[list[tuple[str, int, int]]] = []
        self.paused: set[TopicPartitionKey] = set()
        self.seeks: list[tuple[str, int, int]] = []
        # Like librdkafka, a partition's pause outlives its revoke: `reassign` (from any
        # thread) revokes and assigns these again inside the next consume().
        self.reassign: list[TopicPartition] = []
        self.queued: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._callbacks: dict[str, Callable[..., None]] = {}
        self._assigned = False

    # The callbacks the thread registered in the config (error_cb, stats_cb).
    def error(self, code: int) -> None:
        self.config["error_cb"](KafkaError(code))

    def stats(self, stats: dict[str, Any]) -> None:
        self.config["stats_cb"](json.dumps(stats))

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        self._callbacks = callbacks

    def feed(self, messages: Sequence[Any]) -> None:
        """Messages for the following `consume()` calls to return (from any thread)."""
        for message in messages:
            self.queued.put(message)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if not self._assigned:
            self._assigned = True
            self._callbacks["on_assign"](self, self.partitions)
        if self.reassign:  # a revoke and a new assignment of the same partitions
            again, self.reassign = self.reassign, []
            self._callbacks["on_revoke"](self, again)
            self._callbacks["on_assign"](self, again)
        self.gate.wait()
        batch: list[Any] = []
        while len(batch) < num_messages:
            try:
                batch.append(self.queued.get_nowait())
            except queue.Empty:
                break
        if not batch:
            time.sleep(min(timeout, 0.01))
        return batch

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def seek(self, partition: TopicPartition) -> None:
        key = (partition.topic, partition.partition)
        if key not in self.paused:  # the worker always pauses before it rewinds
            raise KafkaException(KafkaError(KafkaError._STATE))
        self.seeks.append((partition.topic, partition.partition, partition.offset))

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.fail_commits:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def close(self) -> None:
        if self._assigned:
            self._callbacks["on_revoke"](self, self.partitions)


class RecordingSink:
    def __init__(self) -> None:
        self.assigned: list[TopicPartitionKey] = []
        self.revoked: list[TopicPartitionKey] = []
        self.fatal: list[BaseException] = []
        self.messages: list[Any] = []
        self.calls: list[str] = []  # "messages", "revoked", "lost": in the order they came

    def on_messages(self, messages: Sequence[Any]) -> None:
        self.messages.extend(messages)
        self.calls.append("messages")

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.assigned.extend(partitions)

    async def on_revoked(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        self.revoked.extend(partitions)
        self.calls.append("revoked")
        return {}

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.calls.append("lost")

    def on_fatal(self, error: BaseException) -> None:
        self.fatal.append(error)


def consumer_thread(
    metrics: Metrics,
    partitions: Sequence[TopicPartitionKey] = (("segment", 0), ("segment", 1)),
    pause: PauseSwitch | None = None,
    soft_pause_s: float = 0.0,
    defer_while: Callable[[], bool] | None = None,
    batch_size: int = 2000,
) -> tuple[ConsumerThread, FakeKafkaConsumer, RecordingSink]:
    """A ConsumerThread on the running loop over a fake consumer (not started). The pause
    switch pauses the fake at once unless `soft_pause_s` says otherwise."""
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
        soft_pause_s=soft_pause_s,
        defer_while=defer_while,
        batch_size=batch_size,
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
