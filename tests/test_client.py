"""The TikTok Events API client: classification, backoff, Retry-After, and real HTTP against
the in-process fake server and small purpose-built aiohttp apps."""

from __future__ import annotations

import email.utils
import random
import socket
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from aiohttp import web

from devkit.fake_tiktok.server import FakeTikTok, FaultSpec
from tests.forward_proxy import ForwardProxy
from worker.core.redaction import sanitise_message
from worker.delivery.client import (
    ENDPOINT_PATH,
    Outcome,
    SendResult,
    TikTokClient,
    backoff_delay,
    classify,
    classify_answer,
    parse_retry_after,
)

TOKEN = "tok-SECRET-0123456789abcdef"
PIXEL = "COQDA8RC77U2TMR44LI0"


def body_for(*event_ids: str, pixel: str = PIXEL) -> bytes:
    return msgspec.json.encode(
        {
            "event_source": "web",
            "event_source_id": pixel,
            "data": [
                {"event": "AddToCart", "event_time": 1704721970, "event_id": eid, "page": {}}
                for eid in event_ids
            ],
        }
    )


# -- classify -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (200, 0, Outcome.SUCCESS),
        (200, 20001, Outcome.SUCCESS),
        (200, 40100, Outcome.THROTTLED),
        (200, 40132, Outcome.THROTTLED),
        (200, 61000, Outcome.THROTTLED),
        (429, None, Outcome.THROTTLED),
        (429, 0, Outcome.THROTTLED),
        (503, 40100, Outcome.THROTTLED),
        (200, 40001, Outcome.AUTH),
        (200, 40102, Outcome.AUTH),
        (200, 40104, Outcome.AUTH),
        (200, 40105, Outcome.AUTH),
        (401, None, Outcome.AUTH),
        (403, 40002, Outcome.AUTH),
        (200, 40000, Outcome.PERMANENT),
        (200, 40002, Outcome.PERMANENT),
        (200, 40061, Outcome.PERMANENT),
        (200, 40062, Outcome.PERMANENT),
        (200, 40063, Outcome.PERMANENT),
        (200, 12345, Outcome.PERMANENT),
        (400, None, Outcome.PERMANENT),
        (404, None, Outcome.PERMANENT),
        (413, None, Outcome.PERMANENT),
        (400, 0, Outcome.PERMANENT),
        (400, 40100, Outcome.THROTTLED),
        (400, 50000, Outcome.RETRYABLE),
        (408, None, Outcome.RETRYABLE),
        (425, None, Outcome.RETRYABLE),
        (200, 40700, Outcome.RETRYABLE),
        (200, 50000, Outcome.RETRYABLE),
        (200, 50002, Outcome.RETRYABLE),
        (200, 51012, Outcome.RETRYABLE),
        (200, 52204, Outcome.RETRYABLE),
        (200, 60001, Outcome.RETRYABLE),
        (500, None, Outcome.RETRYABLE),
        (500, 0, Outcome.RETRYABLE),
        (502, None, Outcome.RETRYABLE),
        (503, 40002, Outcome.RETRYABLE),
        (504, None, Outcome.RETRYABLE),
        (200, None, Outcome.RETRYABLE),
        (204, None, Outcome.RETRYABLE),
        (302, None, Outcome.PERMANENT),
        (301, None, Outcome.PERMANENT),
        (200, 70001, Outcome.PERMANENT),
        (200, 51999, Outcome.RETRYABLE),
    ],
)
def test_classify_table(status: int, code: int | None, expected: Outcome) -> None:
    assert classify(status, code) is expected


