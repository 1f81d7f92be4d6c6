"""Per-partition offset tracking: the only place where commit arithmetic happens.

Messages of a partition begin in offset order and may finish in any order. The committable
offset is the highest offset ``o`` such that every tracked message at or below ``o`` has
finished, plus one (Kafka's convention: the committed value is the next offset to read).
`OffsetLedger` holds the trackers of every owned partition for the pipeline and for redrive.
Gaps in the offset sequence (compacted topics, transaction markers) are harmless: only offsets
that were begun are waited for.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from worker.kafka.settings import TopicPartitionKey


class PartitionTracker:
    """Tracks in-flight offsets of one assigned partition (one assignment generation)."""

    __slots__ = ("_committed", "_done", "_first_begun", "_inflight", "_last_begun")

    def __init__(self) -> None:
        self._inflight: deque[int] = deque()
        self._done: set[int] = set()
        self._first_begun: int | None = None
        self._last_begun: int | None = None
        self._committed: int | None = None

    def begin(self, offset: int) -> None:
        """Start tracking ``offset``; offsets must be begun in increasing order."""
        if self._last_begun is not None and offset <= self._last_begun:
            raise ValueError(f"offset {offset} begun after {self._last_begun}")
        if self._first_begun is None:
            self._first_begun = offset
        self._inflight.append(offset)
        self._last_begun = offset

    def skip(self, offset: int) -> None:
        """Begin and finish ``offset`` at once (a message with nothing to send).

        It is never waited for, so it need not enter the in-flight queue: above an
        unfinished offset it changes nothing, and with nothing in flight it moves the
        committable offset past itself through ``_last_begun``."""
        if self._last_begun is not None and offset <= self._last_begun:
            raise ValueError(f"offset {offset} begun after {self._last_begun}")
        if self._first_begun is None:
            self._first_begun = offset
        self._last_begun = offset

    def finish(self, offset: int) -> None:
        """Mark ``offset`` finished (delivered, skipped, or dead-lettered and acknowledged)."""
        self._done.add(offset)
        inflight = self._inflight
        done = self._done
        while inflight and inflight[0] in done:
            done.discard(inflight.popleft())

    def finish_many(self, offsets: Iterable[int]) -> None:
        """`finish` each of `offsets` (one delivered request's messages), then advance once."""
        done = self._done
        done.update(offsets)
        inflight = self._inflight
        while inflight and inflight[0] in done:
            done.discard(inflight.popleft())

    @property
    def inflight(self) -> int:
        """Messages begun and not yet finished."""
        return len(self._inflight)

    def committable(self) -> int | None:
        """The offset to commit (the next one to read), or None when nothing has finished."""
        if self._first_begun is None:
            return None
        if self._inflight:
            head = self._inflight[0]
            # Everything begun below the oldest unfinished offset is finished.
            return head if head > self._first_begun else None
        assert self._last_begun is not None
        return self._last_begun + 1

    def pending_commit(self) -> int | None:
        """The committable offset if it moved since the last ``mark_committed``, else None."""
        candidate = self.committable()
        if candidate is None or candidate == self._committed:
            return None
        return candidate

    def mark_committed(self, offset: int) -> None:
        """Record that ``offset`` was committed (commits may complete out of order)."""
        if self._committed is None or offset > self._committed:
            self._committed = offset


class OffsetLedger:
    """The commit ledger of one consumer: a `PartitionTracker` per owned partition.

    Used by the pipeline and by `dlq redrive` alike. Offsets begin and finish here; `pending()`
    is what may be committed now; `commit_once`/`commit_every` drive any commit function. After
    `halt()` (a fatal error) nothing is ever reported committable again, so no commit can pass a
    message whose processing failed.
    """

    __slots__ = ("_halted", "_trackers")

    def __init__(self) -> None:
        self._trackers: dict[TopicPartitionKey, PartitionTracker] = {}
        self._halted = False

    def assign(self, keys: Iterable[TopicPartitionKey]) -> None:
        """Start a fresh generation for each partition."""
        for key in keys:
            self._trackers[key] = PartitionTracker()

    def begin(self, key: TopicPartitionKey, offset: int) -> None:
        tracker = self._trackers.get(key)
        if tracker is None:  # a reader without rebalances (redrive) assigns on first sight
            tracker = self._trackers[key] = PartitionTracker()
        tracker.begin(offset)

    def skip(self, key: TopicPartitionKey, offset: int) -> None:
        """`begin` and `finish` in one step, for a message with nothing to send."""
        tracker = self._trackers.get(key)
        if tracker is None:
            tracker = self._trackers[key] = PartitionTracker()
        tracker.skip(offset)

    def finish(self, key: TopicPartitionKey, offset: int) -> None:
        tracker = self._trackers.get(key)
        if tracker is not None:
            tracker.finish(offset)

    def finish_many(self, key: TopicPartitionKey, offsets: Iterable[int]) -> None:
        tracker = self._trackers.get(key)
        if tracker is not None:
            tracker.finish_many(offsets)

    def owns(self, key: TopicPartitionKey) -> bool:
        return key in self._trackers

    def inflight(self, keys: Iterable[TopicPartitionKey] | None = None) -> int:
        """Messages begun and not finished, in `keys` (default: every partition)."""
        chosen = self._trackers.keys() if keys is None else keys
        return sum(t.inflight for k in chosen if (t := self._trackers.get(k)) is not None)

    def release(self, keys: Iterable[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Forget `keys`; returns their final commit offsets (none after `halt`)."""
        offsets: dict[TopicPartitionKey, int] = {}
        for key in keys:
            tracker = self._trackers.pop(key, None)
            if tracker is None or self._halted:
                continue
            committable = tracker.pending_commit()
            if committable is not None:
                offsets[key] = committable
        return offsets

    def halt(self) -> None:
        self._halted = True

    @property
    def halted(self) -> bool:
        return self._halted

    def pending(self) -> dict[TopicPartitionKey, int]:
        """The partitions whose finished prefix moved since their last commit."""
        if self._halted:
            return {}
        offsets: dict[TopicPartitionKey, int] = {}
        for key, tracker in self._trackers.items():
            offset = tracker.pending_commit()
            if offset is not None:
                offsets[key] = offset
        return offsets

    async def commit_once(
        self, commit: Callable[[dict[TopicPartitionKey, int]], Awaitable[None]]
    ) -> int:
        """Commit what is pending with `commit`; returns the number of partitions committed."""
        offsets = self.pending()
        if not offsets:
            return 0
        await commit(offsets)
        for key, offset in offsets.items():
            tracker = self._trackers.get(key)
            if tracker is not None:
                tracker.mark_committed(offset)
        return len(offsets)

    async def commit_every(
        self,
        interval_s: float,
        commit: Callable[[dict[TopicPartitionKey, int]], Awaitable[None]],
        on_error: Callable[[Exception], None],
    ) -> None:
        """Commit periodically until cancelled; a failed commit is retried next time."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.commit_once(commit)
            except Exception as exc:  # at-least-once holds: the next interval tries again
                on_error(exc)
