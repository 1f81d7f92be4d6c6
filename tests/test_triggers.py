"""The trigger language: parser (operators, precedence, quoting, errors) and evaluator."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.mapping.segment import decode_event
from worker.mapping.triggers import TriggerSyntaxError, parse_trigger

EVENT: dict[str, Any] = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u1",
    "properties": {
        "value": 120.5,
        "count": 3,
        "currency": "EUR",
        "coupon": None,
        "flag": True,
        "tags": ["sale", "new"],
        "numeric_text": "100",
        "my key": "spaced",
        "a.b": "dotted",
        "items": [{"sku": "s0"}, {"sku": "s1"}],
        "empty": "",
    },
    "context": {
        "page": {"url": "https://shop.example.com/checkout?x=1"},
        "library": {"name": "analytics.js"},
    },
    "integrations": {"TikTok Conversions": {"ttclid": "abc"}},
}
_DECODED = decode_event(json.dumps(EVENT).encode())


def holds(trigger: str, event: Any = _DECODED) -> bool:
    return parse_trigger(trigger)(event)


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        # equality, strict on types
        ('event = "Order Completed"', True),
        ('event = "order completed"', False),
        ('type = "track"', True),
        ('"track" = type', True),
        ("properties.count = 3", True),
        ("properties.count = 3.0", True),
        ('properties.count = "3"', False),
        ("properties.numeric_text = 100", False),
        ("properties.flag = true", True),
        ("properties.flag = 1", False),
        ("properties.coupon = null", True),
        ("properties.missing = null", True),
        ("properties.value = null", False),
        ('properties.empty = ""', True),
        # inequality is the negation of equality
        ('event != "Order Completed"', False),
        ('properties.missing != "x"', True),
        ("properties.coupon != null", False),
        # ordering: numbers with numbers, strings with strings, otherwise false
        ("properties.value > 100", True),
        ("properties.value >= 120.5", True),
        ("properties.value < 120.5", False),
        ("properties.value <= 120.5", True),
        ("100 < properties.value", True),
        ('properties.currency < "USD"', True),
        ('properties.currency >= "EUR"', True),
        ("properties.numeric_text > 5", False),
        ("properties.missing < 5", False),
        ("properties.flag > 0", False),
        ("properties.count > properties.value", False),
        ("properties.value > properties.count", True),
        # existence
        ("properties.value", True),
        ("properties.coupon", False),
        ("properties.missing", False),
        ("properties.empty", True),
        ("!properties.missing", True),
        # functions
        ('contains(context.page.url, "checkout")', True),
        ('contains(context.page.url, "cart")', False),
        ('contains(properties.tags, "sale")', True),
        ('contains(properties.tags, "sa")', False),
        ('contains(properties.count, "3")', False),
        ('match(context.page.url, "https://*/checkout*")', True),
        ('match(event, "Order ?ompleted")', True),
        ('match(event, "Order")', False),
        ('match(properties.currency, "[DE]UR")', True),
        ('match(properties.count, "*")', False),
        # logic and precedence: and binds tighter than or, ! tighter than both
        ('type = "page" or event = "Order Completed" and properties.count = 3', True),
        ('(type = "page" or event = "Order Completed") and properties.count = 4', False),
        ('type = "page" or event = "Nope" and properties.count = 3', False),
        ('!type = "page"', True),
        ('!(type = "track" and properties.count = 3)', False),
        ("!!properties.value", True),
        ("true", True),
        ("false or true and false", False),
        # paths: quoted keys, escaped spaces, digits index lists, `$.` prefix
        ('integrations."TikTok Conversions".ttclid = "abc"', True),
        ('properties."my key" = "spaced"', True),
        ('properties.my\\ key = "spaced"', True),
        ('properties."a.b" = "dotted"', True),
        ('properties.items.1.sku = "s1"', True),
        ("properties.items.5.sku = null", True),
        ('$.event = "Order Completed"', True),
        ('context.library.name = "analytics.js"', True),
        ('userId = "u1"', True),
        ("unknownTopLevel = null", True),
        # string escapes
        ('properties.currency != "E\\"UR"', True),
    ],
)
def test_evaluation(trigger: str, expected: bool) -> None:
    assert holds(trigger) is expected


@pytest.mark.parametrize(
    ("trigger", "reason", "position"),
    [
        ("", "empty trigger", 1),
        ("   ", "empty trigger", 1),
        ("event = ", "expected a value after '='", 9),
        ('event = "x" and', "expected a path, a value or '('", 16),
        ('(event = "x"', "expected ')'", 13),
        ('event = "x")', "unexpected ')'", 12),
        ('event = "x', "unterminated string", 9),
        ('event == "x"', "expected a value after '='", 8),
        ('event # "x"', "unexpected character '#'", 7),
        ('"x"', 'expected a comparison after "x"', 4),
        ("5", "expected a comparison after 5", 2),
        ("contains(event)", "expected ','", 15),
        ('contains("x", "y")', "expected a path as the first argument of contains()", 10),
        ("match(event, 5)", "expected a string as the second argument of match()", 14),
        ("properties. = 1", "expected a key after '.'", 12),
        ('event = "a" or or', "expected a path, a value or '('", 16),
        ('event "x"', "unexpected '\"x\"'", 7),
    ],
)
def test_syntax_errors_name_the_position(trigger: str, reason: str, position: int) -> None:
    with pytest.raises(TriggerSyntaxError) as err:
        parse_trigger(trigger)
    assert err.value.reason.startswith(reason)
    assert err.value.position == position
    assert str(err.value).endswith(f"at position {position}")


def test_event_and_type_requirements_are_extracted_for_routing() -> None:
    t = parse_trigger('type = "track" and event = "Order Completed" and properties.value > 1')
    assert (t.event_name, t.event_type) == ("Order Completed", "track")
    assert parse_trigger('"Signed Up" = event').event_name == "Signed Up"
    either = parse_trigger('event = "A" or event = "B"')
    assert (either.event_name, either.event_type) == (None, None)
    negated = parse_trigger('!(event = "A")')
    assert negated.event_name is None
    assert parse_trigger("event = 5").event_name is None


@pytest.mark.parametrize(
    ("trigger", "routing_only"),
    [
        ('event = "A"', True),
        ('type = "page"', True),
        ('type = "track" and event = "A"', True),
        ('event = "A" and event = "B"', False),
        ('event = "A" and properties.x = 1', False),
        ('event = "A" or type = "page"', False),
        ('!(event = "A")', False),
        ("event = 5", False),
    ],
)
def test_routing_only_triggers_need_no_evaluation(trigger: str, routing_only: bool) -> None:
    assert parse_trigger(trigger).routing_only is routing_only


def test_keywords_are_only_keywords_as_whole_words() -> None:
    event = decode_event(
        json.dumps({"type": "track", "properties": {"android": 1, "order": 2, "match": 3}}).encode()
    )
    assert holds("properties.android = 1 and properties.order = 2", event)
    assert holds("properties.match = 3", event)


def test_parse_is_cached_by_text() -> None:
    assert parse_trigger('type = "page"') is parse_trigger('type = "page"')
