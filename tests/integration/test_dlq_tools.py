"""`tiktok-worker dlq inspect` and `dlq redrive` as processes, on real Kafka and the fake TikTok.

Dead letters are produced with the worker's own header builder
(`worker.kafka.deadletters.DeadLetter`), or
by the worker itself (the end-to-end test), and reconciled by Segment messageId against what
the fake TikTok accepted, per pixel.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from devkit.harness import (
    WORKER_CMD,
    Stack,
    WorkerProcess,
    committed_offsets,
    destination,
    headers_of,
    produce,
    read_topic,
    wait_until,
)
from devkit.sample_events import SampleEvents, encode
from worker.core.vocabulary import DeadLetterReason
from worker.kafka.deadletters import DeadLetter
from worker.kafka.parking import PROBE_HEADER, Parked, iso

pytestmark = pytest.mark.integration

PIXEL_A = "C5PIXELAAAAAAAAAAAA1"
PIXEL_B = "C5PIXELBBBBBBBBBBBB2"
CLI_TIMEOUT_S = 60


class Env(Stack):
    """A dead-letter topic, a fake TikTok and a config with destinations shop-a and shop-b."""

    def __init__(self, kafka: Any, tmp_path: Path, *, partitions: int = 2) -> None:
        super().__init__(
            kafka, tmp_path, prefix="segment", dlq_partitions=partitions, retry_partitions=2
        )
        self.samples = SampleEvents(seed=11, prefix="m" + self.topic.removeprefix("segment-"))

    def config(self, **overrides: Any) -> dict[str, Any]:
        overrides.setdefault(
            "destinations",
            [destination("shop-a", pixel=PIXEL_A), destination("shop-b", pixel=PIXEL_B)],
        )
        return super().config(**overrides)

    def event(self) -> dict[str, Any]:
        """A Segment event both destinations map (documented preset: PlaceAnOrder)."""
        return self.samples.track("Order Completed")

    # -- fake TikTok views -------------------------------------------------------------------

    def received(self) -> Counter[tuple[str, str]]:
        """(pixel, event_id) -> times the fake accepted it."""
        return Counter((e["pixel"], e["event_id"]) for e in self.fake.events())


@pytest.fixture
def env(kafka: Any, tmp_path: Path) -> Iterator[Env]:
    environment = Env(kafka, tmp_path)
    try:
        yield environment
    finally:
        environment.stop()


def letter(
    value: bytes,
    *,
    reason: str,
    dest: str | None,
    code: int | None = None,
    attempts: int = 1,
    error: str = "retryable_error: HTTP 503, Service Unavailable",
    batch_index: int | None = None,
    failed_at: dt.datetime | None = None,
    original_offset: int = 0,
) -> tuple[bytes, list[tuple[str, Any]]]:
    headers = DeadLetter(
        reason=DeadLetterReason(reason),
        error=error,
        original_topic="segment-events",
        original_partition=0,
        original_offset=original_offset,
        original_timestamp_ms=1_790_000_000_000,
        destination=dest,
        code=code,
        attempts=attempts,
        batch_index=batch_index,
    ).headers(now=failed_at)
    return value, headers


def produce_letters(
    bootstrap: str,
    topic: str,
    letters: Sequence[tuple[bytes, list[tuple[str, Any]]]],
    *,
    partition: int | None = 0,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for value, headers in letters:
        kwargs: dict[str, Any] = {"value": value, "key": b"k", "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, **kwargs)
    assert producer.flush(30) == 0


def cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WORKER_CMD, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def redrive(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("dlq", "redrive", "--config", str(config), *extra)


_SUMMARY_FIELDS = {
    "redriven": r"(\d+) redriven",
    "delivered": r"(\d+) delivered",
    "failed_again": r"(\d+) failed again",
    "unmapped": r"(\d+) not mapped any more",
    "read": r"(\d+) read",
    "skipped": r"(\d+) skipped",
    "by_filter": r"(\d+) by filter",
    "already_redriven": r"(\d+) already redriven",
}


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The numbers of the summary line (the last stdout line), by name."""
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("redrive "), proc.stdout + proc.stderr
    result = {}
    for name, pattern in _SUMMARY_FIELDS.items():
        m = re.search(pattern, line)
        assert m is not None, f"{name} missing from {line!r}"
        result[name] = int(m.group(1))
    return result


# --------------------------------------------------------------------------- inspect


