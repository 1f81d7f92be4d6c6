"""`tiktok-worker dlq inspect`: what is in the dead-letter topic, and why.

Reads the topic from the beginning to the high watermarks captured at start (never waits for
new records, never commits, never joins a group) and prints, in a stable plain-text format:
the record count, oldest/newest `dlq.failed_at`, counts by reason, destination and TikTok
code, how many records no redrive has handled yet, and up to three sample `dlq.error` texts
per reason (most frequent first). With `--json`, the same as one JSON object (for scripts;
see `as_json` for its keys). Exit 0; 1 when Kafka or the topic is unavailable.

Then what is parked in the retry topic (`kafka.retry_topic`): the records after the retry
intake's committed offsets (group `<group_id>.retry`), which is every parked event not yet
delivered, parked again or dead-lettered (an upper bound: records handled within the last
commit interval, or behind one still waiting for its due time, count too). Counts by
destination, reason and due time, and the oldest first failure (with `--json`: the `parked`
key, see `parked_as_json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from worker.config import Config, load_config, secret_values
from worker.core.redaction import register_secrets
from worker.errors import WorkerError
from worker.kafka.dlq_reader import TOOLS_JOB, BoundedReader, DeadLetterRecord
from worker.kafka.parking import PROBE_HEADER, Parked, iso, retry_group_id
from worker.kafka.preflight import preflight
from worker.kafka.security import client_properties
from worker.kafka.settings import reader_settings
from worker.observability.logs import configure_logging
from worker.redrive.engine import RedriveLedger

SAMPLES_PER_REASON: Final = 3
MAX_DISTINCT_ERRORS: Final = 1000  # per reason; bounds memory on a huge, varied topic
NONE_LABEL: Final = "(none)"
POLL_BATCH: Final = 1000
POLL_TIMEOUT_S: Final = 0.5


@dataclass(slots=True)
class Summary:
    """Aggregates of the dead letters read. `awaiting_redrive` is None when unknown."""

    topic: str
    partitions: int
    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_destination: Counter[str] = field(default_factory=Counter)
    by_code: Counter[str] = field(default_factory=Counter)
    errors: dict[str, Counter[str]] = field(default_factory=dict)
    oldest: str | None = None
    newest: str | None = None
    awaiting_redrive: int | None = None
    redriven_before: int = 0
    written_back: int = 0

    def add(self, record: DeadLetterRecord, ledger: RedriveLedger | None) -> None:
        self.total += 1
        reason = record.reason or NONE_LABEL
        self.by_reason[reason] += 1
        self.by_destination[record.destination or NONE_LABEL] += 1
        self.by_code[str(record.code) if record.code is not None else NONE_LABEL] += 1
        errors = self.errors.setdefault(reason, Counter())
        text = record.error.strip() or "(no dlq.error header)"
        if text in errors or len(errors) < MAX_DISTINCT_ERRORS:
            errors[text] += 1
        when = record.failed_at
        if when is not None:
            if self.oldest is None or when < self.oldest:
                self.oldest = when
            if self.newest is None or when > self.newest:
                self.newest = when
        if record.redrive_count:
            self.written_back += 1
        if ledger is not None and self.awaiting_redrive is not None:
            if ledger.handled_by(record) is None:
                self.awaiting_redrive += 1
            else:
                self.redriven_before += 1


# Due-time buckets of parked records: (label, due within this many seconds from now).
DUE_BUCKETS: Final = (
    ("due now", 0.0),
    ("within 1 min", 60.0),
    ("within 10 min", 600.0),
    ("within 1 h", 3600.0),
    ("later", float("inf")),
)


@dataclass(slots=True)
class ParkedSummary:
    """Aggregates of the parked records not yet committed by the retry intake."""

    topic: str
    group: str
    now: float
    exists: bool = True
    partitions: int = 0
    total: int = 0
    unreadable: int = 0
    by_destination: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_due: Counter[str] = field(default_factory=Counter)
    oldest_first_failure: float | None = None
    reference_only: int = 0

    def add(self, record: DeadLetterRecord) -> None:
        if PROBE_HEADER in record.headers:
            return
        self.total += 1
        try:
            parked = Parked.from_headers(record.headers)
        except ValueError:
            self.unreadable += 1
            return
        self.by_destination[parked.destination] += 1
        self.by_reason[parked.reason] += 1
        wait = parked.due_at - self.now
        label = next(name for name, limit in DUE_BUCKETS if wait <= limit)
        self.by_due[label] += 1
        first = parked.first_failed_at
        if self.oldest_first_failure is None or first < self.oldest_first_failure:
            self.oldest_first_failure = first
        if parked.value_omitted is not None:
            self.reference_only += 1


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(level="info" if args.debug else "warning", fmt=config.logging.format)
    register_secrets(secret_values(config))
    summary = inspect_topic(config)
    parked = inspect_parked(config)
    if getattr(args, "json", False):
        report = as_json(summary)
        report["parked"] = parked_as_json(parked)
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render(summary) + "\n" + render_parked(parked))
    sys.stdout.flush()
    return 0


def inspect_parked(config: Config, *, now: float | None = None) -> ParkedSummary:
    """Read the retry topic from the intake's committed offsets to its end, once."""
    kafka = config.kafka
    group = retry_group_id(kafka.group_id)
    summary = ParkedSummary(
        topic=kafka.retry_topic, group=group, now=time.time() if now is None else now
    )
    reader = BoundedReader(
        # The intake's group: its committed offsets are where the parked records start.
        # Nothing is ever committed to it from here.
        config=reader_settings(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=group,
            client=client_properties(kafka),
            job=TOOLS_JOB,
        ),
        topic=kafka.retry_topic,
        from_committed=True,
        kind="retry topic",
    )
    try:
        try:
            reader.open()
        except WorkerError as exc:
            if "does not exist" not in str(exc):
                raise
            summary.exists = False
            return summary
        summary.partitions = len(reader.ranges)
        while not reader.done:
            for record in reader.poll(POLL_BATCH, POLL_TIMEOUT_S):
                summary.add(record)
    finally:
        reader.close()
    return summary


