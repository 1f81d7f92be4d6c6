"""Pre-built subscriptions: the preset sets a destination can start from.

- `documented`: the subscriptions in the product's own documentation (SPEC §2):
  Checkout Started, Products Searched, Payment Info Entered, Order Completed, and every page.
  Their `contents` sources are those of the current Segment preset with the same trigger
  (Order Completed and page use `$.properties.products`; Products Searched uses
  `$.properties`); Order Completed maps to `PlaceAnOrder`, TikTok's name for PlaceOrder.
- `all`: the 15 presets of Segment's current destination (`index.ts`), with their contents.
- `none`: nothing; only custom subscriptions.

Every preset uses all field defaults (worker.mapping.fields) plus a fixed TikTok event name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["PRESET_SETS", "Preset", "preset_names", "presets_for"]


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    trigger: str
    event: str
    contents: str  # single | multi | none


_DOCUMENTED: Final = (
    Preset("Initiate Checkout", 'event = "Checkout Started"', "InitiateCheckout", "multi"),
    Preset("Search", 'event = "Products Searched"', "Search", "single"),
    Preset("Add Payment Info", 'event = "Payment Info Entered"', "AddPaymentInfo", "multi"),
    Preset("Place an Order", 'event = "Order Completed"', "PlaceAnOrder", "multi"),
    Preset("View Content", 'type = "page"', "ViewContent", "multi"),
)

_ALL: Final = (
    Preset("Complete Payment", 'event = "Order Completed"', "CompletePayment", "multi"),
    Preset("Contact", 'event = "Callback Started"', "Contact", "none"),
    Preset("Subscribe", 'event = "Subscription Created"', "Subscribe", "none"),
    Preset("Submit Form", 'event = "Form Submitted"', "SubmitForm", "none"),
    Preset("Page View", 'type = "page"', "PageView", "multi"),
    Preset("View Content", 'event = "Product Viewed"', "ViewContent", "single"),
    Preset("Click Button", 'event = "Product Clicked"', "ClickButton", "single"),
    Preset("Search", 'event = "Products Searched"', "Search", "single"),
    Preset("Add to Wishlist", 'event = "Product Added to Wishlist"', "AddToWishlist", "single"),
    Preset("Add to Cart", 'event = "Product Added"', "AddToCart", "single"),
    Preset("Initiate Checkout", 'event = "Checkout Started"', "InitiateCheckout", "multi"),
    Preset("Add Payment Info", 'event = "Payment Info Entered"', "AddPaymentInfo", "multi"),
    Preset("Place an Order", 'event = "Order Placed"', "PlaceAnOrder", "multi"),
    Preset("Download", 'event = "Download Link Clicked"', "Download", "none"),
    Preset("Complete Registration", 'event = "Signed Up"', "CompleteRegistration", "none"),
)

PRESET_SETS: Final[dict[str, tuple[Preset, ...]]] = {
    "documented": _DOCUMENTED,
    "all": _ALL,
    "none": (),
}


def presets_for(name: str) -> tuple[Preset, ...]:
    """The presets of set `name` (documented | all | none), in evaluation order."""
    return PRESET_SETS[name]


def preset_names(name: str) -> tuple[str, ...]:
    return tuple(p.name for p in PRESET_SETS[name])