@pytest.mark.parametrize(
    ("status", "code", "message", "expected"),
    [
        (200, 40105, "Access token is incorrect or has been revoked.", (Outcome.AUTH, True)),
        (200, 40001, "No permission to operate pixel code: X.", (Outcome.AUTH, True)),
        (401, None, "", (Outcome.AUTH, True)),
        (
            200,
            40002,
            "Invalid value for event_source_id: not a valid string.",
            (Outcome.PERMANENT, True),
        ),
        (200, 40002, "Invalid value for event_source: bad.", (Outcome.PERMANENT, True)),
        (200, 40002, "Invalid value for data.3.event_id: rejected.", (Outcome.PERMANENT, False)),
        (
            200,
            40002,
            "Batch.0.properties.contents.0.content_id: Not a valid string",
            (Outcome.PERMANENT, False),
        ),
        (200, 40002, "Invalid value for event_id: not a valid string.", (Outcome.PERMANENT, False)),
        (404, None, "", (Outcome.PERMANENT, True)),
        (405, None, "", (Outcome.PERMANENT, True)),
        (308, None, "", (Outcome.PERMANENT, True)),
        (400, None, "", (Outcome.PERMANENT, False)),
        (503, None, "", (Outcome.RETRYABLE, False)),
    ],
)
def test_request_level_answers(
    status: int, code: int | None, message: str, expected: tuple[Outcome, bool]
) -> None:
    assert classify_answer(status, code, message) == expected


def test_code_table_gives_a_reason_for_every_documented_code() -> None:
    from worker.delivery.codes import CODE_TABLE, TikTokCode

    assert set(CODE_TABLE) == set(TikTokCode)
    assert all(decision.reason for decision in CODE_TABLE.values())


@pytest.mark.parametrize(
    ("message", "index"),
    [
        ("Invalid value for data[3].event_id", 3),
        ("Invalid value for data.12.event_time: not an integer", 12),
        ("Batch.7.properties.contents.0.content_id: Not a valid string", 7),
        ("Invalid value for event_id: not a valid string.", None),
        ("Invalid value for event_source_id: not a valid string.", None),
    ],
)
def test_event_index_from_error_text(message: str, index: int | None) -> None:
    from worker.delivery.codes import event_index

    assert event_index(message) == index


@pytest.mark.parametrize(
    ("outcome", "retryable"),
    [
        (Outcome.SUCCESS, False),
        (Outcome.THROTTLED, True),
        (Outcome.RETRYABLE, True),
        (Outcome.TIMEOUT, True),
        (Outcome.CONNECTION, True),
        (Outcome.PERMANENT, False),
        (Outcome.AUTH, False),
    ],
)
def test_outcome_retryable(outcome: Outcome, retryable: bool) -> None:
    assert outcome.retryable is retryable


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_extremes_of_jitter() -> None:
    assert backoff_delay(1, initial_s=0.5, max_s=60, rand=lambda: 0.0) == 0.0
    top = backoff_delay(1, initial_s=0.5, max_s=60, rand=lambda: 0.999999)
    assert 0.49 < top < 0.5
    assert backoff_delay(4, initial_s=0.5, max_s=60, rand=lambda: 0.5) == pytest.approx(2.0)


def test_backoff_is_capped() -> None:
    for attempt in (10, 20, 100, 10_000):
        assert backoff_delay(attempt, initial_s=0.5, max_s=60, rand=lambda: 0.999999) < 60


def test_backoff_retry_after_is_a_floor_capped_at_max_backoff() -> None:
    assert backoff_delay(1, initial_s=0.5, max_s=60, retry_after_s=3, rand=lambda: 0.1) == 3
    # A proxy's Retry-After: 7200 must not become a two-hour wait (issue 14, defect 5).
    assert backoff_delay(1, initial_s=0.5, max_s=2, retry_after_s=90, rand=lambda: 1) == 2
    assert backoff_delay(1, initial_s=0.5, max_s=60, retry_after_s=7200, rand=lambda: 0) == 60
    # A larger jittered delay wins over a small Retry-After.
    assert backoff_delay(8, initial_s=1, max_s=60, retry_after_s=1, rand=lambda: 0.5) == 30


def test_backoff_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, initial_s=0.5, max_s=60)
    with pytest.raises(ValueError, match="initial_s"):
        backoff_delay(1, initial_s=-1, max_s=60)


