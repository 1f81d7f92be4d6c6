"""Event sources (SPEC §3 "Event sources"): web, CRM, offline and app destinations side by side.

Config validation with key paths, the presets of each source (expected tables copied from
docs/tiktok-offline-app.md §1.2 and §2.2, not from worker.presets), every required-field rule,
att_status, batching per (source, id) under one rate-limit key, the fake Events API's rules per
source, and a property test that no raw PII leaves in any source's body. Full bodies, key order
included, are the golden cases tests/data/golden/g20-g25.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.fake_tiktok.validate import match_keys, validate
from tests.reference_mapper import CheckedMapper
from worker.config import Config, parse_config
from worker.delivery.factory import build_routes
from worker.delivery.inflight import InflightMessage, PendingEvent
from worker.delivery.lanes import DEFAULT_MAX_BATCH_BYTES, Lane
from worker.errors import ConfigError
from worker.mapping import reading
from worker.mapping.body import BatchKey, build_body
from worker.mapping.mapper import EventOutcome, MappedEvent, Mapper
from worker.mapping.plan_app import att_status

NOW = 1_700_000_000.0
TOKEN = "token-shared"
WEB = {"name": "web-shop", "pixel_code": "PIXELWEB01", "access_token": TOKEN, "presets": "all"}
CRM = {
    "name": "leads",
    "event_source": "crm",
    "pixel_code": "CRMSET01",
    "access_token": TOKEN,
    "subscriptions": [
        {"name": "Qualified", "trigger": 'event = "Lead Qualified"', "event": "QualifiedLead"}
    ],
}
OFFLINE = {
    "name": "stores",
    "event_source": "offline",
    "event_set_id": "EVSET01",
    "access_token": TOKEN,
}
APP = {
    "name": "mobile",
    "event_source": "app",
    "tiktok_app_id": "7000000001",
    "access_token": TOKEN,
}


def config(*dests: dict[str, Any], **top: Any) -> Config:
    return parse_config(json.dumps({**top, "destinations": list(dests)}), environ={})


def config_error(*dests: dict[str, Any]) -> str:
    """The start-up error: from the config loader, or from the Mapper that compiles it."""
    with pytest.raises(ConfigError) as info:
        Mapper(config(*dests))
    return str(info.value)


def mapper(*dests: dict[str, Any]) -> Mapper:
    return CheckedMapper(config(*dests), now=lambda: NOW)


def outcome(m: Mapper, event: dict[str, Any]) -> EventOutcome:
    (out,) = m.map_message(json.dumps(event).encode())
    return out


def body(m: MappedEvent) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(build_body(m.key, [m.payload]))
    return result


APP_CONTEXT = {
    "app": {"namespace": "com.example.shop", "name": "Shop", "version": "1.0"},
    "device": {"type": "ios", "advertisingId": "AD-1", "id": "IDFV-1", "adTrackingEnabled": False},
    "os": {"version": "17.2"},
}
PRODUCT = {"product_id": "p1", "name": "Mug", "price": 5, "quantity": 1, "category": "kitchen"}


def mixed_event(name: str | None, n: int = 0) -> dict[str, Any]:
    """A Segment event every source can map: identifiers, app context, products, lead id."""
    event: dict[str, Any] = {
        "type": "track" if name else "page",
        "messageId": f"m-{n}-{name}",
        "timestamp": "2024-01-08T13:52:50.212Z",
        "userId": f"user-{n}",
        "context": {**APP_CONTEXT, "page": {"url": "https://shop.example/p"}},
        "properties": {
            "email": f"person{n}@example.com",
            "currency": "USD",
            "value": 5,
            "lead_id": f"lead-{n}",
            "products": [PRODUCT],
            **PRODUCT,
        },
    }
    if name:
        event["event"] = name
    return event


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        pytest.param(
            {"name": "s", "event_source": "offline", "access_token": "t"},
            "destinations[0].event_set_id: required for event_source offline",
            id="offline-without-event-set",
        ),
        pytest.param(
            {"name": "m", "event_source": "app", "access_token": "t"},
            "destinations[0].tiktok_app_id: required for event_source app",
            id="app-without-app-id",
        ),
        pytest.param(
            {"name": "c", "event_source": "crm", "access_token": "t", "subscriptions": []},
            "destinations[0].pixel_code: required for event_source crm",
            id="crm-without-pixel",
        ),
        pytest.param(
            {"name": "w", "access_token": "t"}, "destinations[0].pixel_code: required", id="web"
        ),
        pytest.param(
            {**OFFLINE, "pixel_code": "P"},
            "destinations[0].pixel_code: not used by event_source offline (it needs "
            "event_set_id); remove it",
            id="offline-with-pixel",
        ),
        pytest.param(
            {**WEB, "tiktok_app_id": "1"},
            "destinations[0].tiktok_app_id: not used by event_source web",
            id="web-with-app-id",
        ),
        pytest.param(
            {**OFFLINE, "event_source": "email"},
            "destinations[0].event_source: must be one of: web, crm, offline, app",
            id="unknown-source",
        ),
        pytest.param(
            {**CRM, "subscriptions": []},
            "destinations[0].subscriptions: required for event_source crm",
            id="crm-without-subscriptions",
        ),
        pytest.param(
            {**APP, "subscriptions": [{"name": "x", "trigger": 'type = "track"', "event": "Lead"}]},
            "destinations[0].subscriptions[0].event: 'Lead' is not a TikTok app event",
            id="app-event-outside-the-list",
        ),
        pytest.param(
            {
                **APP,
                "subscriptions": [
                    {"name": "x", "trigger": 'event = "Sub"', "event": "Subscribe"}
                ],
            },
            "destinations[0].subscriptions[0].contents: app event Subscribe requires contents",
            id="app-event-needs-contents",
        ),
        pytest.param(
            {
                **OFFLINE,
                "subscriptions": [
                    {"name": "x", "trigger": 'type = "track"', "event": "Contact",
                     "mapping": {"email": "$.properties.mail"}}
                ],
            },
            "destinations[0].subscriptions[0].mapping.email: unknown field for event_source "
            "offline",
            id="web-field-on-offline",
        ),
        pytest.param(
            {
                **WEB,
                "subscriptions": [
                    {"name": "x", "trigger": 'type = "track"', "event": "Contact",
                     "mapping": {"advertising_id": "$.context.device.advertisingId"}}
                ],
            },
            "destinations[0].subscriptions[0].mapping.advertising_id: unknown field for "
            "event_source web",
            id="app-field-on-web",
        ),
        pytest.param(
            {
                **APP,
                "subscriptions": [
                    {"name": "x", "trigger": 'type = "track"', "event": "Login",
                     "mapping": {"att_status": {"value": "MAYBE"}}}
                ],
            },
            "destinations[0].subscriptions[0].mapping.att_status: must be one of: AUTHORIZED",
            id="att-status-literal",
        ),
    ],
)  # fmt: skip
def test_source_config_errors_name_the_key_path(dest: dict[str, Any], message: str) -> None:
    assert config_error(dest).startswith(message)


def test_one_destination_of_each_source_loads() -> None:
    cfg = config(WEB, CRM, OFFLINE, APP)
    got = [(d.event_source, d.event_source_id) for d in cfg.destinations]
    assert got == [
        ("web", "PIXELWEB01"),
        ("crm", "CRMSET01"),
        ("offline", "EVSET01"),
        ("app", "7000000001"),
    ]


def test_app_subscription_with_a_contents_mapping_is_accepted() -> None:
    sub = {
        "name": "Sub",
        "trigger": 'event = "Subscribed"',
        "event": "Subscribe",
        "mapping": {"contents": "$.properties.plan"},
    }
    Mapper(config({**APP, "presets": "none", "subscriptions": [sub]}))


# --------------------------------------------------------------------------- presets

# docs/tiktok-offline-app.md §1.2 (the web table's triggers and names).
OFFLINE_PRESETS = [
    ("Order Completed", "CompletePayment", "multi"),
    ("Callback Started", "Contact", "none"),
    ("Subscription Created", "Subscribe", "none"),
    ("Form Submitted", "SubmitForm", "none"),
    (None, "PageView", "multi"),
    ("Product Viewed", "ViewContent", "single"),
    ("Product Clicked", "ClickButton", "single"),
    ("Products Searched", "Search", "single"),
    ("Product Added to Wishlist", "AddToWishlist", "single"),
    ("Product Added", "AddToCart", "single"),
    ("Checkout Started", "InitiateCheckout", "multi"),
    ("Payment Info Entered", "AddPaymentInfo", "multi"),
    ("Order Placed", "PlaceAnOrder", "multi"),
    ("Download Link Clicked", "Download", "none"),
    ("Signed Up", "CompleteRegistration", "none"),
]
# docs/tiktok-offline-app.md §2.2.
APP_PRESETS = [
    ("Order Completed", "Purchase", "multi"),
    ("Payment Info Entered", "AddPaymentInfo", "multi"),
    ("Checkout Started", "Checkout", "multi"),
    ("Products Searched", "Search", "none"),
    ("Product Viewed", "ViewContent", "single"),
    ("Product Added", "AddToCart", "single"),
    ("Product Added to Wishlist", "AddToWishlist", "single"),
    ("Application Installed", "InstallApp", "none"),
    ("Application Opened", "LaunchAPP", "none"),
    ("Signed In", "Login", "none"),
    ("Signed Up", "Registration", "none"),
]
# Contents the mixed event yields: `multi` reads properties.products, `single` properties.
MULTI_ITEM = {"price": 5, "quantity": 1, "content_category": "kitchen", "content_id": "p1",
              "content_name": "Mug"}  # fmt: skip
EXPECTED_CONTENTS = {"multi": [MULTI_ITEM], "single": [MULTI_ITEM], "none": []}


@pytest.mark.parametrize("presets", ["all", "documented"])
@pytest.mark.parametrize(("segment", "tiktok", "contents"), OFFLINE_PRESETS)
def test_every_offline_preset(
    presets: str, segment: str | None, tiktok: str, contents: str
) -> None:
    m = mapper({**OFFLINE, "presets": presets})
    out = outcome(m, mixed_event(segment))
    assert out.invalid == []
    (mapped,) = out.mapped
    b = body(mapped)
    assert (b["event_source"], b["event_source_id"]) == ("offline", "EVSET01")
    (data,) = b["data"]
    assert data["event"] == tiktok
    assert data["properties"]["contents"] == EXPECTED_CONTENTS[contents]
    assert list(data) == [
        "event", "event_time", "event_id", "user", "properties", "page", "limited_data_use"
    ]  # fmt: skip


@pytest.mark.parametrize("presets", ["all", "documented"])
@pytest.mark.parametrize(("segment", "tiktok", "contents"), APP_PRESETS)
def test_every_app_preset(presets: str, segment: str, tiktok: str, contents: str) -> None:
    m = mapper({**APP, "presets": presets})
    out = outcome(m, mixed_event(segment))
    assert out.invalid == []
    (mapped,) = out.mapped
    b = body(mapped)
    assert (b["event_source"], b["event_source_id"]) == ("app", "7000000001")
    (data,) = b["data"]
    assert data["event"] == tiktok
    assert data["properties"]["contents"] == EXPECTED_CONTENTS[contents]
    assert list(data) == [
        "event", "event_time", "event_id", "user", "properties", "app", "ad", "limited_data_use"
    ]  # fmt: skip
    assert data["user"]["att_status"] == "DENIED"  # iOS 17.2, adTrackingEnabled false


@pytest.mark.parametrize("source", [OFFLINE, APP, CRM])
def test_presets_none_maps_nothing(source: dict[str, Any]) -> None:
    m = mapper({**source, "presets": "none"})
    assert outcome(m, mixed_event("Order Completed")).skipped == "no_match"


def test_crm_has_no_presets_whatever_the_set() -> None:
    for presets in ("documented", "all"):
        m = mapper({**CRM, "presets": presets})
        assert outcome(m, mixed_event("Order Completed")).skipped == "no_match"
        (mapped,) = outcome(m, mixed_event("Lead Qualified")).mapped
        assert body(mapped)["data"][0]["lead"] == {"lead_id": "lead-0"}


# --------------------------------------------------------------------------- required fields


def _app_event(segment: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "track",
        "event": segment,
        "messageId": "m",
        "userId": "u",
        "context": {"app": {"namespace": "com.example"}},
        "properties": props,
    }


FULL = {"currency": "USD", "value": 1, "products": [PRODUCT], **PRODUCT}


@pytest.mark.parametrize(
    ("segment", "tiktok", "props", "error"),
    [
        *(
            pytest.param(seg, tik, {k: v for k, v in FULL.items() if k != field},
                         f"{field} ($.properties.{path}): required for app event {tik}",
                         id=f"{tik}-{field}")
            for seg, tik in [
                ("Product Added", "AddToCart"),
                ("Product Added to Wishlist", "AddToWishlist"),
                ("Checkout Started", "Checkout"),
                ("Order Completed", "Purchase"),
                ("Product Viewed", "ViewContent"),
            ]
            for field, path in [("currency", "currency"), ("value", "value | $.properties.revenue")]
        ),
        *(
            pytest.param(seg, tik, {**FULL, "products": []},
                         "contents ($.properties.products): required for app event "
                         f"{tik} (no items)",
                         id=f"{tik}-contents")
            for seg, tik in [("Checkout Started", "Checkout"), ("Order Completed", "Purchase")]
        ),
        *(
            pytest.param(seg, tik, {**FULL, "products": [{"price": 1}], "product_id": ""},
                         "contents[].content_id ($.product_id): required on every item for app "
                         f"event {tik}",
                         id=f"{tik}-content_id")
            for seg, tik in [
                ("Product Added", "AddToCart"),
                ("Product Added to Wishlist", "AddToWishlist"),
                ("Checkout Started", "Checkout"),
                ("Order Completed", "Purchase"),
                ("Product Viewed", "ViewContent"),
            ]
        ),
    ],
)  # fmt: skip
def test_app_required_fields_are_invalid_events_naming_the_field(
    segment: str, tiktok: str, props: dict[str, Any], error: str
) -> None:
    out = outcome(mapper(APP), _app_event(segment, props))
    assert out.mapped == []
    assert [(i.reason, i.destination, i.error) for i in out.invalid] == [
        ("invalid_event", "mobile", error)
    ]


def test_app_content_type_literal_null_is_required_for_product_events() -> None:
    sub = {
        "name": "Cart",
        "trigger": 'event = "Product Added"',
        "event": "AddToCart",
        "contents": "single",
        "mapping": {"content_type": None},
    }
    m = mapper({**APP, "presets": "none", "subscriptions": [sub]})
    (inv,) = outcome(m, _app_event("Product Added", FULL)).invalid
    assert inv.error == "content_type (unmapped): required for app event AddToCart"


def test_app_events_without_product_rules_need_only_the_app_id() -> None:
    # AddPaymentInfo maps contents but is not a product event: no content_id check.
    out = outcome(mapper(APP), _app_event("Payment Info Entered", {"products": [{"price": 1}]}))
    assert out.invalid == []
    (mapped,) = out.mapped
    assert body(mapped)["data"][0]["properties"]["contents"] == [{"price": 1}]


def test_offline_identifier_rule_counts_any_one_identifier() -> None:
    m = mapper(OFFLINE)
    base = {"type": "track", "event": "Callback Started", "messageId": "m"}
    for extra in (
        {"userId": "u"},
        {"anonymousId": "a"},
        {"properties": {"email": "a@b.co"}},
        {"context": {"traits": {"phone": "+1 555 555 5555"}}},
    ):
        assert outcome(m, {**base, **extra}).invalid == [], extra
    (inv,) = outcome(m, {**base, "properties": {"email": ""}}).invalid
    assert inv.destination == "stores"
    assert "email_addresses | phone_numbers | external_ids" in inv.error


def test_a_bad_event_for_one_source_does_not_stop_the_others() -> None:
    m = mapper(WEB, OFFLINE, APP)
    event = {"type": "track", "event": "Order Completed", "messageId": "m", "properties": {}}
    out = outcome(m, event)
    assert [x.destination for x in out.mapped] == ["web-shop"]
    assert sorted(i.destination or "" for i in out.invalid) == ["mobile", "stores"]


# --------------------------------------------------------------------------- att_status


@pytest.mark.parametrize(
    ("mapped", "device", "version", "tracking", "want"),
    [
        ("AUTO", "ios", "18.1.3", True, "AUTHORIZED"),
        ("AUTO", "iOS", "17", False, "DENIED"),
        ("AUTO", "ios", "14", None, "NOT_DETERMINED"),
        ("AUTO", "ios", None, None, "NOT_DETERMINED"),
        ("AUTO", "ios", "13.9.9", True, "NOT_APPLICABLE"),
        ("AUTO", "ios", "abc", True, "AUTHORIZED"),
        ("AUTO", "android", "14", True, "NOT_APPLICABLE"),
        ("AUTO", None, None, True, "NOT_APPLICABLE"),
        ("RESTRICTED", "android", None, None, "RESTRICTED"),
    ],
)
def test_att_status_follows_segments_rules(
    mapped: str, device: str | None, version: str | None, tracking: bool | None, want: str
) -> None:
    assert att_status(mapped, device, version, tracking) == want


# --------------------------------------------------------------------------- batching


def mixed_outcomes(m: Mapper, count: int) -> list[MappedEvent]:
    names = ["Order Completed", "Lead Qualified", "Product Added", None, "Signed Up"]
    mapped: list[MappedEvent] = []
    for n in range(count):
        for out in m.map_message(json.dumps(mixed_event(names[n % len(names)], n)).encode()):
            assert out.invalid == [], out.invalid
            mapped.extend(out.mapped)
    return mapped


def test_batches_never_mix_sources_or_ids_and_share_one_rate_limit_key() -> None:
    cfg = config(WEB, CRM, OFFLINE, APP, {**OFFLINE, "name": "stores-2", "event_set_id": "EV2"})
    m = Mapper(cfg, now=lambda: NOW)
    mapped = mixed_outcomes(m, 50)
    batches: list[tuple[BatchKey, list[PendingEvent]]] = []

    async def run() -> None:
        # One lane per request key, exactly as the sender makes them; each seal is a request.
        lanes: dict[BatchKey, Lane] = {}
        for item in mapped:
            lane = lanes.get(item.key)
            if lane is None:
                lane = lanes[item.key] = Lane(
                    item.key,
                    None,  # type: ignore[arg-type]  # no slots are asked for here
                    concurrency=1,
                    max_events=7,
                    max_bytes=DEFAULT_MAX_BATCH_BYTES,
                )
            message = InflightMessage(
                owner=None,  # type: ignore[arg-type]  # nothing finishes here
                topic="t",
                partition=0,
                offset=0,
                timestamp_ms=None,
                key=None,
            )
            lane.add(PendingEvent(message, None, item))  # type: ignore[arg-type]
        for key, lane in lanes.items():
            while lane.queue:
                batches.append((key, lane.seal()))

    asyncio.run(run())
    assert sum(len(events) for _, events in batches) == len(mapped)
    seen: set[tuple[str, str]] = set()
    for key, events in batches:
        sent = json.loads(build_body(key, [e.payload for e in events]))
        head = (sent["event_source"], sent["event_source_id"])
        seen.add(head)
        for e in events:
            assert (e.mapped.key.event_source, e.mapped.key.event_source_id) == head
            assert e.mapped.destination == key.destination
    assert seen == {
        ("web", "PIXELWEB01"),
        ("crm", "CRMSET01"),
        ("offline", "EVSET01"),
        ("offline", "EV2"),
        ("app", "7000000001"),
    }
    assert max(len(events) for _, events in batches) == 7  # real batches, not one event per request
    # One TikTok app (one token, no app_id): one rate-limit key for every source.
    assert len({r.limiter_key for r in build_routes(cfg).values()}) == 1


def test_offline_test_code_stays_inside_events_but_splits_batches() -> None:
    m = mapper({**OFFLINE, "test_event_code": "TEST00001"})
    (mapped,) = outcome(m, mixed_event("Order Completed")).mapped
    sent = body(mapped)
    assert "test_event_code" not in sent
    assert sent["data"][0]["test_event_code"] == "TEST00001"
    assert mapped.key.test_event_code == "TEST00001"


# --------------------------------------------------------------------------- fake Events API


def test_every_source_body_is_accepted_by_the_fake() -> None:
    m = mapper(WEB, CRM, OFFLINE, APP)
    mapped = mixed_outcomes(m, 10)
    assert {x.key.event_source for x in mapped} == {"web", "crm", "offline", "app"}
    for item in mapped:
        request, rejection = validate(build_body(item.key, [item.payload]), now=NOW)
        assert rejection is None, (item.destination, rejection)
        assert request is not None


def _request(source: str, event: dict[str, Any]) -> bytes:
    body = {"event_source": source, "event_source_id": "ID1", "data": [event]}
    return json.dumps(body).encode()


H = "a" * 64


@pytest.mark.parametrize(
    ("source", "event", "message"),
    [
        ("web", {"event": "Search", "event_time": 1700000000}, "data.0.page: required"),
        ("crm", {"event": "QualifiedLead", "event_time": 1700000000}, "data.0.lead.lead_id"),
        ("crm", {"event": "Purchase", "event_time": 1700000000, "lead": {"lead_id": "1"}},
         "CRM events must use a custom event name"),
        ("offline", {"event": "MyOwnEvent", "event_time": 1700000000},
         "offline events must use a standard event name"),
        ("app", {"event": "CompletePayment", "event_time": 1700000000, "app": {"app_id": "a"}},
         "app events must use a TikTok app event name"),
        ("app", {"event": "Purchase", "event_time": 1700000000}, "data.0.app.app_id"),
        ("app", {"event": "Login", "event_time": 1700000000, "app": {"app_id": "a"},
                 "user": {"att_status": "YES"}}, "data.0.user.att_status"),
        ("app", {"event": "Login", "event_time": 1700000000, "app": {"app_id": "a"},
                 "user": {"idfa": "RAW-IDFA"}}, "data.0.user.idfa: PII must be a SHA-256"),
        ("offline", {"event": "Contact", "event_time": 1700000000,
                     "user": {"external_id": ["raw-id"]}}, "data.0.user.external_id"),
    ],
)  # fmt: skip
def test_the_fake_applies_each_sources_rules(
    source: str, event: dict[str, Any], message: str
) -> None:
    _, rejection = validate(_request(source, event), now=NOW)
    assert rejection is not None
    assert message in rejection.message


@pytest.mark.parametrize(
    ("source", "event"),
    [
        ("offline", {"event": "PageView", "event_time": 1700000000, "page": {}}),
        ("offline", {"event": "Contact", "event_time": 1700000000, "test_event_code": "T1"}),
        ("app", {"event": "LaunchAPP", "event_time": 1700000000, "app": {"app_id": "a"},
                 "user": {"idfa": H, "att_status": "AUTHORIZED", "idfv": "RAW-IDFV"}, "ad": {}}),
        ("crm", {"event": "QualifiedLead", "event_time": 1700000000, "lead": {"lead_id": "1"}}),
    ],
)  # fmt: skip
def test_the_fake_accepts_valid_bodies_of_each_source(source: str, event: dict[str, Any]) -> None:
    assert validate(_request(source, event), now=NOW)[1] is None


def test_external_id_is_a_match_key_only_for_web_and_crm() -> None:
    user = {"external_id": [H], "email": [H], "ip": "203.0.113.1"}
    got = {}
    for source in ("web", "crm", "offline", "app"):
        event = {"event": "Contact", "event_time": 1700000000, "user": user}
        request, _ = validate(_request(source, event), now=NOW)
        assert request is not None
        got[source] = match_keys(request.data[0], source)
    assert got == {
        "web": ("email", "external_id", "ip"),
        "crm": ("email", "external_id"),
        "offline": ("email", "ip"),
        "app": ("email", "ip"),
    }


# --------------------------------------------------------------------------- PII


_EMAIL = st.from_regex(r"[A-Za-z]{3,8}\.[a-z]{3,8}@[a-z]{3,8}\.com", fullmatch=True)
_PHONE = st.from_regex(r"\+1 ?\(?[2-9][0-9]{2}\)? ?[0-9]{3}-?[0-9]{4}", fullmatch=True)
_ID = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{5,20}", fullmatch=True)
_PII_MAPPER = CheckedMapper(config(WEB, CRM, OFFLINE, APP), now=lambda: NOW)


@settings(max_examples=150, deadline=None)
@given(_EMAIL, _PHONE, _ID, _ID, st.sampled_from(["properties", "traits"]), st.booleans())
def test_no_raw_pii_leaves_in_any_sources_body(
    email: str, phone: str, user_id: str, ad_id: str, where: str, ios: bool
) -> None:
    event = mixed_event("Order Completed")
    event["userId"] = user_id
    event["anonymousId"] = user_id + "-anon"
    event["context"]["device"] = {"type": "ios" if ios else "android", "advertisingId": ad_id}
    del event["properties"]["email"]
    pii = {"email": email, "phone": phone, "first_name": user_id, "last_name": email}
    if where == "properties":
        event["properties"].update(pii)
    else:
        event["context"]["traits"] = pii
    crm_event = {**event, "event": "Lead Qualified"}
    sources: set[str] = set()
    for value in (event, crm_event):
        (out,) = _PII_MAPPER.map_message(json.dumps(value).encode())
        assert out.invalid == []
        for m in out.mapped:
            sources.add(m.key.event_source)
            text = build_body(m.key, [m.payload]).decode()
            digits = re.sub(r"\D", "", phone)
            for raw in (email, email.lower(), phone, digits, user_id, user_id.lower(), ad_id):
                assert raw not in text, (m.destination, raw)
    assert sources == {"web", "crm", "offline", "app"}


@pytest.mark.parametrize("generated", [True, False])
def test_every_source_reuses_the_age_checks_parse_of_the_timestamp(
    monkeypatch: pytest.MonkeyPatch, generated: bool
) -> None:
    calls: list[str] = []
    real = reading.timestamp_seconds

    def counted(value: str) -> int | None:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(reading, "timestamp_seconds", counted)
    m = Mapper(config(WEB, CRM, OFFLINE, APP), now=lambda: NOW, generated=generated)
    event = mixed_event("Order Completed")
    out = outcome(m, event)
    assert {x.destination for x in out.mapped} == {"web-shop", "stores", "mobile"}
    assert {json.loads(x.payload)["event_time"] for x in out.mapped} == {1704721970}
    assert calls == [event["timestamp"]]
