"""Body validation for the fake TikTok server: what `POST /open_api/v1.3/event/track/` checks.

Follows docs/tiktok-events-api.md (§2.1 body, §3 limits, §4 names, §5.3 codes, §6 hashing).
Types are checked by msgspec while decoding into the Structs below (fast, in C); the semantic
rules (enums, hashes, currencies, the web `page` requirement) are checked in Python after.
Unknown keys are accepted and ignored, as TikTok does. A failure rejects the whole request
with one code and a message naming the field, in TikTok's style
(`Invalid value for data.3.event_id: not a valid string.`):

- 40002 PARAM_ERROR: missing or mistyped field, unknown `event_source`, empty `data`,
  unsupported currency or `content_type`, implausible `event_time` (not Unix seconds), and
  the per-source rules below.
- 40061 INVALID_BATCH_SIZE: more than 1000 events (docs: the whole request is rejected).
- 40062 PII_NOT_HASHED: email/phone/external_id/first_name/last_name/zip_code not a
  SHA-256 hex digest (64 hex characters; empty strings count as absent); for app events also
  `idfa` and `gaid`.

Per event source (docs/tiktok-events-api.md §2.1, §4; docs/tiktok-offline-app.md):
- `web`: `page` is required; any event name (custom names are accepted);
- `crm`: `lead.lead_id` is required; custom event names only;
- `offline`: standard event names only (plus Segment's `PageView`, which the docs say to
  treat as accepted); `test_event_code` may sit inside the event, where Segment's offline
  action puts it;
- `app`: the event name must be one of TikTok's app events; `app.app_id` is required;
  `user.att_status`, when sent, must be one of TikTok's values.
`external_id` is a match key only for web and CRM and `page` only for web: elsewhere TikTok
ignores them, so `match_keys` (what `record`s keep) does not count them. Their values are
still checked for hashing in every source: the fake is also the tests' PII-leak detector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import msgspec

from worker.core.msgspec_errors import ErrorKind, parse_validation_message
from worker.mapping.fields_app import APP_EVENTS, ATT_STATUSES

CODE_PARAM_ERROR: Final = 40002
CODE_INVALID_BATCH_SIZE: Final = 40061
CODE_PII_NOT_HASHED: Final = 40062

MAX_EVENTS_PER_REQUEST: Final = 1000
EVENT_SOURCES: Final = frozenset({"web", "app", "offline", "crm"})
CONTENT_TYPES: Final = frozenset({"product", "product_group"})
# docs §2.1: the supported-currency list of TikTok's SDK (PixelProperties.md).
_CURRENCY_LIST: Final = (
    "AED ARS AUD BDT BHD BIF BOB BRL CAD CHF CLP CNY COP CRC CZK DKK DZD EGP EUR GBP GTQ HKD "
    "HNL HUF IDR ILS INR ISK JPY KES KHR KRW KWD KZT MAD MOP MXN MYR NGN NIO NOK NZD OMR PEN "
    "PHP PKR PLN PYG QAR RON RUB SAR SEK SGD THB TRY TWD UAH USD VES VND ZAR"
)
CURRENCIES: Final = frozenset(_CURRENCY_LIST.split())
# docs §4: both generations of standard web events (legacy names are still accepted).
STANDARD_EVENTS: Final = frozenset(
    {
        "AddPaymentInfo", "AddToCart", "AddToWishlist", "ApplicationApproval", "ClickButton",
        "CompletePayment", "CompleteRegistration", "Contact", "CustomizeProduct", "Download",
        "FindLocation", "InitiateCheckout", "Lead", "PlaceAnOrder", "Purchase", "Schedule",
        "Search", "StartTrial", "SubmitApplication", "SubmitForm", "Subscribe", "ViewContent",
    }
)  # fmt: skip
HASHED_USER_FIELDS: Final = ("email", "phone", "external_id", "first_name", "last_name", "zip_code")
APP_HASHED_USER_FIELDS: Final = ("idfa", "gaid")
# docs/tiktok-events-api.md §4: Segment's `PageView` is not in the standard list; "treat it as
# accepted". Segment's offline presets send it for page calls.
OFFLINE_EVENTS: Final = STANDARD_EVENTS | {"PageView"}
# The user keys TikTok matches on, per source (external_id: web and CRM only).
_MATCH_KEYS: Final = {
    "web": ("email", "phone", "external_id", "ttclid", "ttp", "ip"),
    "crm": ("email", "phone", "external_id"),
    "offline": ("email", "phone", "ttclid", "ttp", "ip"),
    "app": ("email", "phone", "idfa", "gaid", "idfv", "ip"),
}
# An integer event_time at or above this is milliseconds (or nonsense), not Unix seconds.
_MAX_PLAUSIBLE_EVENT_TIME: Final = 10_000_000_000

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class Content(msgspec.Struct):
    content_id: str | None = None
    price: float | None = None
    quantity: int | None = None
    content_name: str | None = None
    content_category: str | None = None
    content_type: str | None = None
    brand: str | None = None


class Properties(msgspec.Struct):
    contents: list[Content] | None = None
    content_type: str | None = None
    content_ids: list[str] | None = None
    currency: str | None = None
    value: float | None = None
    query: str | None = None
    description: str | None = None
    order_id: str | None = None
    shop_id: str | None = None


_HashedValue = str | list[str] | None


class User(msgspec.Struct):
    email: _HashedValue = None
    phone: _HashedValue = None
    external_id: _HashedValue = None
    first_name: _HashedValue = None
    last_name: _HashedValue = None
    zip_code: _HashedValue = None
    ttclid: str | None = None
    ttp: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    locale: str | None = None
    city: str | None = None
    state: str | None = None
    country: str | None = None
    lead_id: str | None = None
    idfa: str | None = None
    gaid: str | None = None
    idfv: str | None = None
    att_status: str | None = None


class Page(msgspec.Struct):
    url: str | None = None
    referrer: str | None = None


class Lead(msgspec.Struct):
    lead_id: str | None = None
    lead_event_source: str | None = None


class App(msgspec.Struct):
    app_id: str | None = None
    app_name: str | None = None
    app_version: str | None = None


class Ad(msgspec.Struct):
    callback: str | None = None
    campaign_id: str | None = None
    ad_id: str | None = None
    creative_id: str | None = None
    is_retargeting: bool | None = None
    attributed: bool | None = None
    attribution_type: str | None = None
    attribution_provider: str | None = None


class Event(msgspec.Struct):
    event: str
    event_time: int
    event_id: str | None = None
    user: User | None = None
    properties: Properties | None = None
    page: Page | None = None
    limited_data_use: bool | None = None
    lead: Lead | None = None
    app: App | None = None
    ad: Ad | None = None
    test_event_code: str | None = None  # offline: Segment's offline action puts it here


class TrackRequest(msgspec.Struct):
    event_source: str
    event_source_id: str
    data: list[Event]
    test_event_code: str | None = None
    partner_name: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused: TikTok's numeric code and a message naming the field."""

    code: int
    message: str


