"""Groups mapped events per request key (one pixel per request) into TikTok batches.

A batch closes when it holds ``max_events`` events, when adding an event would push it past
``max_bytes``, or ``linger_s`` after its first event. Closed batches are handed to ``on_batch``
synchronously; the batcher itself never does I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.delivery.inflight import PendingEvent
    from worker.mapping.body import BatchKey

# TikTok documents no body-size limit; 4 MiB keeps one request well inside common proxy limits
# while still fitting 1000 typical events (about 1 KiB each).
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024


class Batch:
    """Events for one request key, in arrival order."""

    __slots__ = ("created", "events", "key", "nbytes", "timer")

    def __init__(self, key: BatchKey) -> None:
        self.key = key
        self.events: list[PendingEvent] = []
        self.nbytes = 0
        self.created = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.events)


class Batcher:
    """Accumulates events per key and emits full or lingering batches."""

    def __init__(
        self,
        *,
        max_events: int,
        linger_s: float,
        on_batch: Callable[[Batch], None],
        max_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self._on_batch = on_batch
        self._open: dict[BatchKey, Batch] = {}

    def add(self, key: BatchKey, event: PendingEvent) -> None:
        batch = self._open.get(key)
        size = len(event.payload) + 1
        if batch is not None and batch.nbytes + size > self._max_bytes:
            self._emit(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key)
            batch.timer = asyncio.get_running_loop().call_later(self._linger_s, self._expire, batch)
        batch.events.append(event)
        batch.nbytes += size
        if len(batch.events) >= self._max_events:
            self._emit(batch)

    def flush(self) -> None:
        """Emit every open batch now (rebalance, shutdown)."""
        for batch in list(self._open.values()):
            self._emit(batch)

    @property
    def open_events(self) -> int:
        return sum(len(b) for b in self._open.values())

    def _expire(self, batch: Batch) -> None:
        if self._open.get(batch.key) is batch:
            self._emit(batch)

    def _emit(self, batch: Batch) -> None:
        del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        self._on_batch(batch)
