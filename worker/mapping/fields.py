"""The Report Web Event field set: names, types, enums and Segment's default mappings.

One `FieldDef` per mappable field; the `name` is the key used in a subscription's `mapping`.
Sub-fields of Segment's object fields are written with a dot: `address.city`,
`lead_fields.lead_id`, `travel_fields.checkin_date`, `vehicle_fields.make`, and the keys of
a `contents` item as `contents.price` (their paths are relative to the item: `$.price`).

Defaults follow docs/segment-tiktok-destination.md §3 ("X if it exists, else Y" is a list of
candidate paths: the first one present and not null wins), with SPEC §3 improvement 3:
`vehicle_fields.drivetrain` reads `$.properties.drivetrain`, then `$.properties.drive_train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CONTENTS_ITEM_FIELDS",
    "FIELDS",
    "TRAVEL_FIELDS",
    "VEHICLE_FIELDS",
    "Const",
    "FieldDef",
    "Paths",
    "Source",
]


@dataclass(frozen=True, slots=True)
class Paths:
    """Candidate paths (tuples of keys); the first present, non-null value wins."""

    candidates: tuple[tuple[str, ...], ...]

    def text(self) -> str:
        return " | ".join("$" + "".join("." + k for k in c) for c in self.candidates)


@dataclass(frozen=True, slots=True)
class Const:
    """A literal value (`{value: ...}` in a mapping). `key` makes it hashable."""

    value: Any
    key: bytes

    def text(self) -> str:
        return "literal"


Source = Paths | Const | None  # None: the field is not mapped


def _p(*paths: str) -> Paths:
    return Paths(tuple(tuple(p.removeprefix("$.").split(".")) for p in paths))


def _c(value: str) -> Const:
    return Const(value, repr(value).encode())


@dataclass(frozen=True, slots=True)
class FieldDef:
    name: str
    kind: str  # string | number | integer | boolean
    default: Source
    multi: bool = False
    enum: tuple[str, ...] | None = None
    # A sub-field of an object field: Segment removes "" only at the top level, so "" is kept.
    nested: bool = False


def _f(
    name: str,
    kind: str,
    default: Source,
    *,
    multi: bool = False,
    enum: tuple[str, ...] | None = None,
) -> FieldDef:
    return FieldDef(name, kind, default, multi, enum, nested="." in name)


def _either(props_key: str, traits_key: str | None = None) -> Paths:
    t = traits_key or props_key
    return _p(f"$.properties.{props_key}", f"$.context.traits.{t}")


_TIKTOK_INTEGRATION = "$.integrations.TikTok Conversions"

_COMMON: Final = (
    _f("event_source", "string", _c("web"), enum=("web", "crm")),
    _f("event_spec_type", "string", None, enum=("travel_fields", "vehicle_fields")),
    _f("event_id", "string", _p("$.messageId")),
    _f("timestamp", "string", _p("$.timestamp")),
    _f("phone_number", "string", _either("phone"), multi=True),
    _f("email", "string", _either("email"), multi=True),
    _f("first_name", "string", _either("first_name")),
    _f("last_name", "string", _either("last_name")),
    _f("address.city", "string", _either("address.city")),
    _f("address.country", "string", _either("address.country")),
    _f("address.state", "string", _either("address.state")),
    _f("address.zip_code", "string", _either("address.postal_code")),
    _f("order_id", "string", _p("$.properties.order_id")),
    _f("shop_id", "string", _p("$.properties.shop_id")),
    _f("external_id", "string", _p("$.userId", "$.anonymousId"), multi=True),
    _f("ttclid", "string", _p("$.properties.ttclid", f"{_TIKTOK_INTEGRATION}.ttclid")),
    _f("ttp", "string", _p("$.properties.ttp", f"{_TIKTOK_INTEGRATION}.ttp")),
    _f("locale", "string", _p("$.context.locale")),
    _f("url", "string", _p("$.context.page.url")),
    _f("referrer", "string", _p("$.context.page.referrer")),
    _f("ip", "string", _p("$.context.ip")),
    _f("user_agent", "string", _p("$.context.userAgent")),
    _f("content_ids", "string", _p("$.properties.content_ids"), multi=True),
    _f("num_items", "number", _p("$.properties.num_items")),
    _f("content_type", "string", _c("product"), enum=("product", "product_group")),
    _f("currency", "string", _p("$.properties.currency")),
    _f("value", "number", _p("$.properties.value", "$.properties.revenue")),
    _f("description", "string", None),
    _f("query", "string", _p("$.properties.query")),
    _f("limited_data_use", "boolean", _p("$.properties.limited_data_use")),
    _f("test_event_code", "string", None),
    _f(
        "delivery_category",
        "string",
        _p("$.properties.delivery_category"),
        enum=("in_store", "curbside", "home_delivery"),
    ),
    _f("predicted_ltv", "number", _p("$.properties.predicted_ltv")),
    _f("search_string", "string", _p("$.properties.search_string")),
    _f("lead_fields.lead_id", "string", _p("$.properties.lead_id")),
    _f("lead_fields.lead_event_source", "string", _p("$.properties.lead_event_source")),
)


def _props(
    prefix: str, specs: tuple[tuple[str, str, tuple[str, ...] | None, bool], ...]
) -> tuple[FieldDef, ...]:
    return tuple(
        _f(f"{prefix}.{name}", kind, _p(f"$.properties.{name}"), multi=multi, enum=enum)
        for name, kind, enum, multi in specs
    )


# (name, kind, enum, multi) in the order they are copied into `properties`.
TRAVEL_FIELDS: Final = _props(
    "travel_fields",
    (
        ("city", "string", None, False),
        ("region", "string", None, False),
        ("country", "string", None, False),
        ("checkin_date", "string", None, False),
        ("checkout_date", "string", None, False),
        ("num_adults", "number", None, False),
        ("num_children", "number", None, False),
        ("num_infants", "number", None, False),
        ("suggested_hotels", "string", None, True),
        ("departing_departure_date", "string", None, False),
        ("returning_departure_date", "string", None, False),
        ("departing_arrival_date", "string", None, False),
        ("returning_arrival_date", "string", None, False),
        ("origin_airport", "string", None, False),
        ("destination_airport", "string", None, False),
        ("destination_ids", "string", None, True),
        ("travel_class", "string", ("eco", "prem", "bus", "first"), False),
        ("user_score", "number", None, False),
        ("preferred_num_stops", "integer", None, False),
        ("travel_start", "string", None, False),
        ("travel_end", "string", None, False),
        ("suggested_destinations", "string", None, True),
    ),
)

_VEHICLE: Final = _props(
    "vehicle_fields",
    (
        ("postal_code", "string", None, False),
        ("make", "string", None, False),
        ("model", "string", None, False),
        ("year", "number", None, False),
        ("state_of_vehicle", "string", ("New", "Used", "CPO"), False),
        ("mileage_value", "number", None, False),
        ("mileage_unit", "string", ("MI", "KM"), False),
        ("exterior_color", "string", None, False),
        ("transmission", "string", ("Automatic", "Manual", "Other"), False),
        (
            "body_style",
            "string",
            (
                "Convertible",
                "Coupe",
                "Hatchback",
                "Minivan",
                "Truck",
                "SUV",
                "Sedan",
                "Van",
                "Wagon",
                "Crossover",
                "Other",
            ),
            False,
        ),
        (
            "fuel_type",
            "string",
            ("Diesel", "Electric", "Flex", "Gasoline", "Hybrid", "Other"),
            False,
        ),
        ("drivetrain", "string", ("AWD", "FOUR_WD", "FWD", "RWD", "TWO_WD", "Other"), False),
        ("preferred_price_range_min", "number", None, False),
        ("preferred_price_range_max", "number", None, False),
        ("trim", "string", None, False),
        ("vin", "string", None, False),
        ("interior_color", "string", None, False),
        ("condition_of_vehicle", "string", ("Excellent", "Good", "Fair", "Poor", "Other"), False),
        ("viewcontent_type", "string", None, False),
        ("search_type", "string", None, False),
        ("registration_type", "string", None, False),
    ),
)
# SPEC §3 improvement 3: Segment reads only `drive_train`; we read `drivetrain` first.
VEHICLE_FIELDS: Final = tuple(
    _f(
        d.name,
        d.kind,
        _p("$.properties.drivetrain", "$.properties.drive_train"),
        enum=d.enum,
    )
    if d.name == "vehicle_fields.drivetrain"
    else d
    for d in _VEHICLE
)

# Keys of one `contents` item; paths are relative to the item.
CONTENTS_ITEM_FIELDS: Final = (
    FieldDef("contents.price", "number", _p("$.price"), nested=True),
    FieldDef("contents.quantity", "number", _p("$.quantity"), nested=True),
    FieldDef("contents.content_category", "string", _p("$.category"), nested=True),
    FieldDef("contents.content_id", "string", _p("$.product_id"), nested=True),
    FieldDef("contents.content_name", "string", _p("$.name"), nested=True),
    FieldDef("contents.brand", "string", _p("$.brand"), nested=True),
)

FIELDS: Final[dict[str, FieldDef]] = {
    d.name: d for d in (*_COMMON, *TRAVEL_FIELDS, *VEHICLE_FIELDS, *CONTENTS_ITEM_FIELDS)
}