_DECODER: Final = msgspec.json.Decoder(TrackRequest)

_TYPE_WORDS: Final = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "array": "list",
    "object": "object",
}


def _rejection_from_msgspec(error: msgspec.ValidationError) -> Rejection:
    m = parse_validation_message(str(error))
    if m.kind is ErrorKind.WRONG_TYPE:
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in m.expected if t != "null")
        path = m.dotted_path or "request body"
        return Rejection(CODE_PARAM_ERROR, f"Invalid value for {path}: not a valid {words}.")
    if m.kind is ErrorKind.MISSING_FIELD:
        parent = m.dotted_path
        path = f"{parent}.{m.field}" if parent else f"{m.field}"
        return Rejection(CODE_PARAM_ERROR, f"Invalid value for {path}: missing required field.")
    return Rejection(CODE_PARAM_ERROR, f"Invalid request: {error}")


def _bad(path: str, reason: str, code: int = CODE_PARAM_ERROR) -> Rejection:
    return Rejection(code, f"Invalid value for {path}: {reason}.")


def _check_hashed(value: str | list[str], path: str) -> Rejection | None:
    values = [value] if isinstance(value, str) else value
    for item in values:
        if item and _SHA256_HEX.fullmatch(item) is None:
            return _bad(path, "PII must be a SHA-256 hex digest", CODE_PII_NOT_HASHED)
    return None


def _check_user(user: User, prefix: str, source: str) -> Rejection | None:
    names = HASHED_USER_FIELDS + APP_HASHED_USER_FIELDS if source == "app" else HASHED_USER_FIELDS
    for name in names:
        value = getattr(user, name)
        if value is not None:
            problem = _check_hashed(value, f"{prefix}.user.{name}")
            if problem is not None:
                return problem
    if source == "app" and user.att_status is not None and user.att_status not in ATT_STATUSES:
        return _bad(f"{prefix}.user.att_status", f"must be one of {', '.join(ATT_STATUSES)}")
    return None


