"""The mapping engine: Kafka message value -> TikTok `data[]` elements, per destination.

Contract of `Mapper.map_message(value)`:
- it never raises, whatever the bytes;
- it returns one `EventOutcome` per Segment event in the message (SPEC §3 framing), at least
  one: a value that is not JSON gives one outcome with `decode_error`; an empty array or
  batch gives one outcome skipped as `no_match`;
- an outcome carries the TikTok events it produced (`mapped`, one per matching
  (destination, subscription)), the failures (`invalid`, with `destination=None` when the
  event is bad for everyone, or the destination whose mapping failed), and `skipped` (a
  `worker.metrics.SKIP_REASONS` value) only when nothing was mapped and nothing was invalid;
- error texts name a path and an expectation, never a value: no PII, no token.

Mapping follows Segment's Report Web Event action (docs/segment-tiktok-destination.md §3-5):
field defaults with `@if exists` fallbacks, removal of null and top-level "", Ajv-style
coercion, enum checks, then the body builder's rules (which keys are always present, which
only when truthy), ttclid resolution and PII hashing (worker.formatters).

Work shared between subscriptions and destinations is computed once per event: every
subscription points at an interned `_Plan` (its field sources), and destinations with the
same mapping share one plan, so hashing happens once per event even with two destinations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import msgspec

from worker.coerce import Uncoercible, coerce, coerce_list, js_number_str, json_kind
from worker.config import Config, DestinationConfig, LiteralValue, SubscriptionConfig
from worker.errors import ConfigError
from worker.fields import (
    CONTENTS_ITEM_FIELDS,
    FIELDS,
    TRAVEL_FIELDS,
    VEHICLE_FIELDS,
    Const,
    FieldDef,
    Paths,
    Source,
)
from worker.formatters import (
    format_address_part,
    hash_email,
    hash_external_id,
    hash_name,
    hash_phone,
)
from worker.paths import MISSING, compile_getter, compile_item_getter, parse_mapping_path
from worker.presets import presets_for
from worker.segment import (
    EVENT_TYPES,
    DecodeFailure,
    SegmentEvent,
    decode_event,
    split_message,
)
from worker.tiktok import BatchKey, EventOut, Lead, PageOut, UserOut, encode_event
from worker.triggers import Trigger, parse_trigger

__all__ = [
    "INVALID_REASONS",
    "EventOutcome",
    "InvalidEvent",
    "MappedEvent",
    "Mapper",
    "compile_subscription_mapping",
]

INVALID_REASONS: Final = ("decode_error", "invalid_event", "event_too_large")
_UNSET: Final = msgspec.UNSET


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    """Why an event cannot be sent. `destination` is None when it is bad for everyone."""

    reason: str  # decode_error | invalid_event | event_too_large
    error: str  # a path and an expectation; never a value from the event
    destination: str | None = None


@dataclass(frozen=True, slots=True)
class MappedEvent:
    """One TikTok event ready to batch: `payload` is the encoded `data[]` element."""

    destination: str
    subscription: str
    event: str
    key: BatchKey
    event_id: str | None
    payload: bytes


@dataclass(slots=True)
class EventOutcome:
    """Everything that became of one Segment event of a Kafka message."""

    index: int
    multi: bool
    raw: bytes  # the event's own JSON if multi, else the whole message value
    message_id: str | None
    mapped: list[MappedEvent]
    invalid: list[InvalidEvent]
    skipped: str | None


class _FieldError(Exception):
    """A mapped value that cannot be used; `text` is the InvalidEvent error."""

    def __init__(self, field: str, source: Source, reason: str) -> None:
        where = source.text() if source is not None else "unmapped"
        self.text = f"{field} ({where}): {reason}"
        super().__init__(self.text)


# --------------------------------------------------------------------------- sources


def _compile_source(source: Source) -> Callable[[SegmentEvent], Any] | None:
    """event -> raw value (None when absent); None when the field is not mapped."""
    if source is None:
        return None
    if isinstance(source, Const):
        value = source.value
        return lambda event: value
    getters = [compile_getter(c) for c in source.candidates]
    if len(getters) == 1:
        return getters[0]
    if len(getters) == 2:
        first, second = getters

        def either(event: SegmentEvent) -> Any:
            v = first(event)
            return v if v is not None else second(event)

        return either

    def first_present(event: SegmentEvent) -> Any:
        for get in getters:
            v = get(event)
            if v is not None:
                return v
        return None

    return first_present


FieldFn = Callable[[SegmentEvent], Any]


def _absent(event: SegmentEvent) -> Any:
    return None


def _compile_field(fd: FieldDef, source: Source) -> FieldFn:
    """event -> coerced value, or None when absent (null, missing, or top-level "")."""
    get = _compile_source(source)
    if get is None:
        return _absent
    name, kind, enum, nested = fd.name, fd.kind, fd.enum, fd.nested

    def fail(exc: Uncoercible) -> _FieldError:
        return _FieldError(name, source, str(exc))

    if fd.multi:

        def multi(event: SegmentEvent) -> Any:
            v = get(event)
            if v is None or (not nested and v == ""):
                return None
            try:
                out = coerce_list(v, kind)
            except Uncoercible as exc:
                raise fail(exc) from None
            if enum is not None and any(x not in enum for x in out):
                raise _FieldError(name, source, f"not one of {', '.join(enum)}")
            return out

        return multi
    if kind == "string" and enum is None and not nested:

        def plain(event: SegmentEvent) -> Any:
            v = get(event)
            if type(v) is str:
                return v or None
            if v is None:
                return None
            try:
                return coerce(v, "string")
            except Uncoercible as exc:
                raise fail(exc) from None

        return plain

    def scalar(event: SegmentEvent) -> Any:
        v = get(event)
        if v is None or (not nested and v == ""):
            return None
        try:
            out = coerce(v, kind)
        except Uncoercible as exc:
            raise fail(exc) from None
        if enum is not None and out not in enum:
            raise _FieldError(name, source, f"not one of {', '.join(enum)}")
        return out

    return scalar


# --------------------------------------------------------------------------- overrides


def _parse_source(fd_name: str, raw: Any, where: str) -> Source:
    """A `mapping` value from the config -> Source; raises ConfigError naming `where`."""
    if raw is None:
        return None
    if isinstance(raw, LiteralValue):
        value = raw.value
        return Const(value, msgspec.json.encode(value))
    paths = (raw,) if isinstance(raw, str) else tuple(raw)
    if not paths:
        raise ConfigError(f"{where}: an empty list of paths maps nothing; use null")
    candidates = []
    for i, text in enumerate(paths):
        try:
            keys = parse_mapping_path(text)
        except ValueError as exc:
            suffix = f"[{i}]" if not isinstance(raw, str) else ""
            raise ConfigError(f"{where}{suffix}: {exc}") from None
        if not keys and fd_name != "contents" and not fd_name.startswith("contents."):
            raise ConfigError(f"{where}: '$' (the whole event) is not a field value")
        candidates.append(keys)
    return Paths(tuple(candidates))


def compile_subscription_mapping(sub: SubscriptionConfig, *, where: str) -> dict[str, Source]:
    """Validate a subscription's `mapping` overrides and return them as Sources.

    Keys are field names (worker.fields), plus `contents` (the path of the items: an object
    is one item, an array is many). Literals are checked against the field's type and enum.
    """
    out: dict[str, Source] = {}
    for key, raw in sub.mapping.items():
        kwhere = f"{where}.{key}"
        if key == "contents":
            out[key] = _parse_source(key, raw, kwhere)
            continue
        fd = FIELDS.get(key)
        if fd is None:
            raise ConfigError(f"{kwhere}: unknown field (see docs/configuration.md, Fields)")
        source = _parse_source(key, raw, kwhere)
        if isinstance(source, Const):
            _check_literal(fd, source, kwhere)
        out[key] = source
    return out


def _check_literal(fd: FieldDef, source: Const, where: str) -> None:
    value = source.value
    if value is None or (value == "" and not fd.nested):
        return
    try:
        out = coerce_list(value, fd.kind) if fd.multi else coerce(value, fd.kind)
    except Uncoercible as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values = out if isinstance(out, list) else [out]
    if fd.enum is not None and any(v not in fd.enum for v in values):
        raise ConfigError(f"{where}: must be one of: {', '.join(fd.enum)}")


# --------------------------------------------------------------------------- plan


@dataclass(slots=True)
class _Common:
    """Everything of one TikTok event except its name and `contents`."""

    user: UserOut
    properties: dict[str, object]
    page: PageOut | msgspec.UnsetType
    lead: Lead | msgspec.UnsetType
    event_id: str | None
    event_time: int
    event_source: str
    test_event_code: str | None
    limited_data_use: bool


_PROPERTY_FIELDS: Final = (
    "content_type",
    "currency",
    "value",
    "query",
    "description",
    "order_id",
    "shop_id",
    "content_ids",
    "delivery_category",
    "num_items",
    "predicted_ltv",
    "search_string",
)
_PLAN_FIELDS: Final = tuple(
    n for n in FIELDS if not n.startswith(("contents.", "travel_fields.", "vehicle_fields."))
)


def _timestamp_seconds(value: str) -> int | None:
    """Unix seconds (floor) of an ISO-8601 date-time; a value without offset is UTC."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return math.floor(dt.timestamp())
    except (OverflowError, ValueError):  # pragma: no cover - platform limits
        return None


