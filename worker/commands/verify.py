"""`tiktok-worker verify`: send one test event per destination and report TikTok's answer.

For each destination (or only `--destination NAME`), a fixed, obviously synthetic Segment event
is mapped through that destination's real mapping, so the body is one the worker would send;
when the destination's presets and subscriptions map none of the candidates, a minimal valid
event of the destination's event source is sent instead (`ViewContent` for web, offline and
app; a custom `TiktokWorkerVerify` lead for CRM). The candidates carry what every source
needs (an email and user id for offline, `context.app` and `context.device` for app, a
`lead_id` for CRM). The request carries the destination's `test_event_code`, or a generated
`TEST` + 5 digits code (the same for every destination of one run), where that source puts
it (top level; inside the event for offline), so it shows up under Test Events in TikTok
Events Manager and not in reporting.

One request per destination, no retries: verify reports the first answer. Output, one line per
destination in configuration order:

    web-shop: OK (event ViewContent, pixel C5P..., test_event_code TEST04030)
    stores: OK (event CompletePayment, event set 7123..., test_event_code TEST04030)
    web-shop: FAILED: TikTok code 40105: Access token is incorrect or has been revoked.
        -- hint: ...           <- on the same line in reality

Exit 0 when every destination answered OK, 1 when any failed, 2 for an unknown
`--destination`. The access token is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from worker.config import Config, DestinationConfig, load_config, secret_values
from worker.core.redaction import register_secrets, sanitise_message
from worker.delivery.client import Outcome, SendResult, TikTokClient
from worker.errors import ConfigError
from worker.mapping.body import BatchKey, build_body
from worker.mapping.mapper import MappedEvent, Mapper
from worker.mapping.spec import SOURCE_ID_KEYS
from worker.observability.logs import configure_logging

VERIFY_MESSAGE_PREFIX: Final = "tiktok-worker-verify-"
VERIFY_PAGE_URL: Final = "https://example.com/tiktok-worker-verify"
FALLBACK_EVENT: Final = "ViewContent"

# How the id of each event source is called in messages, and its config key.
_ID_WORDS: Final = {"web": "pixel", "crm": "pixel", "offline": "event set", "app": "app"}
_AUTH_TOKEN_CODES: Final = frozenset({40102, 40104, 40105})
_CODE_PERMISSION: Final = 40001
_FIELD_RE: Final = re.compile(r"(?:Invalid value for|invalid value for)\s+([A-Za-z0-9_.\[\]]+)")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The answer for one destination. `line` is what the command prints for it."""

    destination: str
    ok: bool
    line: str
    event: str
    test_event_code: str
    result: SendResult


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = select_destinations(config, getattr(args, "destination", None))
    configure_logging(level="info" if args.debug else "warning", fmt=config.logging.format)
    register_secrets(secret_values(config))
    results = asyncio.run(verify(config, names))
    for result in results:
        sys.stdout.write(result.line + "\n")
    sys.stdout.flush()
    return 0 if all(r.ok for r in results) else 1


def select_destinations(config: Config, name: str | None) -> list[str]:
    """The destinations to verify, in configuration order; ConfigError for an unknown name."""
    names = [d.name for d in config.destinations]
    if name is None:
        return names
    if name not in names:
        raise ConfigError(
            f"--destination: no destination named {name!r} (configured: {', '.join(names)})"
        )
    return [name]


def generated_test_code(rng: random.Random | None = None) -> str:
    """A test event code in TikTok's observed shape: `TEST` and five digits."""
    return f"TEST{(rng or random.Random()).randrange(100000):05d}"


async def verify(
    config: Config,
    names: Sequence[str],
    *,
    client: TikTokClient | None = None,
    test_code: str | None = None,
    now: float | None = None,
) -> list[VerifyResult]:
    """Send one test event to each destination in `names`, concurrently; results in order."""
    tiktok = config.tiktok
    own_client = client is None
    client = client or TikTokClient(
        base_url=tiktok.base_url,
        timeout_s=tiktok.request_timeout_s,
        max_connections=max(1, len(names)),
    )
    code = test_code or generated_test_code()
    when = time.time() if now is None else now
    # Map with the test code set on every destination, so that it lands where each source's
    # body carries it (offline: inside the event, which the batch key cannot change).
    config = msgspec.structs.replace(
        config,
        destinations=tuple(
            msgspec.structs.replace(d, test_event_code=d.test_event_code or code)
            for d in config.destinations
        ),
    )
    mapper = Mapper(config, now=lambda: when)
    by_name = {d.name: (i, d) for i, d in enumerate(config.destinations)}
    try:
        return list(
            await asyncio.gather(
                *(
                    _verify_one(config, mapper, client, by_name[n][1], by_name[n][0], code, when)
                    for n in names
                )
            )
        )
    finally:
        if own_client:
            await client.close()