def match_keys(event: Event, source: str) -> tuple[str, ...]:
    """The non-empty user keys TikTok matches on for `source` (external_id: web and CRM)."""
    user = event.user
    if user is None:
        return ()
    return tuple(n for n in _MATCH_KEYS.get(source, ()) if getattr(user, n))


def _check_properties(props: Properties, prefix: str) -> Rejection | None:
    if props.currency is not None and props.currency not in CURRENCIES:
        return _bad(f"{prefix}.properties.currency", "not a supported currency")
    if props.content_type is not None and props.content_type not in CONTENT_TYPES:
        return _bad(f"{prefix}.properties.content_type", "must be product or product_group")
    return None


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """Optional checks TikTok does not document (docs §3: no known event_time window).

    `max_event_age_s` / `max_event_future_s`: reject event_time older / further ahead than
    this many seconds relative to the receive time; None disables the check.
    """

    max_event_age_s: float | None = None
    max_event_future_s: float | None = None


def _check_event(
    event: Event, index: int, source: str, now: float, policy: ValidationPolicy
) -> Rejection | None:
    prefix = f"data.{index}"
    if not event.event:
        return _bad(f"{prefix}.event", "not a valid string")
    if source == "offline" and event.event not in OFFLINE_EVENTS:
        return _bad(f"{prefix}.event", "offline events must use a standard event name")
    if source == "app" and event.event not in APP_EVENTS:
        return _bad(f"{prefix}.event", "app events must use a TikTok app event name")
    if source == "crm" and event.event in STANDARD_EVENTS:
        return _bad(f"{prefix}.event", "CRM events must use a custom event name")
    t = event.event_time
    if t <= 0 or t >= _MAX_PLAUSIBLE_EVENT_TIME:
        return _bad(f"{prefix}.event_time", "not a Unix timestamp in seconds")
    if policy.max_event_age_s is not None and t < now - policy.max_event_age_s:
        return _bad(f"{prefix}.event_time", "too old")
    if policy.max_event_future_s is not None and t > now + policy.max_event_future_s:
        return _bad(f"{prefix}.event_time", "in the future")
    if source == "web" and event.page is None:
        return _bad(f"{prefix}.page", "required for web events")
    if source == "crm" and (event.lead is None or not event.lead.lead_id):
        return _bad(f"{prefix}.lead.lead_id", "required for CRM events")
    if source == "app" and (event.app is None or not event.app.app_id):
        return _bad(f"{prefix}.app.app_id", "required for app events")
    if event.user is not None:
        problem = _check_user(event.user, prefix, source)
        if problem is not None:
            return problem
    if event.properties is not None:
        return _check_properties(event.properties, prefix)
    return None


def decode_request(body: bytes) -> TrackRequest | Rejection:
    """Decode and type-check a request body; a Rejection names the first mistyped field."""
    try:
        return _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        return _rejection_from_msgspec(exc)
    except msgspec.DecodeError:
        return Rejection(CODE_PARAM_ERROR, "Invalid request body: not valid JSON.")


_DEFAULT_POLICY: Final = ValidationPolicy()


def check_request(
    request: TrackRequest, *, now: float, policy: ValidationPolicy = _DEFAULT_POLICY
) -> Rejection | None:
    """The semantic checks on a decoded request. None means TikTok would accept it."""
    if request.event_source not in EVENT_SOURCES:
        return _bad("event_source", "must be one of web, app, offline, crm")
    if not request.event_source_id:
        return _bad("event_source_id", "not a valid string")
    count = len(request.data)
    if count == 0:
        return _bad("data", "must contain at least 1 event")
    if count > MAX_EVENTS_PER_REQUEST:
        return Rejection(
            CODE_INVALID_BATCH_SIZE,
            f"Invalid value for data: at most {MAX_EVENTS_PER_REQUEST} events per request, "
            f"got {count}.",
        )
    source = request.event_source
    for index, event in enumerate(request.data):
        problem = _check_event(event, index, source, now, policy)
        if problem is not None:
            return problem
    return None


def validate(
    body: bytes, *, now: float, policy: ValidationPolicy = _DEFAULT_POLICY
) -> tuple[TrackRequest | None, Rejection | None]:
    """Decode and check `body`. Returns (request or None if undecodable, rejection or None)."""
    decoded = decode_request(body)
    if isinstance(decoded, Rejection):
        return None, decoded
    return decoded, check_request(decoded, now=now, policy=policy)