def test_backoff_full_jitter_distribution() -> None:
    rng = random.Random(1234)
    cap = 0.5 * 2**3  # attempt 4
    samples = [backoff_delay(4, initial_s=0.5, max_s=60, rand=rng.random) for _ in range(4000)]
    assert all(0 <= s < cap for s in samples)
    # Uniform on [0, cap): mean cap/2, every quarter of the range populated evenly.
    assert statistics.fmean(samples) == pytest.approx(cap / 2, rel=0.05)
    quarters = [sum(1 for s in samples if q * cap / 4 <= s < (q + 1) * cap / 4) for q in range(4)]
    assert all(850 < n < 1150 for n in quarters), quarters


# -- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0.25", 0.25),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    future = email.utils.formatdate(now + 120, usegmt=True)
    past = email.utils.formatdate(now - 120, usegmt=True)
    assert parse_retry_after(future, now=now) == pytest.approx(120.0)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 5) == 5.0


# -- message sanitising -----------------------------------------------------------------------


def test_sanitise_message_masks_secret_pii_and_truncates() -> None:
    text = f"token {TOKEN} for Alice@Example.com at +1 (555) 555-5555 from 10.0.0.1\nnext"
    clean = sanitise_message(text, secret=TOKEN)
    assert TOKEN not in clean
    assert "Example.com" not in clean
    assert "555" not in clean
    assert "10.0.0.1" in clean
    assert "\n" not in clean
    assert len(sanitise_message("x" * 1000)) == 200


# -- the client against the fake server ------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeTikTok]:
    server = FakeTikTok(tokens=[TOKEN], timeout_delay_s=5.0)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def client(fake: FakeTikTok) -> AsyncIterator[TikTokClient]:
    async with TikTokClient(base_url=fake.url, timeout_s=5.0, max_connections=4) as c:
        yield c


def assert_no_secret(result: SendResult) -> None:
    assert TOKEN not in repr(result)
    assert TOKEN not in result.message


async def test_send_success_is_recorded(fake: FakeTikTok, client: TikTokClient) -> None:
    result = await client.send(body_for("e1", "e2"), access_token=TOKEN)
    assert result.outcome is Outcome.SUCCESS
    assert (result.http_status, result.code, result.message) == (200, 0, "OK")
    assert result.request_id is not None
    assert len(result.request_id) == 34
    assert result.retry_after_s is None
    assert result.latency_s > 0
    assert fake.accepted_event_ids() == {"e1", "e2"}
    assert_no_secret(result)


@pytest.mark.parametrize(
    ("spec", "outcome", "status", "code", "retry_after"),
    [
        (FaultSpec(kind="http_500"), Outcome.RETRYABLE, 500, 50000, None),
        (FaultSpec(kind="http_502"), Outcome.RETRYABLE, 502, None, None),
        (FaultSpec(kind="http_503", retry_after_s=2), Outcome.RETRYABLE, 503, None, 2.0),
        (FaultSpec(kind="http_429", retry_after_s=1.5), Outcome.THROTTLED, 429, None, 1.5),
        (FaultSpec(kind="throttle"), Outcome.THROTTLED, 200, 40100, None),
        (FaultSpec(kind="throttle", retry_after_s=3), Outcome.THROTTLED, 200, 40100, 3.0),
        (FaultSpec(kind="auth"), Outcome.AUTH, 200, 40105, None),
        (FaultSpec(kind="auth", code=40001), Outcome.AUTH, 200, 40001, None),
        (FaultSpec(kind="auth", code=40102), Outcome.AUTH, 200, 40102, None),
        (FaultSpec(kind="code", code=50002), Outcome.RETRYABLE, 200, 50002, None),
        (FaultSpec(kind="code", code=40002), Outcome.PERMANENT, 200, 40002, None),
        (FaultSpec(kind="code", code=20001), Outcome.SUCCESS, 200, 20001, None),
        (FaultSpec(kind="disconnect"), Outcome.CONNECTION, None, None, None),
        (
            FaultSpec(kind="reject_event_ids", event_ids=["e1"]),
            Outcome.PERMANENT,
            200,
            40002,
            None,
        ),
    ],
)
async def test_send_classifies_each_fault(
    fake: FakeTikTok,
    client: TikTokClient,
    spec: FaultSpec,
    outcome: Outcome,
    status: int | None,
    code: int | None,
    retry_after: float | None,
) -> None:
    fake.add_fault(spec)
    result = await client.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is outcome
    assert (result.http_status, result.code, result.retry_after_s) == (status, code, retry_after)
    assert result.message
    assert_no_secret(result)
    assert fake.accepted_event_ids() == set()  # an injected answer replaces processing