def _url_ttclid(url: str) -> str | None:
    """The first `ttclid` query parameter of an absolute URL ("" if present but empty)."""
    if "?" not in url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or (
        parts.scheme in ("http", "https", "ws", "wss", "ftp") and not (parts.netloc)
    ):
        return None  # a relative or invalid URL is ignored, as with WHATWG `new URL`
    query = parts.query
    if "ttclid" not in query and "%" not in query:
        return None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "ttclid":
            return value
    return None


class _Plan:
    """The compiled field sources of one mapping (defaults + overrides) and phone region."""

    def __init__(self, sources: dict[str, Source], region: str | None) -> None:
        self.region = region
        fn = {name: _compile_field(FIELDS[name], sources[name]) for name in _PLAN_FIELDS}
        self._sources = sources
        self.event_source = fn["event_source"]
        self.event_spec_type = fn["event_spec_type"]
        self.event_id = fn["event_id"]
        self.timestamp = fn["timestamp"]
        self.phone = fn["phone_number"]
        self.email = fn["email"]
        self.external_id = fn["external_id"]
        self.first_name = fn["first_name"]
        self.last_name = fn["last_name"]
        self.city = fn["address.city"]
        self.state = fn["address.state"]
        self.country = fn["address.country"]
        self.zip_code = fn["address.zip_code"]
        self.ttclid = fn["ttclid"]
        self.ttp = fn["ttp"]
        self.ip = fn["ip"]
        self.user_agent = fn["user_agent"]
        self.locale = fn["locale"]
        self.url = fn["url"]
        self.referrer = fn["referrer"]
        self.limited_data_use = fn["limited_data_use"]
        self.test_event_code = fn["test_event_code"]
        self.lead_id = fn["lead_fields.lead_id"]
        self.lead_event_source = fn["lead_fields.lead_event_source"]
        self.properties = tuple(
            (name, fn[name]) for name in _PROPERTY_FIELDS if sources[name] is not None
        )
        self.travel = tuple(
            (d.name.partition(".")[2], _compile_field(d, sources[d.name]))
            for d in TRAVEL_FIELDS
            if sources[d.name] is not None
        )
        self.vehicle = tuple(
            (d.name.partition(".")[2], _compile_field(d, sources[d.name]))
            for d in VEHICLE_FIELDS
            if sources[d.name] is not None
        )

    def evaluate(self, event: SegmentEvent, now: Callable[[], float]) -> _Common:
        """Map and hash the shared part of a TikTok event; raises _FieldError."""
        event_source = self.event_source(event) or "web"
        event_id = self.event_id(event)
        ts = self.timestamp(event)
        if ts is None:
            event_time = math.floor(now())
        else:
            seconds = _timestamp_seconds(ts)
            if seconds is None:
                raise _FieldError(
                    "timestamp", self._sources["timestamp"], "not an ISO-8601 date-time"
                )
            event_time = seconds

        region = self.region
        phones = self.phone(event)
        emails = self.email(event)
        ids = self.external_id(event)
        first, last = self.first_name(event), self.last_name(event)
        city, state, country = self.city(event), self.state(event), self.country(event)
        zip_code = self.zip_code(event)
        user = UserOut(
            external_id=[hash_external_id(x) for x in ids] if ids else [],
            phone=[hash_phone(p, region) for p in phones] if phones else [],
            email=[hash_email(e) for e in emails] if emails else [],
            first_name=hash_name(first) if first is not None else "",
            last_name=hash_name(last) if last is not None else "",
            city=format_address_part(city) if city is not None else "",
            state=format_address_part(state) if state is not None else "",
            country=format_address_part(country) if country is not None else "",
            zip_code=hash_name(zip_code) if zip_code is not None else "",
        )
        url = self.url(event)
        field_ttclid = self.ttclid(event)
        url_ttclid = _url_ttclid(url) if url else None
        if url_ttclid or field_ttclid:
            user.ttclid = url_ttclid if url_ttclid is not None else field_ttclid
        if ttp := self.ttp(event):
            user.ttp = ttp
        if ip := self.ip(event):
            user.ip = ip
        if ua := self.user_agent(event):
            user.user_agent = ua
        if locale := self.locale(event):
            user.locale = locale

        referrer = self.referrer(event)
        page: PageOut | msgspec.UnsetType = _UNSET
        if url or referrer:
            page = PageOut()
            if url:
                page.url = url
            if referrer:
                page.referrer = referrer

        props: dict[str, object] = {}
        for name, get in self.properties:
            v = get(event)
            if v is not None:
                props[name] = v
        if event_source == "web":
            spec = self.event_spec_type(event)
            if spec == "travel_fields":
                for name, get in self.travel:
                    v = get(event)
                    if v is not None:
                        props[name] = v
            elif spec == "vehicle_fields":
                self._vehicle(event, props)
        else:
            self.event_spec_type(event)  # still validated (enum), like Segment

        lead: Lead | msgspec.UnsetType = _UNSET
        if event_source == "crm":
            lead_id = self.lead_id(event)
            if type(lead_id) is str:
                lead = Lead(lead_id=lead_id)
                if les := self.lead_event_source(event):
                    lead.lead_event_source = les
        return _Common(
            user=user,
            properties=props,
            page=page,
            lead=lead,
            event_id=event_id or None,
            event_time=event_time,
            event_source=event_source,
            test_event_code=self.test_event_code(event) or None,
            limited_data_use=self.limited_data_use(event) is True,
        )

    def _vehicle(self, event: SegmentEvent, props: dict[str, object]) -> None:
        values = {name: get(event) for name, get in self.vehicle}
        for name, _ in self.vehicle:
            v = values[name]
            if name == "mileage_value":
                unit = values.get("mileage_unit")
                if unit is not None and v is not None:
                    props["mileage"] = {"unit": unit, "value": v}
            elif name == "preferred_price_range_min":
                high = values.get("preferred_price_range_max")
                if v is not None and high is not None:
                    props["preferred_price_range"] = [v, high]
            elif name in ("mileage_unit", "preferred_price_range_max"):
                continue
            elif v is not None:
                props[name] = v


