"""Logs: structlog JSON lines (console on request) for the worker's own loggers and for every
library's (aiohttp, asyncio, redis, librdkafka, Python warnings), one summary line per Events API
request with a batch id, and never an access token or raw PII, even at debug level.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from confluent_kafka import Producer

from devkit.fake_tiktok.server import FaultSpec
from devkit.infra.procs import free_port
from devkit.sample_events import SampleEvents
from tests.test_pipeline import Rig, messages, order_events
from tests.test_pipeline import rig_factory as rig_factory  # the fixture
from worker.core.redaction import clear_secrets, register_secrets
from worker.observability.logs import configure_logging, get_logger, kafka_logger

Capture = Callable[..., io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """`capture(level=, fmt=)` configures logging into a StringIO; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    saved_access = access.level

    def configure(level: str = "info", fmt: str = "json") -> io.StringIO:
        stream = io.StringIO()
        configure_logging(level=level, fmt=fmt, stream=stream)
        return stream

    yield configure
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    access.setLevel(saved_access)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    clear_secrets()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line as JSON (fails on a line that is not)."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_worker_and_library_loggers_write_the_same_json_lines(capture: Capture) -> None:
    out = capture()
    get_logger("worker").info("worker started", topics=["a"], http_port=9464)
    logging.getLogger("aiohttp.client").warning("connection pool is full, %s", "waiting")
    logging.getLogger("redis.connection").error("connection reset")
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    got = lines(out)
    assert [(g["logger"], g["level"], g["event"]) for g in got] == [
        ("worker", "info", "worker started"),
        ("aiohttp.client", "warning", "connection pool is full, waiting"),
        ("redis.connection", "error", "connection reset"),
        ("asyncio", "error", "Task exception was never retrieved"),
    ]
    assert got[0]["topics"] == ["a"]
    assert got[0]["http_port"] == 9464
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", g["timestamp"]) for g in got)
    assert "ValueError: bad value" in got[3]["exception"]


def test_level_applies_to_every_logger(capture: Capture) -> None:
    out = capture(level="info")
    get_logger("worker").debug("hidden")
    logging.getLogger("aiohttp.client").debug("hidden too")
    get_logger("worker").info("shown")
    assert [g["event"] for g in lines(out)] == ["shown"]

    out = capture(level="debug")
    get_logger("worker").debug("now shown")
    logging.getLogger("aiohttp.client").debug("library debug shown")
    assert [g["event"] for g in lines(out)] == ["now shown", "library debug shown"]


def test_access_log_is_quiet(capture: Capture) -> None:
    out = capture(level="debug")
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /metrics HTTP/1.1" 200')
    assert out.getvalue() == ""


def test_console_format_is_for_humans(capture: Capture) -> None:
    out = capture(fmt="console")
    get_logger("worker").info("worker started", http_port=9464)
    logging.getLogger("redis").warning("redis is slow")
    text = out.getvalue()
    assert "worker started" in text
    assert "http_port=9464" in text
    assert "redis is slow" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_python_warnings_are_logged(capture: Capture) -> None:
    out = capture()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    got = lines(out)
    assert [g["logger"] for g in got] == ["py.warnings"]
    assert "deprecated thing" in got[0]["event"]


