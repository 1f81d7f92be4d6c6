"""The mapping engine: Kafka message value -> TikTok `data[]` elements, per destination.

Contract of `Mapper.map_message(value)`:
- it never raises, whatever the bytes;
- it returns one `EventOutcome` per Segment event in the message (SPEC §3 framing), at least
  one: a value that is not JSON gives one outcome with `decode_error`; an empty array or
  batch gives one outcome skipped as `no_match`;
- an event whose Segment `timestamp` is older than `tiktok.max_event_age_s` gives an outcome
  skipped as `too_old`, without being mapped;
- an outcome carries the TikTok events it produced (`mapped`, one per matching
  (destination, subscription)), the failures (`invalid`, with `destination=None` when the
  event is bad for everyone, or the destination whose mapping failed), and `skipped` (a
  `SkipReason`) only when nothing was mapped and nothing
  was invalid;
- error texts name a path and an expectation, never a value: no PII, no token.

Mapping follows Segment's Report Web Event action (docs/segment-tiktok-destination.md §3-5):
field defaults with `@if exists` fallbacks, removal of null and top-level "", Ajv-style
coercion, enum checks, then the body builder's rules (which keys are always present, which
only when truthy), ttclid resolution and PII hashing (worker.mapping.hashing).

Offline and app destinations (SPEC §3 "Event sources") follow Segment's Report Offline Event
and Report App Event actions instead: their plans live in worker.mapping.plan_offline and
plan_app, with field tables, presets and start-up checks per source (worker.mapping.sources);
crm is the web action with `event_source: crm` as the default.

Speed (the hot path of the worker): field reads are generated code, one straight-line
function per plan (worker.mapping.codegen); work shared between subscriptions and destinations is
computed once per event: every subscription points at an interned `_Plan` (its field
sources) and contents function, destinations with the same mapping share them, and equal
payloads (same plan, contents, event name and phone region) are encoded once. The routing
and that sharing are generated code too, one function per (Segment type, event name) route
(worker.mapping.routes), found by two dict lookups; a single-event value is decoded before
any framing. `Mapper(generated=False)` keeps the interpretive routing as the reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import msgspec

from worker.core.vocabulary import DeadLetterReason, SkipReason
from worker.errors import ConfigError
from worker.mapping.body import BatchKey, EventOut, Lead, PageOut, UserOut, encode_event
from worker.mapping.codegen import Spec, compile_function
from worker.mapping.coerce import Uncoercible, coerce, coerce_list, js_number_str, json_kind
from worker.mapping.fields import (
    CONTENTS_ITEM_FIELDS,
    FIELDS,
    TRAVEL_FIELDS,
    VEHICLE_FIELDS,
    Const,
    FieldDef,
    Paths,
    Source,
)
from worker.mapping.hashing import (
    Hashers,
    cached_address_part,
    cached_hash_name,
    hash_email,
    hash_external_id,
    hash_phone,
    remembering_hashers,
)
from worker.mapping.paths import MISSING, compile_item_getter, parse_mapping_path
from worker.mapping.plan_app import AppPlan
from worker.mapping.plan_offline import OfflinePlan
from worker.mapping.presets import preset_names, presets_for
from worker.mapping.reading import FieldError as _FieldError
from worker.mapping.reading import Finisher, SourcePlan
from worker.mapping.reading import checker as _checker
from worker.mapping.reading import extractor as _extractor
from worker.mapping.reading import remembering_timestamp as _remembering_timestamp
from worker.mapping.reading import spec as _spec
from worker.mapping.reading import timestamp_seconds as _timestamp_seconds
from worker.mapping.reading import url_ttclid as _url_ttclid
from worker.mapping.routes import RouteFn, compile_route
from worker.mapping.segment import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    DecodeFailure,
    SegmentEvent,
    decode_event,
    split_message,
)
from worker.mapping.segment import decode_unchecked as _decode_unchecked
from worker.mapping.sources import check_subscription, fields_for
from worker.mapping.spec import DestinationConfig, LiteralValue, SubscriptionConfig
from worker.mapping.triggers import Trigger, TriggerSyntaxError, parse_trigger

__all__ = [
    "EventOutcome",
    "InvalidEvent",
    "MappedEvent",
    "Mapper",
    "compile_subscription_mapping",
]

_UNSET: Final = msgspec.UNSET
_encode_event: Final = encode_event


class InvalidEvent(msgspec.Struct, frozen=True):
    """Why an event cannot be sent. `destination` is None when it is bad for everyone."""

    reason: DeadLetterReason  # one of INVALID_REASONS
    error: str  # a path and an expectation; never a value from the event
    destination: str | None = None


class MappedEvent(msgspec.Struct, frozen=True):
    """One TikTok event ready to batch: `payload` is the encoded `data[]` element."""

    destination: str
    subscription: str
    event: str
    key: BatchKey
    event_id: str | None
    payload: bytes


class EventOutcome(msgspec.Struct):
    """Everything that became of one Segment event of a Kafka message."""

    index: int
    multi: bool
    raw: bytes  # the event's own JSON if multi, else the whole message value
    message_id: str | None
    mapped: list[MappedEvent]
    invalid: list[InvalidEvent]
    skipped: SkipReason | None


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


def compile_subscription_mapping(
    sub: SubscriptionConfig, event_source: str = "web", *, where: str
) -> dict[str, Source]:
    """Validate a subscription's `mapping` overrides and return them as Sources.

    Keys are the field names of the destination's event `source` (worker.mapping.sources),
    plus `contents` (the path of the items: an object is one item, an array is many). Literals
    are checked against the field's type and enum.
    """
    fields = fields_for(event_source)
    out: dict[str, Source] = {}
    for key, raw in sub.mapping.items():
        kwhere = f"{where}.{key}"
        if key == "contents":
            out[key] = _parse_source(key, raw, kwhere)
            continue
        fd = fields.get(key)
        if fd is None:
            raise ConfigError(
                f"{kwhere}: unknown field for event_source {event_source} "
                "(see docs/configuration.md, Fields)"
            )
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


_VEHICLE_SPECIAL: Final = frozenset(
    ("mileage_value", "mileage_unit", "preferred_price_range_min", "preferred_price_range_max")
)
# Fields read by the generated `evaluate` (travel/vehicle/lead have their own extractors,
# called only when the event needs them).
_MAIN_FIELDS: Final = tuple(
    n
    for n in FIELDS
    if not n.startswith(("contents.", "travel_fields.", "vehicle_fields.", "lead_fields."))
)


def _var(field: str) -> str:
    """The generated variable holding a field (names come from the fixed field table)."""
    return "f_" + field.replace(".", "_")


# The body of the generated `evaluate(event, now, region)`, after the field reads. It
# builds what Segment's body builder builds (docs/segment-tiktok-destination.md §4.2).
_EVALUATE_TAIL: Final = """\
    event_source = f_event_source or "web"
    if f_timestamp is None:
        event_time = _floor(now())
    else:
        event_time = _ts(f_timestamp)
        if event_time is None:
            raise _ts_error()
    if not f_phone_number:
        phones = []
    elif len(f_phone_number) == 1:
        phones = [_hp(f_phone_number[0], region)]
    else:
        phones = [_hp(x, region) for x in f_phone_number]
    if not f_email:
        emails = []
    elif len(f_email) == 1:
        emails = [_he(f_email[0])]
    else:
        emails = [_he(x) for x in f_email]
    if not f_external_id:
        ids = []
    elif len(f_external_id) == 1:
        ids = [_hx(f_external_id[0])]
    else:
        ids = [_hx(x) for x in f_external_id]
    user = _UserOut(
        ids,
        phones,
        emails,
        _hn(f_first_name) if f_first_name is not None else "",
        _hn(f_last_name) if f_last_name is not None else "",
        _addr(f_address_city) if f_address_city is not None else "",
        _addr(f_address_state) if f_address_state is not None else "",
        _addr(f_address_country) if f_address_country is not None else "",
        _hn(f_address_zip_code) if f_address_zip_code is not None else "",
    )
    url_ttclid = _url_ttclid(f_url) if f_url and "?" in f_url else None
    if url_ttclid or f_ttclid:
        user.ttclid = url_ttclid if url_ttclid is not None else f_ttclid
    if f_ttp:
        user.ttp = f_ttp
    if f_ip:
        user.ip = f_ip
    if f_user_agent:
        user.user_agent = f_user_agent
    if f_locale:
        user.locale = f_locale
    if f_url or f_referrer:
        page = _PageOut()
        if f_url:
            page.url = f_url
        if f_referrer:
            page.referrer = f_referrer
    else:
        page = _UNSET
    props = {}