async def _verify_one(
    config: Config,
    mapper: Mapper,
    client: TikTokClient,
    dest: DestinationConfig,
    index: int,
    generated_code: str,
    now: float,
) -> VerifyResult:
    code = dest.test_event_code or generated_code
    key, payload, event = test_event(config, mapper, dest, code, now)
    result = await client.send(build_body(key, [payload]), access_token=dest.access_token)
    ok = result.outcome is Outcome.SUCCESS
    if ok:
        line = (
            f"{dest.name}: OK (event {event}, {_ID_WORDS[dest.event_source]} "
            f"{dest.event_source_id}, test_event_code {code})"
        )
    else:
        # Second line of defence (the client already masks it): whatever TikTok echoed, the
        # token is never printed.
        answer = describe(result).replace(dest.access_token, "***")
        line = f"{dest.name}: FAILED: {answer} -- hint: {hint(result, dest, index)}"
    return VerifyResult(dest.name, ok, line, event, code, result)


def synthetic_events(now: float) -> list[dict[str, object]]:
    """Candidate test events, most typical first: a completed order, a page view, then the
    other common e-commerce events. Every one is plainly a test (ids, URL, names)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    suffix = f"{int(now * 1000):d}-{random.randrange(1 << 30):08x}"

    def base(kind: str, n: int) -> dict[str, object]:
        return {
            "type": kind,
            "messageId": f"{VERIFY_MESSAGE_PREFIX}{suffix}-{n}",
            "timestamp": stamp,
            "userId": "tiktok-worker-verify",
            "anonymousId": "tiktok-worker-verify",
            "context": {
                "ip": "203.0.113.1",
                "userAgent": "tiktok-worker verify",
                "locale": "en-US",
                "page": {"url": VERIFY_PAGE_URL, "referrer": "https://example.com/"},
                "traits": {"email": "verify@example.com"},
                # What an app event needs (app destinations): the app and the device.
                "app": {"namespace": "tiktok.worker.verify", "name": "tiktok-worker verify"},
                "device": {"type": "android", "id": "tiktok-worker-verify"},
            },
        }

    product = {
        "product_id": "tiktok-worker-verify",
        "sku": "tiktok-worker-verify",
        "name": "tiktok-worker verify test product",
        "category": "test",
        "price": 1.0,
        "quantity": 1,
    }
    events: list[dict[str, object]] = []
    for n, name in enumerate(
        (
            "Order Completed",
            None,  # a page call
            "Checkout Started",
            "Product Added",
            "Product Viewed",
            "Products Searched",
            "Payment Info Entered",
        )
    ):
        if name is None:
            event = base("page", n)
            event["name"] = "tiktok-worker verify"
            event["properties"] = {"url": VERIFY_PAGE_URL, "title": "tiktok-worker verify"}
        else:
            event = base("track", n)
            event["event"] = name
            event["properties"] = {
                "order_id": "tiktok-worker-verify",
                "currency": "USD",
                "value": 1.0,
                "total": 1.0,
                "query": "tiktok-worker verify",
                "lead_id": "tiktok-worker-verify",  # CRM events need one
                "products": [product],
                **product,
            }
        events.append(event)
    return events


def test_event(
    config: Config, mapper: Mapper, dest: DestinationConfig, code: str, now: float
) -> tuple[BatchKey, bytes, str]:
    """(batch key with `code`, encoded `data[]` element, TikTok event name) for `dest`."""
    for candidate in synthetic_events(now):
        mapped = _mapped_for(mapper, candidate, dest.name)
        if mapped is not None:
            return (
                msgspec.structs.replace(mapped.key, test_event_code=code),
                mapped.payload,
                (mapped.event),
            )
    source = dest.event_source
    key = BatchKey(
        destination=dest.name,
        event_source_id=dest.event_source_id,
        event_source=source,
        test_event_code=code,
        partner_name=config.tiktok.partner_name,
    )
    event, payload = fallback_payload(source, code, now)
    return key, msgspec.json.encode(payload), event


# The hashed user id of the fallback offline event (offline needs one identifier).
_VERIFY_USER: Final = hashlib.sha256(b"tiktok-worker-verify").hexdigest()


def fallback_payload(source: str, code: str, now: float) -> tuple[str, dict[str, object]]:
    """(event name, `data[]` element): the smallest event TikTok accepts for `source`.

    Plain dicts rather than the mapper's Structs: these bodies are the fallback's own.
    """
    head: dict[str, object] = {
        "event": "TiktokWorkerVerify" if source == "crm" else FALLBACK_EVENT,
        "event_time": int(now),
        "event_id": f"{VERIFY_MESSAGE_PREFIX}{int(now * 1000)}",
    }
    if source == "offline":
        user: dict[str, object] = {"external_id": [_VERIFY_USER], "phone": [], "email": []}
        body = {**head, "user": user, "properties": {"contents": []}, "page": {}}
        return str(head["event"]), {**body, "limited_data_use": False, "test_event_code": code}
    if source == "app":
        # ViewContent needs content_type, currency and value, and a content_id per item.
        props = {"contents": [], "content_type": "product", "currency": "USD", "value": 0}
        body = {
            **head,
            "user": {"att_status": "NOT_APPLICABLE"},
            "properties": props,
            "app": {"app_id": "tiktok.worker.verify"},
            "ad": {},
        }
        return str(head["event"]), {**body, "limited_data_use": False}
    # web and crm: user keys as Segment always sends them.
    body = {
        **head,
        "user": {
            "external_id": [],
            "phone": [],
            "email": [],
            "first_name": "",
            "last_name": "",
            "city": "",
            "state": "",
            "country": "",
            "zip_code": "",
        },
        "properties": {},
    }
    if source == "crm":
        body["lead"] = {"lead_id": "tiktok-worker-verify"}
    else:
        body["page"] = {"url": VERIFY_PAGE_URL}
    return str(head["event"]), {**body, "limited_data_use": False}


def _mapped_for(mapper: Mapper, event: dict[str, object], name: str) -> MappedEvent | None:
    for outcome in mapper.map_message(json.dumps(event).encode()):
        for mapped in outcome.mapped:
            if mapped.destination == name:
                return mapped
    return None


def describe(result: SendResult) -> str:
    """TikTok's code and message, or what happened instead of an answer."""
    if result.code is not None:
        return f"TikTok code {result.code}: {result.message}"
    if result.http_status is not None:
        return f"HTTP {result.http_status}: {result.message}"
    return f"{result.outcome.value}: {result.message}"


