"""Per-partition offset tracking: the only place where commit arithmetic happens.

Messages of a partition begin in offset order and may finish in any order. The committable
offset is the highest offset ``o`` such that every tracked message at or below ``o`` has
finished, plus one (Kafka's convention: the committed value is the next offset to read).
Gaps in the offset sequence (compacted topics, transaction markers) are harmless: only offsets
that were begun are waited for.
"""

from __future__ import annotations

from collections import deque


class PartitionTracker:
    """Tracks in-flight offsets of one assigned partition (one assignment generation)."""

    __slots__ = ("_committed", "_done", "_first_begun", "_inflight", "_last_begun", "revoked")

    def __init__(self) -> None:
        self._inflight: deque[int] = deque()
        self._done: set[int] = set()
        self._first_begun: int | None = None
        self._last_begun: int | None = None
        self._committed: int | None = None
        self.revoked = False  # completions after revocation are ignored by the pipeline

    def begin(self, offset: int) -> None:
        """Start tracking ``offset``; offsets must be begun in increasing order."""
        if self._last_begun is not None and offset <= self._last_begun:
            raise ValueError(f"offset {offset} begun after {self._last_begun}")
        if self._first_begun is None:
            self._first_begun = offset
        self._inflight.append(offset)
        self._last_begun = offset

    def finish(self, offset: int) -> None:
        """Mark ``offset`` finished (delivered, skipped, or dead-lettered and acknowledged)."""
        self._done.add(offset)
        inflight = self._inflight
        done = self._done
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
