"""What a destination asks of the mapping: the `destinations[]` and `subscriptions[]` config
sections. They live here, below `worker.config`, so that the mapping never imports the config
module (the config composes these sections; the Mapper compiles them)."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = [
    "SOURCE_ID_KEYS",
    "DestinationConfig",
    "DestinationName",
    "EventSource",
    "FieldSource",
    "LiteralValue",
    "NonEmptyStr",
    "SubscriptionConfig",
]

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
# Destination names are metric label values and DLQ header values: keep them plain.
DestinationName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class LiteralValue(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A mapping override that is a constant: `event_source: {value: web}`."""

    value: Any


# A mapping override: one path, a list of candidate paths (first present wins), a literal,
# or null (the field is not mapped at all).
FieldSource = str | tuple[str, ...] | LiteralValue | None


class SubscriptionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: NonEmptyStr
    trigger: NonEmptyStr
    event: NonEmptyStr
    contents: Literal["single", "multi", "none"] = "none"
    mapping: dict[str, FieldSource] = msgspec.field(default_factory=dict)


EventSource = Literal["web", "crm", "offline", "app"]
# The id key each event source needs (SPEC §3 "Event sources"); the others must be absent.
SOURCE_ID_KEYS: Final[dict[str, str]] = {
    "web": "pixel_code",
    "crm": "pixel_code",
    "offline": "event_set_id",
    "app": "tiktok_app_id",
}


class DestinationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: DestinationName
    event_source: EventSource = "web"
    # Exactly the one of these that `event_source` needs (checked by worker.config).
    pixel_code: NonEmptyStr | None = None
    event_set_id: NonEmptyStr | None = None
    tiktok_app_id: NonEmptyStr | None = None
    access_token: NonEmptyStr
    app_id: NonEmptyStr | None = None
    test_event_code: str | None = None
    when: NonEmptyStr | None = None
    presets: Literal["documented", "all", "none"] = "documented"
    phone_default_region: str | None = None
    subscriptions: tuple[SubscriptionConfig, ...] = ()

    @property
    def event_source_id(self) -> str:
        """The request's `event_source_id`: the id key of this destination's source."""
        value = getattr(self, SOURCE_ID_KEYS[self.event_source])
        assert isinstance(value, str)  # guaranteed by worker.config's validation
        return value
