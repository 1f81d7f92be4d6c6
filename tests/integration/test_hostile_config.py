"""Hostile configuration and environments at start-up: `tiktok-worker run` fails fast with one
clear line on stderr and the right exit status, or (Redis) keeps going, and never hangs.

SPEC §6: exit status 2 for a configuration error, 1 for anything else; errors are one line on
stderr, no traceback without `--debug`. SPEC §5: Redis unreachable is not an error: each pod
falls back to a local limiter and reports it in a metric. Every run is bounded by a timeout.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from devkit.harness import (
    WORKER_CMD,
    FakeTikTokProcess,
    TopicSet,
    WorkerProcess,
    committed_offsets,
    destination,
    headers_of,
    metric_value,
    produce,
    read_topic,
    wait_until,
    worker_config,
    write_config,
)
from devkit.infra.procs import free_port
from devkit.sample_events import SampleEvents, encode

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 60  # far above the worker's own 15 s preflight bound: a hang fails the test
TOKEN = "hostile-token-4b1d9e7c0a"


def run_worker(config_path: Path, *, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run `tiktok-worker run` to completion; returns (exit status, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [*WORKER_CMD, "run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    """The worker's own error lines: plain `tiktok-worker: ...` lines (errors before the config
    is loaded, or with `logging.format: console`) and, with `logging.format: json`, the
    `fatal error` log line, rendered as the plain line would read."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith("tiktok-worker:"):
            lines.append(line)
        elif (record := json_line(line)) is not None and record.get("event") == "fatal error":
            lines.append(f"tiktok-worker: error: {record['error']}")
    return lines


def json_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert TOKEN not in stderr
    return lines[0]


@pytest.fixture
def topics(kafka: Any) -> tuple[str, str]:
    topics = TopicSet.create(kafka, "hostile")
    return topics.topic, topics.dlq_topic


def base_config(server: Any, topics: tuple[str, str], **overrides: Any) -> dict[str, Any]:
    topic, dlq = topics
    return worker_config(
        bootstrap=server.bootstrap,
        topic=topic,
        dlq_topic=dlq,
        base_url="http://127.0.0.1:9",
        destinations=[destination(token=TOKEN)],
        **overrides,
    )


# -- configuration errors: exit 2, before anything connects -------------------------------------


@pytest.mark.parametrize(
    ("token", "env", "fragments"),
    [
        ("${HOSTILE_UNSET_TOKEN}", {}, ["destinations[0].access_token", "HOSTILE_UNSET_TOKEN"]),
        ("", {}, ["destinations[0].access_token", "must not be empty"]),
        (12345, {}, ["destinations[0].access_token", "expected a string"]),
        (None, {}, ["destinations[0].access_token"]),
        ("${HOSTILE_EMPTY_TOKEN}", {"HOSTILE_EMPTY_TOKEN": ""}, ["access_token"]),
    ],
    ids=["unset-env-var", "empty", "number", "null", "empty-env-var"],
)
def test_missing_or_invalid_token_is_a_config_error(
    kafka: Any, topics: tuple[str, str], tmp_path: Path, token: Any, env: dict[str, str],
    fragments: list[str]
) -> None:  # fmt: skip
    config = base_config(kafka, topics)
    config["destinations"][0]["access_token"] = token
    os.environ.pop("HOSTILE_UNSET_TOKEN", None)
    status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config), env=env)
    assert status == 2, stderr
    line = assert_one_line_error(stderr, "configuration error", *fragments)
    assert len(stderr.strip().splitlines()) == 1, stderr  # nothing else was printed
    assert line.startswith("tiktok-worker: configuration error: ")


def test_missing_token_key_is_a_config_error(
    kafka: Any, topics: tuple[str, str], tmp_path: Path
) -> None:
    config = base_config(kafka, topics)
    del config["destinations"][0]["access_token"]
    status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 2, stderr
    assert_one_line_error(stderr, "destinations[0].access_token: required")


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    status, stderr, _ = run_worker(tmp_path / "nowhere.yaml")
    assert status == 2, stderr
    assert_one_line_error(stderr, "nowhere.yaml")


@pytest.mark.parametrize(
    ("client", "fragment"),
    [
        ({"no.such.property": "1"}, "no.such.property"),
        ({"security.protocol": "bogus"}, "security.protocol"),
    ],
    ids=["unknown-property", "invalid-value"],
)
def test_librdkafka_property_refused_is_a_config_error(
    kafka: Any, topics: tuple[str, str], tmp_path: Path, client: dict[str, str], fragment: str
) -> None:
    config = base_config(kafka, topics, kafka={"client": client})
    status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 2, stderr
    line = assert_one_line_error(stderr, "configuration error: kafka.client", fragment)
    assert "cannot reach Kafka" not in line


# -- unreachable or missing infrastructure: exit 1, bounded ------------------------------------


def test_unreachable_kafka_at_start_fails_fast(
    kafka: Any, topics: tuple[str, str], tmp_path: Path
) -> None:
    closed = free_port()
    config = base_config(kafka, topics)
    config["kafka"]["bootstrap_servers"] = f"127.0.0.1:{closed}"
    status, stderr, seconds = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 1, stderr
    assert_one_line_error(stderr, "cannot reach Kafka", f"127.0.0.1:{closed}")
    assert seconds < RUN_TIMEOUT_S
    # Issue 19: the wait is announced (what, where, how long) before it can look like a hang.
    records = [r for line in stderr.splitlines() if (r := json_line(line)) is not None]
    events = [r["event"] for r in records]
    assert "waiting for Kafka" in events, stderr
    assert events.index("waiting for Kafka") < events.index("fatal error")
    waiting = records[events.index("waiting for Kafka")]
    assert waiting["bootstrap_servers"] == f"127.0.0.1:{closed}"
    assert waiting["timeout_s"] == 15.0


