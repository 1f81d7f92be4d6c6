"""The commit arithmetic: contiguous finished offsets, out-of-order completion, gaps."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.kafka.offsets import PartitionTracker


def test_nothing_begun_nothing_committable() -> None:
    assert PartitionTracker().committable() is None


def test_commits_only_the_contiguous_prefix() -> None:
    t = PartitionTracker()
    for o in (10, 11, 12, 13):
        t.begin(o)
    t.finish(12)
    assert t.committable() is None  # 10 is still in flight
    t.finish(10)
    assert t.committable() == 11  # 11 in flight: commit "next to read" = 11
    t.finish(11)
    assert t.committable() == 13
    t.finish(13)
    assert t.committable() == 14
    assert t.inflight == 0


def test_gaps_in_offsets_do_not_block() -> None:
    t = PartitionTracker()
    for o in (5, 9, 20):  # compaction or transaction markers leave gaps
        t.begin(o)
    t.finish(5)
    assert t.committable() == 9
    t.finish(20)
    t.finish(9)
    assert t.committable() == 21


def test_begin_must_increase() -> None:
    t = PartitionTracker()
    t.begin(3)
    with pytest.raises(ValueError, match="begun after"):
        t.begin(3)


def test_pending_commit_reports_only_movement() -> None:
    t = PartitionTracker()
    t.begin(0)
    t.finish(0)
    assert t.pending_commit() == 1
    t.mark_committed(1)
    assert t.pending_commit() is None
    t.begin(1)
    assert t.pending_commit() is None
    t.finish(1)
    assert t.pending_commit() == 2
    t.mark_committed(0)  # a late, older commit never moves the mark backwards
    assert t.pending_commit() == 2


@given(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=200), st.randoms())
def test_committable_never_passes_an_unfinished_offset(
    steps: list[int], rnd: random.Random
) -> None:
    t = PartitionTracker()
    offsets: list[int] = []
    o = 0
    for step in steps:
        o += step
        offsets.append(o)
        t.begin(o)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for off in order:
        t.finish(off)
        finished.add(off)
        c = t.committable()
        unfinished = [x for x in offsets if x not in finished]
        if c is not None:
            assert all(x >= c for x in unfinished)
            assert all(x in finished for x in offsets if x < c)
        if unfinished:
            lowest = min(unfinished)
            # the commit reaches exactly the oldest unfinished offset once anything below is done
            assert c == (lowest if lowest > offsets[0] else None)
    assert t.committable() == offsets[-1] + 1


# -- the ledger shared by the pipeline and redrive ----------------------------------------------


async def test_ledger_commits_what_moved_and_marks_it() -> None:
    from worker.kafka.offsets import OffsetLedger

    ledger = OffsetLedger()
    ledger.assign([("t", 0)])
    for offset in (0, 1, 2):
        ledger.begin(("t", 0), offset)
    ledger.finish(("t", 0), 1)
    assert ledger.pending() == {}  # offset 0 is unfinished
    ledger.finish(("t", 0), 0)
    commits: list[dict[tuple[str, int], int]] = []

    async def commit(offsets: dict[tuple[str, int], int]) -> None:
        commits.append(dict(offsets))

    assert await ledger.commit_once(commit) == 1
    assert commits == [{("t", 0): 2}]
    assert await ledger.commit_once(commit) == 0
    assert ledger.inflight() == 1


def test_ledger_release_returns_the_final_offsets_and_forgets() -> None:
    from worker.kafka.offsets import OffsetLedger

    ledger = OffsetLedger()
    ledger.assign([("t", 0), ("t", 1)])
    ledger.begin(("t", 0), 5)
    ledger.finish(("t", 0), 5)
    ledger.begin(("t", 1), 9)
    assert ledger.release([("t", 0), ("t", 1)]) == {("t", 0): 6}
    assert not ledger.owns(("t", 0))
    ledger.finish(("t", 1), 9)  # a late finish of a released partition changes nothing
    assert ledger.pending() == {}


def test_a_halted_ledger_never_reports_anything_committable() -> None:
    from worker.kafka.offsets import OffsetLedger

    ledger = OffsetLedger()
    ledger.assign([("t", 0)])
    ledger.begin(("t", 0), 0)
    ledger.finish(("t", 0), 0)
    ledger.halt()
    assert ledger.pending() == {}
    assert ledger.release([("t", 0)]) == {}


@given(
    st.lists(st.tuples(st.integers(min_value=1, max_value=3), st.booleans()), max_size=120),
    st.randoms(),
)
def test_skip_commits_exactly_like_begin_then_finish(
    steps: list[tuple[int, bool]], rng: random.Random
) -> None:
    """`skip` (issue 18) is begin + finish without the in-flight queue: the same commits."""
    fast, model = PartitionTracker(), PartitionTracker()
    offset, open_offsets = 0, []
    for gap, skipped in steps:
        offset += gap
        if skipped:
            fast.skip(offset)
            model.begin(offset)
            model.finish(offset)
        else:
            fast.begin(offset)
            model.begin(offset)
            open_offsets.append(offset)
        # Finish a random subset of what is open, in a random order.
        rng.shuffle(open_offsets)
        while open_offsets and rng.random() < 0.4:
            done = open_offsets.pop()
            fast.finish(done)
            model.finish(done)
        assert fast.committable() == model.committable()
        # The model's count also holds finished offsets queued behind an unfinished one;
        # what the drain waits for (none left) is the same.
        assert (fast.inflight == 0) == (model.inflight == 0)
        assert fast.inflight <= model.inflight
    if steps:
        with pytest.raises(ValueError, match="begun after"):
            fast.skip(offset)


@given(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=150), st.randoms())
def test_finish_many_commits_exactly_like_finish_one_by_one(
    steps: list[int], rng: random.Random
) -> None:
    """`finish_many` (one delivered request's offsets at once) against `finish` per offset."""
    fast, model = PartitionTracker(), PartitionTracker()
    offsets = list(itertools.accumulate(steps))
    for o in offsets:
        fast.begin(o)
        model.begin(o)
    rng.shuffle(offsets)
    while offsets:
        group = [offsets.pop() for _ in range(min(len(offsets), rng.randint(1, 5)))]
        fast.finish_many(group)
        for o in group:
            model.finish(o)
        assert fast.committable() == model.committable()
        assert fast.inflight == model.inflight
