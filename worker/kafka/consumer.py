"""The Kafka consumer, owned by one dedicated thread.

Every ``confluent_kafka.Consumer`` call (consume, pause, resume, commit, close) happens on this
thread; the asyncio pipeline talks to it only through thread-safe requests. Batches of
messages are handed to the event loop with ``call_soon_threadsafe`` and reach the pipeline in
consumed order, one per loop turn, after the sender's requests that are ready to start
(``MAX_DEFERRALS``). Rebalance callbacks run here, inside ``consume()``, and block on the
pipeline's drain coroutine (bounded by a timeout) before committing what the revoked partitions
finished. The drain must never wait on this thread, or the two would deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Final, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker.core.vocabulary import CommitResult, RebalanceKind
from worker.kafka.settings import TopicPartitionKey
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics

CONSUME_TIMEOUT_S: Final = 0.1
# Batches handed to the event loop and not yet processed. Bounding them keeps the thread from
# racing ahead of the pipeline, so a pause decided by the pipeline takes effect within about
# this many batches (memory bound), while still overlapping consume and processing.
MAX_UNPROCESSED_BATCHES: Final = 2
HANDOFF_WAIT_S: Final = 0.05
# How long the pipeline's pause is kept by not reading before librdkafka is told to pause.
# librdkafka's broker thread notices a resume only at its next wake-up, up to 1 s after the
# pause began (measured: 670-700 ms from a resume 0.3 s into a pause to the next fetch), which
# a backlog drain that pauses several times a second pays every time. Not reading costs
# nothing: librdkafka stops fetching by itself once its bounded pre-fetch queue is full. But
# rebalance callbacks are served only from consume(), so a longer pause is handed to
# librdkafka, which lets the thread keep polling and serve them.
SOFT_PAUSE_S: Final = 2.0
# How many event-loop turns a consumed batch may wait while `defer_while` says requests are
# ready to start. The loop runs one consumed batch (tens of ms of mapping) per turn, and a
# request needs several turns to reach the wire (lane wake-up, slot, task start, write): without
# this, a backlog drain maps batch after batch while sealed requests wait, so the worker
# alternates between mapping and sending and the API sees bursts.
MAX_DEFERRALS: Final = 16


class PauseSwitch:
    """Backpressure, decided on the event loop and applied by the consumer thread.

    Built before both, so neither needs the other to exist first. `paused` is set on the
    event loop; the thread reads it once per loop and, while it is on, waits for it to go off
    (`wait_resumed`) so that reading starts again at once.
    """

    __slots__ = ("_flowing",)

    def __init__(self) -> None:
        self._flowing = threading.Event()
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @paused.setter
    def paused(self, value: bool) -> None:
        if value:
            self._flowing.clear()
        else:
            self._flowing.set()

    def wait_resumed(self, timeout: float) -> bool:
        """Block (on the consumer thread) until the pause is off or `timeout` passes."""
        return self._flowing.wait(timeout)


class ConsumerSink(Protocol):
    """What the consumer thread calls on the pipeline (all on the event loop)."""

    def on_messages(self, messages: Sequence[Message]) -> None: ...

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None: ...

    async def on_revoked(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]: ...

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None: ...

    def on_fatal(self, error: BaseException) -> None: ...


class ConsumerThread:
    """Runs the consume loop on its own thread and serves requests from the event loop."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topics: Sequence[str],
        loop: asyncio.AbstractEventLoop,
        sink: ConsumerSink,
        metrics: Metrics,
        log: Logger,
        drain_timeout_s: float,
        pause: PauseSwitch,
        batch_size: int = 2000,
        soft_pause_s: float = SOFT_PAUSE_S,
        defer_while: Callable[[], bool] | None = None,
        source_gauges: bool = True,
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
        on_share: Callable[[int, int], None] | None = None,
    ) -> None:
        """`on_share(assigned, total)` runs on the event loop after every assignment change:
        how many partitions of the subscribed topics this consumer holds, of how many in all
        (the rate limiter's fallback share). While `defer_while()` is true a consumed batch waits
        for the event loop's next turn (at most `MAX_DEFERRALS` turns): the sender's requests
        ready to start go first."""
        self._topics = list(topics)
        self._loop = loop
        self._sink = sink
        self._metrics = metrics
        self._log = log
        self._drain_timeout_s = drain_timeout_s
        self._batch_size = batch_size
        config = dict(config)
        config["stats_cb"] = self._on_stats
        config["error_cb"] = self._on_error
        self._consumer = consumer_factory(config)
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._handoff = threading.BoundedSemaphore(MAX_UNPROCESSED_BATCHES)
        self._stop = threading.Event()
        self._pause = pause
        self._soft_pause_s = soft_pause_s
        self._defer_while = defer_while
        self._handed: deque[Sequence[Message]] = deque()  # on the event loop, not yet processed
        self._handing_over = False  # a `_hand_over` is scheduled
        self._paused_since: float | None = None  # when the thread first saw the pause on
        self._reading_stopped = False  # the pause is kept by not reading (see SOFT_PAUSE_S)
        self._paused: set[TopicPartitionKey] = set()
        # Partitions the sink asked to leave unread (`hold`), and holds not yet applied.
        self._held: set[TopicPartitionKey] = set()
        self._fresh: set[TopicPartitionKey] = set()  # assigned since the last `_apply_pause`
        self._holds_pending: dict[TopicPartitionKey, tuple[int, asyncio.Future[bool]]] = {}
        self._assigned: set[TopicPartitionKey] = set()
        self._on_share = on_share
        self._partition_counts: dict[str, int] = {}
        self._share_stale = False  # set by rebalance callbacks, reported by the thread's loop
        self._share_refresh = False  # ... re-reading the topics' partition counts first
        # The assigned/paused/last-commit gauges describe the source topics: the retry
        # intake's consumer (`source_gauges=False`) stays out of them, so a retry topic paused
        # while parked events wait never looks like backpressure, and its commits never hide
        # a source consumer that stopped committing.
        self._source_gauges = source_gauges
        self._shown = {"assigned": 0, "paused": 0}
        self._thread = threading.Thread(target=self._run, name="kafka-consumer", daemon=True)
        self.heartbeat = time.monotonic()  # read by /healthz
        self.brokers_down = False  # read by /readyz
        self.closed = threading.Event()

    # -- requests from the event loop ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop consuming; the thread drains, commits, closes the consumer and exits."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def assignment(self) -> list[TopicPartitionKey]:
        """A snapshot of the partitions assigned now (safe from any thread)."""
        return list(self._assigned)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> asyncio.Future[None]:
        """Commit ``offsets`` synchronously on the consumer thread; the future resolves after."""
        future: asyncio.Future[None] = self._loop.create_future()

        def run() -> None:
            try:
                self._commit(offsets)
            except BaseException as exc:  # reported to the awaiting coroutine
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, future)

        self._requests.put(run)
        return future

    def hold(self, key: TopicPartitionKey, offset: int) -> asyncio.Future[bool]:
        """Stop reading partition `key` and rewind it to `offset`, so that the next read after
        `release(key)` starts there. The future resolves (on the event loop) once done: True,
        or False when the partition was revoked first. Every batch handed to the event loop
        before it resolves may still hold records of `key` read past `offset`."""
        future: asyncio.Future[bool] = self._loop.create_future()
        self._holds_pending[key] = (offset, future)
        self._requests.put(self._apply_holds)
        return future

    def release(self, key: TopicPartitionKey) -> None:
        """Read partition `key` again (unless the whole consumer is paused)."""
        self._requests.put(lambda: self._held.discard(key))

    def _deliver(self, messages: Sequence[Message]) -> None:
        """On the event loop: queue a consumed batch for the pipeline, in consumed order."""
        self._handed.append(messages)
        if not self._handing_over:
            self._hand_over(0)

    def _hand_over(self, deferred: int) -> None:
        """Give the oldest queued batch to the pipeline, one per event-loop turn, unless the
        sender has requests ready to start (then wait a turn, at most `MAX_DEFERRALS` times)."""
        self._handing_over = False
        if not self._handed:  # `_hand_over_all` came first
            return
        if deferred < MAX_DEFERRALS and self._defer_while is not None and self._defer_while():
            self._handing_over = True
            self._loop.call_soon(self._hand_over, deferred + 1)
            return
        self._process_oldest()
        if self._handed:
            self._handing_over = True
            self._loop.call_soon(self._hand_over, 0)

    def _hand_over_all(self) -> None:
        """Give every queued batch to the pipeline now: a revoke or a loss is handled only after
        the batches consumed before it, as it would be without the deferral."""
        while self._handed:
            self._process_oldest()

    def _process_oldest(self) -> None:
        messages = self._handed.popleft()
        try:
            self._sink.on_messages(messages)
        finally:
            self._handoff.release()  # the thread may fetch another batch

    async def _revoked_in_order(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        self._hand_over_all()
        return await self._sink.on_revoked(partitions)

    def _lost_in_order(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._hand_over_all()
        self._sink.on_lost(partitions)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._consumer.subscribe(
                self._topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._serve_requests()
                if self._share_stale:
                    # Not from the rebalance callbacks: a blocking client call nested inside
                    # consume() (list_topics) corrupts confluent-kafka's per-thread call state
                    # and aborts the process (`CallState_get: Assertion cs != NULL`).
                    self._share_stale = False
                    self._report_share(refresh=self._share_refresh)
                    self._share_refresh = False
                if not self._handoff.acquire(timeout=HANDOFF_WAIT_S):
                    continue  # the pipeline is behind: wait for it before fetching more
                self._apply_pause()
                if self._reading_stopped:
                    self._handoff.release()
                    self._pause.wait_resumed(HANDOFF_WAIT_S)
                    continue
                # consume(n, timeout) waits the whole timeout unless n messages are ready, so
                # wait for the first message only, then take whatever else is already queued.
                messages = self._consumer.consume(1, CONSUME_TIMEOUT_S)
                if messages and self._batch_size > 1:
                    messages += self._consumer.consume(self._batch_size - 1, 0)
                if messages:
                    self.brokers_down = False
                    self._loop.call_soon_threadsafe(self._deliver, messages)
                else:
                    self._handoff.release()
            self._shutdown()
        except BaseException as exc:
            self._log.error("consumer thread failed", error=str(exc))
            self._loop.call_soon_threadsafe(self._sink.on_fatal, exc)
            with contextlib.suppress(Exception):  # the first error is the one reported
                self._consumer.close()
        finally:
            self.closed.set()

    def _shutdown(self) -> None:
        # Close triggers on_revoke for the remaining assignment: it drains and commits there.
        self._log.info("consumer closing", assigned=len(self._assigned))
        self._consumer.close()
        if self._share_stale and self._partition_counts:  # the final revoke: known totals only
            self._share_stale = False
            self._report_share(refresh=False)
        self._serve_requests()

    def _serve_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request()

    def _apply_pause(self) -> None:
        """Pause every partition while the switch has been on for `soft_pause_s` (until then
        the thread only stops reading), and the held ones always.

        librdkafka keeps a partition's pause across a revoke and a new assignment to the same
        consumer, while this thread forgets it at the revoke: a newly assigned partition is
        therefore resumed here (once it is assigned: not from the callback) unless it is
        wanted paused, or it would never be read again."""
        handed_over = self._pause_handed_over()
        self._reading_stopped = self._pause.paused and not handed_over
        want = self._assigned if handed_over else self._held & self._assigned
        todo = want - self._paused
        if todo:
            self._consumer.pause([TopicPartition(t, p) for t, p in todo])
        done = (self._paused - want) & self._assigned
        fresh = (self._fresh & self._assigned) - want - self._paused
        self._fresh.clear()
        if done or fresh:
            self._consumer.resume([TopicPartition(t, p) for t, p in done | fresh])
        self._paused = set(want)
        self._show()

    def _pause_handed_over(self) -> bool:
        """Whether the pipeline's pause is on and has lasted long enough to pause in
        librdkafka (called once per loop: it also notes when the pause began and ended)."""
        if not self._pause.paused:
            self._paused_since = None
            return False
        now = time.monotonic()
        if self._paused_since is None:
            self._paused_since = now
        return now - self._paused_since >= self._soft_pause_s

    def _apply_holds(self) -> None:
        """Pause, then seek back, each partition whose hold was asked for. A hold asked before
        its partition was revoked was dropped by `_forget`: the next owner reads it from the
        last commit, and a seek in a later generation could skip records never read there."""
        while self._holds_pending:
            key, (offset, future) = self._holds_pending.popitem()
            if key not in self._assigned:  # lost meanwhile
                self._loop.call_soon_threadsafe(_set_result, future, False)
                continue
            try:
                if key not in self._paused:
                    self._consumer.pause([TopicPartition(*key)])
                    self._paused.add(key)
                self._consumer.seek(TopicPartition(key[0], key[1], offset))
            except BaseException as exc:  # reported to the awaiting coroutine
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
                continue
            self._held.add(key)
            self._loop.call_soon_threadsafe(_set_result, future, True)

    def _commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        owned = {tp: o for tp, o in offsets.items() if tp in self._assigned}
        if not owned:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in owned.items()],
                asynchronous=False,
            )
        except KafkaException:
            self._metrics.commits.labels(result=CommitResult.ERROR).inc()
            raise
        self._metrics.commits.labels(result=CommitResult.OK).inc()
        if self._source_gauges:
            self._metrics.last_commit_timestamp.set(time.time())

    # -- librdkafka callbacks (on this thread, inside consume/close) ----------------------------

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._drop_holds(keys)  # asked in an earlier generation (after a loss)
        self._assigned.update(keys)
        self._fresh.update(keys)
        self._metrics.rebalances.labels(kind=RebalanceKind.ASSIGN).inc()
        self._show()
        self._log.info("partitions assigned", partitions=_fmt(keys))
        self._call_on_loop(self._sink.on_assigned, keys)
        self._share_stale = self._share_refresh = True

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._metrics.rebalances.labels(kind=RebalanceKind.REVOKE).inc()
        try:
            offsets = self._await_on_loop(self._revoked_in_order(keys), self._drain_timeout_s + 5)
            self._commit(offsets)
            self._log.info("partitions revoked", partitions=_fmt(keys), committed=len(offsets))
        except Exception as exc:  # the next owner re-reads from the last commit: at-least-once
            self._log.warning("revoke without final commit", error=str(exc))
        finally:
            self._forget(keys)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._metrics.rebalances.labels(kind=RebalanceKind.LOST).inc()
        self._log.warning("partitions lost", partitions=_fmt(keys))
        self._call_on_loop(self._lost_in_order, keys)
        self._forget(keys)

    def _forget(self, keys: Sequence[TopicPartitionKey]) -> None:
        self._assigned.difference_update(keys)
        self._paused.difference_update(keys)
        self._held.difference_update(keys)
        self._drop_holds(keys)
        self._show()
        for topic, partition in keys:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(topic, str(partition))
        self._share_stale = True

    def _drop_holds(self, keys: Sequence[TopicPartitionKey]) -> None:
        for key in keys:
            pending = self._holds_pending.pop(key, None)
            if pending is not None:
                self._loop.call_soon_threadsafe(_set_result, pending[1], False)

    def _report_share(self, *, refresh: bool) -> None:
        """Tell `on_share` how many of the subscribed topics' partitions this consumer holds.

        The totals come from the consumer's metadata (refreshed on assignment: partitions can
        be added); a topic whose metadata cannot be read keeps its last known count.
        """
        if self._on_share is None:
            return
        if refresh or not self._partition_counts:
            for topic in self._topics:
                try:
                    meta = self._consumer.list_topics(topic, timeout=5.0).topics.get(topic)
                except KafkaException:
                    continue
                if meta is not None and meta.error is None and meta.partitions:
                    self._partition_counts[topic] = len(meta.partitions)
        total = sum(self._partition_counts.values())
        if total <= 0:
            return
        assigned = sum(1 for topic, _ in self._assigned if topic in self._partition_counts)
        self._call_on_loop(self._on_share, assigned, total)

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        # Consumer lag is measured by worker.kafka.lag (these statistics miss it before the
        # first commit and freeze it while a partition is paused); they only tell whether a
        # broker is up.
        brokers = stats.get("brokers", {})
        if any(b.get("state") == "UP" for b in brokers.values() if b.get("nodeid", -1) >= 0):
            self.brokers_down = False

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        if error.fatal():
            self._log.error("kafka fatal error", error=error.str())
            self._call_on_loop(self._sink.on_fatal, KafkaException(error))
            self._stop.set()
        else:
            # librdkafka's own logger (routed through structlog) already reports it.
            self._log.debug("kafka error", error=error.str())

    # -- helpers -------------------------------------------------------------------------------

    def _show(self) -> None:
        """Add this consumer's change to the assigned/paused gauges."""
        if not self._source_gauges:
            return
        for name, gauge, count in (
            ("assigned", self._metrics.assigned_partitions, len(self._assigned)),
            (
                "paused",
                self._metrics.paused_partitions,
                len(self._assigned) if self._reading_stopped else len(self._paused),
            ),
        ):
            delta = count - self._shown[name]
            if delta:
                gauge.inc(delta)
                self._shown[name] = count

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _await_on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)


def _fmt(keys: Sequence[TopicPartitionKey]) -> str:
    return ",".join(f"{t}[{p}]" for t, p in sorted(keys))


def _set_result(future: asyncio.Future[Any], result: Any = None) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