def render_parked(summary: ParkedSummary) -> str:
    """The parked report as text, one trailing newline."""
    if not summary.exists:
        return f"retry topic {summary.topic}: does not exist\n"
    lines = [
        f"retry topic {summary.topic}: {summary.total} parked record(s) "
        f"in {summary.partitions} partition(s), not yet handled by group {summary.group}"
    ]
    if summary.total == 0:
        return lines[0] + "\n"
    oldest = summary.oldest_first_failure
    lines.append(f"oldest first failure: {iso(oldest) if oldest is not None else 'unknown'}")
    if summary.unreadable:
        lines.append(f"unreadable (no valid retry.* headers): {summary.unreadable}")
    if summary.reference_only:
        lines.append(f"reference-only (too large for the retry topic): {summary.reference_only}")
    lines.append("")
    lines.extend(_table("parked by destination", summary.by_destination))
    lines.append("")
    lines.extend(_table("parked by reason", summary.by_reason))
    lines.append("")
    lines.append("parked by due time:")
    width = max(len(name) for name, _limit in DUE_BUCKETS)
    for name, _limit in DUE_BUCKETS:  # in time order, not by count
        if summary.by_due[name]:
            lines.append(f"  {name:<{width}}  {summary.by_due[name]}")
    return "\n".join(lines) + "\n"


def inspect_topic(config: Config) -> Summary:
    """Read the whole dead-letter topic once and aggregate it."""
    kafka = config.kafka
    client = client_properties(kafka)
    preflight(config, client)
    ledger: RedriveLedger | None
    try:
        ledger = RedriveLedger.load(config)
    except WorkerError:
        ledger = None  # no permission to list groups: the count is left out, not guessed
    reader = BoundedReader(
        # A group id is required by the client; nothing is ever committed to it.
        config=reader_settings(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=kafka.group_id + "-dlq-inspect",
            client=client,
            job=TOOLS_JOB,
        ),
        topic=kafka.dead_letter_topic,
        from_committed=False,
    )
    try:
        reader.open()
        summary = Summary(topic=kafka.dead_letter_topic, partitions=len(reader.ranges))
        if ledger is not None:
            summary.awaiting_redrive = 0
        while not reader.done:
            for record in reader.poll(POLL_BATCH, POLL_TIMEOUT_S):
                summary.add(record, ledger)
    finally:
        reader.close()
    return summary


