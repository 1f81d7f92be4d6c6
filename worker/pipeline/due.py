"""Items held until a due time, released a slice per turn of the event loop.

The retry intake holds parked records until they are due. Records parked together come due
together (a batch of thousands shares one due time), and a destination whose circuit closes
releases all of its held records at once. One timer per record would run all of them in one
turn of the loop, and the other destinations' responses would wait behind it. Here one timer
serves the earliest due time and each turn hands over at most `slice_size` items.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["DueQueue"]

T = TypeVar("T", bound=Hashable)


class DueQueue(Generic[T]):
    """Holds items until their due time (`clock` seconds); `on_due(item)` releases each once."""

    def __init__(
        self,
        on_due: Callable[[T], None],
        *,
        slice_size: int = 200,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_due = on_due
        self._slice = slice_size
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._live: dict[T, int] = {}  # item -> the sequence number of its live heap entry
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: T) -> bool:
        return item in self._live

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._live))

    def add(self, item: T, due_at: float) -> None:
        self._push(item, due_at)

    def release(self, item: T) -> None:
        """Due now (its destination is back), still a slice per turn."""
        if item in self._live:
            self._push(item, -math.inf)

    def remove(self, item: T) -> bool:
        """Forget an item (its heap entry is skipped when reached)."""
        return self._live.pop(item, None) is not None

    def clear(self) -> None:
        self._live.clear()
        self._heap.clear()
        self._cancel()

    def _push(self, item: T, due_at: float) -> None:
        seq = next(self._seq)
        self._live[item] = seq
        heapq.heappush(self._heap, (due_at, seq, item))
        self._arm()

    def _arm(self) -> None:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # removed or moved: a stale entry
        if not heap:
            self._cancel()
            return
        first = heap[0][0]
        if self._timer is not None and self._timer_at <= first:
            return
        self._cancel()
        delay = max(0.0, first - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_at = first

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        heap, live = self._heap, self._live
        now = self._clock()
        released = 0
        while heap and released < self._slice:
            due_at, seq, item = heap[0]
            if live.get(item) != seq:
                heapq.heappop(heap)
                continue
            if due_at > now:
                break
            heapq.heappop(heap)
            del live[item]
            released += 1
            self._on_due(item)
        # What is still due runs on the next turn (a zero-delay timer: I/O is served first).
        self._arm()
