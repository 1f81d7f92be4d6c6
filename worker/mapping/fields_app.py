"""The Report App Event field set (Segment's TikTok App Events destination).

Field names, types and default paths follow docs/tiktok-offline-app.md §2.4. Segment's object
fields are written with a dot, as for web: `app.app_id` (required), `ad.campaign_id`,
`device_details.device_type` (device details are read only to derive idfa/gaid/idfv and
`att_status`; they are never sent as such). The allowed event names are `APP_EVENTS` (§2.3):
a subscription naming any other event is a configuration error.
"""

from __future__ import annotations

from typing import Final

from worker.mapping.fields import CONTENTS_ITEM_FIELDS, FieldDef, _c, _f, _p

__all__ = [
    "APP_EVENTS",
    "APP_FIELDS",
    "ATT_STATUSES",
    "CONTENTS_REQUIRED_EVENTS",
    "CONTENT_ID_EVENTS",
    "PRODUCT_FIELDS_REQUIRED_EVENTS",
]

# TikTok's App standard events, the only names Segment's action accepts (an enum).
APP_EVENTS: Final = frozenset(
    {
        "AchieveLevel", "AddPaymentInfo", "AddToCart", "AddToWishlist", "Checkout",
        "CompleteTutorial", "CreateGroup", "CreateRole", "GenerateLead", "InAppADClick",
        "InAppADImpr", "InstallApp", "JoinGroup", "LaunchAPP", "LoanApplication",
        "LoanApproval", "LoanDisbursal", "Login", "Purchase", "Rate", "Registration",
        "Search", "SpendCredits", "StartTrial", "Subscribe", "UnlockAchievement", "ViewContent",
    }
)  # fmt: skip
# Segment's conditional requirements (JSON-schema if/then, enforced at runtime) and its
# content_id check for the events whose product mapping type is SINGLE or MULTIPLE.
CONTENTS_REQUIRED_EVENTS: Final = frozenset(
    {"AddToCart", "AddToWishlist", "Checkout", "Purchase", "Subscribe"}
)
PRODUCT_FIELDS_REQUIRED_EVENTS: Final = frozenset(
    {"AddToCart", "AddToWishlist", "Checkout", "Purchase", "ViewContent"}
)
CONTENT_ID_EVENTS: Final = PRODUCT_FIELDS_REQUIRED_EVENTS
ATT_STATUSES: Final = (
    "AUTHORIZED",
    "DENIED",
    "NOT_DETERMINED",
    "RESTRICTED",
    "NOT_APPLICABLE",
    "AUTO",
)


def _either(key: str) -> tuple[str, str]:
    return (f"$.properties.{key}", f"$.context.traits.{key}")


_FIELDS: Final = (
    _f("event_source", "string", _c("app"), enum=("app",)),
    _f("event_id", "string", _p("$.messageId")),
    _f("timestamp", "string", _p("$.timestamp")),
    _f("phone_number", "string", _p(*_either("phone")), multi=True),
    _f("email", "string", _p(*_either("email")), multi=True),
    _f("advertising_id", "string", _p("$.context.device.advertisingId")),
    _f("app.app_id", "string", _p("$.context.app.namespace")),
    _f("app.app_name", "string", _p("$.context.app.name")),
    _f("app.app_version", "string", _p("$.context.app.version")),
    _f("ad.callback", "string", None),
    _f("ad.campaign_id", "string", _p("$.properties.campaign.name")),
    _f("ad.ad_id", "string", _p("$.properties.campaign.ad_group")),
    _f("ad.creative_id", "string", _p("$.properties.campaign.ad_creative")),
    _f("ad.is_retargeting", "boolean", None),
    _f("ad.attributed", "boolean", None),
    _f("ad.attribution_type", "string", None),
    _f("ad.attribution_provider", "string", _p("$.properties.provider")),
    _f("device_details.device_type", "string", _p("$.context.device.type")),
    _f("device_details.device_id", "string", _p("$.context.device.id")),
    _f("device_details.device_version", "string", _p("$.context.os.version")),
    _f("device_details.ad_tracking_enabled", "boolean", _p("$.context.device.adTrackingEnabled")),
    _f("external_id", "string", _p("$.userId", "$.anonymousId"), multi=True),
    _f("locale", "string", _p("$.context.locale")),
    _f("att_status", "string", _c("AUTO"), enum=ATT_STATUSES),
    _f("ip", "string", _p("$.context.ip")),
    _f("user_agent", "string", _p("$.context.userAgent")),
    _f("content_ids", "string", _p("$.properties.content_ids"), multi=True),
    _f("num_items", "number", _p("$.properties.num_items")),
    _f("content_type", "string", _c("product"), enum=("product", "product_group")),
    _f("currency", "string", _p("$.properties.currency")),
    _f("value", "number", _p("$.properties.value", "$.properties.revenue")),
    _f("description", "string", None),
    _f("limited_data_use", "boolean", _p("$.properties.limited_data_use")),
    _f("test_event_code", "string", None),
    _f("search_string", "string", _p("$.properties.search_string")),
)

APP_FIELDS: Final[dict[str, FieldDef]] = {d.name: d for d in (*_FIELDS, *CONTENTS_ITEM_FIELDS)}
