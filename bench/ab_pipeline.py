"""The pipeline's bookkeeping per message, mapping and delivery excluded, in one process.

`Pipeline.on_messages` is fed the bench mix (`make_events`, one destination, `documented`
presets) as real `confluent_kafka.Message`s, 4 partitions, batches of 2,000 as `consume()`
returns them (runs of one partition). The mapper returns outcomes mapped beforehand, the
sender only collects, and after each batch every collected event is reported delivered in
requests of 1,000 (`on_delivered`), as the sender would. What is timed (CPU time of this
process) is therefore the per-message work of issue 18's "bookkeeping": the in-flight and
pending objects, the offset ledger, the counters, the finish path.

To compare two versions, run it once per version (`PYTHONPATH=DIR` with a `worker/` from
`git archive <rev> worker | tar -x -C DIR` imports that version), alternately:

    .venv/bin/python bench/ab_pipeline.py [--events N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import confluent_kafka

import worker
from bench.bench_mapping import _CONFIG, make_events
from worker.config import parse_config
from worker.errors import FatalLatch
from worker.kafka.consumer import PauseSwitch
from worker.kafka.offsets import OffsetLedger
from worker.mapping.mapper import EventOutcome, Mapper
from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics
from worker.pipeline.pipeline import Pipeline

PARTITIONS = 4
BATCH = 2000
REQUEST = 1000


class _Mapped:
    """A mapper that returns what the real one made of each value beforehand."""

    def __init__(self, outcomes: dict[bytes, list[EventOutcome]]) -> None:
        self._outcomes = outcomes

    def map_message(self, value: bytes) -> list[EventOutcome]:
        return self._outcomes[value]


class _Collecting:
    """A sender that only collects (the lanes and HTTP are not measured here)."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def add(self, key: Any, event: Any) -> None:
        self.events.append(event)

    def flush(self) -> None:
        return None

    def purge(self) -> int:
        return 0


class _Acking:
    """A dead-letter producer whose broker acknowledges at once."""

    def send(self, **kwargs: Any) -> None:
        kwargs["on_written"]()


async def _measure(events: list[bytes], rounds: int) -> list[float]:
    config = parse_config(_CONFIG.format(second=""))
    mapper = Mapper(config, now=lambda: 1.7e9)
    sender = _Collecting()
    pipeline = Pipeline(
        mapper=_Mapped({raw: mapper.map_message(raw) for raw in events}),  # type: ignore[arg-type]
        sender=sender,  # type: ignore[arg-type]
        dead_letters=_Acking(),  # type: ignore[arg-type]
        ledger=OffsetLedger(),
        pause=PauseSwitch(),
        fatal=FatalLatch(),
        metrics=Metrics(),
        log=get_logger("bench"),
        max_inflight_messages=10**9,
        drain_timeout_s=1,
    )
    pipeline.on_assigned([("bench", p) for p in range(PARTITIONS)])
    offsets = [0] * PARTITIONS
    us_per_message: list[float] = []
    for _ in range(rounds):
        batches = []
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            per = len(chunk) // PARTITIONS
            batch = []
            for p in range(PARTITIONS):
                for raw in chunk[p * per : (p + 1) * per]:
                    batch.append(
                        confluent_kafka.Message(
                            topic="bench",
                            partition=p,
                            offset=offsets[p],
                            value=raw,
                            key=None,
                            timestamp=(1, 1764072000000),
                        )
                    )
                    offsets[p] += 1
            batches.append(batch)
        count = sum(len(b) for b in batches)
        cpu0 = time.process_time()
        for batch in batches:
            pipeline.on_messages(batch)
            collected, sender.events = sender.events, []
            for i in range(0, len(collected), REQUEST):
                pipeline.on_delivered(collected[i : i + REQUEST])
        us_per_message.append((time.process_time() - cpu0) / count * 1e6)
        if pipeline.inflight_messages:
            raise RuntimeError(f"{pipeline.inflight_messages} messages left unfinished")
    return us_per_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    us = asyncio.run(_measure(make_events(args.events), args.rounds))
    result = {
        "worker": str(worker.__file__).removesuffix("/__init__.py"),
        "events": args.events,
        "rounds": args.rounds,
        "us_per_message": {"min": round(min(us), 3), "median": round(statistics.median(us), 3)},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
