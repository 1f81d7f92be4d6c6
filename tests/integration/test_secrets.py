"""Secrets and PII never leave the worker except hashed, and only in request bodies.

SPEC §3: no raw email, phone, external id, name or zip ever leaves the process, and none is
written to logs or dead-letter headers. SPEC §7: logs never hold a token. The whole pipeline
runs (real Kafka, Redis, the fake TikTok behind a capturing proxy written here, the worker at
debug log level) on events carrying known values, and every output is scanned:

- outgoing request bodies: the hashed forms are there, no raw value and no token;
- outgoing request headers: the token only in `Access-Token`;
- the worker's log (debug level), `/metrics`, `/healthz`, `/readyz`, dead-letter headers,
  Redis keys, `check-config` output: no raw value and no token at all.

Dead-letter VALUES are the original messages byte for byte (SPEC §4), so raw PII there is
expected and not checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, web
from confluent_kafka import KafkaException

from devkit.harness import (
    PIXEL,
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
from devkit.sample_events import recent_base
from worker.delivery.client import ENDPOINT_PATH
from worker.mapping.hashing import hash_email, hash_external_id, hash_name, hash_phone

pytestmark = pytest.mark.integration

TOKEN = "TT-SECRET-TOKEN-5f2c9a7e1d3b4c"
REVOKED_TOKEN = "TT-REVOKED-TOKEN-88aa77bb66cc"
EMAIL = "  Jane.Secret+leak@Example.org "
PHONE = "+1 (415) 555-0199"
FIRST = "Zebulonia"
LAST = "Quixotefield"
ZIP = "QZ-77431-XJ"
EXTERNAL_ID = "ext-user-7d3f2a9c"

# Any of these, in any letter case, is a leak outside request bodies (and in bodies too).
RAW = {
    "email": EMAIL.strip(),
    "email local part": "jane.secret",
    "phone": PHONE,
    "phone E.164": "+14155550199",
    "phone digits": "4155550199",
    "first name": FIRST,
    "last name": LAST,
    "zip": ZIP,
    "external id": EXTERNAL_ID,
}
SECRETS = {"token": TOKEN, "revoked token": REVOKED_TOKEN}


def leaks(text: str, needles: dict[str, str]) -> list[str]:
    low = text.lower()
    return [name for name, value in needles.items() if value.lower() in low]


class CaptureProxy:
    """A tiny HTTP proxy in front of the fake TikTok: records each request's headers and body
    (the fake never gives bodies back), forwards it and relays the answer."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.records: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    def start(self) -> CaptureProxy:
        self._thread.start()
        assert self._started.wait(10), "capture proxy did not start"
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=30))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(ENDPOINT_PATH, self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        with self._lock:
            self.records.append((headers, body))
        assert self._session is not None
        forward = {
            k: v for k, v in headers.items() if k.lower() in ("access-token", "content-type")
        }
        async with self._session.post(
            self.upstream + ENDPOINT_PATH, data=body, headers=forward
        ) as resp:
            answer = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
            return web.Response(
                status=resp.status, body=answer, headers=out, content_type=resp.content_type
            )

    def captured(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self.records)

    def stop(self) -> None:
        async def close() -> None:
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        if self._started.is_set():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def pii_event(kind: str, mid: str, **extra: Any) -> dict[str, Any]:
    # The snake_case keys are the ones Segment's TikTok mapping reads; the camelCase ones
    # (Segment's spec traits) are not mapped, and must not leak either.
    traits = {
        "email": EMAIL,
        "phone": PHONE,
        "first_name": FIRST,
        "last_name": LAST,
        "firstName": FIRST,
        "lastName": LAST,
        "address": {"postal_code": ZIP, "postalCode": ZIP, "city": "Springfield"},
    }
    event: dict[str, Any] = {
        "type": kind,
        "messageId": mid,
        "timestamp": recent_base().isoformat().replace("+00:00", "Z"),
        "userId": EXTERNAL_ID,
        "context": {
            "traits": traits,
            "page": {"url": "https://shop.example.com/checkout?ttclid=E.C.P.123"},
            "ip": "203.0.113.7",
        },
        "properties": {"email": EMAIL, "currency": "USD", "value": 12.5},
    }
    event.update(extra)
    return event


def test_no_token_or_raw_pii_leaves_the_worker_except_hashed_in_bodies(
    kafka: Any, redis: Any, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSet.create(kafka, "pii", 2)
    topic, dlq_topic, group = topics.topic, topics.dlq_topic, topics.group

    delivered = [f"pii-ok-{suffix}-{i}" for i in range(6)]
    rejected = f"pii-rejected-{suffix}"
    values = [json.dumps(pii_event("track", mid, event="Order Completed")).encode()
              for mid in delivered[:4]]  # fmt: skip
    values += [json.dumps(pii_event("page", mid)).encode() for mid in delivered[4:]]
    values += [
        # permanent_api_error: TikTok refuses it
        json.dumps(pii_event("track", rejected, event="Order Completed")).encode(),
        # invalid_event: PII where a number belongs
        json.dumps(
            pii_event(
                "track",
                f"pii-bad-value-{suffix}",
                event="Order Completed",
                properties={"value": EMAIL, "currency": PHONE},
            )
        ).encode(),
        # invalid_event: PII as the Segment type
        json.dumps(pii_event(EMAIL, f"pii-bad-type-{suffix}")).encode(),
        # decode_error: truncated JSON full of PII
        json.dumps(pii_event("track", f"pii-trunc-{suffix}", event="Order Completed")).encode()[
            :-40
        ],
        # skipped: PII as the event name (no subscription matches it)
        json.dumps(pii_event("track", f"pii-name-{suffix}", event=EMAIL)).encode(),
    ]
    produce(kafka.bootstrap, topic, values)

    fake = FakeTikTokProcess(tmp_path, args=("--token", TOKEN)).start()
    proxy = CaptureProxy(fake.url).start()
    worker: WorkerProcess | None = None
    try:
        fake.fault(kind="reject_event_ids", event_ids=[rejected])
        config = worker_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq_topic=dlq_topic,
            base_url=proxy.url,
            group_id=group,
            redis_url=redis.url,
            destinations=[
                destination("web-shop", token=TOKEN),
                destination("revoked-shop", pixel="C5PIXEL0000000000002", token=REVOKED_TOKEN),
            ],
            # A short deadline: the revoked token's events are parked, then dead-lettered
            # (auth_error) within the test.
            tiktok={"retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "deadline_s": 3}},
        )
        config["logging"] = {"level": "debug", "format": "json"}
        path = write_config(tmp_path / "worker.yaml", config)
        worker = WorkerProcess(path).start()
        worker.wait_ready()

        def finished() -> bool:
            try:
                done = committed_offsets(kafka.bootstrap, group, topic)
            except KafkaException:  # e.g. the group coordinator is still being chosen
                return False
            return sum(max(o, 0) for o in done.values()) == len(values)

        assert wait_until(finished, 60, 0.5), worker.log_tail()
        assert set(delivered) <= set(fake.event_ids())
        auth = {"reason": "auth_error", "destination": "revoked-shop"}
        assert wait_until(
            lambda: metric_value(worker.metrics(), "tiktok_worker_dead_letters_total", auth) > 0,
            60,
            0.5,
        ), worker.log_tail()
        port = worker.http_port
        surfaces = {
            "/metrics": worker.metrics(),
            **{
                p: urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=5).read().decode()
                for p in ("/healthz", "/readyz")
            },
        }
        assert worker.terminate() == 0
        surfaces["worker log (debug)"] = worker.log_path.read_text()
    finally:
        if worker is not None:
            worker.stop()
        proxy.stop()
        fake.stop()

    # The log really is at debug level and covers the whole run.
    assert '"level": "debug"' in surfaces["worker log (debug)"]
    assert "worker stopped" in surfaces["worker log (debug)"]

    # Dead letters: the reasons this run provokes, and clean headers.
    dead = read_topic(kafka.bootstrap, dlq_topic, idle_s=1.0)
    reasons = {headers_of(m)["dlq.reason"] for m in dead}
    assert {"permanent_api_error", "invalid_event", "decode_error", "auth_error"} <= reasons
    for i, msg in enumerate(dead):
        surfaces[f"dead-letter headers #{i}"] = json.dumps(headers_of(msg))
    # (Values are the original messages: the PII really went through the pipeline.)
    assert all(EMAIL.strip().encode() in (m.value() or b"") for m in dead)
    # Parked records (the revoked token's events waited there): clean headers too.
    parked = [
        m
        for m in read_topic(kafka.bootstrap, topics.retry_topic, idle_s=1.0)
        if "retry.destination" in headers_of(m)
    ]
    assert parked
    for i, msg in enumerate(parked):
        surfaces[f"parked-record headers #{i}"] = json.dumps(headers_of(msg))

    # Redis: rate-limit keys name the app by a digest, never by the token.
    surfaces["redis keys"] = "\n".join(k.decode() for k in redis.client().keys("*"))

    # check-config prints the effective config with secrets masked.
    shown = subprocess.run(
        [*WORKER_CMD, "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "revoked-shop" in shown.stdout
    surfaces["check-config"] = shown.stdout + shown.stderr

    found = {name: leaks(text, {**RAW, **SECRETS}) for name, text in surfaces.items()}
    assert {name: hit for name, hit in found.items() if hit} == {}

    # Request bodies carry only hashes; headers carry the token only as Access-Token.
    captured = proxy.captured()
    assert len(captured) >= 3
    hashes = {
        "email": hash_email(EMAIL),
        "phone": hash_phone(PHONE),
        "external id": hash_external_id(EXTERNAL_ID),
        "first name": hash_name(FIRST),
        "last name": hash_name(LAST),
        "zip": hash_name(ZIP),
    }
    # The forms documented by TikTok: SHA-256 of the trimmed, lower-cased email, and of E.164.
    assert hashes["email"] == hashlib.sha256(b"jane.secret+leak@example.org").hexdigest()
    assert hashes["phone"] == hashlib.sha256(b"+14155550199").hexdigest()
    bodies = b"\n".join(body for _, body in captured).decode()
    assert leaks(bodies, {**RAW, **SECRETS}) == [], bodies[:3000]
    assert [name for name, digest in hashes.items() if digest not in bodies] == []
    tokens_sent = set()
    for headers, _ in captured:
        others = {k: v for k, v in headers.items() if k.lower() != "access-token"}
        assert leaks(json.dumps(others), {**RAW, **SECRETS}) == []
        tokens_sent.add(headers.get("Access-Token"))
    assert tokens_sent == {TOKEN, REVOKED_TOKEN}
    # Sanity: the bodies went to the pixels configured, through this proxy.
    assert PIXEL in bodies
