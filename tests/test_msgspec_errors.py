"""Every msgspec message form `worker.core.msgspec_errors` reads, produced by the installed
msgspec (its minor version is pinned in pyproject because the wording is parsed)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import pytest

from worker.core.msgspec_errors import ErrorKind, ValidationMessage, parse_validation_message


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    level: Literal["info", "debug"] = "info"
    count: Annotated[int, msgspec.Meta(ge=0)] = 0


class Outer(msgspec.Struct):
    items: list[Inner]
    label: str | None = None


class Cat(msgspec.Struct, tag="cat"):
    pass


class Dog(msgspec.Struct, tag="dog"):
    pass


def error_of(data: bytes, tp: object = Outer) -> ValidationMessage:
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.json.decode(data, type=tp)
    return parse_validation_message(str(err.value))


def test_missing_field() -> None:
    m = error_of(b'{"items": [{}]}')
    assert (m.kind, m.field, m.path) == (ErrorKind.MISSING_FIELD, "name", ".items[0]")
    assert (m.json_path, m.key_path, m.dotted_path) == ("$.items[0]", "items[0]", "items.0")


def test_missing_field_at_the_top() -> None:
    m = error_of(b"{}")
    assert (m.kind, m.field, m.path, m.json_path) == (ErrorKind.MISSING_FIELD, "items", "", "$")


def test_unknown_field() -> None:
    m = error_of(b'{"items": [{"name": "a", "nope": 1}]}')
    assert (m.kind, m.field, m.key_path) == (ErrorKind.UNKNOWN_FIELD, "nope", "items[0]")


def test_wrong_type_with_a_union() -> None:
    m = error_of(b'{"items": [], "label": 3}')
    assert (m.kind, m.expected, m.got, m.key_path) == (
        ErrorKind.WRONG_TYPE,
        ("str", "null"),
        "int",
        "label",
    )


def test_wrong_type_at_the_top() -> None:
    m = error_of(b"[1]")
    assert (m.kind, m.expected, m.got, m.path) == (ErrorKind.WRONG_TYPE, ("object",), "array", "")


@pytest.mark.parametrize(
    ("item", "constraint"),
    [(b'{"name": ""}', "of length >= 1"), (b'{"name": "a", "count": -1}', ">= 0")],
)
def test_constraint(item: bytes, constraint: str) -> None:
    m = error_of(b'{"items": [' + item + b"]}")
    assert (m.kind, m.expected, m.constraint) == (
        ErrorKind.CONSTRAINT,
        ("int",) if b"count" in item else ("str",),
        constraint,
    )


def test_invalid_enum_value_keeps_the_value_out_of_the_parts() -> None:
    m = error_of(b'{"items": [{"name": "a", "level": "jane@example.com"}]}')
    assert (m.kind, m.key_path, m.field, m.got) == (
        ErrorKind.INVALID_ENUM,
        "items[0].level",
        None,
        None,
    )


def test_invalid_tag() -> None:
    m = error_of(b'{"type": "bird"}', Cat | Dog)
    assert (m.kind, m.json_path) == (ErrorKind.INVALID_TAG, "$.type")


def test_number_out_of_range() -> None:
    m = error_of(b'{"items": [{"name": "a", "count": 1e400}]}')
    assert (m.kind, m.key_path) == (ErrorKind.OUT_OF_RANGE, "items[0].count")


def test_a_value_that_looks_like_a_location_does_not_move_the_path() -> None:
    m = parse_validation_message("Invalid value 'x - at `$.evil`' - at `$.type`")
    assert (m.kind, m.path) == (ErrorKind.INVALID_TAG, ".type")


def test_unknown_text_is_other_without_a_path() -> None:
    m = parse_validation_message("Something new")
    assert (m.kind, m.text, m.path) == (ErrorKind.OTHER, "Something new", "")
