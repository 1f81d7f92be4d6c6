"""`tiktok-worker map`: the dry run. Segment events as JSON lines in, one JSON line out per
result, no network and no Kafka.

Each non-blank input line is one Kafka message value (an event, an array of events, or a
batch object); `index` counts non-blank input lines from 0. Output lines on stdout, exactly the
shapes of the product spec (§6):

    {"index": i, "destination": D, "subscription": S, "body": {...}}   one per TikTok event
    {"index": i, "skipped": REASON}
    {"index": i, "invalid": REASON}

Why an event is invalid (and, for multi-event lines, which event and destination) goes to
stderr, one line per invalid event, so stdout stays machine-readable.

`body` is the request body the worker would send for this event alone, produced by the
same `worker.mapping.body.build_body` the worker uses for its batches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import IO, Any

import msgspec

from worker.config import load_config
from worker.errors import WorkerError
from worker.mapping.body import build_body
from worker.mapping.mapper import EventOutcome, Mapper

_encode = msgspec.json.Encoder().encode


def run(args: argparse.Namespace) -> int:
    """Exit 0 after mapping all input (invalid events are reported, not fatal)."""
    mapper = Mapper(load_config(args.config))
    path = getattr(args, "input", "-") or "-"
    out = sys.stdout.buffer
    if path == "-":
        _map_stream(mapper, sys.stdin.buffer, out)
    else:
        try:
            with open(path, "rb") as fh:
                _map_stream(mapper, fh, out)
        except OSError as exc:
            raise WorkerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out.flush()
    return 0


def _map_stream(mapper: Mapper, stream: IO[bytes], out: IO[bytes]) -> None:
    index = 0
    for line in stream:
        value = line.strip()
        if not value:
            continue
        outcomes = mapper.map_message(value)
        for record in render(index, outcomes):
            out.write(_encode(record) + b"\n")
        for explanation in explain_invalid(index, outcomes):
            sys.stderr.write(explanation + "\n")
        index += 1


def render(index: int, outcomes: list[EventOutcome]) -> Iterator[dict[str, Any]]:
    """The output records of one input line."""
    for outcome in outcomes:
        base: dict[str, Any] = {"index": index}
        for m in outcome.mapped:
            body = msgspec.json.decode(build_body(m.key, [m.payload]))
            yield {
                **base,
                "destination": m.destination,
                "subscription": m.subscription,
                "body": body,
            }
        for bad in outcome.invalid:
            yield {**base, "invalid": bad.reason}
        if outcome.skipped is not None:
            yield {**base, "skipped": outcome.skipped}


def explain_invalid(index: int, outcomes: list[EventOutcome]) -> Iterator[str]:
    """One stderr line per invalid event: where it is and why (never a value from it)."""
    for outcome in outcomes:
        where = f"line {index}" + (f" event {outcome.index}" if outcome.multi else "")
        for bad in outcome.invalid:
            target = f" destination {bad.destination}" if bad.destination is not None else ""
            yield f"tiktok-worker map: {where}{target}: {bad.reason}: {bad.error}"
