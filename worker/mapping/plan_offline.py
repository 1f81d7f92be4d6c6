"""Report Offline Event: the compiled mapping of an `event_source: offline` destination.

The body follows Segment's offline action (docs/tiktok-offline-app.md §1.4-1.6), key for key:
`user` holds `ttclid` first (the mapped field wins, the page URL's `ttclid` is the fallback:
the opposite of web), then `external_id`, `phone` and `email` (always present, maybe `[]`),
then `lead_id`, `ttp`, `ip`, `user_agent`, `locale` when set; `properties` is `contents` and
the truthy properties (`value` 0 is kept); `page` is always present (maybe `{}`);
`limited_data_use` defaults to false; `test_event_code` sits inside the event, where the
offline action puts it. At least one of email, phone or external id is required: an event
without any is an `invalid_event` naming the three fields.

SPEC §3 improvements that apply: emails are trimmed (1) and phones honour
`phone_default_region` (2), through the same hashing as web (worker.mapping.hashing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import msgspec

from worker.mapping.body import PageOut, encode_event
from worker.mapping.fields import Source
from worker.mapping.fields_offline import OFFLINE_FIELDS
from worker.mapping.hashing import PLAIN_HASHERS, Hashers
from worker.mapping.reading import FieldError, Finisher, extractor, timestamp_seconds, url_ttclid
from worker.mapping.segment import SegmentEvent

__all__ = ["OfflineEventOut", "OfflinePlan", "OfflineUser"]

_UNSET: Final = msgspec.UNSET
_NAMES: Final = tuple(n for n in OFFLINE_FIELDS if not n.startswith("contents."))
_PROPERTY_FIELDS: Final = ("content_type", "currency", "value", "query", "description")
_IDENTIFIERS_ERROR: Final = (
    "email_addresses | phone_numbers | external_ids: at least one is required for "
    "event_source offline"
)


class OfflineUser(msgspec.Struct, omit_defaults=True, kw_only=True):
    ttclid: str | msgspec.UnsetType = msgspec.UNSET
    external_id: list[str]
    phone: list[str]
    email: list[str]
    lead_id: str | msgspec.UnsetType = msgspec.UNSET
    ttp: str | msgspec.UnsetType = msgspec.UNSET
    ip: str | msgspec.UnsetType = msgspec.UNSET
    user_agent: str | msgspec.UnsetType = msgspec.UNSET
    locale: str | msgspec.UnsetType = msgspec.UNSET


class OfflineEventOut(msgspec.Struct, omit_defaults=True):
    """One `data[]` element of an offline request, keys in Segment's order."""

    event: str
    event_time: int
    event_id: str | msgspec.UnsetType
    user: OfflineUser
    properties: dict[str, object]
    page: PageOut
    limited_data_use: bool
    test_event_code: str | msgspec.UnsetType = msgspec.UNSET


class OfflineCommon(msgspec.Struct):
    """An evaluated event: everything but its name and `contents`."""

    event_time: int
    event_id: str | None
    user: OfflineUser
    properties: dict[str, object]  # without `contents`, in Segment's key order
    page: PageOut
    limited_data_use: bool
    test_event_code: str | None
    event_source: str = "offline"


class OfflinePlan:
    """Field sources of one offline mapping, compiled once; `evaluate` runs per event."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self._extract: Callable[[SegmentEvent], tuple[Any, ...]] = extractor(
            [OFFLINE_FIELDS[n] for n in _NAMES], sources
        )
        ts_source = sources["timestamp"]
        self._ts_error = FieldError("timestamp", ts_source, "not an ISO-8601 date-time").text
        # Indexes of the properties that are mapped at all: unmapped ones cost nothing.
        self._props = tuple(
            (n, _NAMES.index(n))
            for n in (*_PROPERTY_FIELDS, "order_id", "shop_id")
            if sources[n] is not None
        )
        self._finishers: dict[str, Finisher] = {}
        self._hashers = PLAIN_HASHERS
        self._timestamp: Callable[[str], int | None] = timestamp_seconds

    def use_hashers(self, hashers: Hashers) -> None:
        """Hash emails, phones and ids with `hashers` (see worker.mapping.hashing)."""
        self._hashers = hashers

    def use_timestamp(self, parse: Callable[[str], int | None]) -> None:
        """Parse `timestamp` with `parse` (see `worker.mapping.reading.remembering_timestamp`)."""
        self._timestamp = parse

    def evaluate(
        self, event: SegmentEvent, now: Callable[[], float], region: str | None
    ) -> OfflineCommon:
        values = self._extract(event)
        (
            event_id, timestamp, phones, emails, _order_id, _shop_id, external_ids, ttclid,
            ttp, lead_id, locale, url, referrer, ip, user_agent, _content_type, _currency,
            _value, _description, _query, limited_data_use, test_event_code,
        ) = values  # fmt: skip
        if timestamp is None:
            event_time = math.floor(now())
        else:
            parsed = self._timestamp(timestamp)
            if parsed is None:
                raise FieldError.plain(self._ts_error)
            event_time = parsed
        hash_email, hash_external_id, hash_phone = self._hashers
        ids = [hash_external_id(x) for x in external_ids] if external_ids else []
        phone = [hash_phone(x, region) for x in phones] if phones else []
        email = [hash_email(x) for x in emails] if emails else []
        if not ids and not phone and not email:
            raise FieldError.plain(_IDENTIFIERS_ERROR)
        user = OfflineUser(external_id=ids, phone=phone, email=email)
        if not ttclid and url and "?" in url:
            ttclid = url_ttclid(url)  # the field wins; the URL is the fallback
        if ttclid:
            user.ttclid = ttclid
        if lead_id:
            user.lead_id = lead_id
        if ttp:
            user.ttp = ttp
        if ip:
            user.ip = ip
        if user_agent:
            user.user_agent = user_agent
        if locale:
            user.locale = locale
        props: dict[str, object] = {}
        for name, index in self._props:
            v = values[index]
            if v is not None:  # "" was removed at the top level; 0 is kept (value)
                props[name] = v
        page = PageOut()
        if url:
            page.url = url
        if referrer:
            page.referrer = referrer
        return OfflineCommon(
            event_time,
            event_id or None,
            user,
            props,
            page,
            limited_data_use is True,
            test_event_code or None,
        )

    def finisher(self, event: str, contents: Source, items: dict[str, Source]) -> Finisher:
        """Offline has no per-event-name rules: one encoder per TikTok event name."""
        found = self._finishers.get(event)
        if found is None:

            def finish(common: Any, contents: list[dict[str, Any]], code: str | None) -> bytes:
                properties: dict[str, object] = {"contents": contents}
                properties.update(common.properties)
                test_code = common.test_event_code or code
                return encode_event(
                    OfflineEventOut(
                        event,
                        common.event_time,
                        common.event_id if common.event_id is not None else _UNSET,
                        common.user,
                        properties,
                        common.page,
                        common.limited_data_use,
                        test_code if test_code else _UNSET,
                    )
                )

            found = self._finishers[event] = finish
        return found
