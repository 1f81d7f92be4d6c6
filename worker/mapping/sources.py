"""The four TikTok event sources a destination can report (SPEC §3 "Event sources").

`web` and `crm` share Segment's Report Web Event field set (worker.mapping.fields; crm is the
same action with `event_source: crm` and the `lead` object), `offline` is Report Offline Event
(worker.mapping.fields_offline) and `app` is Report App Event (worker.mapping.fields_app). This
module answers the per-source questions the mapper asks at start-up: which fields a
subscription may map, and whether a subscription is valid for the source (app events come
from a fixed list, and some need contents).
"""

from __future__ import annotations

from typing import Final

from worker.errors import ConfigError
from worker.mapping.fields import FIELDS, FieldDef
from worker.mapping.fields_app import APP_EVENTS, APP_FIELDS, CONTENTS_REQUIRED_EVENTS
from worker.mapping.fields_offline import OFFLINE_FIELDS
from worker.mapping.spec import SubscriptionConfig

__all__ = ["EVENT_SOURCES", "check_subscription", "fields_for"]

EVENT_SOURCES: Final = ("web", "crm", "offline", "app")

_FIELDS_BY_SOURCE: Final[dict[str, dict[str, FieldDef]]] = {
    "web": FIELDS,
    "crm": FIELDS,
    "offline": OFFLINE_FIELDS,
    "app": APP_FIELDS,
}


def fields_for(source: str) -> dict[str, FieldDef]:
    """The mappable fields of `source`, by the name a subscription's `mapping` uses."""
    return _FIELDS_BY_SOURCE[source]


def check_subscription(source: str, sub: SubscriptionConfig, *, where: str) -> None:
    """Start-up checks that would otherwise dead-letter every event of the subscription."""
    if source != "app":
        return
    if sub.event not in APP_EVENTS:
        raise ConfigError(
            f"{where}.event: {sub.event!r} is not a TikTok app event (one of: "
            f"{', '.join(sorted(APP_EVENTS))})"
        )
    if "contents" in sub.mapping:  # a `mapping.contents` override replaces `contents`
        has_contents = sub.mapping["contents"] is not None
    else:
        has_contents = sub.contents != "none"
    if sub.event in CONTENTS_REQUIRED_EVENTS and not has_contents:
        raise ConfigError(
            f"{where}.contents: app event {sub.event} requires contents "
            "(single, multi, or a mapping.contents path)"
        )
