"""Report App Event: the compiled mapping of an `event_source: app` destination.

The body follows Segment's app action (docs/tiktok-offline-app.md §2.5-2.6), key for key:
`user` keys are omitted when empty (`external_id`, `phone`, `email`, then `idfa` or `gaid`
from the hashed advertising id, `idfv` (the raw iOS device id), `att_status` always, `ip`,
`user_agent`, `locale`); `contents` items are rebuilt with truthy checks (price 0 is
dropped, quantity 0 kept); `app` and `ad` are always present; there is no `page`, ttclid or
ttp. `att_status: AUTO` (the default) is derived from the device type, iOS version and the
ad-tracking flag.

Required fields (dead-lettered as `invalid_event` naming the field): `app.app_id`; for
AddToCart, AddToWishlist, Checkout, Purchase and ViewContent also `content_type`, `currency`,
`value` and a `content_id` on every contents item; for AddToCart, AddToWishlist, Checkout,
Purchase and Subscribe at least one contents item. Which rules apply is decided per
subscription at start-up (its event name is fixed), not per event.

SPEC §3 improvements that apply: emails are trimmed (1) and phones honour
`phone_default_region` (2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import msgspec

from worker.mapping.body import encode_event
from worker.mapping.fields import Source
from worker.mapping.fields_app import (
    APP_FIELDS,
    CONTENT_ID_EVENTS,
    CONTENTS_REQUIRED_EVENTS,
    PRODUCT_FIELDS_REQUIRED_EVENTS,
)
from worker.mapping.hashing import PLAIN_HASHERS, Hashers, smart_hash
from worker.mapping.reading import FieldError, Finisher, extractor, timestamp_seconds
from worker.mapping.segment import SegmentEvent

__all__ = ["AppEventOut", "AppPlan", "att_status"]

_UNSET: Final = msgspec.UNSET
_NAMES: Final = tuple(n for n in APP_FIELDS if not n.startswith("contents."))
_I: Final = {n: i for i, n in enumerate(_NAMES)}
# `properties` after `contents`, in Segment's order; each sent when present.
_PROPERTY_FIELDS: Final = (
    "content_type",
    "currency",
    "value",
    "description",
    "content_ids",
    "num_items",
    "search_string",
)
_AD_TRUTHY_HEAD: Final = ("callback", "campaign_id", "ad_id", "creative_id")
_AD_BOOLEANS: Final = ("is_retargeting", "attributed")
_AD_TRUTHY_TAIL: Final = ("attribution_type", "attribution_provider")
_MIN_ATT_VERSION: Final = (14.0, 0.0, 0.0)


class AppUser(msgspec.Struct, omit_defaults=True, kw_only=True):
    external_id: list[str] | msgspec.UnsetType = msgspec.UNSET
    phone: list[str] | msgspec.UnsetType = msgspec.UNSET
    email: list[str] | msgspec.UnsetType = msgspec.UNSET
    idfa: str | msgspec.UnsetType = msgspec.UNSET
    gaid: str | msgspec.UnsetType = msgspec.UNSET
    idfv: str | msgspec.UnsetType = msgspec.UNSET
    att_status: str
    ip: str | msgspec.UnsetType = msgspec.UNSET
    user_agent: str | msgspec.UnsetType = msgspec.UNSET
    locale: str | msgspec.UnsetType = msgspec.UNSET


class AppOut(msgspec.Struct, omit_defaults=True):
    app_id: str
    app_name: str | msgspec.UnsetType = msgspec.UNSET
    app_version: str | msgspec.UnsetType = msgspec.UNSET


class AppEventOut(msgspec.Struct, omit_defaults=True):
    """One `data[]` element of an app request, keys in Segment's order."""

    event: str
    event_time: int
    event_id: str | msgspec.UnsetType
    user: AppUser
    properties: dict[str, object]
    app: AppOut
    ad: dict[str, object]
    limited_data_use: bool