# --------------------------------------------------------------------------- contents

ContentsFn = Callable[[SegmentEvent], list[dict[str, Any]]]


def _constant(value: Any) -> Callable[[Any], Any]:
    return lambda item: value


def _compile_contents(source: Source, items: dict[str, Source]) -> ContentsFn:
    """`contents` from `source` (object: one item; array: items), each item mapped."""
    get = _compile_source(source)
    if get is None:
        return lambda event: []
    specs: list[tuple[str, str | None, Callable[[Any], Any], str, Source]] = []
    for fd in CONTENTS_ITEM_FIELDS:
        item_source = items[fd.name]
        if item_source is None:
            continue
        out_key = fd.name.partition(".")[2]
        if isinstance(item_source, Const):
            specs.append((out_key, None, _constant(item_source.value), fd.kind, item_source))
            continue
        # Only the first candidate is used for an item path unless it is missing.
        getters = [compile_item_getter(c) for c in item_source.candidates]
        simple = (
            item_source.candidates[0][0]
            if (len(getters) == 1 and len(item_source.candidates[0]) == 1)
            else None
        )

        def item_get(item: Any, gs: list[Callable[[Any], Any]] = getters) -> Any:
            result: Any = MISSING
            for g in gs:
                v = g(item)
                if v is not MISSING and v is not None:
                    return v
                if v is None:
                    result = None
            return result

        specs.append((out_key, simple, item_get, fd.kind, item_source))
    plan = tuple(specs)

    def contents(event: SegmentEvent) -> list[dict[str, Any]]:
        v = get(event)
        if v is None or v == "":
            return []
        if type(v) is dict:
            rows: list[Any] = [v]
        elif type(v) is list:
            rows = v
        else:
            raise _FieldError("contents", source, f"expected object or array, got {json_kind(v)}")
        out = []
        for row in rows:
            item: dict[str, Any] = {}
            is_dict = type(row) is dict
            for key, simple_key, item_get, kind, isrc in plan:
                if simple_key is not None:
                    x = row.get(simple_key, MISSING) if is_dict else MISSING
                else:
                    x = item_get(row)
                if x is MISSING:
                    continue
                if kind == "string" and type(x) is str:
                    item[key] = x
                    continue
                try:
                    item[key] = coerce(x, kind)
                except Uncoercible as exc:
                    raise _FieldError(f"contents[].{key}", isrc, str(exc)) from None
            out.append(item)
        return out

    return contents


