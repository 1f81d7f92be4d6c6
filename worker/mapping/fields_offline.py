"""The Report Offline Event field set (Segment's TikTok Offline Conversions destination).

Field names, types and default paths follow docs/tiktok-offline-app.md §1.3: the match keys are
plurals (`email_addresses`, `phone_numbers`, `external_ids`), ttclid/ttp fall back to the
`integrations["TikTok Offline Conversions"]` object, `lead_id` is a flat field (it becomes
`user.lead_id`), and there are no name/address, travel, vehicle or CRM fields. The `contents`
item keys are the web ones (worker.mapping.fields.CONTENTS_ITEM_FIELDS).
"""

from __future__ import annotations

from typing import Final

from worker.mapping.fields import CONTENTS_ITEM_FIELDS, FieldDef, _c, _f, _p

__all__ = ["OFFLINE_FIELDS"]

_INTEGRATION = "$.integrations.TikTok Offline Conversions"


def _either(key: str) -> tuple[str, str]:
    return (f"$.properties.{key}", f"$.context.traits.{key}")


_FIELDS: Final = (
    _f("event_id", "string", _p("$.messageId")),
    _f("timestamp", "string", _p("$.timestamp")),
    _f("phone_numbers", "string", _p(*_either("phone")), multi=True),
    _f("email_addresses", "string", _p(*_either("email")), multi=True),
    _f("order_id", "string", _p("$.properties.order_id")),
    _f("shop_id", "string", _p("$.properties.shop_id")),
    _f("external_ids", "string", _p("$.userId", "$.anonymousId"), multi=True),
    _f("ttclid", "string", _p("$.properties.ttclid", f"{_INTEGRATION}.ttclid")),
    _f("ttp", "string", _p("$.properties.ttp", f"{_INTEGRATION}.ttp")),
    _f("lead_id", "string", _p("$.properties.lead_id")),
    _f("locale", "string", _p("$.context.locale")),
    _f("url", "string", _p("$.context.page.url")),
    _f("referrer", "string", _p("$.context.page.referrer")),
    _f("ip", "string", _p("$.context.ip")),
    _f("user_agent", "string", _p("$.context.userAgent")),
    _f("content_type", "string", _c("product"), enum=("product", "product_group")),
    _f("currency", "string", _p("$.properties.currency")),
    _f("value", "number", _p("$.properties.value", "$.properties.revenue")),
    _f("description", "string", None),
    _f("query", "string", _p("$.properties.query")),
    _f("limited_data_use", "boolean", _p("$.properties.limited_data_use")),
    _f("test_event_code", "string", None),
)

OFFLINE_FIELDS: Final[dict[str, FieldDef]] = {d.name: d for d in (*_FIELDS, *CONTENTS_ITEM_FIELDS)}