async def test_send_timeout(fake: FakeTikTok) -> None:
    fake.add_fault(FaultSpec(kind="timeout", delay_s=5))
    async with TikTokClient(base_url=fake.url, timeout_s=0.2, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.TIMEOUT
    assert result.http_status is None
    assert result.code is None
    assert "timed out" in result.message
    assert_no_secret(result)


async def test_send_slow_still_succeeds(fake: FakeTikTok, client: TikTokClient) -> None:
    fake.add_fault(FaultSpec(kind="slow", delay_s=0.05, count=1))
    result = await client.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.SUCCESS
    assert fake.stats()["faults_applied"] == {}  # slow is a delay, not an answer


async def test_send_wrong_token_is_auth(fake: FakeTikTok, client: TikTokClient) -> None:
    result = await client.send(body_for("e1"), access_token="not-the-token")
    assert (result.outcome, result.code) == (Outcome.AUTH, 40105)
    assert "not-the-token" not in repr(result)


@pytest.mark.parametrize("token", ["", "bad\ntoken", "bad\rtoken"])
async def test_send_unusable_token_is_auth_without_a_request(
    fake: FakeTikTok, client: TikTokClient, token: str
) -> None:
    result = await client.send(body_for("e1"), access_token=token)
    assert result.outcome is Outcome.AUTH
    assert result.http_status is None
    assert fake.stats()["requests_total"] == 0


async def test_send_invalid_body_is_permanent_and_names_the_field(client: TikTokClient) -> None:
    body = msgspec.json.encode(
        {
            "event_source": "web",
            "event_source_id": PIXEL,
            "data": [{"event": "Search", "event_time": 1704721970, "event_id": 7, "page": {}}],
        }
    )
    result = await client.send(body, access_token=TOKEN)
    assert (result.outcome, result.code) == (Outcome.PERMANENT, 40002)
    assert "data.0.event_id" in result.message


async def test_send_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The socket is closed: nothing listens on `port`.
    async with TikTokClient(
        base_url=f"http://127.0.0.1:{port}", timeout_s=2, max_connections=1
    ) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.CONNECTION
    assert result.http_status is None
    assert_no_secret(result)


# -- the client against purpose-built servers ------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post(ENDPOINT_PATH, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/"  # trailing slash: the client must not double it

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_body_is_posted_byte_for_byte_with_headers(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    seen: dict[str, object] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["path"] = request.path
        seen["body"] = await request.read()
        seen["headers"] = dict(request.headers)
        return web.json_response({"code": 0, "message": "OK", "request_id": "r1", "data": {}})

    url = await serve(handler)
    body = b'{"event_source": "web",  "data": [ ]}'  # odd spacing must survive untouched
    async with TikTokClient(
        base_url=url, timeout_s=2, max_connections=1, user_agent="test-agent/1"
    ) as c:
        result = await c.send(body, access_token=TOKEN)
    assert result.outcome is Outcome.SUCCESS
    assert result.request_id == "r1"
    assert seen["path"] == ENDPOINT_PATH
    assert seen["body"] == body
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["Access-Token"] == TOKEN
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "test-agent/1"


async def test_non_json_200_is_retryable_and_body_not_echoed(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"<html>echo {TOKEN} alice@example.com</html>")

    url = await serve(handler)
    async with TikTokClient(base_url=url, timeout_s=2, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert (result.outcome, result.http_status, result.code) == (Outcome.RETRYABLE, 200, None)
    assert "alice" not in result.message
    assert_no_secret(result)


async def test_server_message_echoing_the_token_is_masked(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(request: web.Request) -> web.Response:
        token = request.headers["Access-Token"]
        message = f"Access token {token} is incorrect for bob@example.com"
        return web.json_response({"code": 40105, "message": message}, headers={"X-Tt-Logid": "L"})

    url = await serve(handler)
    async with TikTokClient(base_url=url, timeout_s=2, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.AUTH
    assert result.request_id == "L"  # falls back to the log-id header
    assert "bob@" not in result.message
    assert "incorrect" in result.message
    assert_no_secret(result)


async def test_redirect_is_not_followed(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    url = await serve(handler)
    async with TikTokClient(base_url=url, timeout_s=2, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    # A redirect means base_url is wrong: request-level, never retried for an hour.
    assert (result.outcome, result.http_status, result.request_level) == (
        Outcome.PERMANENT,
        302,
        True,
    )


async def test_body_too_large_for_the_fake_is_permanent() -> None:
    async with FakeTikTok(max_body_bytes=200) as server:
        async with TikTokClient(base_url=server.url, timeout_s=2, max_connections=1) as c:
            result = await c.send(body_for(*[f"e{i}" for i in range(20)]), access_token="t")
        assert (result.outcome, result.http_status) == (Outcome.PERMANENT, 413)
        assert server.stats()["requests_by_code"] == {"http_413": 1}


# -- lifecycle --------------------------------------------------------------------------------


async def test_close_is_idempotent_and_send_after_close_raises(fake: FakeTikTok) -> None:
    c = TikTokClient(base_url=fake.url, timeout_s=2, max_connections=1)
    assert (await c.send(body_for("e1"), access_token=TOKEN)).outcome is Outcome.SUCCESS
    await c.close()
    await c.close()
    assert c.closed
    with pytest.raises(RuntimeError, match="closed"):
        await c.send(body_for("e2"), access_token=TOKEN)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="base_url"):
        TikTokClient(base_url="business-api.tiktok.com", timeout_s=1, max_connections=1)
    with pytest.raises(ValueError, match="timeout_s"):
        TikTokClient(base_url="https://x", timeout_s=0, max_connections=1)
    with pytest.raises(ValueError, match="max_connections"):
        TikTokClient(base_url="https://x", timeout_s=1, max_connections=0)
    c = TikTokClient(base_url="https://business-api.tiktok.com/", timeout_s=1, max_connections=1)
    assert c.url == "https://business-api.tiktok.com/open_api/v1.3/event/track/"


# -- proxies (issue 19): HTTP(S)_PROXY and NO_PROXY, through a real forward proxy ------------


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ForwardProxy]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    p = await ForwardProxy().start()
    yield p
    await p.close()


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"code": 0, "message": "OK", "request_id": "via", "data": {}})


async def test_http_proxy_variable_is_honoured(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = (await serve(_ok)).replace("127.0.0.1", "localhost")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with TikTokClient(base_url=url, timeout_s=5, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.SUCCESS, result
    assert result.request_id == "via"
    assert proxy.seen == [("POST", url.rstrip("/") + ENDPOINT_PATH)]


async def test_no_proxy_variable_bypasses_the_proxy(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = (await serve(_ok)).replace("127.0.0.1", "localhost")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,localhost")
    async with TikTokClient(base_url=url, timeout_s=5, max_connections=1) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert result.outcome is Outcome.SUCCESS, result
    assert proxy.seen == []


async def test_https_proxy_variable_is_used_for_https(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `.invalid` never resolves: only the proxy's CONNECT can be what the client did.
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with TikTokClient(
        base_url="https://business-api.tiktok.invalid", timeout_s=5, max_connections=1
    ) as c:
        result = await c.send(body_for("e1"), access_token=TOKEN)
    assert proxy.seen == [("CONNECT", "business-api.tiktok.invalid:443")]
    assert result.outcome is Outcome.CONNECTION  # the test proxy refuses to tunnel
    assert_no_secret(result)
