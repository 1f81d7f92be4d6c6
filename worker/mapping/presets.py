"""Pre-built subscriptions: the preset sets a destination can start from.

- `documented`: the subscriptions in the product's own documentation (SPEC §2):
  Checkout Started, Products Searched, Payment Info Entered, Order Completed, and every page.
  Their `contents` sources are those of the current Segment preset with the same trigger
  (Order Completed and page use `$.properties.products`; Products Searched uses
  `$.properties`); Order Completed maps to `PlaceAnOrder`, TikTok's name for PlaceOrder.
- `all`: the 15 presets of Segment's current destination (`index.ts`), with their contents.
- `none`: nothing; only custom subscriptions.

Every preset uses all field defaults (worker.mapping.fields) plus a fixed TikTok event name.

Per event source (SPEC §3 "Event sources"; docs/tiktok-offline-app.md §1.2, §2.2):
- `web`: the sets above;
- `crm`: no presets (Segment has none; CRM events take custom names), whatever the set;
- `offline`: Segment's 15 offline presets, whose triggers, names and contents are the web
  ones; `documented` means the same as `all`;
- `app`: Segment's 11 app presets (`Purchase`, `Checkout`, `LaunchAPP`, ...); `documented`
  means the same as `all`.
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

_APP: Final = (
    Preset("Complete payment", 'event = "Order Completed"', "Purchase", "multi"),
    Preset("Add payment information", 'event = "Payment Info Entered"', "AddPaymentInfo", "multi"),
    Preset("Place an order", 'event = "Checkout Started"', "Checkout", "multi"),
    Preset("Search", 'event = "Products Searched"', "Search", "none"),
    Preset("View details", 'event = "Product Viewed"', "ViewContent", "single"),
    Preset("Add to cart", 'event = "Product Added"', "AddToCart", "single"),
    Preset("Add to wishlist", 'event = "Product Added to Wishlist"', "AddToWishlist", "single"),
    Preset("Install the app", 'event = "Application Installed"', "InstallApp", "none"),
    Preset("Launch the app", 'event = "Application Opened"', "LaunchAPP", "none"),
    Preset("Log in successfully", 'event = "Signed In"', "Login", "none"),
    Preset("Complete the registration", 'event = "Signed Up"', "Registration", "none"),
)

PRESET_SETS: Final[dict[str, tuple[Preset, ...]]] = {
    "documented": _DOCUMENTED,
    "all": _ALL,
    "none": (),
}

# (event source, set name) -> presets; web uses PRESET_SETS.
_SOURCE_SETS: Final[dict[str, dict[str, tuple[Preset, ...]]]] = {
    "web": PRESET_SETS,
    "crm": {"documented": (), "all": (), "none": ()},
    "offline": {"documented": _ALL, "all": _ALL, "none": ()},
    "app": {"documented": _APP, "all": _APP, "none": ()},
}


def presets_for(name: str, source: str = "web") -> tuple[Preset, ...]:
    """The presets of set `name` (documented | all | none) for event source `source`, in
    evaluation order."""
    return _SOURCE_SETS[source][name]


def preset_names(name: str, source: str = "web") -> tuple[str, ...]:
    return tuple(p.name for p in presets_for(name, source))