_CONTENTS_SOURCES: Final[dict[str, Source]] = {
    "single": Paths((("properties",),)),
    "multi": Paths((("properties", "products"),)),
    "none": None,
}


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class _Sub:
    order: int
    name: str
    event: str
    trigger: Trigger
    plan: _Plan
    contents: ContentsFn


class _Destination:
    """One configured destination: its filter, subscriptions and batch keys."""

    _MAX_ROUTES: Final = 4096  # bound on the (type, event) -> candidates cache

    def __init__(
        self,
        dest: DestinationConfig,
        subs: list[_Sub],
        partner_name: str | None,
    ) -> None:
        self.name = dest.name
        self.pixel_code = dest.pixel_code
        self.test_event_code = dest.test_event_code or None
        self.partner_name = partner_name
        self.when = parse_trigger(dest.when) if dest.when is not None else None
        self.subs = subs
        self._routes: dict[tuple[str, Any], tuple[_Sub, ...]] = {}
        self._keys: dict[tuple[str, str | None], BatchKey] = {}

    def candidates(self, etype: str, name: Any) -> tuple[_Sub, ...]:
        """Subscriptions whose trigger could hold for this (type, event), in order."""
        route = (etype, name if type(name) is str else None)
        found = self._routes.get(route)
        if found is None:
            found = tuple(
                s
                for s in self.subs
                if (s.trigger.event_name is None or s.trigger.event_name == route[1])
                and (s.trigger.event_type is None or s.trigger.event_type == etype)
            )
            if len(self._routes) >= self._MAX_ROUTES:
                self._routes.clear()  # event names are unbounded input
            self._routes[route] = found
        return found

    def key(self, event_source: str, test_event_code: str | None) -> BatchKey:
        code = test_event_code or self.test_event_code
        k = self._keys.get((event_source, code))
        if k is None:
            k = BatchKey(
                destination=self.name,
                pixel_code=self.pixel_code,
                event_source=event_source,
                test_event_code=code,
                partner_name=self.partner_name,
            )
            self._keys[(event_source, code)] = k
        return k


