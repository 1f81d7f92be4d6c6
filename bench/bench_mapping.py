"""Decode + map throughput on one core, for a realistic Segment e-commerce mix.

Prints one JSON object: events/s (min/median/max over the rounds, per second of process CPU
time, so other load on the machine does not count against it) for msgspec typed decode alone
and for decode + route + map + hash + encode with the `documented` presets, with one and with
two destinations (a second pixel with the same mapping; and the same with
phone_default_region GB, so phones are hashed per destination).
The mix: 40% page, 15% identify, 45% track (Product Viewed, Product Added, Checkout Started,
Order Completed with 1-4 products, Products Searched), with full web context; half of the
page/track events come from identified users (userId + context.traits with email, phone,
names and address: six hashes per TikTok event), half from anonymous visitors. The
`all_identified` figure is the worst case where every event carries all of that PII.
Event sources (issue 20): one offline destination (Segment's 15 offline presets), one app
destination (11 app presets; the events get `context.app`, `context.device` and `context.os`
as a mobile SDK sends them), and one destination of each source (web, crm, offline, app)
together on those events.
Run: `.venv/bin/python bench/bench_mapping.py [--events N] [--rounds R]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from typing import Any

import msgspec

from worker.config import parse_config
from worker.mapping.mapper import Mapper
from worker.mapping.segment import decode_event

_CONFIG = """
destinations:
  - name: web-shop
    pixel_code: COQDA8RC77U2TMR44LI0
    access_token: token-1
    presets: documented
{second}
"""
_SECOND = """  - name: web-shop-eu
    pixel_code: BU35TSQHT2A1QT375OMG
    access_token: token-2
    presets: documented
"""
_SECOND_GB = _SECOND + "    phone_default_region: GB\n"
_OFFLINE = """destinations:
  - name: stores
    event_source: offline
    event_set_id: "7299999999999999999"
    access_token: token-1
"""
_APP = """destinations:
  - name: mobile
    event_source: app
    tiktok_app_id: "7000000001"
    access_token: token-1
"""
_FOUR = (
    _CONFIG.format(second="")
    + """  - name: leads
    event_source: crm
    pixel_code: CRMSET0000000000001
    access_token: token-1
    subscriptions:
      - {name: Lead, trigger: 'event = "Checkout Started"', event: QualifiedLead}
"""
    + _OFFLINE.removeprefix("destinations:\n")
    + _APP.removeprefix("destinations:\n")
)
_APP_CONTEXT: dict[str, Any] = {
    "app": {"namespace": "com.example.shop", "name": "Shop", "version": "4.2.0"},
    "device": {
        "type": "ios",
        "id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
        "advertisingId": "7A3CBEA0-BDF5-11E4-8DFC-AA07A5B093DB",
        "adTrackingEnabled": True,
    },
    "os": {"name": "iOS", "version": "18.1.3"},
}


def with_app_context(events: list[bytes]) -> list[bytes]:
    """The same events as a mobile SDK would send them (app, device and OS in context)."""
    out = []
    for raw in events:
        event = msgspec.json.decode(raw)
        event["context"] = {**event.get("context", {}), **_APP_CONTEXT}
        out.append(msgspec.json.encode(event))
    return out


_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
_FIRST = ["Ada", "Grace", "Alan", "Mary Ann", "Linus", "Margaret", "Dennis", "Barbara"]
_LAST = ["Lovelace", "Hopper", "Turing", "O'Neil", "Torvalds", "Hamilton", "Ritchie", "Liskov"]
_CITIES = ["San Francisco", "Oakland", "San José", "Berkeley", "Palo Alto", "Fremont"]
_PRODUCTS: list[dict[str, Any]] = [
    {
        "product_id": f"sku-{i}",
        "name": f"Product {i}",
        "category": "Shoes",
        "brand": "Brand X",
        "price": round(10 + i * 3.5, 2),
        "quantity": 1 + i % 3,
    }
    for i in range(20)
]


def _context(rng: random.Random, user: int, path: str, identified: bool) -> dict[str, Any]:
    query = f"?ttclid=E.C.P.{rng.randrange(10**9)}" if rng.random() < 0.2 else ""
    context: dict[str, Any] = {
        "ip": f"203.0.113.{user % 250}",
        "userAgent": _AGENT,
        "locale": "en-US",
        "library": {"name": "analytics.js", "version": "5.2.0"},
        "page": {
            "url": f"https://shop.example.com{path}{query}",
            "referrer": "https://www.google.com/",
            "path": path,
            "title": "Shop",
        },
    }
    if identified:
        context["traits"] = {
            "email": f"User{user}@Example.com",
            "phone": f"+1 (555) 010-{user % 10000:04d}",
            "first_name": _FIRST[user % len(_FIRST)],
            "last_name": _LAST[user % len(_LAST)],
            "address": {
                "city": _CITIES[user % len(_CITIES)],
                "state": "CA",
                "country": "US",
                "postal_code": f"{94000 + user % 1000}",
            },
        }
    return context


def recent_day() -> str:
    """Yesterday (UTC) as `YYYY-MM-DD`: `make_events(day=...)` then stamps every event 12 to
    36 hours ago, younger than `tiktok.max_event_age_s` (48 h, on by default), so a worker
    with the product defaults sends them instead of skipping them as too_old."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))