class AppCommon(msgspec.Struct):
    """An evaluated event: everything but its name and `contents`."""

    event_time: int
    event_id: str | None
    user: AppUser
    properties: dict[str, object]  # without `contents`
    app: AppOut
    ad: dict[str, object]
    limited_data_use: bool
    test_event_code: str | None
    event_source: str


def _version_part(text: str) -> float:
    """JavaScript's Number() of one version component (NaN when not numeric)."""
    text = text.strip()
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        return math.nan


def _below_ios14(version: str) -> bool:
    parts = [_version_part(p) for p in version.split(".")[:3]]
    parts += [0.0] * (3 - len(parts))
    for have, floor in zip(parts, _MIN_ATT_VERSION, strict=True):
        if have < floor:
            return True
        if have > floor:
            return False
    return False  # equal, or not numeric: never lower


def att_status(
    mapped: str, device_type: str | None, version: str | None, tracking: bool | None
) -> str:
    """Segment's getATTStatus: `AUTO` derives the status from the device; others pass."""
    if mapped != "AUTO":
        return mapped
    if device_type is None or device_type.lower() != "ios":
        return "NOT_APPLICABLE"
    if version and _below_ios14(version):
        return "NOT_APPLICABLE"  # App Tracking Transparency exists from iOS 14
    if type(tracking) is bool:
        return "AUTHORIZED" if tracking else "DENIED"
    return "NOT_DETERMINED"


def _clean_item(item: dict[str, Any]) -> dict[str, Any]:
    """An app contents item: truthy keys only, except a numeric quantity (0 is kept)."""
    return {k: v for k, v in item.items() if v or (k == "quantity" and v is not None)}


