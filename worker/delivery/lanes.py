"""Lanes and app budgets: the queues and the fair slot schedule of the sender (SPEC §4).

A *lane* is one request key (destination, pixel, event source, test code): its own queue of
events, its own `lane_concurrency` permits. An *app budget* hands out the rate-limit slots of
one limiter key (TikTok app and endpoint) to the lanes that want one, round robin, so a busy
lane cannot starve another lane of the same app; lanes of different apps never wait for each
other. A lane asks for a slot only while it holds one of its own permits, and takes a
connection permit (the global `max_concurrent_requests`) only once it has the slot: a
throttled, paused or slow lane holds nothing another lane needs.

The batch is sealed when the slot is granted: events keep joining the queue while the lane
waits, so under throttling every request carries as many events as are waiting (up to
`max_events` and `max_bytes`). `linger_s` is how long a lane waits for more events before it
asks for a slot at all, so it only matters while slots are plentiful.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.delivery.inflight import PendingEvent
    from worker.delivery.ratelimit import RateLimiter
    from worker.mapping.body import BatchKey

# TikTok documents no body-size limit; 4 MiB keeps one request well inside common proxy limits
# while still fitting 1000 typical events (about 1 KiB each).
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024


class AppBudget:
    """Grants the slots of one limiter key to waiting lanes, one slot each in turn.

    One acquirer per key: the limiter's schedule has no burst, so acquiring slots one after
    the other costs nothing, and each slot goes to whichever lane is next *when it is granted*
    (a lane that stopped waiting meanwhile is passed over).
    """

    def __init__(self, limiter: RateLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key
        self._ring: deque[Lane] = deque()
        self._waiters: dict[Lane, deque[asyncio.Future[None]]] = {}
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return self._key

    async def slot(self, lane: Lane) -> None:
        """Wait for this lane's next slot (cancellation gives the turn away)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiting = self._waiters.get(lane)
        if waiting is None:
            waiting = self._waiters[lane] = deque()
            self._ring.append(lane)
        waiting.append(future)
        self._wanted.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"budget {self._key}")
        await future

    def _grant(self) -> bool:
        """Give one slot to the next lane in turn; False when nobody wants it."""
        while self._ring:
            lane = self._ring.popleft()
            waiting = self._waiters[lane]
            while waiting and waiting[0].done():  # cancelled while waiting
                waiting.popleft()
            if not waiting:
                del self._waiters[lane]
                continue
            waiting.popleft().set_result(None)
            if waiting:
                self._ring.append(lane)
            else:
                del self._waiters[lane]
            return True
        return False

    def _someone_waits(self) -> bool:
        return any(not f.done() for waiting in self._waiters.values() for f in waiting)

    async def _run(self) -> None:
        while True:
            if not self._someone_waits():
                self._wanted.clear()
                await self._wanted.wait()
                continue
            try:
                await self._limiter.acquire(self._key)
            except Exception as exc:  # a limiter bug: the waiting lanes fail (and so the run)
                self._fail_all(exc)
                continue
            self._grant()  # a slot nobody wants any more is left unused (never over budget)

    def _fail_all(self, exc: Exception) -> None:
        for waiting in self._waiters.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
        self._waiters.clear()
        self._ring.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Lane:
    """The queue and permits of one request key. The sender runs its pump (`Sender._pump`)."""

    __slots__ = (
        "active_events",
        "budget",
        "cap",
        "first_at",
        "flushing",
        "full",
        "key",
        "max_bytes",
        "max_events",
        "nbytes",
        "permits",
        "queue",
        "task",
        "wake",
    )

    def __init__(
        self, key: BatchKey, budget: AppBudget, *, concurrency: int, max_events: int, max_bytes: int
    ) -> None:
        self.key = key
        self.budget = budget
        self.permits = asyncio.Semaphore(concurrency)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.queue: deque[PendingEvent] = deque()
        self.nbytes = 0
        self.first_at = 0.0
        self.flushing = False
        self.wake = asyncio.Event()  # the queue is no longer empty
        self.full = asyncio.Event()  # a whole batch is waiting, or a flush was asked for
        self.active_events = 0  # sealed and not yet settled (on the wire, backing off)
        # Its fair share of the in-flight bound, once it was found holding more
        # (`Sender.shed`): new events beyond it are parked as they come, until the queue empties.
        self.cap: int | None = None
        self.task: asyncio.Task[None] | None = None

    def add(self, event: PendingEvent) -> None:
        queue = self.queue
        if not queue:
            self.first_at = time.monotonic()
            self.wake.set()
        queue.append(event)
        self.nbytes += len(event.mapped.payload) + 1  # attributes, not the properties: hot
        if len(queue) >= self.max_events or self.nbytes >= self.max_bytes:
            self.full.set()

    def flush(self) -> None:
        """Send what is queued without lingering (rebalance, shutdown)."""
        if self.queue:
            self.flushing = True
            self.full.set()

    def seal(self) -> list[PendingEvent]:
        """Take the next batch: up to `max_events` live events and `max_bytes`."""
        queue = self.queue
        batch: list[PendingEvent] = []
        size = 0
        while queue and len(batch) < self.max_events:
            event = queue[0]
            cost = len(event.mapped.payload) + 1
            if event.message.dropped:
                queue.popleft()
                self.nbytes -= cost
                continue
            if batch and size + cost > self.max_bytes:
                break
            queue.popleft()
            self.nbytes -= cost
            size += cost
            batch.append(event)
        if queue:
            self.first_at = time.monotonic()  # the rest lingers afresh (or goes next if full)
        if self._after_taking():
            self.cap = None  # caught up
        return batch

    def take_newest(self, count: int) -> list[PendingEvent]:
        """Remove up to `count` live events from the back of the queue (the newest), oldest
        of them first: the lane keeps its oldest events, which hold the commit frontier."""
        queue = self.queue
        taken: list[PendingEvent] = []
        while queue and len(taken) < count:
            event = queue.pop()
            self.nbytes -= len(event.mapped.payload) + 1
            if not event.message.dropped:
                taken.append(event)
        self._after_taking()
        taken.reverse()
        return taken

    def _after_taking(self) -> bool:
        """The flags once events left the queue (`seal`, `take_newest`): no longer full below
        both limits, all clear once empty. True when the queue is empty."""
        if self.queue:
            if len(self.queue) < self.max_events and self.nbytes < self.max_bytes:
                self.full.clear()
            return False
        self.wake.clear()
        self.full.clear()
        self.flushing = False
        self.nbytes = 0
        return True

    def purge(self) -> int:
        """Forget queued events of dropped messages; returns how many."""
        before = len(self.queue)
        if not any(e.dropped for e in self.queue):
            return 0
        kept = deque(e for e in self.queue if not e.dropped)
        self.queue = kept
        self.nbytes = sum(len(e.payload) + 1 for e in kept)
        if not kept:
            self.wake.clear()
            self.full.clear()
            self.flushing = False
        return before - len(kept)

    @property
    def queued_events(self) -> int:
        return len(self.queue)

    async def wait_for_batch(self, linger_s: float) -> None:
        """Until the queue holds events and lingering is over (full, flushed, or timed out)."""
        while not self.queue:
            await self.wake.wait()
        if self.full.is_set() or self.flushing:
            return
        remaining = self.first_at + linger_s - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), remaining)


def spawn(
    tasks: set[asyncio.Task[None]],
    coro: Coroutine[Any, Any, None],
    on_done: Callable[[asyncio.Task[None]], None],
    name: str,
) -> asyncio.Task[None]:
    """Start `coro` as a task kept in `tasks` until it ends."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(on_done)
    return task