def _table(title: str, counts: Counter[str]) -> Iterable[str]:
    yield f"{title}:"
    width = max((len(k) for k in counts), default=0)
    # Most frequent first; ties by name so the output is stable.
    for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        yield f"  {key:<{width}}  {count}"


def render(summary: Summary) -> str:
    """The report as text, one trailing newline."""
    lines = [
        f"dead-letter topic {summary.topic}: {summary.total} record(s) "
        f"in {summary.partitions} partition(s)"
    ]
    if summary.total == 0:
        return lines[0] + "\n"
    lines.append(f"oldest failed_at: {summary.oldest or 'unknown'}")
    lines.append(f"newest failed_at: {summary.newest or 'unknown'}")
    if summary.awaiting_redrive is not None:
        lines.append(
            f"not yet redriven: {summary.awaiting_redrive} "
            f"(handled by an earlier redrive: {summary.redriven_before})"
        )
    else:
        lines.append("not yet redriven: unknown (cannot list the redrive consumer groups)")
    if summary.written_back:
        lines.append(f"written back by a redrive (failed again): {summary.written_back}")
    lines.append("")
    lines.extend(_table("by reason", summary.by_reason))
    lines.append("")
    lines.extend(_table("by destination", summary.by_destination))
    lines.append("")
    lines.extend(_table("by TikTok code", summary.by_code))
    lines.append("")
    lines.append("sample errors:")
    for reason, _count in sorted(summary.by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason}:")
        errors = summary.errors.get(reason, Counter())
        top = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:SAMPLES_PER_REASON]
        for text, count in top:
            lines.append(f"    {count} x {text}")
    return "\n".join(lines) + "\n"


def _ranked(counts: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name (JSON objects keep this order)."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def as_json(summary: Summary) -> dict[str, Any]:
    """The report as data. Keys are always present; `oldest_failed_at`/`newest_failed_at` are
    null for an empty topic, `awaiting_redrive`/`redriven_before` null when the redrive groups
    cannot be listed. `by_destination`/`by_tiktok_code` use `(none)` for a missing header."""
    known = summary.awaiting_redrive is not None
    return {
        "topic": summary.topic,
        "partitions": summary.partitions,
        "records": summary.total,
        "oldest_failed_at": summary.oldest,
        "newest_failed_at": summary.newest,
        "awaiting_redrive": summary.awaiting_redrive,
        "redriven_before": summary.redriven_before if known else None,
        "written_back": summary.written_back,
        "by_reason": _ranked(summary.by_reason),
        "by_destination": _ranked(summary.by_destination),
        "by_tiktok_code": _ranked(summary.by_code),
        "sample_errors": {
            reason: [
                {"error": text, "count": count}
                for text, count in list(_ranked(summary.errors.get(reason, Counter())).items())[
                    :SAMPLES_PER_REASON
                ]
            ]
            for reason in _ranked(summary.by_reason)
        },
    }


def parked_as_json(summary: ParkedSummary) -> dict[str, Any]:
    """The parked report as data (the `parked` key of `dlq inspect --json`). `exists` is
    false when the retry topic does not exist; `oldest_first_failure` is null when nothing
    is parked; `by_due` keeps the buckets in time order and leaves out empty ones."""
    oldest = summary.oldest_first_failure
    return {
        "topic": summary.topic,
        "group": summary.group,
        "exists": summary.exists,
        "partitions": summary.partitions,
        "records": summary.total,
        "unreadable": summary.unreadable,
        "reference_only": summary.reference_only,
        "oldest_first_failure": iso(oldest) if oldest is not None else None,
        "by_destination": _ranked(summary.by_destination),
        "by_reason": _ranked(summary.by_reason),
        "by_due": {name: summary.by_due[name] for name, _ in DUE_BUCKETS if summary.by_due[name]},
    }


__all__ = [
    "ParkedSummary",
    "Summary",
    "as_json",
    "inspect_parked",
    "inspect_topic",
    "parked_as_json",
    "render",
    "render_parked",
    "run",
]
