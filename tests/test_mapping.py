"""The mapping engine: golden cases, presets, subscriptions, coercions, framing, fuzzing."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference_mapper import CheckedMapper
from worker.config import Config, parse_config
from worker.core.vocabulary import INVALID_REASONS, SkipReason
from worker.errors import ConfigError
from worker.mapping import reading
from worker.mapping.body import BatchKey, build_body
from worker.mapping.coerce import Uncoercible, coerce, coerce_list, js_number_str
from worker.mapping.mapper import EventOutcome, Mapper
from worker.mapping.presets import PRESET_SETS
from worker.mapping.reading import remembering_timestamp, timestamp_seconds
from worker.mapping.segment import Track

GOLDEN = sorted((Path(__file__).parent / "data" / "golden").glob("*.json"))
NOW = 1_700_000_000.0


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_config(destinations: list[dict[str, Any]] | None = None, **top: Any) -> Config:
    dests = destinations if destinations is not None else [{}]
    full = []
    for i, d in enumerate(dests):
        base = {
            "name": "web-shop" if i == 0 else f"dest-{i}",
            "pixel_code": "COQDA8RC77U2TMR44LI0" if i == 0 else f"PIXEL{i}",
            "access_token": f"token-{i}",
        }
        full.append({**base, **d})
    return parse_config(json.dumps({**top, "destinations": full}), environ={})


def mapper_for(dest: dict[str, Any] | None = None, **top: Any) -> Mapper:
    return CheckedMapper(make_config([dest or {}], **top), now=lambda: NOW)


def run(mapper: Mapper, event: Any) -> list[EventOutcome]:
    value = event if isinstance(event, bytes) else json.dumps(event).encode()
    return mapper.map_message(value)


def bodies(outcome: EventOutcome) -> list[dict[str, Any]]:
    return [json.loads(build_body(m.key, [m.payload])) for m in outcome.mapped]


def only_event(mapper: Mapper, event: dict[str, Any]) -> dict[str, Any]:
    """The single data[] element produced for `event`."""
    (outcome,) = run(mapper, event)
    assert outcome.invalid == [], outcome.invalid
    (body,) = bodies(outcome)
    (data,) = body["data"]
    assert isinstance(data, dict)
    return data


def _resolve_hashes(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("sha256:"):
        return sha(value.removeprefix("sha256:"))
    if isinstance(value, list):
        return [_resolve_hashes(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_hashes(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_case(path: Path) -> None:
    case = json.loads(path.read_text())
    mapper = CheckedMapper(make_config([case["destination"]]), now=lambda: case["now"])
    outcomes = run(mapper, case["input"])
    assert len(outcomes) == len(case["outcomes"])
    for outcome, want in zip(outcomes, case["outcomes"], strict=True):
        got = [
            {"subscription": m.subscription, "body": json.loads(build_body(m.key, [m.payload]))}
            for m in outcome.mapped
        ]
        expected = _resolve_hashes(want["mapped"])
        assert got == expected
        # Key order is part of the body (each source has its own): compare it too.
        assert json.dumps(got) == json.dumps(expected)
        want_invalid = want.get("invalid", [])
        assert [(i.reason, i.destination) for i in outcome.invalid] == [
            (w["reason"], w["destination"]) for w in want_invalid
        ]
        for inv, w in zip(outcome.invalid, want_invalid, strict=True):
            assert w["error_contains"] in inv.error
        assert outcome.skipped == want.get("skipped")


def test_golden_example_body_bytes_match_the_documented_key_order() -> None:
    """Key order of the body and of data[0] is Segment's (the documented example's)."""
    case = json.loads((GOLDEN[0]).read_text())
    mapper = CheckedMapper(make_config([case["destination"]]), now=lambda: NOW)
    (outcome,) = run(mapper, case["input"])
    body = build_body(outcome.mapped[0].key, [outcome.mapped[0].payload])
    keys = re.findall(rb'"(event_source|event_source_id|partner_name|test_event_code|data)":', body)
    assert keys == [
        b"event_source",
        b"event_source_id",
        b"partner_name",
        b"test_event_code",
        b"data",
    ]
    data_keys = list(json.loads(body)["data"][0])
    assert data_keys == [
        "event",
        "event_time",
        "event_id",
        "user",
        "properties",
        "page",
        "limited_data_use",
    ]


# --------------------------------------------------------------------------- presets


def _event_for(trigger: str) -> dict[str, Any]:
    m = re.fullmatch(r'(event|type) ?= ?"([^"]+)"', trigger)
    assert m is not None, trigger
    product = {"product_id": "p0", "price": 1, "quantity": 1}
    props = {
        **product,
        "products": [{"product_id": "p1", "price": 2}, {"product_id": "p2", "price": 3}],
    }
    if m.group(1) == "type":
        return {"type": m.group(2), "messageId": "m", "properties": props}
    return {"type": "track", "event": m.group(2), "messageId": "m", "properties": props}


@pytest.mark.parametrize(
    ("preset_set", "preset"),
    [
        pytest.param(name, p, id=f"{name}:{p.name}")
        for name in ("documented", "all")
        for p in PRESET_SETS[name]
    ],
)
def test_every_preset_maps_its_trigger_to_its_event_and_contents(
    preset_set: str, preset: Any
) -> None:
    mapper = mapper_for({"presets": preset_set})
    (outcome,) = run(mapper, _event_for(preset.trigger))
    matching = [m for m in outcome.mapped if m.subscription == preset.name]
    assert len(matching) == 1
    (data,) = json.loads(build_body(matching[0].key, [matching[0].payload]))["data"]
    assert data["event"] == preset.event
    contents = data["properties"]["contents"]
    if preset.contents == "single":
        assert contents == [{"price": 1, "quantity": 1, "content_id": "p0"}]
    elif preset.contents == "multi":
        assert contents == [{"price": 2, "content_id": "p1"}, {"price": 3, "content_id": "p2"}]
    else:
        assert contents == []


def test_documented_set_is_the_products_documentation() -> None:
    got = {(p.trigger, p.event) for p in PRESET_SETS["documented"]}
    assert got == {
        ('event = "Checkout Started"', "InitiateCheckout"),
        ('event = "Products Searched"', "Search"),
        ('event = "Payment Info Entered"', "AddPaymentInfo"),
        ('event = "Order Completed"', "PlaceAnOrder"),
        ('type = "page"', "ViewContent"),
    }
    assert len(PRESET_SETS["all"]) == 15


def test_order_completed_under_all_is_complete_payment_not_place_an_order() -> None:
    (outcome,) = run(mapper_for({"presets": "all"}), _event_for('event = "Order Completed"'))
    assert [m.event for m in outcome.mapped] == ["CompletePayment"]


def test_presets_none_skips_everything_without_subscriptions() -> None:
    (outcome,) = run(mapper_for({"presets": "none"}), _event_for('event = "Order Completed"'))
    assert outcome.mapped == []
    assert outcome.invalid == []
    assert outcome.skipped == "no_match"


def test_default_presets_are_documented() -> None:
    mapper = mapper_for({})
    (outcome,) = run(mapper, {"type": "page", "messageId": "x"})
    assert [(m.subscription, m.event) for m in outcome.mapped] == [("View Content", "ViewContent")]


# --------------------------------------------------------------------------- subscriptions


def test_custom_subscription_candidate_paths_first_present_wins() -> None:
    sub = {
        "name": "custom",
        "trigger": 'event = "X"',
        "event": "Custom",
        "mapping": {
            "email": ["$.properties.primary_email", "$.properties.backup_email"],
            "value": "$.properties.total",
            "currency": {"value": "EUR"},
            "ttclid": None,
            "description": ["$.properties.desc"],
        },
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    event = {
        "type": "track",
        "event": "X",
        "properties": {
            "primary_email": None,
            "backup_email": "b@x.com",
            "email": "ignored@x.com",
            "total": "12",
            "value": 99,
            "currency": "USD",
            "ttclid": "should-not-appear",
            "desc": "d",
        },
    }
    data = only_event(mapper, event)
    assert data["event"] == "Custom"
    assert data["user"]["email"] == [sha("b@x.com")]
    assert "ttclid" not in data["user"]
    assert data["properties"]["value"] == 12
    assert data["properties"]["currency"] == "EUR"
    assert data["properties"]["description"] == "d"


def test_custom_contents_path_and_item_paths() -> None:
    sub = {
        "name": "items",
        "trigger": 'event = "Cart Viewed"',
        "event": "ViewContent",
        "contents": "multi",
        "mapping": {
            "contents": "$.properties.items",
            "contents.content_id": ["$.sku", "$.id"],
            "contents.price": "$.pricing.unit",
            "contents.brand": {"value": "House"},
            "contents.content_name": None,
        },
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    event = {
        "type": "track",
        "event": "Cart Viewed",
        "properties": {
            "products": [{"product_id": "ignored"}],
            "items": [
                {"sku": "s1", "id": "i1", "pricing": {"unit": "9.5"}, "name": "n"},
                {"id": "i2", "pricing": {}},
            ],
        },
    }
    data = only_event(mapper, event)
    assert data["properties"]["contents"] == [
        {"price": 9.5, "content_id": "s1", "brand": "House"},
        {"content_id": "i2", "brand": "House"},
    ]


def test_several_matching_subscriptions_each_yield_an_event_in_order() -> None:
    subs = [
        {"name": "a", "trigger": 'type = "track"', "event": "A"},
        {"name": "b", "trigger": 'event = "Order Completed"', "event": "B"},
    ]
    mapper = mapper_for({"presets": "documented", "subscriptions": subs})
    (outcome,) = run(mapper, {"type": "track", "event": "Order Completed", "messageId": "m"})
    assert [(m.subscription, m.event) for m in outcome.mapped] == [
        ("Place an Order", "PlaceAnOrder"),
        ("a", "A"),
        ("b", "B"),
    ]
    assert {m.event_id for m in outcome.mapped} == {"m"}


def test_destination_when_filters_before_subscriptions() -> None:
    mapper = mapper_for({"when": 'context.app.name = "shop"'})
    (kept,) = run(mapper, {"type": "page", "context": {"app": {"name": "shop"}}})
    (dropped,) = run(mapper, {"type": "page", "context": {"app": {"name": "blog"}}})
    assert len(kept.mapped) == 1
    assert dropped.mapped == []
    assert dropped.skipped == "no_match"


def test_two_destinations_each_get_the_event_with_their_own_key() -> None:
    config = make_config([{"test_event_code": "TEST1"}, {"phone_default_region": "GB"}])
    mapper = CheckedMapper(config, now=lambda: NOW)
    event = {"type": "page", "messageId": "m", "properties": {"phone": "07700 900123"}}
    (outcome,) = run(mapper, event)
    assert [m.destination for m in outcome.mapped] == ["web-shop", "dest-1"]
    first, second = (m.key for m in outcome.mapped)
    assert first == BatchKey("web-shop", "COQDA8RC77U2TMR44LI0", "web", "TEST1", "Segment")
    assert second == BatchKey("dest-1", "PIXEL1", "web", None, "Segment")
    a, b = (json.loads(m.payload) for m in outcome.mapped)
    # Segment's rule without a region; E.164 for GB with it.
    assert a["user"]["phone"] == [sha("+07700900123")]
    assert b["user"]["phone"] == [sha("+447700900123")]
    a["user"].pop("phone")
    b["user"].pop("phone")
    assert a == b


def test_mapping_test_event_code_overrides_the_destination_one() -> None:
    sub = {
        "name": "t",
        "trigger": 'type = "track"',
        "event": "T",
        "mapping": {"test_event_code": "$.properties.tec"},
    }
    mapper = mapper_for({"presets": "none", "test_event_code": "DEST", "subscriptions": [sub]})
    (with_code,) = run(mapper, {"type": "track", "properties": {"tec": "EVT"}})
    (without,) = run(mapper, {"type": "track", "properties": {}})
    assert with_code.mapped[0].key.test_event_code == "EVT"
    assert without.mapped[0].key.test_event_code == "DEST"
    assert (
        json.loads(build_body(without.mapped[0].key, [without.mapped[0].payload]))[
            "test_event_code"
        ]
        == "DEST"
    )


def test_partner_name_null_omits_the_key() -> None:
    mapper = mapper_for({}, tiktok={"partner_name": None})
    (outcome,) = run(mapper, {"type": "page"})
    body = json.loads(build_body(outcome.mapped[0].key, [outcome.mapped[0].payload]))
    assert "partner_name" not in body
    assert body["event_source_id"] == "COQDA8RC77U2TMR44LI0"


# --------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(
    ("url", "field", "expected"),
    [
        pytest.param("https://s.example/?ttclid=U", "F", "U", id="url-wins"),
        pytest.param(
            "https://s.example/?a=1&ttclid=U1&ttclid=U2", None, "U1", id="first-url-value"
        ),
        pytest.param("https://s.example/", "F", "F", id="no-param-field"),
        pytest.param("https://s.example/?ttclid=", "F", "", id="empty-param-with-field"),
        pytest.param("https://s.example/?ttclid=", None, None, id="empty-param-alone"),
        pytest.param("/relative?ttclid=U", "F", "F", id="relative-url-ignored"),
        pytest.param("https://s.example/?ttclid=a%20b+c", None, "a b c", id="percent-and-plus"),
        pytest.param("https://s.example/#x?ttclid=U", "F", "F", id="fragment-not-query"),
        pytest.param("https://s.example/?tt%63lid=U", "F", "U", id="percent-encoded-name"),
        pytest.param("https://s.example/?utm_source=x&a=1", "F", "F", id="other-params-only"),
        pytest.param(None, None, None, id="nothing"),
    ],
)
def test_ttclid_resolution(url: str | None, field: str | None, expected: str | None) -> None:
    event: dict[str, Any] = {"type": "page", "properties": {}, "context": {"page": {}}}
    if url is not None:
        event["context"]["page"]["url"] = url
    if field is not None:
        event["properties"]["ttclid"] = field
    user = only_event(mapper_for({}), event)["user"]
    assert user.get("ttclid") == expected


def test_ttclid_and_ttp_fall_back_to_the_integrations_object() -> None:
    event = {"type": "page", "integrations": {"TikTok Conversions": {"ttclid": "I", "ttp": "P"}}}
    user = only_event(mapper_for({}), event)["user"]
    assert (user["ttclid"], user["ttp"]) == ("I", "P")


def test_event_time_comes_from_timestamp_or_the_clock() -> None:
    mapper = CheckedMapper(make_config(), now=lambda: 1234.99)
    assert only_event(mapper, {"type": "page"})["event_time"] == 1234
    stamped = {"type": "page", "timestamp": "2025-02-03T04:05:06.999Z"}
    assert only_event(mapper, stamped)["event_time"] == 1738555506
    naive = {"type": "page", "timestamp": "2025-02-03T04:05:06"}
    assert only_event(mapper, naive)["event_time"] == 1738555506


def test_limited_data_use_and_lead_rules() -> None:
    mapper = mapper_for({})
    assert only_event(mapper, {"type": "page"})["limited_data_use"] is False
    data = only_event(mapper, {"type": "page", "properties": {"limited_data_use": True}})
    assert data["limited_data_use"] is True
    # web events never carry `lead`, even with a lead_id.
    assert "lead" not in only_event(mapper, {"type": "page", "properties": {"lead_id": "L"}})


def test_vehicle_drive_train_is_still_read_and_partial_mileage_is_dropped() -> None:
    sub = {
        "name": "car",
        "trigger": 'type = "track"',
        "event": "ViewContent",
        "mapping": {"event_spec_type": {"value": "vehicle_fields"}},
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    props = only_event(
        mapper,
        {
            "type": "track",
            "properties": {
                "drive_train": "FWD",
                "mileage_value": 5,
                "preferred_price_range_min": 1,
            },
        },
    )["properties"]
    assert props["drivetrain"] == "FWD"
    assert "mileage" not in props
    assert "mileage_value" not in props
    assert "preferred_price_range" not in props


def test_travel_fields_are_ignored_for_crm_events() -> None:
    sub = {
        "name": "t",
        "trigger": 'type = "track"',
        "event": "Lead",
        "mapping": {
            "event_source": {"value": "crm"},
            "event_spec_type": {"value": "travel_fields"},
        },
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    data = only_event(mapper, {"type": "track", "properties": {"city": "Paris", "lead_id": "L1"}})
    assert "city" not in data["properties"]
    assert data["lead"] == {"lead_id": "L1"}


@pytest.mark.parametrize(
    ("properties", "field_text"),
    [
        pytest.param({"first_name": ["a", "b"]}, "first_name", id="list-for-scalar"),
        pytest.param({"currency": {"code": "USD"}}, "currency", id="object-for-string"),
        pytest.param({"num_items": "three"}, "num_items", id="non-numeric"),
        pytest.param({"value": ""}, None, id="empty-top-level-is-dropped-not-invalid"),
        pytest.param({"email": {"a": 1}}, "email", id="object-for-multi"),
        pytest.param({"email": [["x", "y"]]}, "email", id="nested-list-element"),
        pytest.param({"products": "abc"}, "contents", id="contents-not-a-list"),
        pytest.param({"products": [{"price": "abc"}]}, "contents[].price", id="item-price"),
        pytest.param(
            {"products": [{"quantity": ""}]}, "contents[].quantity", id="item-empty-number"
        ),
        pytest.param({"content_type": "sku"}, None, id="content_type-is-a-literal-default"),
        pytest.param({"limited_data_use": "yes"}, "limited_data_use", id="bad-boolean"),
    ],
)
def test_uncoercible_values_make_the_event_invalid_for_the_destination(
    properties: dict[str, Any], field_text: str | None
) -> None:
    mapper = mapper_for({"presets": "documented"})
    event = {"type": "track", "event": "Order Completed", "properties": properties}
    (outcome,) = run(mapper, event)
    if field_text is None:
        assert outcome.invalid == []
        assert len(outcome.mapped) == 1
        return
    assert outcome.mapped == []
    (inv,) = outcome.invalid
    assert (inv.reason, inv.destination) == ("invalid_event", "web-shop")
    assert inv.error.startswith(field_text)
    assert outcome.skipped is None


def test_invalid_errors_never_echo_the_value() -> None:
    secret = "jane.secret@example.com"
    mapper = mapper_for({"presets": "documented"})
    for props in (
        {"value": secret},
        {"delivery_category": secret},
        {"products": [{"price": secret}]},
    ):
        (outcome,) = run(mapper, {"type": "track", "event": "Order Completed", "properties": props})
        (inv,) = outcome.invalid
        assert secret not in inv.error


def test_a_failing_destination_does_not_stop_the_others() -> None:
    sub = {
        "name": "num",
        "trigger": 'type = "page"',
        "event": "V",
        "mapping": {"num_items": "$.properties.label"},
    }
    config = make_config([{"presets": "none", "subscriptions": [sub]}, {}])
    (outcome,) = run(
        CheckedMapper(config, now=lambda: NOW), {"type": "page", "properties": {"label": "x"}}
    )
    assert [i.destination for i in outcome.invalid] == ["web-shop"]
    assert [m.destination for m in outcome.mapped] == ["dest-1"]


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("12", "number", 12),
        (" 12.5 ", "number", 12.5),
        ("  ", "number", 0),
        ("1e3", "number", 1000),
        ("0x10", "number", 16),
        (True, "number", 1),
        (None, "number", 0),
        (100.0, "number", 100),
        (["7"], "number", 7),
        (12, "string", "12"),
        (7.0, "string", "7"),
        (1.5, "string", "1.5"),
        (1e21, "string", "1e+21"),
        (1.5e-7, "string", "1.5e-7"),
        (0.000015, "string", "0.000015"),
        (False, "string", "false"),
        (None, "string", ""),
        (["a"], "string", "a"),
        ("true", "boolean", True),
        ("false", "boolean", False),
        (1, "boolean", True),
        (0, "boolean", False),
        ("3", "integer", 3),
    ],
)
def test_coerce_follows_ajv(value: Any, kind: str, expected: Any) -> None:
    got = coerce(value, kind)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("", "number"),
        ("abc", "number"),
        ("1_000", "number"),
        ("Infinity", "number"),
        ({"a": 1}, "string"),
        (["a", "b"], "string"),
        ([], "string"),
        ("yes", "boolean"),
        (2, "boolean"),
        ("1.5", "integer"),
        ([[1]], "number"),
    ],
)
def test_coerce_refuses(value: Any, kind: str) -> None:
    with pytest.raises(Uncoercible):
        coerce(value, kind)


def test_coerce_list_wraps_scalars_and_drops_null_elements() -> None:
    assert coerce_list("a", "string") == ["a"]
    assert coerce_list(["a", None, 3, ""], "string") == ["a", "3", ""]
    assert coerce_list([], "string") == []
    with pytest.raises(Uncoercible):
        coerce_list({"a": 1}, "string")


def test_js_number_str_large_integers_lose_precision_like_javascript() -> None:
    assert js_number_str(2**53) == "9007199254740992"
    assert js_number_str(12345678901234567890) == "12345678901234567000"
    assert js_number_str(-0.5) == "-0.5"


# --------------------------------------------------------------------------- framing


def test_single_event_message_raw_is_the_whole_value() -> None:
    value = b'  {"type": "page", "messageId": "m1"}  '
    (outcome,) = mapper_for({}).map_message(value)
    assert (outcome.index, outcome.multi, outcome.raw, outcome.message_id) == (
        0,
        False,
        value,
        "m1",
    )


def test_array_message_yields_one_outcome_per_event_with_its_own_bytes() -> None:
    value = (
        b'[{"type":"page","messageId":"a"}, {"type":"identify"}, 5,'
        b' {"type":"track","event":"Order Completed"}]'
    )
    outcomes = mapper_for({}).map_message(value)
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert all(o.multi for o in outcomes)
    assert outcomes[0].raw == b'{"type":"page","messageId":"a"}'
    assert outcomes[2].raw == b"5"
    assert (len(outcomes[0].mapped), outcomes[1].skipped, len(outcomes[3].mapped)) == (
        1,
        "no_match",
        1,
    )
    (inv,) = outcomes[2].invalid
    assert (inv.reason, inv.destination) == ("invalid_event", None)


def test_batch_object_is_unwrapped() -> None:
    value = json.dumps({"batch": [{"type": "page"}, {"type": "page"}], "sentAt": "x"}).encode()
    outcomes = mapper_for({}).map_message(value)
    assert [(o.index, o.multi, len(o.mapped)) for o in outcomes] == [(0, True, 1), (1, True, 1)]
    assert json.loads(outcomes[1].raw) == {"type": "page"}


def test_property_named_batch_does_not_make_a_batch() -> None:
    value = json.dumps({"type": "page", "properties": {"batch": [1]}}).encode()
    (outcome,) = mapper_for({}).map_message(value)
    assert (outcome.multi, len(outcome.mapped)) == (False, 1)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(b"not json", "decode_error", id="garbage"),
        pytest.param(b"", "decode_error", id="empty"),
        pytest.param(None, "decode_error", id="tombstone"),
        pytest.param(b'{"type": "page"', "decode_error", id="truncated"),
        pytest.param(b'{"type": "\xff"}', "decode_error", id="invalid-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "decode_error", id="deep-array"),
        pytest.param(
            b'{"type":"track","properties":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
            "decode_error",
            id="deep-object",
        ),
        pytest.param(b'"a string"', "invalid_event", id="not-an-object"),
        pytest.param(b'{"event": "x"}', "invalid_event", id="no-type"),
        pytest.param(b'{"type": "Track"}', "invalid_event", id="unknown-type"),
        pytest.param(
            b'{"type": "track", "properties": []}', "invalid_event", id="properties-array"
        ),
        pytest.param(b'{"type": "track", "context": "x"}', "invalid_event", id="context-string"),
        pytest.param(
            b'{"type": "track", "properties": {"v": 1e400}}',
            "invalid_event",
            id="number-out-of-range",
        ),
    ],
)
def test_bad_messages_are_one_invalid_outcome(value: bytes | None, reason: str) -> None:
    (outcome,) = mapper_for({}).map_message(value)
    (inv,) = outcome.invalid
    assert (inv.reason, inv.destination) == (reason, None)
    assert outcome.mapped == []
    assert outcome.skipped is None
    assert outcome.raw == (value or b"")


def test_event_over_one_mib_is_too_large() -> None:
    big = json.dumps({"type": "page", "properties": {"x": "a" * (1024 * 1024)}}).encode()
    (outcome,) = mapper_for({}).map_message(big)
    assert [(i.reason, i.destination) for i in outcome.invalid] == [("event_too_large", None)]
    small = json.dumps({"type": "page"}).encode()
    outcomes = mapper_for({}).map_message(b"[" + big + b"," + small + b"]")
    assert [o.invalid[0].reason if o.invalid else "ok" for o in outcomes] == [
        "event_too_large",
        "ok",
    ]


def test_empty_array_is_one_skipped_outcome() -> None:
    (outcome,) = mapper_for({}).map_message(b"[]")
    assert (outcome.multi, outcome.skipped, outcome.raw) == (True, "no_match", b"[]")


def test_numeric_message_id_becomes_the_event_id_string() -> None:
    (outcome,) = run(mapper_for({}), {"type": "page", "messageId": 123})
    assert outcome.message_id == "123"
    assert outcome.mapped[0].event_id == "123"
    assert json.loads(outcome.mapped[0].payload)["event_id"] == "123"


# --------------------------------------------------------------------------- bodies


def test_build_body_concatenates_payloads_without_reencoding() -> None:
    key = BatchKey("d", "PIX", "web", "TEST9", "Segment")
    payloads = [msgspec.json.encode({"event": "E", "n": i}) for i in range(1000)]
    body = build_body(key, payloads)
    decoded = json.loads(body)
    assert decoded["event_source_id"] == "PIX"
    assert decoded["test_event_code"] == "TEST9"
    assert [d["n"] for d in decoded["data"]] == list(range(1000))
    assert body.endswith(b"]}")
    assert payloads[-1] in body


def test_build_body_without_partner_or_test_code() -> None:
    body = json.loads(build_body(BatchKey("d", "P", "crm", None, None), [b'{"a":1}']))
    assert body == {"event_source": "crm", "event_source_id": "P", "data": [{"a": 1}]}


# --------------------------------------------------------------------------- config-time


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"event_source": {"value": "app"}}, "mapping.event_source: must be one of: web, crm"),
        ({"value": {"value": "ten"}}, "mapping.value: expected number"),
        ({"emial": "$.properties.email"}, "mapping.emial: unknown field"),
        ({"email": "properties.email"}, "mapping.email: a path must start with '$.'"),
        ({"email": ["$.a", "$.b..c"]}, "mapping.email[1]: a path must not contain an empty key"),
        ({"email": []}, "mapping.email: an empty list of paths maps nothing"),
        ({"email": "$"}, "mapping.email: '$' (the whole event) is not a field value"),
    ],
)
def test_bad_mapping_overrides_are_config_errors(mapping: dict[str, Any], message: str) -> None:
    sub = {"name": "s", "trigger": 'type = "track"', "event": "E", "mapping": mapping}
    config = make_config([{"subscriptions": [sub]}])
    with pytest.raises(ConfigError) as err:
        Mapper(config)
    assert str(err.value) == f"destinations[0].subscriptions[0].{message}" or str(
        err.value
    ).startswith(f"destinations[0].subscriptions[0].{message}")


# --------------------------------------------------------------------------- fuzzing

_FUZZ_MAPPER = CheckedMapper(
    make_config(
        [
            {"presets": "all", "phone_default_region": "US"},
            {
                "presets": "none",
                "subscriptions": [
                    {
                        "name": "any",
                        "trigger": 'type = "track" or !event',
                        "event": "Any",
                        "contents": "multi",
                        "mapping": {"event_spec_type": {"value": "vehicle_fields"}},
                    }
                ],
            },
        ]
    ),
    now=lambda: NOW,
)


def _check_outcomes(outcomes: list[EventOutcome]) -> None:
    assert len(outcomes) >= 1
    for o in outcomes:
        assert isinstance(o, EventOutcome)
        if o.skipped is not None:
            assert isinstance(o.skipped, SkipReason)
            assert o.mapped == []
            assert o.invalid == []
        else:
            assert o.mapped or o.invalid
        for inv in o.invalid:
            assert inv.reason in INVALID_REASONS
            assert "internal mapping error" not in inv.error
        for m in o.mapped:
            body = json.loads(build_body(m.key, [m.payload]))
            assert isinstance(body["data"][0]["event_time"], int)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = [
    "email",
    "phone",
    "value",
    "revenue",
    "currency",
    "products",
    "price",
    "first_name",
    "address",
    "content_ids",
    "limited_data_use",
    "order_id",
    "ttclid",
    "mileage_value",
    "mileage_unit",
    "year",
    "drivetrain",
    "delivery_category",
    "num_items",
    "query",
]
_event = st.fixed_dictionaries(
    {"type": st.sampled_from(["track", "page", "identify", "screen", "group", "alias"])},
    optional={
        "event": st.sampled_from(["Order Completed", "Product Added", "Signed Up"]) | _json,
        "messageId": _json,
        "userId": _json,
        "anonymousId": _json,
        "timestamp": st.sampled_from(["2024-01-08T13:52:50.212Z", "nope", ""]) | _json,
        "properties": st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=8),
        "context": st.fixed_dictionaries(
            {},
            optional={
                "traits": st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4),
                "page": st.dictionaries(st.sampled_from(["url", "referrer"]), _json),
                "ip": _json,
            },
        ),
        "integrations": _json,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_raise(value: bytes) -> None:
    _check_outcomes(_FUZZ_MAPPER.map_message(value))


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_any_json_never_raises(value: Any) -> None:
    _check_outcomes(_FUZZ_MAPPER.map_message(json.dumps(value).encode()))


@settings(max_examples=200, deadline=None)
@given(st.lists(_event, min_size=1, max_size=3), st.booleans())
def test_fuzz_segment_like_events_never_raise(events: list[dict[str, Any]], as_array: bool) -> None:
    value = json.dumps(events if as_array else events[0]).encode()
    _check_outcomes(_FUZZ_MAPPER.map_message(value))


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[a-z]{3,8}\.[a-z]{3,8}@[a-z]{3,8}\.com", fullmatch=True),
    st.from_regex(r"\+1 ?\(?[2-9][0-9]{2}\)? ?[0-9]{3}-?[0-9]{4}", fullmatch=True),
    st.sampled_from(["properties", "traits"]),
)
def test_fuzz_no_raw_email_or_phone_leaves_the_mapper(email: str, phone: str, where: str) -> None:
    pii = {"email": email, "phone": phone, "first_name": email, "address": {"postal_code": phone}}
    event: dict[str, Any] = {
        "type": "track",
        "event": "Order Completed",
        "userId": email,
        "properties": {},
        "context": {"traits": {}},
    }
    if where == "properties":
        event["properties"] = pii
    else:
        event["context"]["traits"] = pii
    bad_event = {**event, "properties": {**event["properties"], "value": email}}
    for ev in (event, bad_event):
        for outcome in _FUZZ_MAPPER.map_message(json.dumps(ev).encode()):
            texts = [m.payload.decode() for m in outcome.mapped] + [
                i.error for i in outcome.invalid
            ]
            for text in texts:
                assert email not in text
                assert email.upper() not in text
                assert phone not in text
                assert re.sub(r"\D", "", phone) not in text


def test_generated_reads_handle_indexes_unknown_roots_and_type() -> None:
    sub = {
        "name": "paths",
        "trigger": 'type = "track"',
        "event": "E",
        "mapping": {
            "order_id": "$.properties.items.1.sku",
            "shop_id": "$.notASegmentField.x",
            "description": "$.type",
            "query": ["$.context.missing.deep", "$.event"],
            "search_string": "$.properties.items.9.sku",
        },
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    event = {"type": "track", "event": "Q", "properties": {"items": [{"sku": "a"}, {"sku": "b"}]}}
    props = only_event(mapper, event)["properties"]
    assert props["order_id"] == "b"
    assert "shop_id" not in props
    assert "search_string" not in props
    assert props["description"] == "track"
    assert props["query"] == "Q"


def test_intermediate_values_that_are_not_objects_read_as_missing() -> None:
    mapper = mapper_for({})
    event = {
        "type": "page",
        "properties": {"address": "not an object", "email": "a@b.c"},
        "context": {"traits": ["x"], "page": "nope"},
    }
    data = only_event(mapper, event)
    assert data["user"]["city"] == ""
    assert data["user"]["email"] == [sha("a@b.c")]
    assert "page" not in data


# --------------------------------------------------------------------------- generated routes

# Every routing feature at once: a destination filter, routing-only and evaluated triggers,
# `or`, plans shared between destinations (same mapping) and not (overrides), phones hashed
# for another region, a test code, crm with its lead rule, offline and app.
_ROUTES_MAPPER = CheckedMapper(
    make_config(
        [
            {"presets": "all", "phone_default_region": "US"},
            {"presets": "all"},
            {"presets": "documented", "phone_default_region": "GB", "test_event_code": "T1"},
            {
                "presets": "none",
                "when": 'properties.value > 10 or type = "page"',
                "subscriptions": [
                    {
                        "name": "big",
                        "trigger": 'event = "Order Completed" and properties.currency',
                        "event": "PlaceAnOrder",
                        "contents": "multi",
                        "mapping": {"value": "$.properties.revenue"},
                    },
                    {"name": "pages", "trigger": 'type = "page"', "event": "Pageview"},
                    {"name": "any", "trigger": "userId or !event", "event": "Any"},
                ],
            },
            {
                "event_source": "crm",
                "presets": "none",
                "subscriptions": [
                    {"name": "lead", "trigger": 'event = "Signed Up"', "event": "Lead"},
                    {"name": "orders", "trigger": 'event = "Order Completed"', "event": "Lead2"},
                ],
            },
            {"event_source": "offline", "event_set_id": "EV1", "pixel_code": None},
            {
                "event_source": "offline",
                "event_set_id": "EV2",
                "pixel_code": None,
                "phone_default_region": "GB",
            },
            {"event_source": "app", "tiktok_app_id": "7000000001", "pixel_code": None},
        ]
    ),
    now=lambda: NOW,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_event, min_size=1, max_size=3),
    st.sampled_from(["single", "array", "batch", "batch with type", "batch not a list"]),
)
def test_generated_routes_match_the_reference_mapper(
    events: list[dict[str, Any]], framing: str
) -> None:
    """CheckedMapper asserts byte-identical outcomes of the generated and reference routing,
    whatever the framing (decode first must frame exactly as before)."""
    value: Any = {
        "single": events[0],
        "array": events,
        "batch": {"batch": events, "sentAt": "x"},
        "batch with type": {**events[0], "batch": events},
        "batch not a list": {**events[0], "batch": events[0]},
    }[framing]
    _check_outcomes(_ROUTES_MAPPER.map_message(json.dumps(value).encode()))


def test_generated_routes_match_the_reference_on_the_bench_mix() -> None:
    from bench.bench_mapping import make_events, with_app_context

    events = make_events(300, seed=3)
    mapped = 0
    for value in [*events, *with_app_context(events[:100])]:
        for outcome in _ROUTES_MAPPER.map_message(value):
            mapped += len(outcome.mapped)
    assert mapped > 1000
    assert _ROUTES_MAPPER._route_fns, "the generated routes were not used"


def test_a_batch_envelope_that_also_has_a_type_is_framed_as_a_batch() -> None:
    inner = {"type": "page", "messageId": "m1"}
    value = json.dumps({"type": "track", "event": "X", "batch": [inner, inner]}).encode()
    outcomes = mapper_for({}).map_message(value)
    assert [(o.index, o.multi, o.message_id) for o in outcomes] == [
        (0, True, "m1"),
        (1, True, "m1"),
    ]
    # Not a list: not an envelope, the object is one event (as before issue 18).
    value = json.dumps({"type": "page", "messageId": "m2", "batch": 5}).encode()
    (outcome,) = mapper_for({}).map_message(value)
    assert (outcome.multi, outcome.message_id, len(outcome.mapped)) == (False, "m2", 1)


def test_route_functions_are_bounded_by_the_config_not_by_event_names() -> None:
    mapper = Mapper(make_config([{"presets": "all"}]), now=lambda: NOW)
    for n in range(5000):
        value = json.dumps({"type": "track", "event": f"name-{n}", "messageId": "m"}).encode()
        (outcome,) = mapper.map_message(value)
        assert outcome.skipped == SkipReason.NO_MATCH
    mapper.map_message(json.dumps({"type": "track", "event": "Order Completed"}).encode())
    assert len(mapper._routes[Track]) <= Mapper._MAX_ROUTES
    assert len(mapper._route_fns) == 2  # any other name, and "Order Completed"


def test_remembering_hashers_hash_like_the_plain_ones() -> None:
    from worker.mapping.hashing import PLAIN_HASHERS, remembering_hashers

    email, external_id, phone = remembering_hashers()
    a = " User@Example.com"
    b = "".join([" User@", "Example.com"])  # equal, another object
    assert email(a) == email(a) == email(b) == PLAIN_HASHERS.email(a)
    assert external_id("U-1") == PLAIN_HASHERS.external_id("U-1")
    number = "07700 900123"
    assert phone(number, "GB") == PLAIN_HASHERS.phone(number, "GB")
    assert phone(number, None) == PLAIN_HASHERS.phone(number, None)  # region is part of the key
    assert phone(number, "GB") != phone(number, None)


# -- tiktok.max_event_age_s ------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def test_event_older_than_max_age_is_skipped_as_too_old() -> None:
    mapper = mapper_for()  # default max_event_age_s: 172800 (TikTok's 48 h dedup window)
    old = {"type": "page", "messageId": "old", "timestamp": _iso(NOW - 172800 - 1)}
    (outcome,) = run(mapper, old)
    assert outcome.skipped == "too_old"
    assert outcome.mapped == []
    assert outcome.invalid == []
    assert outcome.message_id == "old"
    edge = {"type": "page", "messageId": "edge", "timestamp": _iso(NOW - 172800 + 1)}
    (outcome,) = run(mapper, edge)
    assert outcome.skipped is None
    assert len(outcome.mapped) == 1


def test_max_event_age_applies_per_event_of_a_batch() -> None:
    mapper = mapper_for(tiktok={"max_event_age_s": 60})
    batch = {
        "batch": [
            {"type": "page", "messageId": "a", "timestamp": _iso(NOW - 61)},
            {"type": "page", "messageId": "b", "timestamp": _iso(NOW - 59)},
        ]
    }
    first, second = run(mapper, batch)
    assert first.skipped == "too_old"
    assert second.skipped is None
    assert len(second.mapped) == 1


def test_max_event_age_null_turns_the_check_off_and_an_override_wins() -> None:
    event = {"type": "page", "messageId": "x", "timestamp": "2001-01-01T00:00:00Z"}
    (outcome,) = run(mapper_for(tiktok={"max_event_age_s": None}), event)
    assert outcome.skipped is None
    assert len(outcome.mapped) == 1
    config = make_config([{}])
    (outcome,) = run(Mapper(config, now=lambda: NOW, max_event_age_s=None), event)
    assert len(outcome.mapped) == 1
    (outcome,) = run(Mapper(config, now=lambda: NOW, max_event_age_s=10), event)
    assert outcome.skipped == "too_old"


def test_events_without_a_usable_timestamp_are_not_judged_by_age() -> None:
    mapper = mapper_for(tiktok={"max_event_age_s": 60})
    (outcome,) = run(mapper, {"type": "page", "messageId": "none"})
    assert len(outcome.mapped) == 1  # event_time = now, as before
    (outcome,) = run(mapper, {"type": "page", "messageId": "bad", "timestamp": "yesterday"})
    assert outcome.skipped is None
    assert outcome.invalid
    assert "timestamp" in outcome.invalid[0].error


def test_remembering_timestamp_parses_like_timestamp_seconds() -> None:
    parse = remembering_timestamp()
    values = ["2025-02-03T04:05:06.999Z", "2025-02-03T04:05:06", "yesterday", "", "2025-02-03"]
    for value in values:
        assert parse(value) == timestamp_seconds(value)
        assert parse(value) == timestamp_seconds(value)  # the remembered result
    # An equal string that is another object is parsed again, with the same result.
    copy = "".join(["2025-02-03T04:05:06", ".999Z"])
    assert copy is not values[0]
    assert parse(copy) == timestamp_seconds(values[0])


def _counting_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of `timestamp_seconds` behind the mapper's remembering parser."""
    calls: list[str] = []
    real = reading.timestamp_seconds

    def counted(value: str) -> int | None:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(reading, "timestamp_seconds", counted)
    return calls


