"""TikTok's numeric answer codes and what the sender does with each: one table, with reasons.

Sources: docs/tiktok-events-api.md §5.3 (the SDK's `NumericErrorCodes`, RudderStack, Airbyte).
TikTok answers most errors with HTTP 200 and a non-zero `code`, so this table decides whenever
the body parses; `worker.delivery.client.classify` falls back to the HTTP status otherwise.

Each code has a *class* (success, throttled, retryable, auth, permanent) and a *scope*: a
request-level error is a property of the request (token, pixel, top-level fields), so no
subset of the batch can succeed and bisecting it would only burn the app's shared budget.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final


class CodeClass(enum.Enum):
    SUCCESS = "success"
    THROTTLED = "throttled"
    RETRYABLE = "retryable"
    AUTH = "auth"
    PERMANENT = "permanent"


class TikTokCode(enum.IntEnum):
    OK = 0
    PARTIAL_OK = 20001
    INVALID_PARAMS = 40000
    PERMISSION_ERROR = 40001
    PARAM_ERROR = 40002
    VERSION_ERROR = 40006
    NOT_EXIST = 40007
    INVALID_API_VERSION = 40051
    INVALID_BATCH_SIZE = 40061
    PII_NOT_HASHED = 40062
    INVALID_PARTNER_NAME = 40063
    REQUEST_TOO_FREQUENT = 40100
    ACCESS_TOKEN_EXPIRE = 40102
    EMPTY_ACCESS_TOKEN = 40104
    INVALID_ACCESS_TOKEN = 40105
    REQUEST_FREQUENCY_LIMITED = 40132
    RPC_VALIDATION_ERROR = 40700
    SYS_ERROR = 50000
    SYS_TIMEOUT = 50002
    MAINTENANCE = 60001
    TOO_MANY_REQUESTS_BL = 61000


@dataclass(frozen=True, slots=True)
class Decision:
    cls: CodeClass
    request_level: bool
    reason: str


def _d(cls: CodeClass, reason: str, *, request_level: bool = False) -> Decision:
    return Decision(cls, request_level, reason)


_S, _T, _R, _A, _P = (
    CodeClass.SUCCESS,
    CodeClass.THROTTLED,
    CodeClass.RETRYABLE,
    CodeClass.AUTH,
    CodeClass.PERMANENT,
)

# The decision for every code TikTok documents for this endpoint.
CODE_TABLE: Final[dict[TikTokCode, Decision]] = {
    TikTokCode.OK: _d(_S, "accepted"),
    TikTokCode.PARTIAL_OK: _d(_S, "RudderStack treats it as OK; TikTok lists no failed events"),
    TikTokCode.INVALID_PARAMS: _d(_P, "a field of the request is invalid: bisect to find it"),
    TikTokCode.PERMISSION_ERROR: _d(
        _A, "the token may not use this pixel: no event can pass", request_level=True
    ),
    # Request-level when the message names a top-level field; see `decide`.
    TikTokCode.PARAM_ERROR: _d(_P, "an event field is invalid: bisect to the event"),
    TikTokCode.VERSION_ERROR: _d(_P, "wrong API version: the URL is wrong", request_level=True),
    TikTokCode.NOT_EXIST: _d(_P, "the pixel does not exist", request_level=True),
    TikTokCode.INVALID_API_VERSION: _d(
        _P, "wrong API version: the URL is wrong", request_level=True
    ),
    TikTokCode.INVALID_BATCH_SIZE: _d(_P, "the data array as a whole is refused: split it"),
    TikTokCode.PII_NOT_HASHED: _d(_P, "an event carries PII in clear: bisect to it"),
    TikTokCode.INVALID_PARTNER_NAME: _d(
        _P, "partner_name is a top-level field", request_level=True
    ),
    TikTokCode.REQUEST_TOO_FREQUENT: _d(_T, "the app's QPS limit: slow down, honour Retry-After"),
    TikTokCode.ACCESS_TOKEN_EXPIRE: _d(_A, "expired token: no event can pass", request_level=True),
    TikTokCode.EMPTY_ACCESS_TOKEN: _d(_A, "no token was sent", request_level=True),
    TikTokCode.INVALID_ACCESS_TOKEN: _d(_A, "revoked or wrong token", request_level=True),
    TikTokCode.REQUEST_FREQUENCY_LIMITED: _d(_T, "a frequency limit (by its name): slow down"),
    TikTokCode.RPC_VALIDATION_ERROR: _d(_R, "RudderStack treats it as a server error"),
    TikTokCode.SYS_ERROR: _d(_R, "TikTok system error: transient"),
    TikTokCode.SYS_TIMEOUT: _d(_R, "TikTok system timeout: transient"),
    TikTokCode.MAINTENANCE: _d(_R, "TikTok maintenance: transient"),
    TikTokCode.TOO_MANY_REQUESTS_BL: _d(_T, "a throttle (by its name): slow down"),
}

# Undocumented codes inside TikTok's system-error ranges (51xxx RPC, 52xxx DB/storage).
_SYSTEM_RANGES: Final = ((50000, 52999),)
_SYSTEM_RANGE: Final = _d(_R, "TikTok system-error range 50000-52999: transient")
# Anything else (70001 included) is not known to be transient: retrying it for an hour would
# hold its events back for nothing, so it is treated as a per-event error and surfaced.
_UNKNOWN: Final = _d(_P, "undocumented code: not known to be transient; bisect and surface it")
_TOP_LEVEL_PARAM: Final = _d(
    _P, "40002 on a top-level field: no event can pass", request_level=True
)

# A 40002 message naming a top-level field, e.g. "Invalid value for event_source_id: ...".
_TOP_LEVEL_FIELD_RE: Final = re.compile(
    r"\b(?:event_source_id|event_source|partner_name|test_event_code)\b(?![.\w])"
)
# The index of the rejected event: `data[3]`, `data.3.event_id`, `Batch.3.properties...`.
_INDEX_RE: Final = re.compile(r"\b(?:data|batch)(?:\[(\d+)\]|\.(\d+)\b)", re.IGNORECASE)


def decide(code: int, message: str = "") -> Decision:
    """The decision for TikTok `code`, refined by the message where the table says so."""
    try:
        known = TikTokCode(code)
    except ValueError:
        if any(low <= code <= high for low, high in _SYSTEM_RANGES):
            return _SYSTEM_RANGE
        return _UNKNOWN
    if (
        known is TikTokCode.PARAM_ERROR
        and event_index(message) is None
        and _TOP_LEVEL_FIELD_RE.search(message)
    ):
        return _TOP_LEVEL_PARAM
    return CODE_TABLE[known]


def event_index(message: str) -> int | None:
    """The index of the event an error message names (`data[3]`, `Batch.3.`), or None."""
    match = _INDEX_RE.search(message)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


THROTTLE_CODES: Final = frozenset(c for c, d in CODE_TABLE.items() if d.cls is _T)
AUTH_CODES: Final = frozenset(c for c, d in CODE_TABLE.items() if d.cls is _A)