def test_inspect_counts_reasons_destinations_codes_and_samples(env: Env) -> None:
    t0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
    ev = [encode(env.event()) for _ in range(7)]
    p0 = [
        letter(ev[0], reason="retries_exhausted", dest="shop-a", failed_at=t0),
        letter(ev[1], reason="retries_exhausted", dest="shop-a", code=50000,
               failed_at=t0 + dt.timedelta(minutes=5)),
        letter(ev[2], reason="permanent_api_error", dest="shop-b", code=40002,
               error="permanent_error: HTTP 200, Invalid value for data.0.event_id: rejected.",
               failed_at=t0 + dt.timedelta(minutes=1)),
    ]  # fmt: skip
    p1 = [
        letter(ev[3], reason="permanent_api_error", dest="shop-b", code=40002,
               error="permanent_error: HTTP 200, Invalid value for data.0.event_id: rejected.",
               failed_at=t0 + dt.timedelta(hours=2)),
        letter(b"not json", reason="decode_error", dest=None, attempts=0,
               error="not valid JSON", failed_at=t0 - dt.timedelta(days=1)),
        letter(ev[5], reason="auth_error", dest="shop-a", code=40105,
               error="auth_error: HTTP 200, Access token is incorrect or has been revoked.",
               failed_at=t0 + dt.timedelta(minutes=30)),
    ]  # fmt: skip
    produce_letters(env.kafka.bootstrap, env.dlq_topic, p0, partition=0)
    produce_letters(env.kafka.bootstrap, env.dlq_topic, p1, partition=1)
    config = env.config_path()

    proc = cli("dlq", "inspect", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        out.splitlines()[0] == f"dead-letter topic {env.dlq_topic}: 6 record(s) in 2 partition(s)"
    )
    assert "oldest failed_at: 2026-10-31T08:00:00.000Z" in out
    assert "newest failed_at: 2026-11-01T10:00:00.000Z" in out
    assert "not yet redriven: 6 (handled by an earlier redrive: 0)" in out

    def table(title: str) -> dict[str, int]:
        block = out.split(f"{title}:\n", 1)[1].split("\n\n", 1)[0]
        return {k: int(v) for k, v in (line.split() for line in block.splitlines())}

    assert table("by reason") == {
        "retries_exhausted": 2,
        "permanent_api_error": 2,
        "decode_error": 1,
        "auth_error": 1,
    }
    assert table("by destination") == {"shop-a": 3, "shop-b": 2, "(none)": 1}
    assert table("by TikTok code") == {"(none)": 2, "40002": 2, "50000": 1, "40105": 1}
    samples = out.split("sample errors:\n", 1)[1]
    assert (
        "  permanent_api_error:\n    2 x permanent_error: HTTP 200, Invalid value for "
        "data.0.event_id: rejected." in samples
    )
    assert "  decode_error:\n    1 x not valid JSON" in samples
    assert "Access token is incorrect" in samples

    # Issue 19: the same report as one JSON object, for scripts.
    as_json = cli("dlq", "inspect", "--config", str(config), "--json")
    assert as_json.returncode == 0, as_json.stderr
    (line,) = as_json.stdout.splitlines()
    report = json.loads(line)
    assert report["topic"] == env.dlq_topic
    assert (report["records"], report["partitions"]) == (6, 2)
    assert report["oldest_failed_at"] == "2026-10-31T08:00:00.000Z"
    assert report["newest_failed_at"] == "2026-11-01T10:00:00.000Z"
    assert (report["awaiting_redrive"], report["redriven_before"]) == (6, 0)
    assert report["written_back"] == 0
    assert report["by_reason"] == table("by reason")
    assert list(report["by_reason"]) == list(table("by reason"))  # same order
    assert report["by_destination"] == {"shop-a": 3, "shop-b": 2, "(none)": 1}
    assert report["by_tiktok_code"] == {"(none)": 2, "40002": 2, "50000": 1, "40105": 1}
    assert report["sample_errors"]["permanent_api_error"] == [
        {
            "error": "permanent_error: HTTP 200, Invalid value for data.0.event_id: rejected.",
            "count": 2,
        }
    ]
    assert report["sample_errors"]["decode_error"] == [{"error": "not valid JSON", "count": 1}]

    # Inspect never commits: the topic reads the same a second time and no group has offsets.
    again = cli("dlq", "inspect", "--config", str(config))
    assert again.stdout == out
    offsets = committed_offsets(env.kafka.bootstrap, f"{env.group}-dlq-inspect", env.dlq_topic)
    assert all(o < 0 for o in offsets.values()), offsets


