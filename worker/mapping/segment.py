"""Inbound Segment events: msgspec Structs, one reused Decoder, and Kafka message framing.

A Kafka message value holds one Segment event (a JSON object), a JSON array of events, or a
Segment HTTP API batch object `{"batch": [...], ...}`. `split_message` turns a value into
`Item`s, one per event, each carrying its own raw bytes (the dead-letter value for events from
multi-event messages). `decode_event` decodes one event's bytes into a typed Struct.

Only the top-level Segment fields are declared; `properties`, `traits`, `context` and
`integrations` stay loosely typed (`dict[str, Any]`) because mapping paths reach into them
freely. Unknown top-level fields are tolerated and dropped (Segment adds fields over time).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from worker.core.msgspec_errors import ErrorKind, parse_validation_message
from worker.core.vocabulary import DeadLetterReason

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "ROOT_ATTRS",
    "Alias",
    "DecodeFailure",
    "Group",
    "Identify",
    "Item",
    "Page",
    "Screen",
    "SegmentEvent",
    "Track",
    "decode_event",
    "event_type",
    "split_message",
]

MAX_EVENT_BYTES: Final = 1024 * 1024  # an event over 1 MiB is dead-lettered, never mapped


class _EventBase(msgspec.Struct, rename="camel", tag_field="type", kw_only=True):
    """Fields shared by every Segment call type. A missing field and an explicit null are the
    same thing for the mapper (`@if exists` treats both as absent), so both decode to None."""

    message_id: Any = None
    timestamp: Any = None
    user_id: Any = None
    anonymous_id: Any = None
    event: str | None = None  # the name triggers compare; a non-string is invalid_event
    name: str | None = None
    category: Any = None
    group_id: Any = None
    previous_id: Any = None
    channel: Any = None
    version: Any = None
    original_timestamp: Any = None
    sent_at: Any = None
    received_at: Any = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None


class Track(_EventBase, tag="track"):
    """`analytics.track(event, properties)`."""


class Page(_EventBase, tag="page"):
    """`analytics.page(category, name, properties)`."""


class Screen(_EventBase, tag="screen"):
    """`analytics.screen(name, properties)`."""


class Identify(_EventBase, tag="identify"):
    """`analytics.identify(userId, traits)`."""


class Group(_EventBase, tag="group"):
    """`analytics.group(groupId, traits)`."""


class Alias(_EventBase, tag="alias"):
    """`analytics.alias(userId, previousId)`."""


SegmentEvent = Track | Page | Screen | Identify | Group | Alias

EVENT_TYPES: Final[dict[type[_EventBase], str]] = {
    Track: "track",
    Page: "page",
    Screen: "screen",
    Identify: "identify",
    Group: "group",
    Alias: "alias",
}

# Wire name (as written in paths: `messageId`) -> attribute name (`message_id`).
ROOT_ATTRS: Final[dict[str, str]] = {f.encode_name: f.name for f in msgspec.structs.fields(Track)}

_EVENT_DECODER: Final = msgspec.json.Decoder(SegmentEvent)


class _Batch(msgspec.Struct):
    """Segment HTTP API batch envelope; only `batch` matters, other keys are ignored."""

    batch: list[msgspec.Raw]


_ARRAY_DECODER: Final = msgspec.json.Decoder(list[msgspec.Raw])
_BATCH_DECODER: Final = msgspec.json.Decoder(_Batch)


def event_type(event: SegmentEvent) -> str:
    """The event's Segment `type` (the tag is not an attribute of the Struct)."""
    return EVENT_TYPES[type(event)]