def hint(result: SendResult, dest: DestinationConfig, index: int) -> str:
    """What the operator should check, by TikTok code or outcome."""
    where = f"destinations[{index}]"
    code = result.code
    if code == 40104:
        return f"the access token is empty: set {where}.access_token"
    if code in _AUTH_TOKEN_CODES or (code is None and result.outcome is Outcome.AUTH):
        return (
            "bad or expired access token: generate a new one in TikTok Events Manager "
            f"(the pixel's Settings, Events API) and update {where}.access_token"
        )
    id_key = SOURCE_ID_KEYS[dest.event_source]
    if code == _CODE_PERMISSION:
        noun = _ID_WORDS[dest.event_source]
        return (
            f"the access token lacks permission for {noun} {dest.event_source_id}: check "
            f"{where}.{id_key}, and that the token was generated for this {noun}'s "
            "advertiser account"
        )
    if result.outcome is Outcome.THROTTLED:
        return "TikTok is rate-limiting this app right now: try again in a minute"
    if result.outcome in (Outcome.RETRYABLE, Outcome.TIMEOUT, Outcome.CONNECTION):
        return (
            "TikTok unreachable or busy: check tiktok.base_url and network access "
            "(HTTPS_PROXY/NO_PROXY, egress NetworkPolicy), then try again"
        )
    field = _bad_field(result.message)
    if code is not None and 40000 <= code < 41000 and field is not None:
        extra = f" (check {where}.{id_key})" if field.startswith("event_source") else ""
        return f"TikTok rejected a bad parameter: {field}{extra}"
    if code is not None and 40000 <= code < 41000:
        return "TikTok rejected a bad parameter: see the message"
    return "TikTok rejected the request: see the message"


def _bad_field(message: str) -> str | None:
    m = _FIELD_RE.search(sanitise_message(message))
    return m.group(1).rstrip(".:") if m else None