#PROPERTIES#
    if event_source == "web":
        if f_event_spec_type == "travel_fields":
            _travel(event, props)
        elif f_event_spec_type == "vehicle_fields":
            _vehicle(event, props)
    if event_source == "crm":
        lead = _lead(event)
        if lead is _UNSET:
            raise _lead_error()
    else:
        lead = _UNSET
    return _Common(
        user,
        region,
        None,
        f_phone_number,
        props,
        page,
        lead,
        f_event_id or None,
        event_time,
        event_source,
        f_test_event_code or None,
        f_limited_data_use is True,
    )
"""


class _Common(msgspec.Struct):
    """Everything of one TikTok event except its name and `contents`.

    `user` was built for phone default region `region`; phones are the only user key that
    depends on the destination, so `phones` keeps the raw values to hash for another."""

    user: UserOut
    region: str | None
    other_users: dict[str | None, UserOut] | None
    phones: list[str] | None
    properties: dict[str, object]
    page: PageOut | msgspec.UnsetType
    lead: Lead | msgspec.UnsetType
    event_id: str | None
    event_time: int
    event_source: str
    test_event_code: str | None
    limited_data_use: bool

    def user_for(self, region: str | None) -> UserOut:
        if region == self.region:
            return self.user
        if self.other_users is None:
            self.other_users = {}
        user = self.other_users.get(region)
        if user is None:
            phones = [hash_phone(p, region) for p in self.phones] if self.phones else []
            user = self.other_users[region] = msgspec.structs.replace(self.user, phone=phones)
        return user


class _Plan:
    """The compiled field sources of one mapping (defaults + overrides).

    `evaluate(event, now, region)` is generated code (worker.mapping.codegen); it raises
    _FieldError.
    """

    def __init__(self, sources: dict[str, Source]) -> None:
        ts_source = sources["timestamp"]
        travel_names = tuple(d.name.partition(".")[2] for d in TRAVEL_FIELDS)
        travel = _extractor(TRAVEL_FIELDS, sources)
        vehicle_names = tuple(d.name.partition(".")[2] for d in VEHICLE_FIELDS)
        vehicle = _extractor(VEHICLE_FIELDS, sources)
        lead_fields = _extractor(
            [FIELDS["lead_fields.lead_id"], FIELDS["lead_fields.lead_event_source"]], sources
        )

        def add_travel(event: SegmentEvent, props: dict[str, object]) -> None:
            for name, v in zip(travel_names, travel(event), strict=True):
                if v is not None:
                    props[name] = v

        def add_vehicle(event: SegmentEvent, props: dict[str, object]) -> None:
            values = dict(zip(vehicle_names, vehicle(event), strict=True))
            for name, v in values.items():
                if name == "mileage_value":
                    unit = values["mileage_unit"]
                    if unit is not None and v is not None:
                        props["mileage"] = {"unit": unit, "value": v}
                elif name == "preferred_price_range_min":
                    high = values["preferred_price_range_max"]
                    if v is not None and high is not None:
                        props["preferred_price_range"] = [v, high]
                elif name not in _VEHICLE_SPECIAL and v is not None:
                    props[name] = v

        def lead(event: SegmentEvent) -> Lead | msgspec.UnsetType:
            lead_id, lead_event_source = lead_fields(event)
            if type(lead_id) is not str:
                return _UNSET
            out = Lead(lead_id=lead_id)
            if lead_event_source:
                out.lead_event_source = lead_event_source
            return out

        def ts_error() -> _FieldError:
            return _FieldError("timestamp", ts_source, "not an ISO-8601 date-time")

        lead_source = sources["lead_fields.lead_id"]

        def lead_error() -> _FieldError:
            # TikTok requires lead.lead_id for CRM events; Segment would send the event
            # without `lead` and have it refused.
            return _FieldError("lead_fields.lead_id", lead_source, "required for event_source crm")

        properties = "\n".join(
            f"    if {_var(n)} is not None:\n        props[{n!r}] = {_var(n)}"
            for n in _PROPERTY_FIELDS
            if sources[n] is not None
        )
        self.evaluate: Callable[[SegmentEvent, Callable[[], float], str | None], _Common] = (
            compile_function(
                [_spec(FIELDS[n], sources[n]) for n in _MAIN_FIELDS],
                [_var(n) for n in _MAIN_FIELDS],
                signature="event, now, region",
                tail=_EVALUATE_TAIL.replace("#PROPERTIES#", properties or "    pass").splitlines(),
                namespace={
                    "_floor": math.floor,
                    "_ts": _timestamp_seconds,
                    "_ts_error": ts_error,
                    "_lead_error": lead_error,
                    "_hp": hash_phone,
                    "_he": hash_email,
                    "_hx": hash_external_id,
                    "_hn": cached_hash_name,
                    "_addr": cached_address_part,
                    "_url_ttclid": _url_ttclid,
                    "_UserOut": UserOut,
                    "_PageOut": PageOut,
                    "_Common": _Common,
                    "_UNSET": _UNSET,
                    "_travel": add_travel,
                    "_vehicle": add_vehicle,
                    "_lead": lead,
                },
            )
        )

    def use_hashers(self, hashers: Hashers) -> None:
        """Hash emails, phones and ids with `hashers` (the generated code's globals)."""
        names = self.evaluate.__globals__
        names["_he"], names["_hx"], names["_hp"] = hashers

    def use_timestamp(self, parse: Callable[[str], int | None]) -> None:
        """Parse `timestamp` with `parse` (a `remembering_timestamp`)."""
        self.evaluate.__globals__["_ts"] = parse


# --------------------------------------------------------------------------- contents

ContentsFn = Callable[[SegmentEvent], list[dict[str, Any]]]


def _item_getter(candidates: tuple[tuple[str, ...], ...]) -> Callable[[Any], Any]:
    """item -> first present non-null candidate; None if one was null; else MISSING."""
    getters = [compile_item_getter(c) for c in candidates]

    def get(item: Any) -> Any:
        result: Any = MISSING
        for g in getters:
            v = g(item)
            if v is not MISSING and v is not None:
                return v
            if v is None:
                result = None
        return result

    return get


def _compile_contents(source: Source, items: dict[str, Source]) -> ContentsFn:
    """`contents` from `source` (an object is one item, an array is many), as generated code.

    Like Segment's `@arrayPath`: a row that is not an object maps to `{}`; a key whose path
    is missing is omitted; an explicit null is coerced (0 or "") and kept.
    """
    if source is None:
        return lambda event: []
    names: dict[str, Any] = {"_M": MISSING, "_EMPTY": {}}

    def name(prefix: str, value: Any) -> str:
        n = f"{prefix}{len(names)}"
        names[n] = value
        return n

    def bad_source(value: Any) -> _FieldError:
        return _FieldError("contents", source, f"expected object or array, got {json_kind(value)}")

    lines = [
        "    if v is None or v == '':",
        "        return []",
        "    if type(v) is dict:",
        "        rows = (v,)",
        "    elif type(v) is list:",
        "        rows = v",
        "    else:",
        f"        raise {name('_bad', bad_source)}(v)",
        "    out = []",
        "    for row in rows:",
        "        d = row if type(row) is dict else _EMPTY",
        "        item = {}",
    ]
    for fd in CONTENTS_ITEM_FIELDS:
        item_source = items[fd.name]
        if item_source is None:
            continue
        key = fd.name.partition(".")[2]
        check = name("_c", _checker(replace(fd, name=f"contents[].{key}"), item_source))
        if isinstance(item_source, Const):
            if item_source.value is not None:
                lines.append(f"        item[{key!r}] = {name('_k', item_source.value)}")
            continue
        cands = item_source.candidates
        if len(cands) == 1 and len(cands[0]) == 1:
            lines.append(f"        x = d.get({cands[0][0]!r}, _M)")
        else:
            lines.append(f"        x = {name('_g', _item_getter(cands))}(row)")
        fast = "type(x) is str" if fd.kind == "string" else "type(x) is int"
        lines.append("        if x is not _M:")
        lines.append(f"            item[{key!r}] = x if {fast} else {check}(x)")
    lines += ["        out.append(item)", "    return out"]
    spec: Spec = (
        (None, source.value, None, "raw")
        if isinstance(source, Const)
        else (source.candidates, None, None, "raw")
    )
    fn: ContentsFn = compile_function([spec], ["v"], tail=lines, namespace=names)
    return fn


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
    plan: _Plan | SourcePlan
    contents: ContentsFn
    routing_only: bool  # the (type, event) routing already proves the trigger
    # offline and app: builds the `data[]` element (None: web and crm, built inline below)
    finish: Finisher | None = None

    @property
    def predicate(self) -> Callable[[SegmentEvent], bool]:
        return self.trigger.predicate


class _Destination:
    """One configured destination: its filter, subscriptions and batch keys."""

    _MAX_ROUTES: Final = 4096  # bound on the (type, event) -> candidates cache

    def __init__(
        self,
        dest: DestinationConfig,
        when: Trigger | None,
        subs: list[_Sub],
        partner_name: str | None,
    ) -> None:
        self.name = dest.name
        self.event_source_id = dest.event_source_id
        self.test_event_code = dest.test_event_code or None
        self.region = dest.phone_default_region
        self.partner_name = partner_name
        self.when = when
        self.when_predicate = when.predicate if when is not None else None
        self.subs = subs
        self._routes: dict[tuple[str, Any], tuple[_Sub, ...]] = {}
        self._keys: dict[tuple[str, str | None], BatchKey] = {}
        self.web_key = self.key("web", None)  # the common case, without a lookup

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
                event_source_id=self.event_source_id,
                event_source=event_source,
                test_event_code=code,
                partner_name=self.partner_name,
            )
            self._keys[(event_source, code)] = k
        return k


