"""TikTok Events API client: one POST per batch, every answer classified, nothing raised.

Contract:
- `TikTokClient.send(body, access_token=...)` posts `body` byte for byte to
  `{base_url}/open_api/v1.3/event/track/` and returns a `SendResult`. HTTP errors, network
  errors, timeouts and unparseable responses are *classified* (`Outcome`), never raised; only
  cancellation and programming errors propagate.
- `classify(http_status, code)` is the pure decision table (SPEC §4, docs/tiktok-events-api.md
  §5): TikTok answers HTTP 200 with a non-zero `code` for most errors, so the JSON `code`
  decides whenever the body parses, and the HTTP status decides otherwise.
- `backoff_delay(...)` is capped exponential backoff with full jitter; `Retry-After` is a floor.
- `SendResult.message` is short and sanitised: it never contains the access token, and it is
  taken only from TikTok's JSON `message` (never from a non-JSON body, which might echo input).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import msgspec

from worker import __version__
from worker.core.redaction import has_control_characters, sanitise_message
from worker.core.vocabulary import Outcome
from worker.delivery.codes import AUTH_CODES, THROTTLE_CODES, CodeClass, decide

ENDPOINT_PATH = "/open_api/v1.3/event/track/"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The classified answer to one request.

    `http_status` is None when no HTTP response arrived (timeout, connection error); `code` is
    TikTok's JSON `code` when the body parsed as an envelope; `retry_after_s` comes from the
    `Retry-After` header; `latency_s` covers sending the request and reading the whole answer.
    """

    outcome: Outcome
    http_status: int | None
    code: int | None
    message: str
    retry_after_s: float | None
    request_id: str | None
    latency_s: float
    # No subset of the batch can succeed (auth, top-level field, wrong URL): never bisect.
    request_level: bool = False


_OUTCOME_OF: dict[CodeClass, Outcome] = {
    CodeClass.SUCCESS: Outcome.SUCCESS,
    CodeClass.THROTTLED: Outcome.THROTTLED,
    CodeClass.RETRYABLE: Outcome.RETRYABLE,
    CodeClass.AUTH: Outcome.AUTH,
    CodeClass.PERMANENT: Outcome.PERMANENT,
}


def classify(http_status: int, code: int | None, message: str = "") -> Outcome:
    """Classify one HTTP answer. `code` is TikTok's JSON `code`, or None if the body had none."""
    return classify_answer(http_status, code, message)[0]


def classify_answer(http_status: int, code: int | None, message: str = "") -> tuple[Outcome, bool]:
    """The outcome of one HTTP answer and whether it is request-level (never bisected).

    Rules, in order:
    - HTTP 429 → THROTTLED.
    - HTTP 5xx → THROTTLED if the code is a throttle code, else RETRYABLE (never success).
    - HTTP 408 / 425 → RETRYABLE (the request did not complete; resending is safe).
    - HTTP 401 / 403 → AUTH, request-level.
    - HTTP 3xx (redirects are not followed), 404, 405 → PERMANENT, request-level: `base_url`
      or a proxy in front of it is misconfigured; no event can pass, none is to blame.
    - other HTTP 4xx → the code's class when a non-success code is present, else PERMANENT.
    - HTTP 2xx → the code's class (`worker.delivery.codes`); no code (unparseable or
      non-envelope body) → RETRYABLE: the events may or may not have been taken, a resend is
      deduplicated.
    - 1xx → RETRYABLE.
    """
    if http_status == 429:
        return Outcome.THROTTLED, False
    if http_status >= 500:
        if code is not None and code in THROTTLE_CODES:
            return Outcome.THROTTLED, False
        return Outcome.RETRYABLE, False
    if http_status in (408, 425):
        return Outcome.RETRYABLE, False
    if http_status in (401, 403):
        return Outcome.AUTH, True
    if 300 <= http_status < 400 or http_status in (404, 405):
        return Outcome.PERMANENT, True
    if 400 <= http_status < 500:
        if code is not None:
            decision = decide(code, message)
            if decision.cls is not CodeClass.SUCCESS:
                return _OUTCOME_OF[decision.cls], decision.request_level
        return Outcome.PERMANENT, False
    if 200 <= http_status < 300:
        if code is None:
            return Outcome.RETRYABLE, False
        decision = decide(code, message)
        return _OUTCOME_OF[decision.cls], decision.request_level
    return Outcome.RETRYABLE, False


# Exponents above this already exceed any sane cap; avoids float overflow on huge attempts.
_MAX_EXPONENT = 62


def backoff_delay(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next try, after `attempt` failed tries (attempt ≥ 1).

    Full jitter: uniform in [0, min(max_s, initial_s * 2**(attempt-1))). A server's
    `Retry-After` is a floor, itself capped at `max_s`: a proxy's "Retry-After: 7200" must
    not turn into a two-hour wait (or an immediate dead letter against the retry deadline).
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if initial_s < 0 or max_s < 0:
        raise ValueError("initial_s and max_s must be >= 0")
    cap = min(max_s, initial_s * math.pow(2.0, min(attempt - 1, _MAX_EXPONENT)))
    delay = rand() * cap
    if retry_after_s is not None and retry_after_s > delay:
        delay = min(retry_after_s, max_s)
    return max(0.0, delay)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a `Retry-After` header: delta-seconds or an HTTP-date. None if absent or invalid.

    Negative results (a date in the past) become 0.0. `now` is the Unix time to measure an
    HTTP-date against (default: the current time).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate gives naive for "-0000"
        return None
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)


