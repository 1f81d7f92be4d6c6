"""Reading fields from a Segment event, shared by every event source's mapping.

The remove-empty-values + Ajv semantics of one field (`checker`), how the generated code reads
it (`spec`, `extractor`, see worker.mapping.codegen), the error a field raises (`FieldError`:
its text names the field and its paths, never a value), and the value parsers every source
uses (`timestamp_seconds`, `url_ttclid`). Also the interface of the offline and app plans
(`SourcePlan`, `Finisher`) that `worker.mapping.mapper` drives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl

from worker.mapping.codegen import Checker, Spec, compile_extractor
from worker.mapping.coerce import Uncoercible, coerce, coerce_list
from worker.mapping.fields import Const, FieldDef, Source
from worker.mapping.hashing import Hashers
from worker.mapping.segment import SegmentEvent

__all__ = [
    "FieldError",
    "Finisher",
    "SourcePlan",
    "checker",
    "extractor",
    "remembering_timestamp",
    "spec",
    "timestamp_seconds",
    "url_ttclid",
]


class FieldError(Exception):
    """A mapped value that cannot be used; `text` is the InvalidEvent error."""

    def __init__(self, field: str, source: Source, reason: str) -> None:
        where = source.text() if source is not None else "unmapped"
        self.text = f"{field} ({where}): {reason}"
        super().__init__(self.text)

    @classmethod
    def plain(cls, text: str) -> FieldError:
        """An error whose text is given whole (a rule about several fields)."""
        error = cls.__new__(cls)
        error.text = text
        Exception.__init__(error, text)
        return error


def checker(fd: FieldDef, source: Source) -> Checker:
    """Present raw value -> coerced value, None for a top-level "", or FieldError."""
    kind, enum, nested = fd.kind, fd.enum, fd.nested
    name = fd.name

    def fail(reason: str) -> FieldError:
        return FieldError(name, source, reason)

    if fd.multi:

        def check_list(v: Any) -> Any:
            if not nested and v == "":
                return None
            try:
                out = coerce_list(v, kind)
            except Uncoercible as exc:
                raise fail(str(exc)) from None
            if enum is not None and any(x not in enum for x in out):
                raise fail(f"not one of {', '.join(enum)}")
            return out

        return check_list

    def check(v: Any) -> Any:
        if not nested and v == "":
            return None
        try:
            out = coerce(v, kind)
        except Uncoercible as exc:
            raise fail(str(exc)) from None
        if enum is not None and out not in enum:
            raise fail(f"not one of {', '.join(enum)}")
        return out

    return check


def spec(fd: FieldDef, source: Source) -> Spec:
    """How the generated code reads one field (see worker.mapping.codegen.Spec)."""
    check = checker(fd, source)
    string = fd.kind == "string" and fd.enum is None
    if string and fd.multi and not fd.nested:
        mode = "multi_string"
    elif string and not fd.multi:
        mode = "nested" if fd.nested else "plain"
    else:
        mode = "check"
    if source is None:
        return (None, None, check, mode)
    if isinstance(source, Const):
        # Literals were validated at load: coerce once here, not per event.
        value = check(source.value) if source.value is not None else None
        return (None, value, None, mode)
    return (source.candidates, None, check, mode)


def extractor(
    defs: Sequence[FieldDef], sources: dict[str, Source]
) -> Callable[[SegmentEvent], tuple[Any, ...]]:
    """One generated function reading `defs` (in order) with their mapped sources."""
    return compile_extractor([spec(fd, sources[fd.name]) for fd in defs])


def timestamp_seconds(value: str) -> int | None:
    """Unix seconds (floor) of an ISO-8601 date-time; a value without offset is UTC."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return math.floor(dt.timestamp())  # a float is exact to the microsecond here
    except (OverflowError, ValueError, OSError):  # pragma: no cover - edges of the range
        return None


def remembering_timestamp() -> Callable[[str], int | None]:
    """`timestamp_seconds` that returns its last result again for the same string object.

    With `tiktok.max_event_age_s` on, the mapper parses an event's `timestamp` for the age
    check and its plans parse the same object again for `event_time`: only the first pays.
    Identity (not equality) keeps a miss to one comparison; the remembered string stays
    referenced, so its identity cannot be reused. Argument and result are kept in one tuple,
    so they are always read as a pair. One per Mapper."""
    last: tuple[object, int | None] = (None, None)

    def parsed(value: str) -> int | None:
        nonlocal last
        pair = last
        if value is pair[0]:
            return pair[1]
        out = timestamp_seconds(value)
        last = (value, out)
        return out

    return parsed


_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_HOST_SCHEMES: Final = frozenset(("http", "https", "ws", "wss", "ftp"))


def url_ttclid(url: str) -> str | None:
    """The first `ttclid` query parameter of an absolute URL ("" if present but empty).

    A relative or invalid URL is ignored, as Segment's `new URL(...)` ignores it; the query
    is decoded like URLSearchParams (`+` is a space, percent-escapes are UTF-8)."""
    if "?" not in url or ("ttclid" not in url and "%" not in url):
        return None  # no query, or no way to spell the name (it could be percent-encoded)
    m = _SCHEME_RE.match(url)
    if m is None:
        return None
    scheme = url[: m.end() - 1].lower()
    if scheme in _HOST_SCHEMES:
        rest = url[m.end() :]
        if not rest.startswith("//") or rest[2:3] in ("", "/", "?", "#"):
            return None
    query = url.partition("#")[0].partition("?")[2]
    if "%" in query or "+" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "ttclid":
                return value
        return None
    if "ttclid" not in query:
        return None
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "ttclid":
            return value
    return None


# (evaluated event, contents, destination test_event_code) -> encoded `data[]` element.
Finisher = Callable[[Any, list[dict[str, Any]], str | None], bytes]


class SourcePlan(Protocol):
    """The compiled mapping of one offline or app subscription set (worker.mapping.plan_*)."""

    def evaluate(self, event: SegmentEvent, now: Callable[[], float], region: str | None) -> Any:
        """Everything that does not depend on the subscription; raises FieldError."""

    def finisher(self, event: str, contents: Source, items: dict[str, Source]) -> Finisher:
        """The compile-time rules of one subscription (its TikTok event name, contents)."""

    def use_hashers(self, hashers: Hashers) -> None:
        """Hash emails, phones and ids with `hashers` (worker.mapping.hashing)."""

    def use_timestamp(self, parse: Callable[[str], int | None]) -> None:
        """Parse `timestamp` with `parse` (a `remembering_timestamp`)."""
