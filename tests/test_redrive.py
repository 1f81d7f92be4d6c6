"""Redrive building blocks without Kafka: filters and their group ids, the ledger of earlier
redrives, written-back headers, record parsing, progress and summary text."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from typing import Any

import pytest
import yaml

from tests.fakes import FakeMessage
from worker.commands.dlq_redrive import Progress, parse_max_age, summary_line
from worker.config import parse_config
from worker.core.vocabulary import DeadLetterReason
from worker.errors import ConfigError
from worker.kafka.deadletters import DeadLetter
from worker.kafka.dlq_reader import DeadLetterRecord, decode_headers, parse_record
from worker.redrive.engine import RedriveFilter, RedriveLedger, RedriveStats
from worker.redrive.engine import validate_filter as check_filter


def dead_letter(headers: Any, *, partition: int = 0, offset: int = 0) -> Any:
    """A record of the dead-letter topic (a stand-in for confluent_kafka.Message)."""
    return FakeMessage(
        partition,
        offset,
        b'{"type":"track"}',
        topic="dlq",
        key=b"key",
        headers=headers,
        timestamp_ms=1_790_000_000_123,
    )


def record(
    *, partition: int = 0, offset: int = 0, reason: str = "auth_error", dest: str | None = "a"
) -> DeadLetterRecord:
    letter = DeadLetter(
        reason=DeadLetterReason(reason),
        error="e",
        original_topic="src",
        original_partition=0,
        original_offset=0,
        original_timestamp_ms=None,
        destination=dest,
    )
    return parse_record(dead_letter(letter.headers(), partition=partition, offset=offset))


# -- filters and group ids --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "group"),
    [
        (RedriveFilter(), "tiktok-conversions-redrive"),
        (RedriveFilter(reason="auth_error"), "tiktok-conversions-redrive--reason=auth_error"),
        (
            RedriveFilter(destination="web.shop-1"),
            "tiktok-conversions-redrive--destination=web.shop-1",
        ),
        (
            RedriveFilter(reason="retries_exhausted", destination="a--b"),
            "tiktok-conversions-redrive--reason=retries_exhausted--destination=a--b",
        ),
    ],
)
def test_group_id_round_trip(flt: RedriveFilter, group: str) -> None:
    assert flt.group_id("tiktok-conversions") == group
    assert RedriveFilter.from_group_id("tiktok-conversions", group) == flt


@pytest.mark.parametrize(
    "group",
    [
        "tiktok-conversions",  # the worker's own group
        "tiktok-conversions-dlq-inspect",
        "tiktok-conversions-redrive-redrive",  # a redrive group of a worker named ...-redrive
        "other-redrive",
        "tiktok-conversions-redrive--reason=Bad",
    ],
)
def test_foreign_groups_are_not_filters(group: str) -> None:
    assert RedriveFilter.from_group_id("tiktok-conversions", group) is None


def test_filter_matches() -> None:
    assert RedriveFilter().matches(record(dest=None))
    assert RedriveFilter().matches(record(reason="invalid_event", dest=None))
    # Bytes that can never succeed are redriven only when asked for by reason.
    assert not RedriveFilter().matches(record(reason="decode_error", dest=None))
    assert not RedriveFilter(destination="a").matches(record(reason="event_too_large"))
    assert RedriveFilter(reason="decode_error").matches(record(reason="decode_error", dest=None))
    assert RedriveFilter(reason="auth_error").matches(record())
    assert not RedriveFilter(reason="retries_exhausted").matches(record())
    assert RedriveFilter(destination="a").matches(record())
    assert not RedriveFilter(destination="a").matches(record(dest=None))
    assert not RedriveFilter(reason="auth_error", destination="b").matches(record())


def test_validate_filter() -> None:
    config = parse_config(
        yaml.safe_dump({"destinations": [{"name": "a", "pixel_code": "P", "access_token": "t"}]})
    )
    assert check_filter(config, "auth_error", "a") == RedriveFilter("auth_error", "a")
    with pytest.raises(ConfigError, match="--reason: unknown reason 'auth'"):
        check_filter(config, "auth", None)
    with pytest.raises(
        ConfigError, match=r"--destination: no destination named 'b' \(configured: a\)"
    ):
        check_filter(config, None, "b")


# -- the ledger ---------------------------------------------------------------------------------


def test_ledger_knows_what_matching_groups_committed_past() -> None:
    ledger = RedriveLedger.from_offsets(
        "g",
        {
            "g-redrive--reason=auth_error": {0: 10},
            "g-redrive--destination=b": {1: 5},
            "g-unrelated": {0: 100},
        },
    )
    assert set(ledger.groups) == {"g-redrive--reason=auth_error", "g-redrive--destination=b"}
    assert ledger.handled_by(record(offset=9)) == "g-redrive--reason=auth_error"
    assert ledger.handled_by(record(offset=10)) is None  # not yet reached by that group
    assert ledger.handled_by(record(offset=3, reason="retries_exhausted")) is None  # filtered
    assert ledger.handled_by(record(partition=1, offset=3)) is None  # other partition, other dest
    assert ledger.handled_by(record(partition=1, offset=4, dest="b")) == "g-redrive--destination=b"
    assert ledger.handled_by(record(offset=9), exclude="g-redrive--reason=auth_error") is None


# -- records ------------------------------------------------------------------------------------


def test_parse_record_reads_every_header() -> None:
    letter = DeadLetter(
        reason=DeadLetterReason.PERMANENT_API_ERROR,
        error="permanent_error: HTTP 200, bad",
        original_topic="segment-events",
        original_partition=3,
        original_offset=1234,
        original_timestamp_ms=1_790_000_000_000,
        destination="web-shop",
        code=40002,
        attempts=2,
        batch_index=4,
    )
    now = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
    headers = [*letter.headers(now=now), ("dlq.redrive.count", b"2"), ("other", None)]
    rec = parse_record(dead_letter(headers, partition=1, offset=7))
    assert (rec.topic, rec.partition, rec.offset) == ("dlq", 1, 7)
    assert rec.timestamp_ms == 1_790_000_000_123
    assert (rec.reason, rec.destination, rec.code, rec.attempts) == (
        "permanent_api_error",
        "web-shop",
        40002,
        2,
    )
    assert rec.error == "permanent_error: HTTP 200, bad"
    assert rec.failed_at == "2026-11-01T08:00:00.000Z"
    assert (rec.batch_index, rec.redrive_count) == (4, 2)
    assert (rec.original_topic, rec.original_partition, rec.original_offset) == (
        "segment-events",
        3,
        1234,
    )
    assert rec.original_timestamp_ms == 1_790_000_000_000
    assert rec.headers["other"] == ""


def test_parse_record_tolerates_missing_and_malformed_headers() -> None:
    rec = parse_record(
        dead_letter(
            [("dlq.attempts", b"many"), ("dlq.tiktok.code", b"\xff"), ("dlq.destination", b"")]
        )
    )
    assert (rec.reason, rec.destination, rec.code, rec.attempts, rec.redrive_count) == (
        "",
        None,
        None,
        0,
        0,
    )
    assert rec.original_topic is None
    assert rec.failed_at is None


def test_decode_headers_first_value_wins_and_accepts_dicts() -> None:
    assert decode_headers([("a", b"1"), ("a", b"2"), ("b", "x")]) == {"a": "1", "b": "x"}
    assert decode_headers({"a": b"1"}) == {"a": "1"}
    assert decode_headers(None) == {}


def test_written_back_letter_adds_the_redrive_count() -> None:
    letter = DeadLetter(
        redrive_count=3,
        reason=DeadLetterReason.RETRIES_EXHAUSTED,
        error="x",
        original_topic="t",
        original_partition=0,
        original_offset=1,
        original_timestamp_ms=None,
        destination="a",
        attempts=7,
    )
    headers = dict(letter.headers())
    assert headers["dlq.redrive.count"] == b"3"
    assert headers["dlq.attempts"] == b"7"
    assert list(dict(letter.headers()))[-1] == "dlq.redrive.count"


# -- output -------------------------------------------------------------------------------------


def stats(**kw: Any) -> RedriveStats:
    base = RedriveStats(to_read=10, read=10, redriven=6, delivered=4, failed_again=1, unmapped=1)
    return dataclasses.replace(base, **kw)


def test_summary_line() -> None:
    s = stats(skipped_filter=3, skipped_redriven=1)
    assert summary_line(s) == (
        "redrive done: 6 redriven (4 delivered, 1 failed again, 1 not mapped any more); "
        "10 read, 4 skipped (3 by filter, 1 already redriven)"
    )
    s = stats(skipped_filter=2, skipped_unconfigured={"old": 2}, redriven=8, interrupted=True)
    assert summary_line(s) == (
        "redrive interrupted: 8 redriven (4 delivered, 1 failed again, 1 not mapped any more); "
        "10 read, 4 skipped (2 by filter, 0 already redriven, 2 for unconfigured destination "
        "old); 2 unfinished: run the same command again to resume"
    )
    s = stats(skipped_reference_only=2)
    assert summary_line(s).endswith(
        "2 skipped (0 by filter, 0 already redriven, 2 reference-only (no value to send))"
    )


def test_summary_line_counts_too_old_records_only_when_there_are_some() -> None:
    s = stats(redriven=7, too_old=1)
    assert summary_line(s) == (
        "redrive done: 7 redriven (4 delivered, 1 failed again, 1 not mapped any more, "
        "1 too old); 10 read, 0 skipped (0 by filter, 0 already redriven)"
    )
    assert s.inflight == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("172800", 172800.0), ("36h", 129600.0), ("7d", 604800.0), ("90m", 5400.0),
     ("1.5h", 5400.0), ("none", None), (" NONE ", None)],
)  # fmt: skip
def test_max_age_accepts_seconds_durations_and_none(text: str, seconds: float | None) -> None:
    assert parse_max_age(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "7w", "soon", "1e9"])
def test_max_age_refuses_anything_else_in_one_line(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--max-age: expected a positive duration"):
        parse_max_age(text)


def test_progress_bar_on_a_terminal_plain_lines_otherwise() -> None:
    tty = io.StringIO()
    bar = Progress(tty, tty=True)
    bar.update(stats(read=5), force=True)
    bar.finish(stats())
    text = tty.getvalue()
    assert text.startswith("\r[############------------] 5/10 read · 4 delivered")
    assert text.endswith("\x1b[K\n")
    assert "\r[########################] 10/10 read" in text

    plain = io.StringIO()
    lines = Progress(plain, tty=False)
    lines.update(stats(read=5), force=True)
    lines.update(stats(read=6))  # throttled: within the plain-line interval
    lines.finish(stats())
    assert plain.getvalue().splitlines() == [
        "redrive: 5/10 read, 4 delivered, 1 failed again, 0 skipped, 0 in flight",
        "redrive: 10/10 read, 4 delivered, 1 failed again, 0 skipped, 0 in flight",
    ]