def test_missing_dead_letter_topic_fails_fast(
    kafka: Any, topics: tuple[str, str], tmp_path: Path
) -> None:
    missing = f"no-such-dlq-{uuid.uuid4().hex[:8]}"
    config = base_config(kafka, topics)
    config["kafka"]["dead_letter_topic"] = missing
    status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 1, stderr
    assert_one_line_error(stderr, "dead-letter topic", missing, "does not exist")
    assert missing not in kafka.topics()  # checking did not create it


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_fatal_start_up_error_follows_the_log_format(
    kafka: Any, topics: tuple[str, str], tmp_path: Path, fmt: str
) -> None:
    missing = f"no-such-dlq-{uuid.uuid4().hex[:8]}"
    config = base_config(kafka, topics)
    config["kafka"]["dead_letter_topic"] = missing
    config["logging"]["format"] = fmt
    status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 1, stderr
    plain = [line for line in stderr.splitlines() if line.startswith("tiktok-worker:")]
    fatal = [
        r for line in stderr.splitlines() if (r := json_line(line)) and r["event"] == "fatal error"
    ]
    if fmt == "json":
        # Every line the worker prints is JSON, the fatal one included (issue 19).
        assert plain == [], stderr
        assert len(fatal) == 1, stderr
        assert fatal[0]["level"] == "critical"
        assert fatal[0]["exit_status"] == 1
        assert missing in fatal[0]["error"]
    else:
        assert fatal == [], stderr
        assert len(plain) == 1, stderr
        assert missing in plain[0]


def test_http_port_in_use_fails_in_one_line(
    kafka: Any, topics: tuple[str, str], tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = base_config(kafka, topics)
        config["http"]["port"] = busy.getsockname()[1]
        status, stderr, _ = run_worker(write_config(tmp_path / "w.yaml", config))
    assert status == 1, stderr
    assert_one_line_error(stderr, str(config["http"]["port"]))


def test_unreachable_redis_at_start_falls_back_to_the_local_limiter(
    kafka: Any, topics: tuple[str, str], tmp_path: Path
) -> None:
    topic, _ = topics
    events = list(SampleEvents(seed=3, prefix=f"hr{uuid.uuid4().hex[:6]}").stream(200))
    produce(kafka.bootstrap, topic, [encode(e) for e in events])
    expected = {
        e["messageId"]
        for e in events
        if e["type"] == "page"
        or (e["type"] == "track" and e["event"] in ("Checkout Started", "Products Searched",
                                                    "Payment Info Entered", "Order Completed"))
    }  # fmt: skip
    with FakeTikTokProcess(tmp_path) as fake:
        config = base_config(kafka, topics, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        config["tiktok"]["base_url"] = fake.url
        worker = WorkerProcess(write_config(tmp_path / "w.yaml", config)).start()
        try:
            worker.wait_ready(60)
            assert wait_until(lambda: expected <= set(fake.event_ids()), 60), worker.log_tail()
            text = worker.metrics()
            assert metric_value(text, "tiktok_worker_rate_limit_fallback") == 1
            assert worker.terminate() == 0
        finally:
            worker.stop()
    assert "Traceback" not in worker.log_path.read_text()


# -- a dead-letter topic that cannot take a record: stop, never skip ----------------------------


@pytest.mark.parametrize(
    ("client", "dlq_limit"),
    [({"message.max.bytes": 1_000_000}, 4 * 1024 * 1024), ({}, 1024 * 1024)],
    ids=["producer-limit", "broker-topic-limit"],
)
def test_dead_letter_too_large_for_its_topic_is_written_reference_only(
    kafka: Any, tmp_path: Path, client: dict[str, Any], dlq_limit: int
) -> None:
    # A 1.5 MiB event is dead-lettered as event_too_large, but the dead letter is too large,
    # for the worker's own producer limit or for the dead-letter topic. Refusing it would
    # crash-loop the group on this message: the worker writes a reference-only dead letter
    # (headers and provenance, no value, dlq.value_omitted) and moves on (issue 15).
    big = {"max.message.bytes": str(4 * 1024 * 1024), "segment.bytes": str(16 * 1024 * 1024)}
    dlq_config = {**big, "max.message.bytes": str(dlq_limit)}
    topics = TopicSet.create(kafka, "refused", config=big, dlq_config=dlq_config)
    topic, dlq, group = topics.topic, topics.dlq_topic, topics.group
    suffix = topic.removeprefix("refused-")
    event = SampleEvents(seed=9, prefix=f"big{suffix}").track("Order Completed")
    # Random text: the dead-letter producer compresses, and a repeated character would
    # shrink below the topic's limit.
    event["properties"]["description"] = base64.b64encode(os.urandom(1152 * 1024)).decode()
    value = encode(event)
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap, "message.max.bytes": 8 * 1024 * 1024}
    )
    producer.produce(topic, value=value)
    assert producer.flush(30) == 0
    config = base_config(kafka, (topic, dlq), group_id=group, kafka={"client": client})
    worker = WorkerProcess(write_config(tmp_path / "w.yaml", config)).start()
    try:
        worker.wait_ready()
        assert wait_until(
            lambda: committed_offsets(kafka.bootstrap, group, topic).get(0, -1) == 1, 60
        ), worker.log_tail()
        assert worker.running()
        (letter,) = read_topic(kafka.bootstrap, dlq, idle_s=1.0)
        headers = headers_of(letter)
        assert headers["dlq.reason"] == "event_too_large"
        assert headers["dlq.value_omitted"] == str(len(value))
        assert headers["dlq.original.topic"] == topic
        assert headers["dlq.original.offset"] == "0"
        assert not letter.value()
        assert worker.terminate() == 0
    finally:
        worker.stop()