@pytest.mark.parametrize("generated", [True, False])
def test_the_age_check_and_event_time_share_one_parse(
    monkeypatch: pytest.MonkeyPatch, generated: bool
) -> None:
    calls = _counting_parses(monkeypatch)
    mapper = Mapper(make_config([{}, {}]), now=lambda: NOW, generated=generated)
    stamp = _iso(NOW - 10)
    (outcome,) = run(mapper, {"type": "page", "messageId": "m", "timestamp": stamp})
    assert [json.loads(m.payload)["event_time"] for m in outcome.mapped] == [int(NOW - 10)] * 2
    assert calls == [stamp]


def test_event_time_from_another_path_is_parsed_on_its_own() -> None:
    # The age check reads the Segment `timestamp`; a mapping may take event_time elsewhere.
    sub = {
        "name": "t",
        "trigger": 'type = "track"',
        "event": "T",
        "mapping": {"timestamp": "$.properties.when"},
    }
    mapper = mapper_for({"presets": "none", "subscriptions": [sub]})
    event = {
        "type": "track",
        "timestamp": _iso(NOW - 10),
        "properties": {"when": "2025-02-03T04:05:06Z"},
    }
    assert only_event(mapper, event)["event_time"] == 1738555506
    event["timestamp"] = _iso(NOW - 172800 - 1)
    (outcome,) = run(mapper, event)
    assert outcome.skipped == "too_old"
