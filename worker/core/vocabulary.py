"""The fixed vocabularies the worker reports: each value is a metric label value, a
`dlq.reason` header or a `map` output, all SPEC interfaces. The metrics derive their label sets
from these enums (`worker.observability.metrics`), so a new member is a new label value."""

from __future__ import annotations

import enum
from typing import Final


class DeadLetterReason(enum.StrEnum):
    """`dlq.reason` and the `reason` label of `tiktok_worker_dead_letters_total` (SPEC §4)."""

    DECODE_ERROR = "decode_error"
    INVALID_EVENT = "invalid_event"
    EVENT_TOO_LARGE = "event_too_large"
    PERMANENT_API_ERROR = "permanent_api_error"
    AUTH_ERROR = "auth_error"
    RETRIES_EXHAUSTED = "retries_exhausted"


# The reasons the mapper gives (bad input); the others come from delivery.
INVALID_REASONS: Final = frozenset(
    {
        DeadLetterReason.DECODE_ERROR,
        DeadLetterReason.INVALID_EVENT,
        DeadLetterReason.EVENT_TOO_LARGE,
    }
)
# The same bytes can never succeed, so a redrive sends these only when asked for by name.
UNSENDABLE_REASONS: Final = frozenset(
    {DeadLetterReason.DECODE_ERROR, DeadLetterReason.EVENT_TOO_LARGE}
)


class SkipReason(enum.StrEnum):
    """The `reason` label of `tiktok_worker_events_skipped_total`."""

    NO_MATCH = "no_match"  # an unknown Segment `type` is invalid_event, not a skip
    # The event's Segment `timestamp` is older than tiktok.max_event_age_s (TikTok's 48 h
    # dedup window): sending it could count it twice.
    TOO_OLD = "too_old"


class Outcome(enum.StrEnum):
    """How one Events API request ended: the `outcome` label of `tiktok_worker_requests_total`."""

    SUCCESS = "success"
    THROTTLED = "throttled"
    RETRYABLE = "retryable_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    PERMANENT = "permanent_error"
    AUTH = "auth_error"

    @property
    def retryable(self) -> bool:
        """True when the same body may be sent again later (TikTok dedups by event_id)."""
        return self in _RETRYABLE_OUTCOMES


_RETRYABLE_OUTCOMES: Final = frozenset(
    {Outcome.THROTTLED, Outcome.RETRYABLE, Outcome.TIMEOUT, Outcome.CONNECTION}
)


class ParkReason(enum.StrEnum):
    """Why events were parked: `retry.reason` and the `reason` label of
    `tiktok_worker_events_parked_total` (SPEC §4, Parking)."""

    RETRYABLE = "retryable"  # still failing after tiktok.retry.in_memory_s
    THROTTLED = "throttled"  # throttled past tiktok.retry.in_memory_s
    AUTH_ERROR = "auth_error"  # parked at once
    CIRCUIT_OPEN = "circuit_open"  # parked without a request


class CommitResult(enum.StrEnum):
    """The `result` label of `tiktok_worker_commits_total`."""

    OK = "ok"
    ERROR = "error"


class RebalanceKind(enum.StrEnum):
    """The `kind` label of `tiktok_worker_rebalances_total`."""

    ASSIGN = "assign"
    REVOKE = "revoke"
    LOST = "lost"