def test_inspect_empty_topic_returns_at_once(env: Env) -> None:
    proc = cli("dlq", "inspect", "--config", str(env.config_path()), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"dead-letter topic {env.dlq_topic}: 0 record(s) in 2 partition(s)\n\n"
        f"retry topic {env.retry_topic}: 0 parked record(s) in 2 partition(s), "
        f"not yet handled by group {env.group}.retry\n"
    )
    report = json.loads(cli("dlq", "inspect", "--config", str(env.config_path()), "--json").stdout)
    assert (report["records"], report["oldest_failed_at"], report["by_reason"]) == (0, None, {})
    assert (report["parked"]["records"], report["parked"]["exists"]) == (0, True)


def parked_record(
    value: bytes, dest: str, *, first: float, due: float, reason: str = "retryable"
) -> tuple[bytes, list[tuple[str, Any]]]:
    parked = Parked(
        destination=dest,
        subscription="Order Completed",
        reason=reason,
        failure="retryable",
        error="retryable_error: HTTP 503, unavailable",
        code=None,
        attempts=4,
        parks=1,
        first_failed_at=first,
        parked_at=first + 30,
        due_at=due,
        original_topic="segment-events",
        original_partition=0,
        original_offset=7,
        original_timestamp_ms=1_790_000_000_000,
    )
    return value, list(parked.headers())


def test_inspect_shows_what_is_parked(env: Env) -> None:
    # A running worker would deliver these when due; here nobody consumes the retry topic.
    now = time.time()
    value = encode(env.event())
    records = [
        parked_record(value, "shop-a", first=now - 600, due=now - 1),
        parked_record(value, "shop-a", first=now - 60, due=now + 120, reason="circuit_open"),
        parked_record(value, "shop-b", first=now - 30, due=now + 7200),
        (b"", [(PROBE_HEADER, b"1")]),  # the start-up check's write: not a parked event
    ]
    produce_letters(env.kafka.bootstrap, env.retry_topic, records, partition=1)
    proc = cli("dlq", "inspect", "--config", str(env.config_path()))
    assert proc.returncode == 0, proc.stderr
    parked = proc.stdout.split("\n\n", 1)[1]
    assert parked.splitlines()[0] == (
        f"retry topic {env.retry_topic}: 3 parked record(s) in 2 partition(s), "
        f"not yet handled by group {env.group}.retry"
    )
    assert f"oldest first failure: {iso(now - 600)}" in parked
    assert "parked by destination:\n  shop-a  2\n  shop-b  1\n" in parked
    assert "parked by reason:\n  retryable     2\n  circuit_open  1\n" in parked
    assert parked.endswith(
        "parked by due time:\n  due now        1\n  within 10 min  1\n  later          1\n"
    )
    report = json.loads(cli("dlq", "inspect", "--config", str(env.config_path()), "--json").stdout)
    assert report["parked"]["by_destination"] == {"shop-a": 2, "shop-b": 1}
    assert report["parked"]["by_due"] == {"due now": 1, "within 10 min": 1, "later": 1}
    assert report["parked"]["oldest_first_failure"] == iso(now - 600)


def test_missing_topic_and_bad_arguments_are_one_line_errors(env: Env) -> None:
    config = env.config_path()
    for args, status, fragment in [
        (("--reason", "nope"), 2, "--reason: unknown reason 'nope'"),
        (("--destination", "nope"), 2, "--destination: no destination named 'nope'"),
        (("--max", "0"), 2, "--max: must be >= 1"),
    ]:
        proc = redrive(config, *args)
        assert proc.returncode == status, proc.stderr
        assert fragment in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    missing = env.config_path(kafka={"dead_letter_topic": "no-such-topic-" + env.group})
    for command in ("inspect", "redrive"):
        proc = cli("dlq", command, "--config", str(missing))
        assert proc.returncode == 1
        assert "dead-letter topic 'no-such-topic-" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- redrive


