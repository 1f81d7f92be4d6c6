"""Paths into a Segment event, compiled once into small getter functions.

Mapping paths are written `$.properties.email` or `$.integrations.TikTok Conversions.ttclid`
(dot-separated keys; spaces are part of a key; a key of digits indexes a list). Trigger
paths are the same keys without `$.` (see worker.mapping.triggers). The first key is a top-level
Segment field (`type`, `event`, `messageId`, `userId`, `properties`, `context`, ...).

Getters return None when any step is missing or null: for the mapper "missing" and "null"
are the same (`@if exists`). Item getters (paths relative to a `contents` item) return the
`MISSING` sentinel instead, because there an explicit null is emitted (coerced) while a
missing key is omitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from worker.mapping.segment import EVENT_TYPES, ROOT_ATTRS, SegmentEvent

__all__ = ["MISSING", "Getter", "compile_getter", "compile_item_getter", "parse_mapping_path"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

Getter = Callable[[SegmentEvent], Any]
Key = str | int


def parse_mapping_path(text: str) -> tuple[str, ...]:
    """`$.a.b` -> ("a", "b"); `$` -> (). Raises ValueError with a reason."""
    if text == "$":
        return ()
    if not text.startswith("$."):
        raise ValueError("a path must start with '$.' (e.g. $.properties.email)")
    keys = tuple(text[2:].split("."))
    if any(k == "" for k in keys):
        raise ValueError("a path must not contain an empty key ('..' or a trailing '.')")
    return keys


def _steps(keys: tuple[str, ...]) -> tuple[tuple[str, int | None], ...]:
    return tuple((k, int(k) if k.isdigit() else None) for k in keys)


def _walk(value: Any, steps: tuple[tuple[str, int | None], ...]) -> Any:
    for key, index in steps:
        if type(value) is dict:
            value = value.get(key)
        elif index is not None and type(value) is list:
            value = value[index] if index < len(value) else None
        else:
            return None
        if value is None:
            return None
    return value


def compile_getter(keys: tuple[str, ...]) -> Getter:
    """A function event -> value (None when missing or null) for a path from the event root."""
    if not keys:
        raise ValueError("the whole event is not a field value")
    root, rest = keys[0], keys[1:]
    if root == "type":
        if rest:
            return lambda event: None
        types = EVENT_TYPES
        return lambda event: types[type(event)]
    attr = ROOT_ATTRS.get(root)
    if attr is None:
        # Not a Segment top-level field: the typed decoder does not keep it.
        return lambda event: None
    if not rest:
        return lambda event: getattr(event, attr)
    if len(rest) == 1 and not rest[0].isdigit():
        key = rest[0]

        def get1(event: SegmentEvent) -> Any:
            d = getattr(event, attr)
            return d.get(key) if d is not None else None

        return get1
    steps = _steps(rest)

    def get(event: SegmentEvent) -> Any:
        d = getattr(event, attr)
        return _walk(d, steps) if d is not None else None

    return get


def compile_item_getter(keys: tuple[str, ...]) -> Callable[[Any], Any]:
    """A function item -> value for a path relative to a `contents` item.

    Returns `MISSING` when the path does not exist (the key is then omitted) and the value,
    possibly None, when it does (an explicit null is coerced and emitted, like Segment).
    """
    if not keys:
        return lambda item: item
    steps = _steps(keys)
    last_key, last_index = steps[-1]
    head = steps[:-1]

    def get(item: Any) -> Any:
        value = item
        for key, index in head:
            if type(value) is dict:
                value = value.get(key, MISSING)
            elif index is not None and type(value) is list:
                value = value[index] if index < len(value) else MISSING
            else:
                return MISSING
            if value is MISSING or value is None:
                return MISSING
        if type(value) is dict:
            return value.get(last_key, MISSING)
        if last_index is not None and type(value) is list:
            return value[last_index] if last_index < len(value) else MISSING
        return MISSING

    return get
