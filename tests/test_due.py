"""The retry intake's hold queue (worker.pipeline.due): due order, slices per turn, release,
removal."""

from __future__ import annotations

import asyncio

from worker.pipeline.due import DueQueue


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_items_come_out_in_due_order_and_only_when_due() -> None:
    clock = Clock()
    out: list[str] = []
    queue: DueQueue[str] = DueQueue(out.append, clock=clock)
    queue.add("late", 1000.2)
    queue.add("early", 1000.1)
    queue.add("now", 999.0)
    await asyncio.sleep(0.01)
    assert out == ["now"]
    assert len(queue) == 2
    clock.now = 1000.15
    await asyncio.sleep(0.2)
    assert out == ["now", "early"]
    clock.now = 1000.3
    await asyncio.sleep(0.2)
    assert out == ["now", "early", "late"]
    assert len(queue) == 0


async def test_many_due_together_are_handed_over_a_slice_per_turn() -> None:
    clock = Clock()
    out: list[int] = []
    queue: DueQueue[int] = DueQueue(out.append, slice_size=100, clock=clock)
    for i in range(450):
        queue.add(i, 999.0)
    turns: list[int] = []
    for _ in range(8):  # each turn of the loop sees at most one more slice
        await asyncio.sleep(0)
        turns.append(len(out))
    assert sorted(out) == list(range(450))
    steps = [b - a for a, b in zip([0, *turns], turns, strict=False)]
    assert max(steps) <= 100
    assert len([s for s in steps if s]) >= 5


async def test_release_makes_an_item_due_now_once_and_remove_forgets_it() -> None:
    clock = Clock()
    out: list[str] = []
    queue: DueQueue[str] = DueQueue(out.append, clock=clock)
    for item in ("a", "b", "c"):
        queue.add(item, 5000.0)
    queue.release("a")
    assert queue.remove("b")
    assert not queue.remove("b")
    await asyncio.sleep(0.01)
    assert out == ["a"]
    assert "c" in queue
    assert "b" not in queue
    clock.now = 6000.0
    queue.add("d", 1.0)  # arms the timer again; "c" is due by now too
    await asyncio.sleep(0.01)
    assert sorted(out) == ["a", "c", "d"]
    queue.add("e", 7000.0)
    queue.clear()
    assert len(queue) == 0
