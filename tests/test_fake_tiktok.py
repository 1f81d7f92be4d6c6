"""The fake TikTok server: validation like TikTok, recording, fault injection, control API, CLI.

HTTP goes through a plain aiohttp session so that the fake is tested independently of
`worker.delivery.client`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from devkit.fake_tiktok.server import FakeSpecError, FakeTikTok, FaultSpec, _QpsLimiter
from devkit.fake_tiktok.validate import ValidationPolicy, validate
from worker.delivery.client import ENDPOINT_PATH

TOKEN = "test-token"
PIXEL = "COQDA8RC77U2TMR44LI0"
H = hashlib.sha256(b"someone@example.com").hexdigest()

# docs/tiktok-events-api.md §2.1, the minimal valid web example (Segment's test capture).
DOCS_EXAMPLE: dict[str, Any] = {
    "event_source": "web",
    "event_source_id": "COQDA8RC77U2TMR44LI0",
    "partner_name": "Segment",
    "test_event_code": "TEST04030",
    "data": [
        {
            "event": "AddToCart",
            "event_time": 1704721970,
            "event_id": "corey123",
            "user": {
                "email": ["eb9869a32b532840dd6aa714f7a872d21d6f650fc5aa933d9feefc64708969c7"],
                "phone": ["910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"],
                "external_id": ["481f202262e9c5ccc48d24e60798fadaa5f6ff1f8369f7ab927c04c3aa682a7f"],
                "ttclid": "12345",
                "ip": "0.0.0.0",
                "user_agent": "Mozilla/5.0 ...",
                "locale": "en-US",
            },
            "properties": {
                "contents": [
                    {
                        "price": 100,
                        "quantity": 2,
                        "content_category": "Air Force One (Size S)",
                        "content_id": "abc123",
                        "content_name": "pname1",
                        "brand": "Brand X",
                    }
                ],
                "content_type": "product",
                "currency": "USD",
                "value": 100,
                "query": "shoes",
            },
            "page": {"url": "https://segment.com/", "referrer": "https://google.com/"},
            "limited_data_use": False,
        }
    ],
}


def request_body(*event_ids: str, pixel: str = PIXEL, event: str = "AddToCart") -> bytes:
    return msgspec.json.encode(
        {
            "event_source": "web",
            "event_source_id": pixel,
            "data": [
                {"event": event, "event_time": 1704721970, "event_id": eid, "page": {}}
                for eid in event_ids
            ],
        }
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def fake() -> AsyncIterator[FakeTikTok]:
    server = FakeTikTok(tokens=[TOKEN], timeout_delay_s=5.0, seed=7)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


async def post_track(
    http: aiohttp.ClientSession, fake: FakeTikTok, body: bytes, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Access-Token"] = token
    async with http.post(fake.url + ENDPOINT_PATH, data=body, headers=headers) as resp:
        raw = await resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"text": raw.decode(errors="replace")}
        return resp.status, payload


async def control(
    http: aiohttp.ClientSession, fake: FakeTikTok, method: str, path: str, payload: Any = None
) -> tuple[int, Any]:
    async with http.request(method, fake.url + path, json=payload) as resp:
        return resp.status, await resp.json()


# -- validation ------------------------------------------------------------------------------


async def test_docs_example_is_accepted_and_recorded(
    http: aiohttp.ClientSession, fake: FakeTikTok
) -> None:
    status, payload = await post_track(http, fake, msgspec.json.encode(DOCS_EXAMPLE))
    assert status == 200
    assert payload["code"] == 0
    assert payload["message"] == "OK"
    assert payload["data"] == {}
    assert len(payload["request_id"]) == 34
    [event] = fake.events
    assert (event.event_id, event.event, event.pixel, event.test_event_code) == (
        "corey123",
        "AddToCart",
        PIXEL,
        "TEST04030",
    )
    assert event.duplicate is False
    assert event.received_at > 1_600_000_000


def _mutated(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    body = copy.deepcopy(DOCS_EXAMPLE)
    mutate(body)
    return msgspec.json.encode(body)


def _event(body: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = body["data"][0]
    return event


INVALID_CASES: list[tuple[str, Callable[[dict[str, Any]], None], int, str]] = [
    ("no event_source_id", lambda b: b.pop("event_source_id"), 40002, "event_source_id"),
    ("int event_source_id", lambda b: b.update(event_source_id=123), 40002, "event_source_id"),
    ("empty event_source_id", lambda b: b.update(event_source_id=""), 40002, "event_source_id"),
    ("no event_source", lambda b: b.pop("event_source"), 40002, "event_source"),
    ("bad event_source", lambda b: b.update(event_source="mobile"), 40002, "event_source"),
    ("no data", lambda b: b.pop("data"), 40002, "data"),
    ("data not a list", lambda b: b.update(data={}), 40002, "data"),
    ("empty data", lambda b: b.update(data=[]), 40002, "data"),
    ("1001 events", lambda b: b.update(data=b["data"] * 1001), 40061, "1000"),
    ("event not an object", lambda b: b.update(data=[1]), 40002, "data.0"),
    ("no event name", lambda b: _event(b).pop("event"), 40002, "data.0.event"),
    ("empty event name", lambda b: _event(b).update(event=""), 40002, "data.0.event"),
    ("no event_time", lambda b: _event(b).pop("event_time"), 40002, "data.0.event_time"),
    ("string event_time", lambda b: _event(b).update(event_time="1704721970"), 40002, "event_time"),
    ("float event_time", lambda b: _event(b).update(event_time=1704721970.5), 40002, "event_time"),
    ("ms event_time", lambda b: _event(b).update(event_time=1704721970000), 40002, "event_time"),
    ("int event_id", lambda b: _event(b).update(event_id=5), 40002, "data.0.event_id"),
    (
        "numeric content_id",
        lambda b: _event(b)["properties"]["contents"][0].update(content_id=123),
        40002,
        "data.0.properties.contents.0.content_id",
    ),
    (
        "unsupported currency",
        lambda b: _event(b)["properties"].update(currency="XYZ"),
        40002,
        "data.0.properties.currency",
    ),
    (
        "string value",
        lambda b: _event(b)["properties"].update(value="100"),
        40002,
        "data.0.properties.value",
    ),
    (
        "bad content_type",
        lambda b: _event(b)["properties"].update(content_type="sku"),
        40002,
        "properties.content_type",
    ),
    (
        "raw email",
        lambda b: _event(b)["user"].update(email="someone@example.com"),
        40062,
        "data.0.user.email",
    ),
    (
        "raw phone in a list",
        lambda b: _event(b)["user"].update(phone=[H, "+15555555555"]),
        40062,
        "data.0.user.phone",
    ),
    (
        "raw external_id",
        lambda b: _event(b)["user"].update(external_id="user_123"),
        40062,
        "user.external_id",
    ),
    (
        "short hex first_name",
        lambda b: _event(b)["user"].update(first_name="abc123"),
        40062,
        "user.first_name",
    ),
    ("raw zip", lambda b: _event(b)["user"].update(zip_code="94107"), 40062, "user.zip_code"),
    ("int ip", lambda b: _event(b)["user"].update(ip=1), 40002, "data.0.user.ip"),
    ("no page on web", lambda b: _event(b).pop("page"), 40002, "data.0.page"),
    ("page url not a string", lambda b: _event(b).update(page={"url": 1}), 40002, "page.url"),
    (
        "string limited_data_use",
        lambda b: _event(b).update(limited_data_use="no"),
        40002,
        "limited_data_use",
    ),
    (
        "int test_event_code",
        lambda b: b.update(test_event_code=4030),
        40002,
        "test_event_code",
    ),
    (
        "custom event on offline",
        lambda b: b.update(event_source="offline") or _event(b).update(event="MyThing"),
        40002,
        "data.0.event",
    ),
    (
        "crm without lead_id",
        lambda b: b.update(event_source="crm") or _event(b).update(event="Qualified"),
        40002,
        "lead.lead_id",
    ),
    (
        "second event invalid",
        lambda b: b.update(data=[b["data"][0], {**b["data"][0], "event_id": None, "page": None}]),
        40002,
        "data.1.page",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "code", "field"),
    [pytest.param(m, c, f, id=name) for name, m, c, f in INVALID_CASES],
)
async def test_invalid_bodies_are_rejected_whole(
    http: aiohttp.ClientSession,
    fake: FakeTikTok,
    mutate: Callable[[dict[str, Any]], None],
    code: int,
    field: str,
) -> None:
    status, payload = await post_track(http, fake, _mutated(mutate))
    assert status == 200
    assert payload["code"] == code
    assert field in payload["message"]
    assert fake.events == []
    stats = fake.stats()
    assert stats["accepted_events_total"] == 0
    assert stats["rejected_requests"] == 1


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b"", b'{"event_source": "web"'],
    ids=["text", "array", "empty", "truncated"],
)
async def test_non_object_bodies_are_param_errors(
    http: aiohttp.ClientSession, fake: FakeTikTok, body: bytes
) -> None:
    status, payload = await post_track(http, fake, body)
    assert (status, payload["code"]) == (200, 40002)


def _as_app_event(body: dict[str, Any]) -> None:
    body["event_source"] = "app"
    event = _event(body)
    del event["page"]
    event.update(event="Purchase", app={"app_id": "com.example.app"})


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b.update(unknown_top=1), id="unknown top-level key"),
        pytest.param(lambda b: _event(b).update(context={"x": 1}), id="unknown event key"),
        pytest.param(lambda b: _event(b)["user"].update(email=H.upper()), id="uppercase hex"),
        pytest.param(lambda b: _event(b)["user"].update(first_name=""), id="empty hashed field"),
        pytest.param(lambda b: _event(b)["user"].update(city="sanfrancisco"), id="plain city"),
        pytest.param(lambda b: b.pop("test_event_code"), id="no test_event_code"),
        pytest.param(lambda b: _event(b).pop("event_id"), id="no event_id"),
        pytest.param(lambda b: _event(b).update(event="MyCustomEvent"), id="custom web event"),
        pytest.param(lambda b: _event(b).pop("user"), id="no user"),
        pytest.param(lambda b: _event(b)["properties"].update(value=12.34), id="decimal value"),
        pytest.param(lambda b: b.update(data=b["data"] * 1000), id="exactly 1000 events"),
        pytest.param(_as_app_event, id="app"),
    ],
)
async def test_valid_variants_are_accepted(
    http: aiohttp.ClientSession, fake: FakeTikTok, mutate: Callable[[dict[str, Any]], None]
) -> None:
    body = _mutated(mutate)
    status, payload = await post_track(http, fake, body)
    assert (status, payload["code"]) == (200, 0), payload
    assert fake.stats()["accepted_events_total"] == len(json.loads(body)["data"])


def test_event_time_window_is_optional_policy() -> None:
    body = msgspec.json.encode(DOCS_EXAMPLE)
    now = 1704721970 + 40 * 86400
    assert validate(body, now=now)[1] is None
    policy = ValidationPolicy(max_event_age_s=28 * 86400, max_event_future_s=300)
    rejection = validate(body, now=now, policy=policy)[1]
    assert rejection is not None
    assert "too old" in rejection.message
    rejection = validate(body, now=1704721970 - 3600, policy=policy)[1]
    assert rejection is not None
    assert "future" in rejection.message


# -- tokens ------------------------------------------------------------------------------------


async def test_missing_and_wrong_tokens(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    body = request_body("e1")
    assert (await post_track(http, fake, body, token=None))[1]["code"] == 40104
    assert (await post_track(http, fake, body, token=""))[1]["code"] == 40104
    status, payload = await post_track(http, fake, body, token="other")
    assert (status, payload["code"]) == (200, 40105)
    assert "incorrect or has been revoked" in payload["message"]
    assert fake.events == []


async def test_any_token_accepted_by_default_and_pixel_permissions(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeTikTok(token_pixels={"limited": ["PIXA"]}) as server:
        assert (await post_track(http, server, request_body("e1"), token="anything"))[1][
            "code"
        ] == 0
        assert (await post_track(http, server, request_body("e2", pixel="PIXA"), "limited"))[1][
            "code"
        ] == 0
        _, payload = await post_track(http, server, request_body("e3", pixel="PIXB"), "limited")
        assert payload["code"] == 40001
        assert "PIXB" in payload["message"]
        assert server.accepted_event_ids() == {"e1", "e2"}


# -- recording ---------------------------------------------------------------------------------


async def test_duplicates_and_stats(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    await post_track(http, fake, request_body("e1", "e2"))
    await post_track(http, fake, request_body("e2", "e3", event="Search"))
    await post_track(http, fake, request_body("e2"))  # same pixel+event+id as the first
    await post_track(http, fake, request_body("e9"), token="wrong")
    stats = fake.stats()
    assert stats["requests_total"] == 4
    assert stats["requests_by_code"] == {"0": 3, "40105": 1}
    assert stats["requests_by_status"] == {"200": 4}
    assert stats["accepted_requests"] == 3
    assert stats["rejected_requests"] == 1
    assert stats["accepted_events_total"] == 5
    assert stats["accepted_events_by_name"] == {"AddToCart": 3, "Search": 2}
    assert stats["duplicate_events"] == 1  # e2/Search is a different dedup key
    assert stats["unique_events"] == 4
    assert stats["rejected_events_total"] == 1
    assert [e.duplicate for e in fake.events] == [False, False, False, False, True]


async def test_recording_is_capped_but_counted(http: aiohttp.ClientSession) -> None:
    async with FakeTikTok(max_recorded_events=3, max_recorded_requests=2) as server:
        await post_track(http, server, request_body("a", "b"))
        await post_track(http, server, request_body("c", "d", "e"))
        await post_track(http, server, request_body("f"))
        stats = server.stats()
        assert stats["accepted_events_total"] == 6
        assert stats["recorded_events"] == 3
        assert stats["unrecorded_events"] == 3
        assert [e.event_id for e in server.events] == ["a", "b", "c"]
        assert [r.events for r in server.state.requests] == [3, 1]  # the most recent two


# -- faults and the control API ------------------------------------------------------------


async def test_fault_count_then_normal(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    status, payload = await control(
        http, fake, "POST", "/_fake/faults", {"kind": "http_500", "count": 2}
    )
    assert status == 200
    assert payload["ids"] == [1]
    codes = [(await post_track(http, fake, request_body(f"e{i}")))[0] for i in range(3)]
    assert codes == [500, 500, 200]
    assert fake.accepted_event_ids() == {"e2"}
    assert fake.stats()["faults_applied"] == {"http_500": 2}
    assert (await control(http, fake, "GET", "/_fake/faults"))[1] == []


async def test_fault_list_queue_and_delete(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    specs = [{"kind": "throttle", "count": 1, "retry_after_s": 2}, {"kind": "http_503"}]
    status, payload = await control(http, fake, "POST", "/_fake/faults", specs)
    assert (status, payload["ids"]) == (200, [1, 2])
    async with http.post(
        fake.url + ENDPOINT_PATH, data=request_body("e1"), headers={"Access-Token": TOKEN}
    ) as resp:
        assert resp.headers["Retry-After"] == "2"
        assert (await resp.json())["code"] == 40100
    assert (await post_track(http, fake, request_body("e1")))[0] == 503
    assert (await post_track(http, fake, request_body("e1")))[0] == 503  # no count: stays
    listed = (await control(http, fake, "GET", "/_fake/faults"))[1]
    assert [(f["spec"]["kind"], f["applied"]) for f in listed] == [("http_503", 2)]
    assert (await control(http, fake, "DELETE", "/_fake/faults"))[0] == 200
    assert (await post_track(http, fake, request_body("e1")))[1]["code"] == 0


async def test_reject_event_ids_hits_only_requests_holding_them(
    http: aiohttp.ClientSession, fake: FakeTikTok
) -> None:
    await control(
        http, fake, "POST", "/_fake/faults", {"kind": "reject_event_ids", "event_ids": ["bad"]}
    )
    _, payload = await post_track(http, fake, request_body("ok1", "bad", "ok2"))
    assert payload["code"] == 40002
    assert "data.1.event_id" in payload["message"]
    assert (await post_track(http, fake, request_body("ok1")))[1]["code"] == 0
    assert (await post_track(http, fake, request_body("ok2")))[1]["code"] == 0
    assert (await post_track(http, fake, request_body("bad")))[1]["code"] == 40002
    assert fake.accepted_event_ids() == {"ok1", "ok2"}


async def test_pixel_filter_and_probability(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    fake.add_fault(FaultSpec(kind="auth", pixel="BADPIXEL"))
    fake.add_fault(FaultSpec(kind="http_500", probability=0.0))
    assert (await post_track(http, fake, request_body("a", pixel="BADPIXEL")))[1]["code"] == 40105
    assert (await post_track(http, fake, request_body("b", pixel="GOODPIXEL")))[1]["code"] == 0
    assert fake.accepted_event_ids() == {"b"}


async def test_duration_fault_expires(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    fault_id = fake.add_fault(FaultSpec(kind="http_502", duration_s=0.001))
    assert fault_id == 1
    assert len(fake.faults()) == 1
    await asyncio.sleep(0.01)  # the monotonic clock is now past the fault's end
    assert (await post_track(http, fake, request_body("e1")))[1]["code"] == 0
    assert fake.faults() == []


async def test_process_fault_records_then_fails(
    http: aiohttp.ClientSession, fake: FakeTikTok
) -> None:
    fake.add_fault(FaultSpec(kind="http_500", count=1, process=True))
    assert (await post_track(http, fake, request_body("e1")))[0] == 500
    assert fake.accepted_event_ids() == {"e1"}
    stats = fake.stats()
    assert stats["rejected_requests"] == 1
    assert stats["rejected_events_total"] == 0  # the events were taken


async def test_disconnect_and_timeout_faults(http: aiohttp.ClientSession, fake: FakeTikTok) -> None:
    fake.add_fault(FaultSpec(kind="disconnect", count=1))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_track(http, fake, request_body("e1"))
    fake.add_fault(FaultSpec(kind="timeout", count=1, delay_s=0.01))
    status, _payload = await post_track(http, fake, request_body("e1"))
    assert status == 504
    assert fake.stats()["requests_by_code"] == {"disconnect": 1, "http_504": 1}


async def test_stop_releases_requests_held_by_a_timeout_fault(
    http: aiohttp.ClientSession,
) -> None:
    server = FakeTikTok(timeout_delay_s=3600)
    await server.start()
    server.add_fault(FaultSpec(kind="timeout"))
    pending = asyncio.create_task(post_track(http, server, request_body("e1"), token="t"))
    for _ in range(3000):  # until the handler holds the request (bounded)
        if server.faults()[0]["applied"]:
            break
        await asyncio.sleep(0.01)
    assert server.faults()[0]["applied"] == 1
    await asyncio.wait_for(server.stop(), timeout=30)
    status, _ = await asyncio.wait_for(pending, timeout=30)
    assert status == 504


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"kind": "explode"}, "kind"),
        ({"kind": "http_500", "count": 0}, "count"),
        ({"kind": "http_500", "probability": 2}, "probability"),
        ({"kind": "reject_event_ids"}, "event_ids"),
        ({"kind": "code"}, "code"),
        ({"kind": "slow"}, "delay_s"),
        ({"kind": "http_500", "bogus": 1}, "bogus"),
        ({"count": 1}, "kind"),
    ],
)
async def test_invalid_faults_are_refused(
    http: aiohttp.ClientSession, fake: FakeTikTok, payload: dict[str, Any], field: str
) -> None:
    status, answer = await control(http, fake, "POST", "/_fake/faults", payload)
    assert status == 400
    assert field in answer["error"]
    assert fake.faults() == []


def test_fault_spec_error_type() -> None:
    with pytest.raises(FakeSpecError, match="kind"):
        FaultSpec(kind="nope").check()
    assert issubclass(FakeSpecError, ValueError)


async def test_events_requests_stats_reset_endpoints(
    http: aiohttp.ClientSession, fake: FakeTikTok
) -> None:
    await post_track(http, fake, request_body("a", "b", pixel="P1"))
    await post_track(http, fake, request_body("c", pixel="P2"))
    events = (await control(http, fake, "GET", "/_fake/events"))[1]
    assert [(e["event_id"], e["pixel"]) for e in events] == [("a", "P1"), ("b", "P1"), ("c", "P2")]
    assert set(events[0]) == {
        "event_id",
        "event",
        "pixel",
        "test_event_code",
        "received_at",
        "duplicate",
        "event_source",
        "match_keys",
    }
    page = (await control(http, fake, "GET", "/_fake/events?offset=1&limit=1"))[1]
    assert [e["event_id"] for e in page] == ["b"]
    only_p2 = (await control(http, fake, "GET", "/_fake/events?pixel=P2"))[1]
    assert [e["event_id"] for e in only_p2] == ["c"]
    assert (await control(http, fake, "GET", "/_fake/events?limit=x"))[0] == 400

    records = (await control(http, fake, "GET", "/_fake/requests"))[1]
    assert [(r["pixel"], r["events"], r["code"], r["http_status"]) for r in records] == [
        ("P1", 2, 0, 200),
        ("P2", 1, 0, 200),
    ]
    assert records[0]["received_mono"] <= records[1]["received_mono"]
    assert len((await control(http, fake, "GET", "/_fake/requests?limit=1"))[1]) == 1

    stats = (await control(http, fake, "GET", "/_fake/stats"))[1]
    assert stats["accepted_events_total"] == 3

    fake.add_fault(FaultSpec(kind="http_500"))
    assert (await control(http, fake, "POST", "/_fake/reset"))[0] == 200
    assert fake.events == []
    assert fake.faults() == []
    assert fake.stats()["requests_total"] == 0
    assert (await post_track(http, fake, request_body("z")))[1]["code"] == 0


async def test_config_endpoint_and_random_faults(
    http: aiohttp.ClientSession, fake: FakeTikTok
) -> None:
    config = {"fault_rate": 1.0, "random_fault_kinds": ["http_500", "http_503"]}
    status, answer = await control(http, fake, "POST", "/_fake/config", config)
    assert status == 200
    assert answer["fault_rate"] == 1.0
    statuses = {(await post_track(http, fake, request_body(f"e{i}")))[0] for i in range(12)}
    assert statuses == {500, 503}  # seeded: both kinds appear
    assert fake.events == []
    await control(http, fake, "POST", "/_fake/config", {"fault_rate": 0})
    assert (await post_track(http, fake, request_body("ok")))[1]["code"] == 0
    bad = await control(http, fake, "POST", "/_fake/config", {"fault_rate": 3})
    assert bad[0] == 400
    assert "fault_rate" in bad[1]["error"]
    assert (await control(http, fake, "GET", "/_fake/config"))[1]["fault_rate"] == 0


def test_qps_limiter_sliding_window() -> None:
    limiter = _QpsLimiter(2)
    assert [limiter.admit(t) for t in (0.0, 0.1, 0.2, 0.9)] == [True, True, False, False]
    assert limiter.admit(1.05)  # 0.0 left the window
    assert not limiter.admit(1.08)
    assert limiter.admit(1.2)  # 0.1 left the window
    slow = _QpsLimiter(0.5)  # one request per two seconds
    assert [slow.admit(t) for t in (0.0, 1.0, 2.1)] == [True, False, True]


async def test_throttle_qps_answers_40100(http: aiohttp.ClientSession) -> None:
    # 0.01 req/s: the first request is admitted and the rest of the burst (well within
    # 100 s) is throttled.
    async with FakeTikTok(throttle_qps=0.01) as server:
        codes = [
            (await post_track(http, server, request_body(f"e{i}"), "t"))[1]["code"]
            for i in range(4)
        ]
        assert codes == [0, 40100, 40100, 40100]
        records = list(server.state.requests)
        assert [r.code for r in records] == codes
        assert server.accepted_event_ids() == {"e0"}


# -- the CLI -----------------------------------------------------------------------------------


def _cli() -> list[str]:
    return [sys.executable, "-m", "devkit.fake_tiktok"]


def _post(url: str, body: bytes, token: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url + ENDPOINT_PATH,
        data=body,
        headers={"Access-Token": token, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [*_cli(), "--port", "0", "--token", "cli-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("fake-tiktok listening on http://127.0.0.1:")
        url = first.split()[-1]
        assert _post(url, request_body("cli-1"), "cli-token")["code"] == 0
        assert _post(url, request_body("cli-2"), "nope")["code"] == 40105
        with urllib.request.urlopen(url + "/_fake/stats", timeout=10) as resp:
            assert json.loads(resp.read())["accepted_events_total"] == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "1 events accepted" in out
    assert "cli-token" not in out + err


@pytest.mark.parametrize(
    ("extra", "status", "needle"),
    [
        (["--fault-rate", "1.5"], 2, "--fault-rate"),
        (["--throttle-qps", "0"], 2, "--throttle-qps"),
    ],
)
def test_cli_rejects_bad_options(extra: list[str], status: int, needle: str) -> None:
    done = subprocess.run(
        [*_cli(), "--port", "0", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == status
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_port_in_use_exits_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = subprocess.run(
            [*_cli(), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "cannot listen" in done.stderr