class DecodeFailure(Exception):
    """An event (or a whole message) that cannot be used.

    `reason` is one of the mapper's dead-letter reasons (`INVALID_REASONS`);
    `error` is short text naming a JSON path and an expectation, never a value from the input.
    """

    def __init__(self, reason: DeadLetterReason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


class Item(msgspec.Struct, frozen=True):
    """One event's bytes inside a message (`multi`: it came from an array or a batch)."""

    index: int
    raw: bytes
    multi: bool


def split_message(value: bytes | None) -> list[Item]:
    """Frame a Kafka message value into events.

    Raises `DecodeFailure` for a value that is not JSON at all (or is empty), so the caller
    dead-letters the whole message. A single object that is not a batch is returned as one
    item (it may still fail `decode_event`). An empty array or batch yields no items.
    """
    if not value:
        raise DecodeFailure(DeadLetterReason.DECODE_ERROR, "empty message value")
    head = value.lstrip()[:1]
    if head == b"[":
        # A large array is still framed: only events over the limit are refused, one by one.
        try:
            parts = _ARRAY_DECODER.decode(value)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise DecodeFailure(DeadLetterReason.DECODE_ERROR, _decode_text(exc)) from None
        except UnicodeDecodeError:
            raise DecodeFailure(DeadLetterReason.DECODE_ERROR, "not valid UTF-8") from None
        except msgspec.ValidationError as exc:  # pragma: no cover - list[Raw] accepts any array
            raise DecodeFailure(DeadLetterReason.DECODE_ERROR, _decode_text(exc)) from None
        return [Item(i, bytes(p), True) for i, p in enumerate(parts)]
    if head == b"{" and b'"batch"' in value:
        try:
            envelope = _BATCH_DECODER.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, ValueError):
            envelope = None
        if envelope is not None:
            return [Item(i, bytes(p), True) for i, p in enumerate(envelope.batch)]
    return [Item(0, value, False)]


def decode_event(raw: bytes) -> SegmentEvent:
    """Decode one event's JSON bytes, or raise `DecodeFailure` with a JSON-path reason."""
    if len(raw) > MAX_EVENT_BYTES:
        raise DecodeFailure(
            DeadLetterReason.EVENT_TOO_LARGE, f"event is {len(raw)} bytes (limit 1 MiB)"
        )
    try:
        event: SegmentEvent = _EVENT_DECODER.decode(raw)
        return event
    except msgspec.ValidationError as exc:
        return _not_an_event(raw, str(exc))
    except msgspec.DecodeError as exc:
        raise DecodeFailure(DeadLetterReason.DECODE_ERROR, _decode_text(exc)) from None
    except UnicodeDecodeError:  # msgspec raises it for invalid UTF-8 inside a string
        raise DecodeFailure(DeadLetterReason.DECODE_ERROR, "not valid UTF-8") from None
    except RecursionError:
        raise DecodeFailure(DeadLetterReason.DECODE_ERROR, "JSON nested too deeply") from None


def _not_an_event(raw: bytes, message: str) -> SegmentEvent:
    """Explain a ValidationError without echoing input values (msgspec quotes bad tags)."""
    m = parse_validation_message(message)
    path = m.json_path
    if m.kind is ErrorKind.INVALID_TAG:
        error = f"{path}: not a Segment type (track, page, screen, identify, group, alias)"
    elif m.kind is ErrorKind.MISSING_FIELD and m.field == "type" and not m.path:
        error = "$.type: required"
    elif m.kind is ErrorKind.WRONG_TYPE and m.expected == ("object",) and not m.path:
        error = f"$: expected a JSON object, got {m.got or 'something else'}"
    elif m.kind is ErrorKind.OUT_OF_RANGE:
        error = f"{path}: number out of range"
    elif m.kind in (ErrorKind.WRONG_TYPE, ErrorKind.CONSTRAINT):
        error = f"{path}: {m.text[0].lower()}{m.text[1:]}".replace("`", "")
    else:
        error = f"{path}: {m.text}".replace("`", "")
    raise DecodeFailure(DeadLetterReason.INVALID_EVENT, error)


def _decode_text(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    text = str(exc)
    # msgspec's DecodeError texts name a byte offset, never the data itself.
    return f"not valid JSON ({text})" if text else "not valid JSON"
