"""`tiktok-worker map`: the dry run. Segment events as JSON lines in, one JSON line out per
result, no network and no Kafka.

Each non-blank input line is one Kafka message value (an event, an array of events, or a
batch object); `index` counts non-blank input lines from 0. Explanations on stderr name the
input's own line number (1-based, blank lines counted), as an editor shows it. Output lines
on stdout, exactly these shapes (docs/configuration.md, "What is sent"):

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
        _map_stream(mapper, sys.stdin.buffer, out, name="stdin")
    else:
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed below; only open/read errors are ours)
        except OSError as exc:
            raise WorkerError(f"{path}: cannot read: {exc.strerror or exc}") from None
        with fh:
            _map_stream(mapper, fh, out, name=path)
    out.flush()
    return 0


def _map_stream(mapper: Mapper, stream: IO[bytes], out: IO[bytes], *, name: str) -> None:
    """Map every non-blank line. A failed read blames the input; a failed write (e.g. a
    closed pipe) propagates as it is, so the CLI can tell the two apart."""
    index = 0
    lines = iter(stream)
    line_no = 0
    while True:
        try:
            line = next(lines)
        except StopIteration:
            break
        except OSError as exc:
            raise WorkerError(f"{name}: cannot read: {exc.strerror or exc}") from None
        line_no += 1
        value = line.strip()
        if not value:
            continue
        outcomes = mapper.map_message(value)
        for record in render(index, outcomes):
            out.write(_encode(record) + b"\n")
        for explanation in explain_invalid(line_no, outcomes):
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


def explain_invalid(line_no: int, outcomes: list[EventOutcome]) -> Iterator[str]:
    """One stderr line per invalid event: where it is (the input's 1-based line number, as
    editors show it) and why (never a value from it)."""
    for outcome in outcomes:
        where = f"line {line_no}" + (f" event {outcome.index}" if outcome.multi else "")
        for bad in outcome.invalid:
            target = f" destination {bad.destination}" if bad.destination is not None else ""
            yield f"tiktok-worker map: {where}{target}: {bad.reason}: {bad.error}"