def test_librdkafka_logs_come_out_as_json(capture: Capture) -> None:
    out = capture()
    port = free_port()  # nothing listens there
    producer = Producer(
        {"bootstrap.servers": f"127.0.0.1:{port}", "logger": kafka_logger(), "client.id": "t"}
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "Connection refused" not in out.getvalue():
        producer.poll(0.2)
    got = [g for g in lines(out) if g["logger"] == "kafka"]
    assert got, out.getvalue()
    assert any("Connection refused" in g["event"] and g["level"] == "error" for g in got), got


def test_secret_keys_registered_secrets_and_emails_are_masked(capture: Capture) -> None:
    out = capture(level="debug")
    secret = "tt-access-token-0123456789"
    register_secrets([secret, None, "short"])  # too short to register: would mask words
    log = get_logger("worker")
    log.info("config", access_token=secret, kafka={"sasl.password": "pw-123456", "acks": "all"})
    log.info(f"calling with {secret}", headers=[f"Access-Token: {secret}"])
    logging.getLogger("aiohttp.client").debug("sent header Access-Token: %s", secret)
    try:
        raise RuntimeError(f"request failed for {secret}")
    except RuntimeError:
        log.exception("send failed")
    log.warning("bad row", error="invalid email Jane.Doe+x@Example.co.uk here", note="short")
    text = out.getvalue()
    assert secret not in text
    assert "pw-123456" not in text
    assert "Jane.Doe" not in text
    got = lines(out)
    assert got[0]["access_token"] == "***"
    assert got[0]["kafka"] == {"sasl.password": "***", "acks": "all"}
    assert got[1]["event"] == "calling with ***"
    assert got[1]["headers"] == ["Access-Token: ***"]
    assert got[2]["event"] == "sent header Access-Token: ***"
    assert "RuntimeError: request failed for ***" in got[3]["exception"]
    assert got[4]["error"] == "invalid email <email> here"
    assert got[4]["note"] == "short"


async def test_one_summary_line_per_request_with_a_batch_id(
    capture: Capture, rig_factory: Any
) -> None:
    out = capture()
    rig: Rig = await rig_factory(max_batch_events=4)
    events = order_events(8)
    bad = events[3]["messageId"]
    rig.fake.add_fault(FaultSpec(kind="reject_event_ids", event_ids=[bad]))
    rig.pipeline.on_messages(messages(events[:4]))
    rig.pipeline.on_messages(messages(events[4:], start=4))
    await rig.settle()
    got = lines(out)
    summaries = [g for g in got if g["event"] == "tiktok request"]
    assert len(summaries) == rig.fake.stats()["requests_total"] == 1 + 2
    for line in summaries:
        assert line["destination"] == "web-shop"
        assert line["level"] == "info"
        assert isinstance(line["events"], int)
        assert isinstance(line["attempt"], int)
        assert isinstance(line["latency_ms"], float)
        assert {"outcome", "http_status", "code", "request_id", "batch_id"} <= set(line)
        assert ("message" in line) == (line["outcome"] != "success")
    by_batch: dict[int, list[tuple[int, str, int | None]]] = {}
    for line in summaries:
        by_batch.setdefault(line["batch_id"], []).append(
            (line["events"], line["outcome"], line["code"])
        )
    assert sorted(by_batch.values(), key=len) == [
        [(4, "success", 0)],
        # The rejected batch: TikTok's text names data.3, the other three are resent.
        [(4, "permanent_error", 40002), (3, "success", 0)],
    ]
    failed_batch = next(b for b, v in by_batch.items() if len(v) > 1)
    dead = [g for g in got if g["event"] == "dead-lettering events"]
    assert len(dead) == 1
    assert dead[0]["batch_id"] == failed_batch
    assert dead[0]["reason"] == "permanent_api_error"


async def test_no_token_or_raw_pii_in_logs_at_debug_level(
    capture: Capture, rig_factory: Any
) -> None:
    out = capture(level="debug")
    asyncio.get_running_loop().set_debug(True)
    rig: Rig = await rig_factory(deadline_s=0.5)
    gen = SampleEvents(seed=21)
    events = [gen.track("Order Completed") for _ in range(6)] + [gen.page() for _ in range(3)]
    # TikTok's message echoes PII and the token back: it must not reach the logs either.
    echo = f"invalid email {events[0]['context']['traits']['email']} with token tok-1"
    rig.fake.add_fault(FaultSpec(kind="code", code=40002, message=echo, count=1))
    rig.fake.add_fault(FaultSpec(kind="auth", count=1))
    rig.fake.add_fault(FaultSpec(kind="http_500", count=2))
    rig.pipeline.on_messages(messages(events))
    rig.pipeline.on_messages(messages([gen.track("Checkout Started")], start=len(events)))
    await rig.settle()
    asyncio.get_running_loop().set_debug(False)
    text = out.getvalue()
    got = lines(out)  # every line is JSON
    echoed = [g for g in got if g["event"] == "tiktok request" and g["code"] == 40002]
    assert echoed  # the failed request is logged with TikTok's message, masked
    assert echoed[0]["message"] == "invalid email <email> with token ***"
    assert any(g["event"] == "dead-lettering events" and g["code"] == 40105 for g in got)
    lowered = text.lower()
    assert "tok-1" not in lowered
    for event in events:
        traits = event["context"]["traits"]
        assert traits["email"].lower() not in lowered
        assert traits["phone"] not in text
        assert traits["address"]["postalCode"] not in text
        assert event["context"]["ip"] not in text
    assert "lovelace" not in lowered
    assert not re.search(r"\buser-\d+\b|\banon-\d+\b", text)