class AppPlan:
    """Field sources of one app mapping, compiled once; `evaluate` runs per event."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self._hashers = PLAIN_HASHERS
        self._timestamp: Callable[[str], int | None] = timestamp_seconds
        self._sources = sources
        self._extract: Callable[[SegmentEvent], tuple[Any, ...]] = extractor(
            [APP_FIELDS[n] for n in _NAMES], sources
        )
        ts_source = sources["timestamp"]
        self._ts_error = FieldError("timestamp", ts_source, "not an ISO-8601 date-time").text
        app_source = sources["app.app_id"]
        self._app_error = FieldError("app.app_id", app_source, "required").text
        self._props = tuple((n, _I[n]) for n in _PROPERTY_FIELDS if sources[n] is not None)
        self._ad = tuple(
            (n, _I[f"ad.{n}"], kind)
            for names, kind in (
                (_AD_TRUTHY_HEAD, "truthy"),
                (_AD_BOOLEANS, "bool"),
                (_AD_TRUTHY_TAIL, "truthy"),
            )
            for n in names
            if sources[f"ad.{n}"] is not None
        )
        self._finishers: dict[tuple[str, str, str], Finisher] = {}

    def use_hashers(self, hashers: Hashers) -> None:
        """Hash emails, phones and ids with `hashers` (see worker.mapping.hashing)."""
        self._hashers = hashers

    def use_timestamp(self, parse: Callable[[str], int | None]) -> None:
        """Parse `timestamp` with `parse` (see `worker.mapping.reading.remembering_timestamp`)."""
        self._timestamp = parse

    def evaluate(
        self, event: SegmentEvent, now: Callable[[], float], region: str | None
    ) -> AppCommon:
        v = self._extract(event)
        # One unpack in _NAMES (APP_FIELDS) order: no per-event name lookups. A field added to
        # the table must be added here too (the golden cases fail otherwise).
        (
            event_source, event_id, timestamp, phones, emails, advertising_id, app_id,
            app_name, app_version, _callback, _campaign_id, _ad_id, _creative_id,
            _is_retargeting, _attributed, _attribution_type, _attribution_provider,
            device_type, device_id, device_version, ad_tracking_enabled, external_ids,
            locale, mapped_att_status, ip, user_agent, _content_ids, _num_items,
            _content_type, _currency, _value, _description, limited_data_use,
            test_event_code, _search_string,
        ) = v  # fmt: skip
        if timestamp is None:
            event_time = math.floor(now())
        else:
            parsed = self._timestamp(timestamp)
            if parsed is None:
                raise FieldError.plain(self._ts_error)
            event_time = parsed
        if not app_id:
            raise FieldError.plain(self._app_error)
        platform = device_type.lower() if device_type else None
        user = AppUser(
            att_status=att_status(
                mapped_att_status or "AUTO", device_type, device_version, ad_tracking_enabled
            )
        )
        hash_email, hash_external_id, hash_phone = self._hashers
        if external_ids:
            user.external_id = [hash_external_id(x) for x in external_ids]
        if phones:
            user.phone = [hash_phone(x, region) for x in phones]
        if emails:
            user.email = [hash_email(x) for x in emails]
        if advertising_id and platform == "ios":
            hashed = smart_hash(advertising_id.strip().lower())
            if hashed:
                user.idfa = hashed
        elif advertising_id and platform == "android":
            hashed = smart_hash(advertising_id.strip())  # Android ids keep their case
            if hashed:
                user.gaid = hashed
        if platform == "ios" and device_id:
            user.idfv = device_id
        if ip:
            user.ip = ip
        if user_agent:
            user.user_agent = user_agent
        if locale:
            user.locale = locale
        props: dict[str, object] = {}
        for name, index in self._props:
            value = v[index]
            if value is not None:
                props[name] = value
        app = AppOut(app_id)
        if app_name:
            app.app_name = app_name
        if app_version:
            app.app_version = app_version
        ad: dict[str, object] = {}
        for name, index, kind in self._ad:
            value = v[index]
            if (kind == "bool" and type(value) is bool) or (kind == "truthy" and value):
                ad[name] = value
        return AppCommon(
            event_time,
            event_id or None,
            user,
            props,
            app,
            ad,
            limited_data_use is True,
            test_event_code or None,
            event_source or "app",
        )

    def finisher(self, event: str, contents: Source, items: dict[str, Source]) -> Finisher:
        """The encoder for TikTok event `event`, with that event's required-field rules."""
        key = (event, repr(contents), repr(items["contents.content_id"]))
        found = self._finishers.get(key)
        if found is not None:
            return found
        sources = self._sources
        # Error texts are built here, from the config only: they carry no event value.
        product_fields = tuple(
            (name, FieldError(name, sources[name], f"required for app event {event}").text)
            for name in ("content_type", "currency", "value")
            if event in PRODUCT_FIELDS_REQUIRED_EVENTS
        )
        contents_error = (
            FieldError("contents", contents, f"required for app event {event} (no items)").text
            if event in CONTENTS_REQUIRED_EVENTS
            else None
        )
        content_id_error = (
            FieldError(
                "contents[].content_id",
                items["contents.content_id"],
                f"required on every item for app event {event}",
            ).text
            if event in CONTENT_ID_EVENTS
            else None
        )

        def finish(common: Any, contents: list[dict[str, Any]], code: str | None) -> bytes:
            props = common.properties
            for name, error in product_fields:
                if name not in props:
                    raise FieldError.plain(error)
            if contents_error is not None and not contents:
                raise FieldError.plain(contents_error)
            if content_id_error is not None and any(not c.get("content_id") for c in contents):
                raise FieldError.plain(content_id_error)
            properties: dict[str, object] = {"contents": [_clean_item(c) for c in contents]}
            properties.update(props)
            return encode_event(
                AppEventOut(
                    event,
                    common.event_time,
                    common.event_id if common.event_id is not None else _UNSET,
                    common.user,
                    properties,
                    common.app,
                    common.ad,
                    common.limited_data_use,
                )
            )

        self._finishers[key] = finish
        return finish