def test_redrive_sends_only_to_the_recorded_destination_with_filters(env: Env) -> None:
    a1, a2, b1, b2, n1, gone = (env.event() for _ in range(6))
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [
            letter(encode(a1), reason="retries_exhausted", dest="shop-a"),
            letter(encode(b1), reason="retries_exhausted", dest="shop-b"),
            letter(encode(b2), reason="auth_error", dest="shop-b", code=40105),
            letter(encode(n1), reason="invalid_event", dest=None, attempts=0),
            letter(encode(gone), reason="retries_exhausted", dest="old-shop"),
            letter(encode(a2), reason="retries_exhausted", dest="shop-a"),
            letter(b"not json", reason="decode_error", dest=None, attempts=0),
        ],
    )
    config = env.config_path()
    named = {"a1": a1, "a2": a2, "b1": b1, "b2": b2, "n1": n1, "gone": gone}
    ids = {name: e["messageId"] for name, e in named.items()}

    first = redrive(config, "--reason", "auth_error")
    assert first.returncode == 0, first.stderr
    assert summary(first)["redriven"] == 1
    assert summary(first)["by_filter"] == 6
    assert env.received() == Counter({(PIXEL_B, ids["b2"]): 1})
    assert "redriving reason=auth_error from" in first.stderr

    second = redrive(config, "--destination", "shop-a")
    assert second.returncode == 0, second.stderr
    assert summary(second)["redriven"] == 2
    assert env.received() == Counter(
        {(PIXEL_B, ids["b2"]): 1, (PIXEL_A, ids["a1"]): 1, (PIXEL_A, ids["a2"]): 1}
    )

    # Unfiltered: what the filtered runs handled is skipped, the rest goes where it belongs;
    # the record without a destination goes to every destination that maps it.
    third = redrive(config)
    assert third.returncode == 0, third.stderr
    s = summary(third)
    assert (s["redriven"], s["delivered"], s["already_redriven"]) == (2, 2, 3)
    assert s["by_filter"] == 1  # the decode_error record: only with --reason decode_error
    assert "1 for unconfigured destination old-shop" in third.stdout
    assert "destination 'old-shop'" in third.stderr
    assert env.received() == Counter(
        {
            (PIXEL_B, ids["b2"]): 1,
            (PIXEL_A, ids["a1"]): 1,
            (PIXEL_A, ids["a2"]): 1,
            (PIXEL_B, ids["b1"]): 1,
            (PIXEL_A, ids["n1"]): 1,
            (PIXEL_B, ids["n1"]): 1,
        }
    )

    # Everything is handled now: another run reads nothing and sends nothing.
    fourth = redrive(config)
    assert fourth.returncode == 0, fourth.stderr
    assert summary(fourth)["read"] == 0
    assert sum(env.received().values()) == 6
    inspect = cli("dlq", "inspect", "--config", str(config))
    assert "not yet redriven: 1 (handled by an earlier redrive: 6)" in inspect.stdout

    # Asked for by name, the undecodable record is tried, fails again and is written back.
    fifth = redrive(config, "--reason", "decode_error")
    assert fifth.returncode == 1
    assert (summary(fifth)["redriven"], summary(fifth)["failed_again"]) == (1, 1)
    # Two partitions: find the written-back record by its header, not by position.
    records = read_topic(env.kafka.bootstrap, env.dlq_topic, idle_s=0.5)
    (back,) = [r for r in records if "dlq.redrive.count" in headers_of(r)]
    assert back.value() == b"not json"
    assert headers_of(back)["dlq.redrive.count"] == "1"
    assert headers_of(back)["dlq.destination"] == ""
    assert sum(env.received().values()) == 6


def test_redrive_max_then_resume_sends_each_record_once(env: Env) -> None:
    events = [env.event() for _ in range(5)]
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [letter(encode(e), reason="retries_exhausted", dest="shop-a") for e in events],
    )
    config = env.config_path()
    runs = [redrive(config, "--max", "2"), redrive(config, "--max", "2"), redrive(config)]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    assert [summary(r)["delivered"] for r in runs] == [2, 2, 1]
    assert env.received() == Counter({(PIXEL_A, e["messageId"]): 1 for e in events})
    assert committed_offsets(env.kafka.bootstrap, f"{env.group}-redrive", env.dlq_topic)[0] == 5


def test_redrive_skips_reference_only_letters(env: Env) -> None:
    kept, big = env.event(), env.event()
    _value, headers = letter(encode(big), reason="event_too_large", dest=None, attempts=0)
    reference_only = (b"", [*headers, ("dlq.value_omitted", b"2000000")])
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [reference_only, letter(encode(kept), reason="retries_exhausted", dest="shop-a")],
    )
    proc = redrive(env.config_path(), "--reason", "retries_exhausted")
    assert proc.returncode == 0, proc.stderr
    assert "1 by filter" in proc.stdout  # the filter comes first
    proc = redrive(env.config_path(), "--reason", "event_too_large")
    assert proc.returncode == 0, proc.stderr
    assert "1 reference-only (no value to send)" in proc.stdout
    assert env.received() == Counter({(PIXEL_A, kept["messageId"]): 1})


