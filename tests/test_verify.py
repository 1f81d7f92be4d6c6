"""`tiktok-worker verify` against the in-process fake TikTok: the body, the test code, and the
line (code, message, hint) for each way a destination can fail."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import yaml

from devkit.fake_tiktok.server import FakeTikTok, FaultSpec
from worker.commands.verify import VerifyResult, select_destinations, verify
from worker.config import Config, parse_config
from worker.errors import ConfigError

GOOD = "good-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
PIXEL = "C5PIXEL0000000000001"
PIXEL_2 = "BU35TSQHT2A1QT375OMG"  # a real-looking code (digit runs are masked as phones)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTikTok]:
    server = FakeTikTok(tokens=[GOOD, OTHER], token_pixels={OTHER: [PIXEL]})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config(base_url: str, *destinations: Mapping[str, Any], **tiktok: Any) -> Config:
    data = {
        "tiktok": {"base_url": base_url, "request_timeout_s": 2, **tiktok},
        "destinations": list(destinations)
        or [{"name": "web-shop", "pixel_code": PIXEL, "access_token": GOOD}],
    }
    return parse_config(yaml.safe_dump(data))


def dest(name: str = "web-shop", **extra: Any) -> dict[str, Any]:
    return {"name": name, "pixel_code": PIXEL, "access_token": GOOD, **extra}


async def one(cfg: Config) -> VerifyResult:
    [result] = await verify(cfg, [d.name for d in cfg.destinations])
    return result


async def test_success_sends_a_mapped_test_event_with_the_configured_code(fake: FakeTikTok) -> None:
    result = await one(config(fake.url, dest(test_event_code="TEST04030")))
    assert result.ok
    assert result.line == (
        f"web-shop: OK (event PlaceAnOrder, pixel {PIXEL}, test_event_code TEST04030)"
    )
    [event] = fake.events
    assert (event.event, event.pixel, event.test_event_code) == ("PlaceAnOrder", PIXEL, "TEST04030")
    assert event.event_id is not None
    assert event.event_id.startswith("tiktok-worker-verify-")


async def test_generated_code_is_shared_by_the_destinations_of_one_run(fake: FakeTikTok) -> None:
    cfg = config(fake.url, dest("a"), dest("b"))
    results = await verify(cfg, ["a", "b"])
    assert [r.ok for r in results] == [True, True]
    codes = {e.test_event_code for e in fake.events}
    assert len(codes) == 1
    assert re.fullmatch(r"TEST\d{5}", codes.pop() or "")


async def test_custom_subscription_mapping_is_used(fake: FakeTikTok) -> None:
    subscription = {
        "name": "Add to cart",
        "trigger": 'type = "track" and event = "Product Added"',
        "event": "AddToCart",
        "contents": "single",
    }
    result = await one(config(fake.url, dest(presets="none", subscriptions=[subscription])))
    assert result.ok, result.line
    assert result.event == "AddToCart"
    assert [e.event for e in fake.events] == ["AddToCart"]


async def test_minimal_view_content_when_the_mapping_yields_nothing(fake: FakeTikTok) -> None:
    result = await one(config(fake.url, dest(presets="none")))
    assert result.ok, result.line
    assert result.event == "ViewContent"
    assert [e.event for e in fake.events] == ["ViewContent"]


@pytest.mark.parametrize(
    ("fault", "code", "hint"),
    [
        (None, 40105, "bad or expired access token"),
        (FaultSpec(kind="auth", code=40102), 40102, "bad or expired access token"),
        (FaultSpec(kind="auth", code=40104), 40104, "the access token is empty"),
    ],
)
async def test_token_failures_say_bad_or_expired_token(
    fake: FakeTikTok, fault: FaultSpec | None, code: int, hint: str
) -> None:
    token = "wrong-token-9f8e7d6c5b4a" if fault is None else GOOD
    if fault is not None:
        fake.add_fault(fault)
    result = await one(config(fake.url, dest(access_token=token)))
    assert not result.ok
    assert result.line.startswith(f"web-shop: FAILED: TikTok code {code}: ")
    assert f"-- hint: {hint}" in result.line
    assert "destinations[0].access_token" in result.line
    assert token not in result.line
    assert fake.events == []


async def test_token_without_permission_for_the_pixel(fake: FakeTikTok) -> None:
    result = await one(config(fake.url, dest(pixel_code=PIXEL_2, access_token=OTHER)))
    assert not result.ok
    assert f"TikTok code 40001: No permission to operate pixel code: {PIXEL_2}" in result.line
    assert f"hint: the access token lacks permission for pixel {PIXEL_2}" in result.line
    assert "destinations[0].pixel_code" in result.line


async def test_parameter_error_names_the_field(fake: FakeTikTok) -> None:
    fake.add_fault(
        FaultSpec(
            kind="code",
            code=40002,
            message="Invalid value for event_source_id: not a valid string.",
        )
    )
    result = await one(config(fake.url, dest()))
    assert not result.ok
    assert "TikTok code 40002: Invalid value for event_source_id" in result.line
    assert "hint: TikTok rejected a bad parameter: event_source_id" in result.line
    assert "check destinations[0].pixel_code" in result.line


async def test_parameter_error_on_an_event_field(fake: FakeTikTok) -> None:
    fake.add_fault(
        FaultSpec(kind="code", code=40002, message="Invalid value for data.0.event_id: rejected.")
    )
    result = await one(config(fake.url, dest()))
    assert "hint: TikTok rejected a bad parameter: data.0.event_id" in result.line
    assert "pixel_code" not in result.line


@pytest.mark.parametrize(
    ("fault", "what"),
    [
        (FaultSpec(kind="http_503"), "HTTP 503"),
        (FaultSpec(kind="http_500"), "TikTok code 50000"),
        (FaultSpec(kind="disconnect"), "connection_error"),
        (FaultSpec(kind="timeout", delay_s=2.0), "timeout: timed out after 0.3s"),
    ],
)
async def test_busy_or_unreachable_tiktok(fake: FakeTikTok, fault: FaultSpec, what: str) -> None:
    fake.add_fault(fault)
    result = await one(config(fake.url, dest(), request_timeout_s=0.3))
    assert not result.ok
    assert f"web-shop: FAILED: {what}" in result.line
    assert "hint: TikTok unreachable or busy" in result.line


async def test_unreachable_host() -> None:
    from devkit.infra.procs import free_port

    result = await one(config(f"http://127.0.0.1:{free_port()}", dest()))
    assert not result.ok
    assert "FAILED: connection_error: " in result.line
    assert "hint: TikTok unreachable or busy" in result.line


async def test_throttled(fake: FakeTikTok) -> None:
    fake.add_fault(FaultSpec(kind="throttle"))
    result = await one(config(fake.url, dest()))
    assert "TikTok code 40100" in result.line
    assert "hint: TikTok is rate-limiting this app right now" in result.line


async def test_results_follow_configuration_order(fake: FakeTikTok) -> None:
    cfg = config(fake.url, dest("a"), dest("b", access_token="wrong-token-1234567890"), dest("c"))
    results = await verify(cfg, ["a", "b", "c"])
    assert [(r.destination, r.ok) for r in results] == [("a", True), ("b", False), ("c", True)]


def test_select_destinations() -> None:
    cfg = config("http://127.0.0.1:9", dest("a"), dest("b"))
    assert select_destinations(cfg, None) == ["a", "b"]
    assert select_destinations(cfg, "b") == ["b"]
    with pytest.raises(
        ConfigError, match=r"--destination: no destination named 'c' \(configured: a, b\)"
    ):
        select_destinations(cfg, "c")


# --------------------------------------------------------------------------- event sources

SOURCE_DESTINATIONS = [
    pytest.param(
        {"name": "leads", "event_source": "crm", "pixel_code": PIXEL, "access_token": GOOD,
         "subscriptions": [{"name": "Q", "trigger": 'event = "Lead Qualified"',
                            "event": "QualifiedLead"}]},
        "crm", "TiktokWorkerVerify", f"pixel {PIXEL}", id="crm-fallback",
    ),
    pytest.param(
        {"name": "stores", "event_source": "offline", "event_set_id": "EVSET1",
         "access_token": GOOD},
        "offline", "CompletePayment", "event set EVSET1", id="offline-preset",
    ),
    pytest.param(
        {"name": "stores", "event_source": "offline", "event_set_id": "EVSET1",
         "access_token": GOOD, "presets": "none"},
        "offline", "ViewContent", "event set EVSET1", id="offline-fallback",
    ),
    pytest.param(
        {"name": "mobile", "event_source": "app", "tiktok_app_id": "7000000001",
         "access_token": GOOD},
        "app", "Purchase", "app 7000000001", id="app-preset",
    ),
    pytest.param(
        {"name": "mobile", "event_source": "app", "tiktok_app_id": "7000000001",
         "access_token": GOOD, "presets": "none"},
        "app", "ViewContent", "app 7000000001", id="app-fallback",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("destination", "source", "event", "id_words"), SOURCE_DESTINATIONS)
async def test_verify_works_for_every_event_source(
    fake: FakeTikTok, destination: dict[str, Any], source: str, event: str, id_words: str
) -> None:
    result = await one(config(fake.url, destination))
    assert result.ok, result.line
    name = destination["name"]
    expected = rf"{name}: OK \(event {event}, {id_words}, test_event_code TEST\d{{5}}\)"
    assert re.fullmatch(expected, result.line), result.line
    [accepted] = fake.events
    assert (accepted.event, accepted.event_source) == (event, source)
    # The test code reached TikTok where the source carries it (inside the event for offline).
    assert accepted.test_event_code == result.test_event_code


async def test_permission_hint_names_the_sources_id_key(fake: FakeTikTok) -> None:
    offline = {"name": "stores", "event_source": "offline", "event_set_id": "EVSET9",
               "access_token": OTHER}  # fmt: skip
    result = await one(config(fake.url, offline))
    assert not result.ok
    assert "check destinations[0].event_set_id" in result.line
    assert "event set EVSET9" in result.line
