"""Scalar coercions that reproduce what Segment's framework (Ajv, `coerceTypes: "array"`)
does to a mapped value before the TikTok action sees it.

- to string: numbers become JavaScript's `String(n)`, booleans `"true"`/`"false"`, null `""`;
- to number: numeric strings (surrounding whitespace allowed, whitespace-only is 0), booleans
  (1/0) and null (0); integral results are ints, so `"100"` and `100.0` both encode as `100`;
- to integer: as number, and the result must be integral;
- to boolean: `"true"`/`"false"`, 1/0, null (false);
- a one-element list stands for its element; a longer list or an object cannot be a scalar.

`Uncoercible` carries the expected kind and the kind found, never the value itself.
"""

from __future__ import annotations

import re
import sys
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "Uncoercible",
    "coerce",
    "coerce_list",
    "js_number_str",
    "json_kind",
]

_MAX_SAFE: Final = 2**53
_MAX_DOUBLE: Final = sys.float_info.max
_NUMBER_RE: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_RADIX_RE: Final = re.compile(r"0[xX][0-9a-fA-F]+\Z|0[oO][0-7]+\Z|0[bB][01]+\Z")


class Uncoercible(ValueError):
    """A value that cannot become the field's type."""

    def __init__(self, expected: str, found: str) -> None:
        super().__init__(f"expected {expected}, got {found}")
        self.expected = expected
        self.found = found


def json_kind(value: Any) -> str:
    """The JSON type name of a decoded value (for error text that never shows the value)."""
    if value is None:
        return "null"
    t = type(value)
    if t is bool:
        return "boolean"
    if t is int or t is float:
        return "number"
    if t is str:
        return "string"
    if t is list:
        return "array"
    if t is dict:
        return "object"
    return t.__name__


def js_number_str(n: int | float) -> str:
    """`String(n)` as JavaScript writes it (JSON numbers are IEEE doubles there)."""
    if isinstance(n, int):
        if -_MAX_SAFE <= n <= _MAX_SAFE:
            return str(n)
        n = float(n)
    if n != n or n in (float("inf"), float("-inf")):
        return "NaN" if n != n else ("Infinity" if n > 0 else "-Infinity")
    if n.is_integer() and -_MAX_SAFE <= n <= _MAX_SAFE:
        return str(int(n))
    text = repr(n)  # the shortest round-trip digits, as JavaScript uses
    if "e" not in text:
        return text.removesuffix(".0")
    mantissa, exp_text = text.split("e")
    exp = int(exp_text)
    if -7 < exp < 21:
        return format(Decimal(text), "f")
    return f"{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"


def _num(value: float) -> int | float:
    """Integral doubles are emitted as ints, like JSON.stringify does."""
    if value.is_integer() and -_MAX_SAFE <= value <= _MAX_SAFE:
        return int(value)
    return value


def _parse_number(text: str) -> int | float | None:
    """JavaScript's `+text` for the forms Ajv accepts; None when it would be NaN/Infinity."""
    if text == "":
        return None  # Ajv's `data && data == +data` refuses the empty string
    s = text.strip()
    if s == "":
        return 0  # but `+"  "` is 0 in JavaScript
    if _NUMBER_RE.match(s):
        value = float(s)
        if value in (float("inf"), float("-inf")):
            return None
        return _num(value)
    if _RADIX_RE.match(s):
        return int(s, 0)
    return None


def _scalar(value: Any, kind: str) -> Any:
    t = type(value)
    if t is list:
        if len(value) != 1:
            raise Uncoercible(kind, f"array of {len(value)}")
        value = value[0]
        t = type(value)
        if t is list or t is dict:
            raise Uncoercible(kind, json_kind(value))
    elif t is dict:
        raise Uncoercible(kind, "object")
    if kind == "string":
        if t is str:
            return value
        if t is bool:
            return "true" if value else "false"
        if t is int or t is float:
            return js_number_str(value)
        if value is None:
            return ""
    elif kind == "number" or kind == "integer":
        result: Any
        if t is int:
            if not -_MAX_DOUBLE <= value <= _MAX_DOUBLE:
                # JSON numbers are doubles: like 1e400 (refused by the decoder), an integer
                # literal beyond the double range is not a number TikTok can take.
                raise Uncoercible(kind, "number out of range")
            result = value
        elif t is float:
            result = _num(value)
        elif t is bool:
            result = 1 if value else 0
        elif value is None:
            result = 0
        elif t is str:
            result = _parse_number(value)
            if result is None:
                raise Uncoercible(kind, "non-numeric string")
        else:
            raise Uncoercible(kind, json_kind(value))
        if kind == "integer" and type(result) is not int:
            raise Uncoercible(kind, "fractional number")
        return result
    elif kind == "boolean":
        if t is bool:
            return value
        if value is None or value == "false" or (t is not str and value == 0):
            return False
        if value == "true" or (t is not str and value == 1):
            return True
        raise Uncoercible(kind, json_kind(value))
    raise Uncoercible(kind, json_kind(value))


def coerce(value: Any, kind: str) -> Any:
    """Coerce a present value to `kind` (string, number, integer, boolean); may raise."""
    if kind == "string" and type(value) is str:
        return value  # the common case, kept cheap
    return _scalar(value, kind)


def coerce_list(value: Any, kind: str) -> list[Any]:
    """A "multiple" field: a scalar becomes a one-item list; null elements are dropped."""
    if type(value) is list:
        if kind == "string":
            out: list[Any] = []
            for v in value:
                if type(v) is str:
                    out.append(v)
                elif v is not None:
                    out.append(_scalar(v, kind))
            return out
        return [_scalar(v, kind) for v in value if v is not None]
    if type(value) is dict:
        raise Uncoercible(f"{kind} or array", "object")
    return [_scalar(value, kind)]
