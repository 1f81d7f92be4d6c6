"""Realistic Segment events for the demo, the tests and the benchmarks.

Each generated event has a unique ``messageId`` so that what was produced can be reconciled
with what the fake TikTok server accepted and what went to the dead-letter topic.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from typing import Any, Final

# Track events the `documented` preset set maps (see docs/configuration.md).
DOCUMENTED_TRACK_EVENTS: Final = (
    "Checkout Started",
    "Products Searched",
    "Payment Info Entered",
    "Order Completed",
)
OTHER_TRACK_EVENTS: Final = ("Product Viewed", "Product Added", "Cart Viewed")

_PRODUCTS: Final = (
    ("sku-1001", "Trail Runner 2", "Shoes", "Northpeak", 89.0),
    ("sku-1002", "Merino Socks", "Socks", "Woolly", 14.5),
    ("sku-1003", "Rain Shell", "Jackets", "Northpeak", 149.99),
    ("sku-1004", "Water Bottle", "Accessories", "Hydra", 19.0),
    ("sku-1005", "Headlamp 300", "Accessories", "Lumen", 39.95),
)


def recent_base(now: dt.datetime | None = None) -> dt.datetime:
    """The start of the previous UTC hour: recent, yet the same for every generator made
    within one hour (so two seeded generators still produce equal events)."""
    now = now if now is not None else dt.datetime.now(dt.UTC)
    return now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)


class SampleEvents:
    """A seeded generator of Segment events (dicts) and Kafka message values (bytes)."""

    def __init__(
        self, *, seed: int = 7, prefix: str = "msg", base: dt.datetime | None = None
    ) -> None:
        self._rng = random.Random(seed)
        self._prefix = prefix
        self._count = 0
        # Recent by default: the worker skips events older than tiktok.max_event_age_s (48 h),
        # so a fixed date would turn every sample into a too_old skip once it ages.
        self._base = base if base is not None else recent_base()

    def _message_id(self) -> str:
        self._count += 1
        return f"{self._prefix}-{self._count:08d}"

    def _common(self, kind: str) -> dict[str, Any]:
        rng = self._rng
        user = rng.randrange(1, 5000)
        ts = self._base + dt.timedelta(seconds=self._count)
        return {
            "type": kind,
            "messageId": self._message_id(),
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "userId": f"user-{user}",
            "anonymousId": f"anon-{user:05d}",
            "context": {
                "ip": f"203.0.113.{user % 250}",
                "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0",
                "locale": "en-US",
                "page": {
                    "url": f"https://shop.example.com/p/{user}?ttclid=E.C.P.{user:06d}",
                    "referrer": "https://www.tiktok.com/",
                },
                "traits": {
                    "email": f"Customer{user}@Example.com",
                    "phone": f"+1 (555) 010-{user % 10000:04d}",
                    "firstName": "Ada",
                    "lastName": "Lovelace",
                    "address": {
                        "city": "São Paulo",
                        "state": "SP",
                        "country": "BR",
                        "postalCode": "01310-100",
                    },
                },
            },
        }

    def track(self, name: str | None = None) -> dict[str, Any]:
        rng = self._rng
        name = name or rng.choice(DOCUMENTED_TRACK_EVENTS + OTHER_TRACK_EVENTS)
        event = self._common("track")
        products: list[dict[str, Any]] = [
            {
                "product_id": pid,
                "name": pname,
                "category": cat,
                "brand": brand,
                "price": price,
                "quantity": rng.randrange(1, 4),
            }
            for pid, pname, cat, brand, price in rng.sample(_PRODUCTS, rng.randrange(1, 4))
        ]
        total = round(sum(p["price"] * p["quantity"] for p in products), 2)
        properties: dict[str, Any] = {"currency": "USD", "value": total, "products": products}
        if name == "Products Searched":
            properties = {"query": rng.choice(["rain shell", "socks", "headlamp"])}
        elif name == "Order Completed":
            properties["order_id"] = f"order-{self._count}"
            properties["total"] = total
        event["event"] = name
        event["properties"] = properties
        return event

    def page(self) -> dict[str, Any]:
        event = self._common("page")
        event["name"] = "Product"
        event["properties"] = {"title": "Trail Runner 2", "path": "/p/sku-1001"}
        return event

    def identify(self) -> dict[str, Any]:
        event = self._common("identify")
        event["traits"] = {"plan": "pro"}
        return event

    def mixed(self) -> dict[str, Any]:
        """The usual traffic mix: mostly track, some page, a few identify."""
        roll = self._rng.random()
        if roll < 0.7:
            return self.track()
        if roll < 0.9:
            return self.page()
        return self.identify()

    def stream(self, count: int) -> Iterator[dict[str, Any]]:
        for _ in range(count):
            yield self.mixed()


MALFORMED_VALUES: Final[tuple[bytes, ...]] = (
    b"not json at all",
    b'{"type": "track", "event": "Order Completed", "messageId": ',  # truncated
    b"\xff\xfe\x00garbage",  # invalid UTF-8
    b'["just", "strings"]',
    b'{"type": "track", "messageId": 42, "event": ["not", "a", "string"]}',
)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