class _ConfigDefault:
    """Marks "take the value from the config" where None has a meaning of its own."""


CONFIG_DEFAULT: Final = _ConfigDefault()


def _source_plan(kind: str, sources: dict[str, Source]) -> SourcePlan:
    return OfflinePlan(sources) if kind == "offline" else AppPlan(sources)


def _default_sources(source: str) -> dict[str, Source]:
    out = {name: fd.default for name, fd in fields_for(source).items()}
    if source == "crm":
        out["event_source"] = _CRM  # the web action with event_source crm (SPEC §3)
    return out


_CRM: Final = Const("crm", b"'crm'")


class _PartnerSettings(Protocol):
    @property
    def partner_name(self) -> str | None: ...

    @property
    def max_event_age_s(self) -> float | None: ...


class MappingConfig(Protocol):
    """The part of `worker.config.Config` the Mapper reads (the mapping never imports config)."""

    @property
    def destinations(self) -> Sequence[DestinationConfig]: ...

    @property
    def tiktok(self) -> _PartnerSettings: ...


def _compile_trigger(text: str, where: str) -> Trigger:
    try:
        return parse_trigger(text)
    except TriggerSyntaxError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class Mapper:
    """Maps Kafka message values to TikTok events for every configured destination.

    Build once per process (compiles triggers, paths and plans); `map_message` is then a
    pure function of the bytes and the clock (`now`, used when an event has no timestamp).
    """

    _MAX_ROUTES: Final = 4096  # event names per event class kept in the route lookup

    def __init__(
        self,
        config: MappingConfig,
        *,
        now: Callable[[], float] = time.time,
        max_event_age_s: float | _ConfigDefault | None = CONFIG_DEFAULT,
        generated: bool = True,
    ) -> None:
        """Compile every destination once; a bad trigger, duplicate subscription name or mapping
        override raises `ConfigError` naming its key path (`destinations[0].when: ...`).

        `generated=False` keeps the mapper as it was before issue 18 (the `"batch"` byte scan
        before the decode, the interpretive routing of `_map_subscription`): the reference
        the generated routes (worker.mapping.routes) are tested against."""
        self._now = now
        self._generated = generated
        # Events older than this (by their Segment `timestamp`) are skipped as too_old;
        # `dlq redrive --max-age` passes its own value, None turns the check off.
        self._max_age: float | None = (
            config.tiktok.max_event_age_s
            if isinstance(max_event_age_s, _ConfigDefault)
            else max_event_age_s
        )
        # The age check parses each event's `timestamp`; with the check on, the plans reuse
        # that parse for `event_time` (same string object), in the reference path too.
        self._parse_ts: Callable[[str], int | None] = (
            _timestamp_seconds if self._max_age is None else _remembering_timestamp()
        )
        plans: dict[tuple[Any, ...], _Plan | SourcePlan] = {}
        contents_fns: dict[tuple[Any, ...], ContentsFn] = {}
        self._destinations: list[_Destination] = []
        for i, dest in enumerate(config.destinations):
            where = f"destinations[{i}]"
            when = _compile_trigger(dest.when, f"{where}.when") if dest.when is not None else None
            subs: list[_Sub] = []
            source = dest.event_source
            # web and crm are one action (Report Web Event); offline and app have their own.
            kind = "web" if source in ("web", "crm") else source
            specs: list[tuple[str, Trigger, str, str, dict[str, Source]]] = [
                (p.name, parse_trigger(p.trigger), p.event, p.contents, {})
                for p in presets_for(dest.presets, source)
            ]
            names = set(preset_names(dest.presets, source))
            for j, sub in enumerate(dest.subscriptions):
                swhere = f"{where}.subscriptions[{j}]"
                if sub.name in names:
                    raise ConfigError(
                        f"{swhere}.name: duplicate subscription name {sub.name!r} "
                        f"(presets {dest.presets!r} or an earlier subscription use it)"
                    )
                names.add(sub.name)
                trigger = _compile_trigger(sub.trigger, f"{swhere}.trigger")
                overrides = compile_subscription_mapping(sub, source, where=f"{swhere}.mapping")
                check_subscription(source, sub, where=swhere)
                specs.append((sub.name, trigger, sub.event, sub.contents, overrides))
            for order, (name, compiled, event, contents, overrides) in enumerate(specs):
                sources = _default_sources(source)
                sources.update({k: v for k, v in overrides.items() if k != "contents"})
                # Destinations with the same mapping share a plan, so an event is mapped
                # and hashed once however many destinations it goes to.
                plan_key = (kind, *sorted((k, _source_key(v)) for k, v in sources.items()))
                plan = plans.get(plan_key)
                if plan is None:
                    plan = plans[plan_key] = (
                        _Plan(sources) if kind == "web" else _source_plan(kind, sources)
                    )
                    if self._max_age is not None:
                        plan.use_timestamp(self._parse_ts)
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
                finish = (
                    plan.finisher(event, csource, items) if not isinstance(plan, _Plan) else None
                )
                subs.append(
                    _Sub(order, name, event, compiled, plan, cfn, compiled.routing_only, finish)
                )
            self._destinations.append(_Destination(dest, when, subs, config.tiktok.partner_name))
        if len(plans) > 1 and generated:
            # Several plans evaluate the same event (e.g. web, crm, offline and app
            # destinations): each hashes the same email, phone and id; only the first pays.
            # The reference keeps the plain functions, so CheckedMapper compares the two.
            hashers = remembering_hashers()
            for plan in plans.values():
                plan.use_hashers(hashers)
        # Route functions, compiled on first use and shared by every route with the same
        # candidate subscriptions: their number is bounded by the config (names some trigger
        # pins, plus one for any other name). The lookup dicts are bounded by _MAX_ROUTES.
        self._known_names = frozenset(
            s.trigger.event_name
            for d in self._destinations
            for s in d.subs
            if s.trigger.event_name is not None
        )
        self._routes: dict[type, dict[str | None, RouteFn]] = {t: {} for t in EVENT_TYPES}
        self._route_fns: dict[tuple[Any, ...], RouteFn] = {}
        self._route_ns: dict[str, Any] = {
            "_FE": _FieldError,
            "_ME": MappedEvent,
            "_EO": EventOutcome,
            "_inv": _record_invalid,
            "_mid": _message_id,
            "_NO_MATCH": SkipReason.NO_MATCH,
            "_now": now,
            "_enc": _encode_event,
            "_EventOut": EventOut,
            "_UNSET": _UNSET,
        }

    # -- public API ---------------------------------------------------------------------

    def map_message(self, value: bytes | None) -> list[EventOutcome]:
        """All outcomes of one Kafka message value. Never raises."""
        if not self._generated:
            return self._reference_map_message(value)
        if value and value[:1] == b"{" and len(value) <= MAX_EVENT_BYTES:
            # The common case, one event per message: decode first. A batch envelope either
            # fails the decode (no `type`) or shows its `batch`; both take the framing path,
            # as does any value that fails, so its outcome is exactly the framing path's.
            try:
                event: SegmentEvent | None = _decode_unchecked(value)
            except Exception:
                event = None
            if event is not None and event.batch is _UNSET:
                if self._max_age is not None and self._too_old(event.timestamp):
                    return [self._too_old_outcome(event, value)]
                try:
                    fn = self._routes[type(event)].get(event.event)
                    if fn is None:
                        fn = self._route(type(event), event.event)
                    return [fn(event, 0, False, value)]
                except Exception as exc:  # defensive: a mapper bug must not stop the partition
                    return [_internal_error(0, False, value, exc)]
        return self._framed(value)

    def _reference_map_message(self, value: bytes | None) -> list[EventOutcome]:
        """`map_message` as it was before the generated routes: the reference."""
        if value and value[:1] == b"{" and b'"batch"' not in value:
            try:
                event = decode_event(value)
            except DecodeFailure as exc:
                return [_failed(0, False, value, exc.reason, exc.error)]
            except Exception as exc:  # defensive, as below
                return [_unreadable(0, False, value, exc)]
            try:
                return [self._reference_map_event(event, raw=value)]
            except Exception as exc:  # defensive: a mapper bug must not stop the partition
                return [_internal_error(0, False, value, exc)]
        return self._framed(value)

    def _framed(self, value: bytes | None) -> list[EventOutcome]:
        """The general path: frame the value into events (array, batch), map each."""
        raw = value if value is not None else b""
        try:
            items = split_message(value)
        except DecodeFailure as exc:
            return [_failed(0, False, raw, exc.reason, exc.error)]
        except Exception as exc:  # defensive: framing must not take the worker down
            return [_unreadable(0, False, raw, exc)]
        if not items:
            return [EventOutcome(0, True, raw, None, [], [], SkipReason.NO_MATCH)]
        return [self._map_item(item.index, item.multi, item.raw) for item in items]

    def map_event(
        self, event: SegmentEvent, *, index: int = 0, multi: bool = False, raw: bytes = b""
    ) -> EventOutcome:
        """Map an already decoded event (the `map` command and tests use this)."""
        if self._generated:
            if self._max_age is not None and self._too_old(event.timestamp):
                return EventOutcome(
                    index, multi, raw, _message_id(event), [], [], SkipReason.TOO_OLD
                )
            fn = self._routes[type(event)].get(event.event)
            if fn is None:
                fn = self._route(type(event), event.event)
            outcome: EventOutcome = fn(event, index, multi, raw)
            return outcome
        return self._reference_map_event(event, index=index, multi=multi, raw=raw)

    def _route(self, cls: type, name: str | None) -> RouteFn:
        """Compile (or share) the route function of (event class, event name)."""
        routes = self._routes[cls]
        if len(routes) >= self._MAX_ROUTES:
            routes.clear()  # event names are unbounded input; the functions stay shared
        route_name = name if name in self._known_names else None
        etype = EVENT_TYPES[cls]
        dests = [(d, d.candidates(etype, route_name)) for d in self._destinations]
        signature = tuple(tuple(id(s) for s in subs) for _, subs in dests)
        fn = self._route_fns.get(signature)
        if fn is None:
            fn = self._route_fns[signature] = compile_route(dests, self._route_ns)
        routes[name] = fn
        return fn

    def _reference_map_event(
        self, event: SegmentEvent, *, index: int = 0, multi: bool = False, raw: bytes = b""
    ) -> EventOutcome:
        """The interpretive routing, kept as the reference for the generated routes."""
        if self._max_age is not None and self._too_old(event.timestamp):
            return EventOutcome(index, multi, raw, _message_id(event), [], [], SkipReason.TOO_OLD)
        mapped: list[MappedEvent] = []
        invalid: list[InvalidEvent] = []
        # Results shared by subscriptions/destinations with the same plan or contents.
        memo: dict[Any, Any] = {}
        etype = EVENT_TYPES[type(event)]
        name = event.event
        for dest in self._destinations:
            if dest.when is not None and not dest.when.predicate(event):
                continue
            for sub in dest.candidates(etype, name):
                if not sub.routing_only and not sub.trigger.predicate(event):
                    continue
                self._map_subscription(dest, sub, event, memo, mapped, invalid)
        mid = event.message_id
        message_id = mid if type(mid) is str else _message_id(event)
        skipped = None if mapped or invalid else SkipReason.NO_MATCH
        return EventOutcome(index, multi, raw, message_id, mapped, invalid, skipped)

    # -- internals ----------------------------------------------------------------------

    def _too_old_outcome(self, event: SegmentEvent, raw: bytes) -> EventOutcome:
        return EventOutcome(0, False, raw, _message_id(event), [], [], SkipReason.TOO_OLD)

    def _too_old(self, timestamp: Any) -> bool:
        """True when the event's own timestamp is older than max_event_age_s. An event
        without a usable timestamp is not judged here (the mapping decides about it)."""
        if type(timestamp) is not str:
            return False
        seconds = self._parse_ts(timestamp)
        assert self._max_age is not None
        return seconds is not None and seconds < self._now() - self._max_age

    def _map_item(self, index: int, multi: bool, raw: bytes) -> EventOutcome:
        try:
            event = decode_event(raw)
        except DecodeFailure as exc:
            return _failed(index, multi, raw, exc.reason, exc.error)
        except Exception as exc:  # defensive: decoding must not take the worker down
            return _unreadable(index, multi, raw, exc)
        try:
            return self.map_event(event, index=index, multi=multi, raw=raw)
        except Exception as exc:  # defensive: a mapper bug must not stop the partition
            return _internal_error(index, multi, raw, exc)

    def _map_subscription(
        self,
        dest: _Destination,
        sub: _Sub,
        event: SegmentEvent,
        memo: dict[Any, Any],
        mapped: list[MappedEvent],
        invalid: list[InvalidEvent],
    ) -> None:
        if sub.finish is not None:
            self._map_source_subscription(dest, sub, event, memo, mapped, invalid)
            return
        # Web and crm subscriptions (no `finish`) always hold a _Plan; no runtime check here.
        plan: _Plan = sub.plan  # type: ignore[assignment]
        common: _Common | _FieldError | None = memo.get(id(plan))
        if common is None:
            try:
                common = plan.evaluate(event, self._now, dest.region)
            except _FieldError as exc:
                common = exc
            memo[id(plan)] = common
        contents_fn = sub.contents
        contents: list[dict[str, Any]] | _FieldError | None = memo.get(id(contents_fn))
        if contents is None:
            try:
                contents = contents_fn(event)
            except _FieldError as exc:
                contents = exc
            memo[id(contents_fn)] = contents
        if isinstance(common, _FieldError) or isinstance(contents, _FieldError):
            error = common if isinstance(common, _FieldError) else contents
            assert isinstance(error, _FieldError)
            failure = InvalidEvent(DeadLetterReason.INVALID_EVENT, error.text, dest.name)
            if failure not in invalid:
                invalid.append(failure)
            return
        event_id = common.event_id
        region = dest.region
        # Destinations with the same plan, contents, event name and phone region send the
        # same bytes: encode once.
        payload_key = (id(plan), id(contents_fn), sub.event, region)
        payload: bytes | None = memo.get(payload_key)
        if payload is None:
            properties: dict[str, object] = {"contents": contents}
            properties.update(common.properties)
            payload = _encode_event(
                EventOut(
                    sub.event,
                    common.event_time,
                    event_id if event_id is not None else _UNSET,
                    common.user if common.region == region else common.user_for(region),
                    properties,
                    common.page,
                    common.lead,
                    common.limited_data_use,
                )
            )
            memo[payload_key] = payload
        if common.event_source == "web" and common.test_event_code is None:
            key = dest.web_key
        else:
            key = dest.key(common.event_source, common.test_event_code)
        mapped.append(MappedEvent(dest.name, sub.name, sub.event, key, event_id, payload))

    def _map_source_subscription(
        self,
        dest: _Destination,
        sub: _Sub,
        event: SegmentEvent,
        memo: dict[Any, Any],
        mapped: list[MappedEvent],
        invalid: list[InvalidEvent],
    ) -> None:
        """`_map_subscription` for offline and app: the plan evaluates, `finish` encodes."""
        plan, finish, region = sub.plan, sub.finish, dest.region
        assert finish is not None
        assert not isinstance(plan, _Plan)
        common_key = (id(plan), region)  # phones are hashed for the destination's region
        common = memo.get(common_key)
        if common is None:
            try:
                common = plan.evaluate(event, self._now, region)
            except _FieldError as exc:
                common = exc
            memo[common_key] = common
        contents_fn = sub.contents
        contents = memo.get(id(contents_fn))
        if contents is None:
            try:
                contents = contents_fn(event)
            except _FieldError as exc:
                contents = exc
            memo[id(contents_fn)] = contents
        payload: bytes | _FieldError | None = None
        if not isinstance(common, _FieldError) and not isinstance(contents, _FieldError):
            code = dest.test_event_code
            payload_key = (id(plan), id(contents_fn), id(finish), region, code)
            payload = memo.get(payload_key)
            if payload is None:
                try:
                    payload = finish(common, contents, code)
                except _FieldError as exc:
                    payload = exc
                memo[payload_key] = payload
        for x in (common, contents, payload):
            if isinstance(x, _FieldError):
                failure = InvalidEvent(DeadLetterReason.INVALID_EVENT, x.text, dest.name)
                if failure not in invalid:
                    invalid.append(failure)
                return
        assert isinstance(payload, bytes)
        assert not isinstance(common, _FieldError)
        key = dest.key(common.event_source, common.test_event_code)
        mapped.append(MappedEvent(dest.name, sub.name, sub.event, key, common.event_id, payload))


