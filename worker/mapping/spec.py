"""What a destination asks of the mapping: the `destinations[]` and `subscriptions[]` config
sections. They live here, below `worker.config`, so that the mapping never imports the config
module (the config composes these sections; the Mapper compiles them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "DestinationConfig",
    "DestinationName",
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


class DestinationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: DestinationName
    pixel_code: NonEmptyStr
    access_token: NonEmptyStr
    app_id: NonEmptyStr | None = None
    test_event_code: str | None = None
    when: NonEmptyStr | None = None
    presets: Literal["documented", "all", "none"] = "documented"
    phone_default_region: str | None = None
    subscriptions: tuple[SubscriptionConfig, ...] = ()
