"""msgspec's validation messages, read in one place.

msgspec reports a validation failure as text only (`Expected `str`, got `int` - at `$.a[0]``),
and the worker turns that text into its own one-line errors: config errors (exit 2), the
`invalid_event` reason of a dead letter, and the fake Events API's rejections. The wording is
msgspec's, not a documented interface, so pyproject pins msgspec's minor version and
tests/test_msgspec_errors.py checks every form below against the installed msgspec.

Forms understood (each optionally followed by ` - at `$<path>``):
- ``Object missing required field `f` `` / ``Object contains unknown field `f` ``
- ``Expected `t1 | t2`, got `g` `` (wrong type) and ``Expected `t` <constraint>`` (e.g.
  ``of length >= 1``, ``>= 0``, ``matching regex '...'``)
- ``Invalid enum value 'v'`` (a Literal) and ``Invalid value 'v'`` (a tag of a tagged union)
- ``Number out of range``; anything else is `OTHER`.
Quoted input values (`'v'`) are never copied into `field`, `expected`, `got` or `path`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

_LOCATION: Final = " - at `$"
_INDEX_RE: Final = re.compile(r"\[(\d+)\]")
_PATTERNS: Final = (
    ("MISSING_FIELD", re.compile(r"Object missing required field `(?P<field>[^`]*)`")),
    ("UNKNOWN_FIELD", re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")),
    ("WRONG_TYPE", re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]*)`")),
    ("CONSTRAINT", re.compile(r"Expected `(?P<expected>[^`]+)` (?P<constraint>.+)", re.S)),
    ("INVALID_ENUM", re.compile(r"Invalid enum value\b")),
    ("INVALID_TAG", re.compile(r"Invalid value\b")),
    ("OUT_OF_RANGE", re.compile(r"Number out of range")),
)


class ErrorKind(enum.Enum):
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    CONSTRAINT = "constraint"
    INVALID_ENUM = "invalid_enum"
    INVALID_TAG = "invalid_tag"
    OUT_OF_RANGE = "out_of_range"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ValidationMessage:
    """One msgspec validation message, split into its parts.

    `path` is the location after `$` (`.kafka.client`, `[0].type`; "" at the top level);
    `field` names the missing or unknown key; `expected` are the type names of a WRONG_TYPE or
    CONSTRAINT error, `got` the type found, `constraint` the rest (`of length >= 1`).
    """

    kind: ErrorKind
    text: str
    path: str = ""
    field: str | None = None
    expected: tuple[str, ...] = ()
    got: str | None = None
    constraint: str | None = None

    @property
    def json_path(self) -> str:
        """`$` plus the path: `$.properties.revenue`, `$` at the top level."""
        return "$" + self.path

    @property
    def key_path(self) -> str:
        """The path without `$` and its leading dot: `destinations[0].name`."""
        return self.path.lstrip(".")

    @property
    def dotted_path(self) -> str:
        """The path with indexes as keys: `data.0.user.email`."""
        return _INDEX_RE.sub(r".\1", self.path).lstrip(".")


def parse_validation_message(message: str) -> ValidationMessage:
    """Split `str(msgspec.ValidationError)` into a `ValidationMessage` (never raises)."""
    text, sep, location = message.rpartition(_LOCATION)
    if sep and location.endswith("`"):
        path = location[:-1]
    else:
        text, path = message, ""
    for name, pattern in _PATTERNS:
        m = pattern.match(text)
        if m is None:
            continue
        groups = m.groupdict()
        expected = groups.get("expected")
        return ValidationMessage(
            kind=ErrorKind[name],
            text=text,
            path=path,
            field=groups.get("field"),
            expected=tuple(t.strip() for t in expected.split("|")) if expected else (),
            got=groups.get("got"),
            constraint=groups.get("constraint"),
        )
    return ValidationMessage(kind=ErrorKind.OTHER, text=text, path=path)