def _source_key(source: Source) -> Any:
    if source is None:
        return None
    if isinstance(source, Const):
        return ("const", source.key)
    return ("paths", source.candidates)


def _record_invalid(invalid: list[InvalidEvent], a: Any, b: Any, destination: str) -> None:
    """Record the FieldError among `a`, `b` (a first) for `destination`, once per message."""
    error = a if isinstance(a, _FieldError) else b
    failure = InvalidEvent(DeadLetterReason.INVALID_EVENT, error.text, destination)
    if failure not in invalid:
        invalid.append(failure)


def _failed(
    index: int, multi: bool, raw: bytes, reason: DeadLetterReason, error: str
) -> EventOutcome:
    return EventOutcome(index, multi, raw, None, [], [InvalidEvent(reason, error)], None)


def _message_id(event: SegmentEvent) -> str | None:
    mid = event.message_id
    if type(mid) is str:
        return mid
    if type(mid) is int or type(mid) is float:
        return js_number_str(mid)
    return None


def _unreadable(index: int, multi: bool, raw: bytes, exc: Exception) -> EventOutcome:
    return _failed(
        index, multi, raw, DeadLetterReason.DECODE_ERROR, f"unreadable: {type(exc).__name__}"
    )


def _internal_error(index: int, multi: bool, raw: bytes, exc: Exception) -> EventOutcome:
    error = f"internal mapping error: {type(exc).__name__}"
    return _failed(index, multi, raw, DeadLetterReason.INVALID_EVENT, error)