class _Envelope(msgspec.Struct):
    """TikTok's response envelope; `data` and unknown keys are ignored."""

    code: int | None = None
    message: str | None = None
    request_id: str | None = None


_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)


def _valid_header_value(value: str) -> bool:
    return bool(value) and not has_control_characters(value)


class TikTokClient:
    """Posts pre-encoded request bodies to the Events API over one pooled ClientSession.

    The session is created lazily inside the running event loop on the first `send`, with an
    explicit timeout (total = `timeout_s`, TCP connect = `connect_timeout_s`) and a connection
    pool of `max_connections`. It honours the standard proxy variables (`HTTPS_PROXY`,
    `HTTP_PROXY`, `NO_PROXY`, read when the session is created). `close()` is idempotent; the
    client is an async context manager.
    """

    __slots__ = (
        "_closed",
        "_connect_timeout_s",
        "_max_connections",
        "_session",
        "_timeout_s",
        "_url",
        "_user_agent",
    )

    def __init__(
        self,
        *,
        base_url: str,
        timeout_s: float,
        max_connections: int,
        user_agent: str = f"tiktok-conversions-worker/{__version__}",
        connect_timeout_s: float | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if connect_timeout_s is not None and connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {connect_timeout_s}")
        self._url = base_url.rstrip("/") + ENDPOINT_PATH
        self._timeout_s = timeout_s
        # The TCP/TLS connect gets its own, shorter bound so an unreachable host fails fast;
        # `sock_connect` (not `connect`) so waiting for a free pooled connection is not counted.
        self._connect_timeout_s = (
            connect_timeout_s if connect_timeout_s is not None else min(timeout_s, 5.0)
        )
        self._max_connections = max_connections
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The full endpoint URL requests are posted to."""
        return self._url

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("TikTokClient is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=self._timeout_s, sock_connect=self._connect_timeout_s
                ),
                headers={"User-Agent": self._user_agent, "Accept": "application/json"},
                raise_for_status=False,
                # HTTP_PROXY / HTTPS_PROXY / NO_PROXY (and ~/.netrc) as every HTTP tool does:
                # clusters often reach the internet only through an egress proxy.
                trust_env=True,
            )
        return self._session

    async def send(self, body: bytes, *, access_token: str) -> SendResult:
        """POST `body` (already-encoded JSON, sent as-is) and classify the answer.

        Never raises for HTTP, network, timeout or response-format problems. Raises
        RuntimeError if the client is closed; cancellation propagates.
        """
        session = self._get_session()
        if not _valid_header_value(access_token):
            return SendResult(
                outcome=Outcome.AUTH,
                request_level=True,
                http_status=None,
                code=None,
                message="access token is empty or contains control characters",
                retry_after_s=None,
                request_id=None,
                latency_s=0.0,
            )
        headers = {"Access-Token": access_token, "Content-Type": "application/json"}
        started = time.monotonic()
        try:
            async with session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                log_id = resp.headers.get("X-Tt-Logid")
        except TimeoutError:  # asyncio's and aiohttp's timeouts are TimeoutError on 3.11+
            return self._failure(Outcome.TIMEOUT, f"timed out after {self._timeout_s:g}s", started)
        except aiohttp.ClientError as exc:
            return self._failure(Outcome.CONNECTION, _describe(exc, access_token), started)
        except OSError as exc:  # defensive: socket errors that escape aiohttp's wrapping
            return self._failure(Outcome.CONNECTION, _describe(exc, access_token), started)
        latency = time.monotonic() - started

        code: int | None = None
        message: str
        request_id = log_id
        try:
            envelope = _ENVELOPE_DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            envelope = None
        if envelope is not None and envelope.code is not None:
            code = envelope.code
            message = sanitise_message(envelope.message or "", secret=access_token)
            if envelope.request_id:
                request_id = envelope.request_id
        else:
            # Non-JSON or non-envelope answers (e.g. an edge proxy's HTML page): report only
            # the status, never the body, which could echo input.
            message = f"HTTP {status} without a TikTok response envelope"
        if not message:
            message = f"HTTP {status} code {code}"
        outcome, request_level = classify_answer(status, code, message)
        return SendResult(
            outcome=outcome,
            request_level=request_level,
            http_status=status,
            code=code,
            message=message,
            retry_after_s=retry_after,
            request_id=request_id,
            latency_s=latency,
        )

    @staticmethod
    def _failure(outcome: Outcome, message: str, started: float) -> SendResult:
        return SendResult(
            outcome=outcome,
            http_status=None,
            code=None,
            message=message,
            retry_after_s=None,
            request_id=None,
            latency_s=time.monotonic() - started,
        )

    async def close(self) -> None:
        """Close the session and its connections. Safe to call more than once."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> TikTokClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _describe(exc: BaseException, secret: str) -> str:
    """Exception type plus its sanitised text; aiohttp messages name the host, never headers."""
    text = sanitise_message(str(exc), secret=secret)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


__all__ = [
    "AUTH_CODES",
    "ENDPOINT_PATH",
    "THROTTLE_CODES",
    "Outcome",
    "SendResult",
    "TikTokClient",
    "backoff_delay",
    "classify",
    "classify_answer",
    "parse_retry_after",
]