def make_events(
    n: int, seed: int = 7, identified_share: float = 0.5, day: str = "2024-05-01"
) -> list[bytes]:
    """A mix: 40% page, 15% identify, 45% track (viewed, added, checkout, order, search).

    `identified_share` of the page/track events come from identified users: `userId` and
    `context.traits` with email, phone, names and address (six hashes per TikTok event); the
    others are anonymous visitors (`anonymousId` only, one hash). Every `timestamp` falls in
    12:00-13:00 UTC of `day`: the fixed default keeps the bytes stable for the in-memory
    benches (their mappers' clock is 1.7e9); a worker on the real clock needs `recent_day()`."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for _ in range(n):
        user = rng.randrange(100_000)
        base: dict[str, Any] = {
            "messageId": str(uuid.UUID(int=rng.getrandbits(128))),
            "timestamp": f"{day}T12:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
            f".{rng.randrange(1000):03d}Z",
            "anonymousId": str(uuid.UUID(int=rng.getrandbits(128))),
        }
        r = rng.random()
        identified = r < 0.55 or rng.random() < identified_share
        if identified:
            base["userId"] = f"user-{user}"
        if r < 0.40:
            event = {
                **base,
                "type": "page",
                "name": "Product",
                "properties": {"path": "/p"},
                "context": _context(rng, user, "/products/shoe", identified),
            }
        elif r < 0.55:
            event = {
                **base,
                "type": "identify",
                "traits": {"email": f"user{user}@example.com"},
                "context": _context(rng, user, "/account", identified),
            }
        else:
            kind = rng.choice(
                [
                    "Product Viewed",
                    "Product Added",
                    "Checkout Started",
                    "Order Completed",
                    "Products Searched",
                ]
            )
            products = rng.sample(_PRODUCTS, rng.randint(1, 4))
            props: dict[str, Any]
            if kind in ("Product Viewed", "Product Added"):
                props = {**products[0], "currency": "USD", "value": products[0]["price"]}
            elif kind == "Products Searched":
                props = {"query": "running shoes"}
            else:
                total = round(sum(p["price"] * p["quantity"] for p in products), 2)
                props = {
                    "order_id": f"o-{rng.randrange(10**6)}",
                    "currency": "USD",
                    "revenue": total,
                    "products": products,
                }
            event = {
                **base,
                "type": "track",
                "event": kind,
                "properties": props,
                "context": _context(rng, user, "/checkout", identified),
            }
        out.append(msgspec.json.encode(event))
    return out


def _rate(fn: Any, events: list[bytes], rounds: int) -> dict[str, float]:
    """Events per second of CPU time of this process (what one core delivers, whatever else
    the machine runs), min/median/max over the rounds; plus the median by wall clock."""
    cpu_rates, wall_rates = [], []
    for _ in range(rounds):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for raw in events:
            fn(raw)
        cpu_rates.append(len(events) / (time.process_time() - cpu0))
        wall_rates.append(len(events) / (time.perf_counter() - wall0))
    return {
        "min": round(min(cpu_rates)),
        "median": round(statistics.median(cpu_rates)),
        "max": round(max(cpu_rates)),
        "wall_median": round(statistics.median(wall_rates)),
    }


def _source_rates(events: list[bytes], rounds: int) -> dict[str, Any]:
    app_events = with_app_context(events)
    out: dict[str, Any] = {}
    for label, text, sample in (
        ("1_offline_destination", _OFFLINE, events),
        ("1_app_destination", _APP, app_events),
        ("4_sources", _FOUR, app_events),
    ):
        mapper = Mapper(parse_config(text), now=lambda: 1.7e9)
        outcomes = [o for raw in sample for o in mapper.map_message(raw)]
        out[f"mapped_per_event_{label}"] = round(
            sum(len(o.mapped) for o in outcomes) / len(sample), 3
        )
        out[f"invalid_per_event_{label}"] = round(
            sum(len(o.invalid) for o in outcomes) / len(sample), 3
        )
        out[f"decode_map_{label}_events_per_s"] = _rate(mapper.map_message, sample, rounds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--identified-share",
        type=float,
        default=0.5,
        help="share of page/track events from identified users (default 0.5)",
    )
    args = parser.parse_args(argv)
    events = make_events(args.events, identified_share=args.identified_share)
    all_identified = make_events(args.events, identified_share=1.0)
    mapper1 = Mapper(parse_config(_CONFIG.format(second="")), now=lambda: 1.7e9)
    mapper2 = Mapper(parse_config(_CONFIG.format(second=_SECOND)), now=lambda: 1.7e9)
    mapper2gb = Mapper(parse_config(_CONFIG.format(second=_SECOND_GB)), now=lambda: 1.7e9)
    mapped1 = sum(len(o.mapped) for raw in events for o in mapper1.map_message(raw))
    result = {
        "events": len(events),
        "rounds": args.rounds,
        "identified_share": args.identified_share,
        "mean_event_bytes": round(sum(map(len, events)) / len(events)),
        "mapped_per_event_1_destination": round(mapped1 / len(events), 3),
        "decode_only_events_per_s": _rate(decode_event, events, args.rounds),
        "decode_map_1_destination_events_per_s": _rate(mapper1.map_message, events, args.rounds),
        "decode_map_2_destinations_events_per_s": _rate(mapper2.map_message, events, args.rounds),
        "decode_map_2_destinations_second_with_region_gb_events_per_s": _rate(
            mapper2gb.map_message, events, args.rounds
        ),
        "decode_map_1_destination_all_identified_events_per_s": _rate(
            mapper1.map_message, all_identified, args.rounds
        ),
        **_source_rates(events, args.rounds),
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
