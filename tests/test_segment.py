"""Segment decoding and Kafka message framing."""

from __future__ import annotations

import json

import pytest

from worker.mapping.segment import (
    MAX_EVENT_BYTES,
    Alias,
    DecodeFailure,
    Group,
    Identify,
    Page,
    Screen,
    Track,
    decode_event,
    event_type,
    split_message,
)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("track", Track),
        ("page", Page),
        ("screen", Screen),
        ("identify", Identify),
        ("group", Group),
        ("alias", Alias),
    ],
)
def test_every_segment_type_decodes_to_its_struct(kind: str, cls: type) -> None:
    event = decode_event(json.dumps({"type": kind, "messageId": "m"}).encode())
    assert type(event) is cls
    assert event_type(event) == kind
    assert event.message_id == "m"


def test_camel_case_fields_and_unknown_fields() -> None:
    raw = json.dumps(
        {
            "type": "track",
            "event": "E",
            "userId": 7,
            "anonymousId": "a",
            "originalTimestamp": "t0",
            "sentAt": "t1",
            "receivedAt": "t2",
            "writeKey": "ignored",
            "newFieldFromTheFuture": {"x": 1},
            "properties": {"a": [1, {"b": None}]},
            "context": {"traits": {"email": "x"}},
            "integrations": {"All": False},
        }
    ).encode()
    event = decode_event(raw)
    assert (event.event, event.user_id, event.anonymous_id) == ("E", 7, "a")
    assert (event.original_timestamp, event.sent_at, event.received_at) == ("t0", "t1", "t2")
    assert event.properties == {"a": [1, {"b": None}]}
    assert event.context == {"traits": {"email": "x"}}
    assert event.integrations == {"All": False}
    assert not hasattr(event, "write_key")


def test_null_and_missing_are_both_none() -> None:
    a = decode_event(b'{"type": "page", "properties": null, "userId": null}')
    b = decode_event(b'{"type": "page"}')
    assert (a.properties, a.user_id) == (b.properties, b.user_id) == (None, None)


@pytest.mark.parametrize(
    ("raw", "reason", "error"),
    [
        (b'{"type": "Track"}', "invalid_event", "$.type: not a Segment type"),
        (b'{"type": 5}', "invalid_event", "$.type"),
        (b'{"event": "x"}', "invalid_event", "$.type: required"),
        (b"[1]", "invalid_event", "$: expected a JSON object, got array"),
        (b"null", "invalid_event", "$: expected a JSON object, got null"),
        (
            b'{"type": "page", "properties": "x"}',
            "invalid_event",
            "$.properties: expected object | null, got str",
        ),
        (b'{"type": "page", "traits": [1]}', "invalid_event", "$.traits"),
        (b"{", "decode_error", "not valid JSON"),
        (b'{"type": "p\xc3"}', "decode_error", "not valid"),
    ],
)
def test_decode_failures_name_the_path_not_the_value(raw: bytes, reason: str, error: str) -> None:
    with pytest.raises(DecodeFailure) as err:
        decode_event(raw)
    assert err.value.reason == reason
    assert err.value.error.startswith(error)


def test_unknown_type_value_is_not_echoed() -> None:
    with pytest.raises(DecodeFailure) as err:
        decode_event(b'{"type": "secret@example.com"}')
    assert "secret" not in err.value.error


def test_too_large_is_refused_before_decoding() -> None:
    raw = b'{"type": "page", "name": "' + b"a" * MAX_EVENT_BYTES + b'"}'
    with pytest.raises(DecodeFailure) as err:
        decode_event(raw)
    assert err.value.reason == "event_too_large"


def test_split_single_array_and_batch() -> None:
    single = b'{"type": "page"}'
    assert [(i.index, i.raw, i.multi) for i in split_message(single)] == [(0, single, False)]
    array = b'[{"type": "page"}, {"type": "track"}]'
    assert [(i.index, i.raw, i.multi) for i in split_message(array)] == [
        (0, b'{"type": "page"}', True),
        (1, b'{"type": "track"}', True),
    ]
    batch = b'{"batch": [{"type": "page"}], "sentAt": "x", "context": {"library": {}}}'
    assert [(i.index, i.raw, i.multi) for i in split_message(batch)] == [
        (0, b'{"type": "page"}', True)
    ]
    assert split_message(b"  []  ") == []


def test_split_batch_that_is_not_a_list_is_a_single_event() -> None:
    value = b'{"batch": "nope", "type": "page"}'
    (item,) = split_message(value)
    assert (item.raw, item.multi) == (value, False)


@pytest.mark.parametrize("value", [b"", None, b"[1,", b"[" * 200_000 + b"]" * 200_000])
def test_split_refuses_unframeable_values(value: bytes | None) -> None:
    with pytest.raises(DecodeFailure) as err:
        split_message(value)
    assert err.value.reason == "decode_error"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        pytest.param(b'{"type":"track","event":["Order Completed"]}', "$.event", id="event-list"),
        pytest.param(b'{"type":"track","event":{"n":1}}', "$.event", id="event-object"),
        pytest.param(b'{"type":"page","name":5}', "$.name", id="page-name-number"),
    ],
)
def test_event_and_name_must_be_strings(raw: bytes, path: str) -> None:
    # Triggers compare these names; a non-string one is not a Segment event, not a "no match".
    with pytest.raises(DecodeFailure) as err:
        decode_event(raw)
    assert err.value.reason == "invalid_event"
    assert str(err.value.error).startswith(path + ": expected str")