def test_redrive_sigterm_finishes_in_flight_and_resumes_without_resending(env: Env) -> None:
    events = [env.event() for _ in range(40)]
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [letter(encode(e), reason="retries_exhausted", dest="shop-b") for e in events],
    )
    # One event per request, one request at a time, 0.1 s each: about 4 s for all of them.
    config = env.config_path(tiktok={"max_batch_events": 1, "max_concurrent_requests": 1})
    env.fake.fault(kind="slow", delay_s=0.1)
    proc = subprocess.Popen(
        [*WORKER_CMD, "dlq", "redrive", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: len(env.fake.events()) >= 5, 30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "redrive interrupted" in out
    first = env.received()
    assert 5 <= sum(first.values()) < 40
    committed = committed_offsets(env.kafka.bootstrap, f"{env.group}-redrive", env.dlq_topic)[0]
    assert committed == sum(first.values())  # in-flight work finished and was committed

    env.fake.clear_faults()
    rest = redrive(config)
    assert rest.returncode == 0, rest.stderr
    assert summary(rest)["delivered"] == 40 - committed
    assert env.received() == Counter({(PIXEL_B, e["messageId"]): 1 for e in events})


def test_redrive_killed_resumes_from_committed_progress(env: Env) -> None:
    events = [env.event() for _ in range(40)]
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [letter(encode(e), reason="retries_exhausted", dest="shop-a") for e in events],
    )
    config = env.config_path(tiktok={"max_batch_events": 1, "max_concurrent_requests": 1})
    env.fake.fault(kind="slow", delay_s=0.1)
    proc = subprocess.Popen(
        [*WORKER_CMD, "dlq", "redrive", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    group = f"{env.group}-redrive"
    try:
        # Wait for a commit (commit_interval_s 0.5) to land, then kill -9 mid-way.
        assert wait_until(
            lambda: committed_offsets(env.kafka.bootstrap, group, env.dlq_topic)[0] >= 5, 30, 0.2
        )
    finally:
        proc.kill()
        proc.wait()
    committed = committed_offsets(env.kafka.bootstrap, group, env.dlq_topic)[0]
    assert 5 <= committed < 40
    env.fake.clear_faults()
    rest = redrive(config)
    assert rest.returncode == 0, rest.stderr
    received = env.received()
    # Every record arrived; those below the committed offset were never sent again.
    assert set(received) == {(PIXEL_A, e["messageId"]) for e in events}
    assert all(received[(PIXEL_A, e["messageId"])] == 1 for e in events[:committed])
    assert summary(rest)["redriven"] == 40 - committed


def test_failing_again_goes_back_to_the_dlq_with_incremented_headers(env: Env) -> None:
    event = env.event()
    value = encode(event)
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [
            letter(
                value,
                reason="retries_exhausted",
                dest="shop-a",
                attempts=3,
                batch_index=2,
                original_offset=41,
            )
        ],
    )
    config = env.config_path()
    env.fake.fault(kind="reject_event_ids", event_ids=[event["messageId"]])
    failed = redrive(config)
    assert failed.returncode == 1, failed.stderr
    assert summary(failed)["failed_again"] == 1
    assert env.received() == Counter()

    records = read_topic(env.kafka.bootstrap, env.dlq_topic, idle_s=1.0)
    assert len(records) == 2
    # The topic has two partitions: find the written-back record by its header, not position.
    (back,) = [r for r in records if "dlq.redrive.count" in headers_of(r)]
    assert back.value() == value
    assert back.key() == b"k"
    headers = headers_of(back)
    assert headers["dlq.reason"] == "permanent_api_error", headers
    assert headers["dlq.tiktok.code"] == "40002"
    assert headers["dlq.destination"] == "shop-a"
    assert headers["dlq.attempts"] == "4"
    assert headers["dlq.redrive.count"] == "1"
    assert headers["dlq.batch_index"] == "2"
    assert headers["dlq.original.topic"] == "segment-events"
    assert headers["dlq.original.offset"] == "41"
    assert headers["dlq.original.timestamp"] == "1790000000000"
    assert "Invalid value for data.0.event_id" in headers["dlq.error"]

    # Once TikTok takes it, the written-back record is delivered and the original is not
    # sent again (the first run committed past it).
    env.fake.clear_faults()
    ok = redrive(config)
    assert ok.returncode == 0, ok.stderr
    assert (summary(ok)["read"], summary(ok)["delivered"]) == (1, 1)
    assert env.received() == Counter({(PIXEL_A, event["messageId"]): 1})
    inspect = cli("dlq", "inspect", "--config", str(config))
    assert "written back by a redrive (failed again): 1" in inspect.stdout


def test_worker_dead_letters_then_redrive_never_duplicates_the_accepting_destination(
    env: Env,
) -> None:
    """End to end: shop-b's token is refused while the worker runs, shop-a accepts. The
    redrive then delivers to shop-b only; shop-a never gets an event twice."""
    events = [env.event() for _ in range(10)]
    env.fake.fault(kind="auth", pixel=PIXEL_B, code=40105)
    worker = WorkerProcess(env.config_path()).start()
    try:
        worker.wait_ready()
        produce(env.kafka.bootstrap, env.topic, [encode(e) for e in events])
        assert wait_until(
            lambda: len(read_topic(env.kafka.bootstrap, env.dlq_topic, idle_s=0.3)) >= 10, 60, 0.5
        ), worker.log_tail()
        assert wait_until(lambda: len(env.fake.events()) >= 10, 30)
    finally:
        worker.stop()
    letters = read_topic(env.kafka.bootstrap, env.dlq_topic, idle_s=0.5)
    assert {headers_of(m)["dlq.destination"] for m in letters} == {"shop-b"}
    assert {headers_of(m)["dlq.reason"] for m in letters} == {"auth_error"}
    assert env.received() == Counter({(PIXEL_A, e["messageId"]): 1 for e in events})

    env.fake.clear_faults()
    proc = redrive(env.config_path(), "--reason", "auth_error")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["delivered"] == 10
    expected = Counter({(PIXEL_A, e["messageId"]): 1 for e in events})
    expected.update({(PIXEL_B, e["messageId"]): 1 for e in events})
    assert env.received() == expected
    assert env.fake.stats()["duplicate_events"] == 0


def test_progress_is_plain_lines_without_a_terminal(env: Env) -> None:
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [letter(encode(env.event()), reason="retries_exhausted", dest="shop-a")],
    )
    proc = redrive(env.config_path())
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "\x1b" not in proc.stderr
    assert re.search(r"^redrive: 1/1 read, 1 delivered, 0 failed again", proc.stderr, re.M)
    assert proc.stdout.count("\n") == 1  # stdout holds only the summary line


def test_redrive_skips_events_older_than_max_age_unless_max_age_allows_them(env: Env) -> None:
    old_samples = SampleEvents(
        seed=12, prefix="old", base=dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    )
    old = [old_samples.track("Order Completed") for _ in range(2)]
    fresh = [env.event() for _ in range(2)]
    letters = [letter(encode(e), reason="retries_exhausted", dest="shop-a") for e in old + fresh]
    produce_letters(env.kafka.bootstrap, env.dlq_topic, letters)
    # Default max age (48 h): the 3-day-old events are not sent, and are handled.
    plain = redrive(env.config_path(), "--reason", "retries_exhausted", "--max", "4")
    assert plain.returncode == 0, plain.stderr
    assert summary(plain)["delivered"] == 2
    assert "2 too old" in plain.stdout
    assert "2 dead letter(s) hold events older than 48 h" in plain.stderr
    assert plain.stderr.count("hold events older than") == 1  # the note is written once
    assert env.received() == Counter({(PIXEL_A, e["messageId"]): 1 for e in fresh})
    # Another filter (so another progress group) with --max-age 4d: the old ones go out.
    # (The ledger sees them handled by the first group, so write them again first.)
    produce_letters(
        env.kafka.bootstrap,
        env.dlq_topic,
        [letter(encode(e), reason="retries_exhausted", dest="shop-b") for e in old],
    )
    allowed = redrive(env.config_path(), "--destination", "shop-b", "--max-age", "4d")
    assert allowed.returncode == 0, allowed.stderr
    assert summary(allowed)["delivered"] == 2
    assert "too old" not in allowed.stdout
    assert env.received()[(PIXEL_B, old[0]["messageId"])] == 1
    bad = redrive(env.config_path(), "--max-age", "soon")
    assert bad.returncode == 2
    assert "--max-age: expected a positive duration" in bad.stderr
