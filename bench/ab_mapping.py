"""The mapping levers of issue 18, A/B in one process: each one switched off in turn.

Every variant maps the same messages (bench_mapping's mix, one destination with the
`documented` presets) in the same process, round-robin, so load on the machine hits all of
them alike; each figure is events per CPU-second (median of the rounds) and its ratio to
`all levers`. The variants:
- `all levers`: the worker as shipped;
- `timestamp twice`: the age check (`tiktok.max_event_age_s`, on by default) and the plan's
  `event_time` each parse the `timestamp` (before the parse was shared);
- `no LRU`: names, zip codes and address parts hashed/normalised every time;
- `reference routing`: decode first, then the interpretive routing of `Mapper(generated=False)`
  (candidates, memo dict, `_map_subscription`) instead of the generated route functions;
- `byte scan first`: `Mapper(generated=False)` as it is, the old `b'"batch"' in value` test
  before `decode_event` and the interpretive routing (the code before issue 18), LRU kept;
- `before issue 18`: byte scan, reference routing and no LRU together.
Also the decode-only floor, to give the ratio the issue's target is stated in.

Run: `.venv/bin/python bench/ab_mapping.py [--events N] [--rounds R]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

import worker.mapping.mapper as mapper_module
from bench.bench_mapping import _CONFIG, make_events
from worker.config import parse_config
from worker.mapping.hashing import format_address_part, hash_name
from worker.mapping.mapper import EventOutcome, Mapper
from worker.mapping.reading import timestamp_seconds
from worker.mapping.segment import decode_event


def _mapper(*, generated: bool, lru: bool) -> Mapper:
    saved = mapper_module.cached_hash_name, mapper_module.cached_address_part
    if not lru:
        mapper_module.cached_hash_name = hash_name
        mapper_module.cached_address_part = format_address_part
    try:
        config = parse_config(_CONFIG.format(second=""))
        return Mapper(config, now=lambda: 1.7e9, generated=generated)
    finally:
        mapper_module.cached_hash_name, mapper_module.cached_address_part = saved


def _timestamp_twice(mapper: Mapper) -> Mapper:
    """`mapper` with the age check and every plan parsing `timestamp` on their own."""
    mapper._parse_ts = timestamp_seconds
    for dest in mapper._destinations:
        for sub in dest.subs:
            sub.plan.use_timestamp(timestamp_seconds)
    return mapper


def _decode_first(mapper: Mapper) -> Callable[[bytes], list[EventOutcome]]:
    """The shipped fast path (decode first) in front of the interpretive routing."""

    def map_message(value: bytes) -> list[EventOutcome]:
        if value and value[:1] == b"{":
            event = decode_event(value)
            if event.batch is msgspec.UNSET:
                return [mapper._reference_map_event(event, raw=value)]
        return mapper.map_message(value)

    return map_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    events = make_events(args.events)
    variants: dict[str, Callable[[bytes], Any]] = {
        "decode only": decode_event,
        "all levers": _mapper(generated=True, lru=True).map_message,
        "timestamp twice": _timestamp_twice(_mapper(generated=True, lru=True)).map_message,
        "no LRU": _mapper(generated=True, lru=False).map_message,
        "reference routing": _decode_first(_mapper(generated=False, lru=True)),
        "byte scan first": _mapper(generated=False, lru=True).map_message,
        "before issue 18": _mapper(generated=False, lru=False).map_message,
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for label, fn in variants.items():
            cpu0 = time.process_time()
            for raw in events:
                fn(raw)
            rates[label].append(len(events) / (time.process_time() - cpu0))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    base = medians["all levers"]
    floor = medians["decode only"]
    result = {
        "events": len(events),
        "rounds": args.rounds,
        "python": sys.version.split()[0],
        "events_per_cpu_s": {k: round(v) for k, v in medians.items()},
        "vs_all_levers": {k: round(v / base, 3) for k, v in medians.items()},
        "vs_decode_only": {k: round(v / floor, 3) for k, v in medians.items()},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