def _default_sources() -> dict[str, Source]:
    return {name: fd.default for name, fd in FIELDS.items()}


class Mapper:
    """Maps Kafka message values to TikTok events for every configured destination.

    Build once per process (compiles triggers, paths and plans); `map_message` is then a
    pure function of the bytes and the clock (`now`, used when an event has no timestamp).
    """

    def __init__(self, config: Config, *, now: Callable[[], float] = time.time) -> None:
        self._now = now
        plans: dict[tuple[Any, ...], _Plan] = {}
        contents_fns: dict[tuple[Any, ...], ContentsFn] = {}
        self._destinations: list[_Destination] = []
        for i, dest in enumerate(config.destinations):
            subs: list[_Sub] = []
            specs: list[tuple[str, str, str, str, dict[str, Source]]] = [
                (p.name, p.trigger, p.event, p.contents, {}) for p in presets_for(dest.presets)
            ]
            for j, sub in enumerate(dest.subscriptions):
                where = f"destinations[{i}].subscriptions[{j}].mapping"
                overrides = compile_subscription_mapping(sub, where=where)
                specs.append((sub.name, sub.trigger, sub.event, sub.contents, overrides))
            for order, (name, trigger, event, contents, overrides) in enumerate(specs):
                sources = _default_sources()
                sources.update({k: v for k, v in overrides.items() if k != "contents"})
                plan_key = (
                    tuple(sorted((k, _source_key(v)) for k, v in sources.items())),
                    dest.phone_default_region,
                )
                plan = plans.get(plan_key)
                if plan is None:
                    plan = plans[plan_key] = _Plan(sources, dest.phone_default_region)
                csource = (
                    overrides["contents"]
                    if "contents" in overrides
                    else (_CONTENTS_SOURCES[contents])
                )
                items = {fd.name: sources[fd.name] for fd in CONTENTS_ITEM_FIELDS}
                ckey = (_source_key(csource), tuple(_source_key(v) for v in items.values()))
                cfn = contents_fns.get(ckey)
                if cfn is None:
                    cfn = contents_fns[ckey] = _compile_contents(csource, items)
                subs.append(_Sub(order, name, event, parse_trigger(trigger), plan, cfn))
            self._destinations.append(_Destination(dest, subs, config.tiktok.partner_name))

    # -- public API ---------------------------------------------------------------------

    def map_message(self, value: bytes | None) -> list[EventOutcome]:
        """All outcomes of one Kafka message value. Never raises."""
        raw = value if value is not None else b""
        try:
            items = split_message(value)
        except DecodeFailure as exc:
            return [_failed(0, False, raw, exc.reason, exc.error)]
        except Exception as exc:  # defensive: framing must not take the worker down
            return [_failed(0, False, raw, "decode_error", f"unreadable: {type(exc).__name__}")]
        if not items:
            return [EventOutcome(0, True, raw, None, [], [], "no_match")]
        return [self._map_item(item.index, item.multi, item.raw) for item in items]

    def map_event(
        self, event: SegmentEvent, *, index: int = 0, multi: bool = False, raw: bytes = b""
    ) -> EventOutcome:
        """Map an already decoded event (the `map` command and tests use this)."""
        mapped: list[MappedEvent] = []
        invalid: list[InvalidEvent] = []
        memo: dict[int, Any] = {}
        now = self._now
        for dest in self._destinations:
            self._map_destination(dest, event, memo, now, mapped, invalid)
        skipped = None if mapped or invalid else "no_match"
        return EventOutcome(index, multi, raw, _message_id(event), mapped, invalid, skipped)

    # -- internals ----------------------------------------------------------------------

    def _map_item(self, index: int, multi: bool, raw: bytes) -> EventOutcome:
        try:
            event = decode_event(raw)
        except DecodeFailure as exc:
            return _failed(index, multi, raw, exc.reason, exc.error)
        try:
            return self.map_event(event, index=index, multi=multi, raw=raw)
        except Exception as exc:  # defensive: a mapper bug must not stop the partition
            return _failed(
                index, multi, raw, "invalid_event", f"internal mapping error: {type(exc).__name__}"
            )

    @staticmethod
    def _map_destination(
        dest: _Destination,
        event: SegmentEvent,
        memo: dict[int, Any],
        now: Callable[[], float],
        mapped: list[MappedEvent],
        invalid: list[InvalidEvent],
    ) -> None:
        if dest.when is not None and not dest.when.predicate(event):
            return
        for sub in dest.candidates(EVENT_TYPES[type(event)], event.event):
            if not sub.trigger.predicate(event):
                continue
            try:
                common = memo.get(id(sub.plan))
                if common is None:
                    try:
                        common = sub.plan.evaluate(event, now)
                    except _FieldError as exc:
                        common = exc
                    memo[id(sub.plan)] = common
                if isinstance(common, _FieldError):
                    raise common
                cid = id(sub.contents)
                contents = memo.get(cid)
                if contents is None:
                    try:
                        contents = sub.contents(event)
                    except _FieldError as exc:
                        contents = exc
                    memo[cid] = contents
                if isinstance(contents, _FieldError):
                    raise contents
            except _FieldError as exc:
                failure = InvalidEvent("invalid_event", exc.text, dest.name)
                if failure not in invalid:
                    invalid.append(failure)
                continue
            properties: dict[str, object] = {"contents": contents}
            properties.update(common.properties)
            payload = encode_event(
                EventOut(
                    event=sub.event,
                    event_time=common.event_time,
                    event_id=common.event_id if common.event_id is not None else _UNSET,
                    user=common.user,
                    properties=properties,
                    page=common.page,
                    lead=common.lead,
                    limited_data_use=common.limited_data_use,
                )
            )
            mapped.append(
                MappedEvent(
                    destination=dest.name,
                    subscription=sub.name,
                    event=sub.event,
                    key=dest.key(common.event_source, common.test_event_code),
                    event_id=common.event_id,
                    payload=payload,
                )
            )


def _source_key(source: Source) -> Any:
    if source is None:
        return None
    if isinstance(source, Const):
        return ("const", source.key)
    return ("paths", source.candidates)


def _failed(index: int, multi: bool, raw: bytes, reason: str, error: str) -> EventOutcome:
    return EventOutcome(index, multi, raw, None, [], [InvalidEvent(reason, error)], None)


def _message_id(event: SegmentEvent) -> str | None:
    mid = event.message_id
    if type(mid) is str:
        return mid
    if type(mid) is int or type(mid) is float:
        return js_number_str(mid)
    return None


def iter_mapped(outcomes: Iterable[EventOutcome]) -> Iterable[MappedEvent]:
    """Every MappedEvent of some outcomes, in order."""
    for outcome in outcomes:
        yield from outcome.mapped
