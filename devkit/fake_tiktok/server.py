"""A local stand-in for TikTok's Events API, for tests, demos and benchmarks.

`FakeTikTok` serves `POST /open_api/v1.3/event/track/` like TikTok as far as
docs/tiktok-events-api.md says (validation in `devkit.fake_tiktok.validate`), records what it
accepted, and injects faults on request. Answers use TikTok's envelope
`{"code", "message", "request_id", "data"}` with HTTP 200 for API-level errors.

Processing order for one request: injected faults (control API) → random faults
(`fault_rate`) → `Access-Token` check (40104 missing, 40105 unknown, 40001 pixel not allowed)
→ request-rate throttle (`throttle_qps`, server-wide, 40100) → body validation → accept.

Control API (JSON; no authentication, it is a fake):
- `POST /_fake/faults`: one fault object or a list (see `FaultSpec`); answers `{"ids": [...]}`.
- `GET /_fake/faults`, `DELETE /_fake/faults`.
- `GET /_fake/config`, `POST /_fake/config` (`fault_rate`, `throttle_qps`,
  `random_fault_kinds`, `timeout_delay_s`).
- `GET /_fake/events?offset=&limit=&pixel=`: accepted events (`AcceptedEvent`) in arrival order.
- `GET /_fake/requests?limit=`: the most recent per-request records (`RequestRecord`).
- `GET /_fake/stats`: counters (see `FakeState.stats`).
- `POST /_fake/reset`: forget recorded events, requests, counters and faults; keep config.

Memory is bounded: at most `max_recorded_events` events and `max_recorded_requests` request
records are kept (counters continue past the caps; `unrecorded_events` says how many were not
kept); bodies are never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import msgspec
from aiohttp import web

from devkit.fake_tiktok.validate import (
    CODE_PARAM_ERROR,
    Rejection,
    TrackRequest,
    ValidationPolicy,
    match_keys,
    validate,
)
from worker.delivery.client import ENDPOINT_PATH

CODE_OK: Final = 0
CODE_PERMISSION: Final = 40001
CODE_EMPTY_TOKEN: Final = 40104
CODE_INVALID_TOKEN: Final = 40105
CODE_THROTTLED: Final = 40100

MESSAGES: Final = {
    CODE_OK: "OK",
    CODE_PERMISSION: "No permission to operate pixel code: {pixel}. You must be an admin or "
    "operator of this advertiser account.",
    CODE_EMPTY_TOKEN: "Access token is empty.",
    40102: "Access token has expired.",
    CODE_INVALID_TOKEN: "Access token is incorrect or has been revoked.",
    CODE_THROTTLED: "Too many requests. Please retry in some time.",
    50000: "System error.",
    50002: "System timeout.",
}

FAULT_KINDS: Final = frozenset(
    {
        "http_500",  # HTTP 500 with a JSON envelope, code 50000
        "http_502",  # HTTP 502 with an HTML body (an edge proxy)
        "http_503",  # HTTP 503 with a text body (+ Retry-After if retry_after_s)
        "http_429",  # HTTP 429 with a text body (+ Retry-After if retry_after_s)
        "throttle",  # HTTP 200, code 40100 (+ Retry-After if retry_after_s)
        "timeout",  # no answer for delay_s (default: timeout_delay_s), then HTTP 504
        "slow",  # wait delay_s, then carry on (combines with the other faults)
        "auth",  # HTTP 200, code 40105 (or `code`: 40001, 40102, 40104)
        "disconnect",  # close the connection without an answer
        "code",  # HTTP 200 with `code` and `message`
        "reject_event_ids",  # HTTP 200, code 40002 for a request holding one of `event_ids`
    }
)
RANDOM_FAULT_KINDS_DEFAULT: Final = ("http_500", "http_502", "http_503", "timeout")
_MAX_FAULTS: Final = 1000
_MAX_EVENT_NAMES: Final = 1000
_OTHER_NAMES: Final = "_other"


class FakeSpecError(ValueError):
    """An invalid fault or configuration request; the message starts with the field name."""


class FaultSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One injected fault. Applies to matching requests until `count` of them have had it or
    `duration_s` has passed (neither: until deleted).

    `pixel` restricts it to requests for that `event_source_id`; `event_ids` (any kind) to
    requests holding one of those events (a poison event); `probability` applies it to
    that share of matching requests; `process=True` accepts and records the events first and
    then answers with the fault (a lost response: the sender will resend, TikTok dedups).
    """

    kind: str
    count: int | None = None
    duration_s: float | None = None
    delay_s: float | None = None
    retry_after_s: float | None = None
    event_ids: list[str] | None = None
    pixel: str | None = None
    code: int | None = None
    message: str | None = None
    probability: float = 1.0
    process: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.kind not in FAULT_KINDS:
            raise FakeSpecError(f"kind: must be one of {', '.join(sorted(FAULT_KINDS))}")
        if self.count is not None and self.count < 1:
            raise FakeSpecError("count: must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise FakeSpecError("duration_s: must be > 0")
        if self.delay_s is not None and self.delay_s < 0:
            raise FakeSpecError("delay_s: must be >= 0")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise FakeSpecError("retry_after_s: must be >= 0")
        if not 0.0 <= self.probability <= 1.0:
            raise FakeSpecError("probability: must be between 0 and 1")
        if self.kind == "reject_event_ids" and not self.event_ids:
            raise FakeSpecError("event_ids: required for reject_event_ids")
        if self.kind == "code" and self.code is None:
            raise FakeSpecError("code: required for kind code")
        if self.kind == "slow" and self.delay_s is None:
            raise FakeSpecError("delay_s: required for kind slow")


class FakeConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The runtime-adjustable knobs (`POST /_fake/config` takes any subset)."""

    fault_rate: float | None = None
    throttle_qps: float | None = None
    random_fault_kinds: list[str] | None = None
    timeout_delay_s: float | None = None


class AcceptedEvent(msgspec.Struct, frozen=True, gc=False):
    """One event TikTok would have taken. `duplicate`: (pixel, event, event_id) seen before.
    `pixel` is the request's `event_source_id` (a pixel, event set or app id);
    `test_event_code` the request's, or the event's own (offline); `match_keys` the user
    keys TikTok matches on for `event_source` (see devkit.fake_tiktok.validate.match_keys)."""

    event_id: str | None
    event: str
    pixel: str
    test_event_code: str | None
    received_at: float
    duplicate: bool
    event_source: str = "web"
    match_keys: tuple[str, ...] = ()


class RequestRecord(msgspec.Struct, frozen=True, gc=False):
    """One request to the track endpoint. `http_status` None: the connection was dropped."""

    received_mono: float
    received_unix: float
    pixel: str | None
    events: int
    http_status: int | None
    code: int | None
    fault: str | None
    latency_s: float


@dataclass(slots=True)
class _ActiveFault:
    id: int
    spec: FaultSpec
    remaining: int | None
    expires_at: float | None
    event_ids: frozenset[str]
    applied: int = 0

    def matches(self, pixel: str | None, request: TrackRequest | None) -> bool:
        if self.spec.pixel is not None and self.spec.pixel != pixel:
            return False
        if self.spec.kind == "reject_event_ids" or self.event_ids:
            return request is not None and self.rejected_index(request) is not None
        return True

    def rejected_index(self, request: TrackRequest) -> int | None:
        ids = self.event_ids
        for index, event in enumerate(request.data):
            if event.event_id is not None and event.event_id in ids:
                return index
        return None

    def consume(self) -> None:
        self.applied += 1
        if self.remaining is not None:
            self.remaining -= 1

    def live(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        return self.expires_at is None or now < self.expires_at

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": msgspec.to_builtins(self.spec),
            "remaining": self.remaining,
            "expires_in_s": None if self.expires_at is None else max(0.0, self.expires_at - now),
            "applied": self.applied,
        }


@dataclass(slots=True)
class FakeState:
    """Everything the fake recorded. Read it directly in tests; it survives `stop()`."""

    max_events: int
    max_requests: int
    events: list[AcceptedEvent] = field(default_factory=list)
    requests: deque[RequestRecord] = field(default_factory=deque)
    requests_total: int = 0
    requests_by_code: dict[str, int] = field(default_factory=dict)
    requests_by_status: dict[str, int] = field(default_factory=dict)
    accepted_requests: int = 0
    rejected_requests: int = 0
    accepted_events_total: int = 0
    accepted_events_by_name: dict[str, int] = field(default_factory=dict)
    duplicate_events: int = 0
    rejected_events_total: int = 0
    unrecorded_events: int = 0
    faults_applied: dict[str, int] = field(default_factory=dict)
    _seen: set[int] = field(default_factory=set)
    _strings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests = deque(maxlen=self.max_requests)

    def reset(self) -> None:
        fresh = FakeState(max_events=self.max_events, max_requests=self.max_requests)
        for item in fields(self):
            setattr(self, item.name, getattr(fresh, item.name))

    def _intern(self, value: str) -> str:
        # Event names and pixels repeat millions of times; keep one copy (bounded cache).
        cached = self._strings.get(value)
        if cached is not None:
            return cached
        if len(self._strings) < 10_000:
            self._strings[value] = value
        return value

    def record_accepted(self, request: TrackRequest, received_at: float) -> None:
        pixel = self._intern(request.event_source_id)
        test_code = request.test_event_code
        source = self._intern(request.event_source)
        by_name = self.accepted_events_by_name
        seen = self._seen
        keep = self.max_events - len(self.events)
        for event in request.data:
            name = self._intern(event.event)
            duplicate = False
            if event.event_id is not None:
                key = hash((pixel, name, event.event_id))
                if key in seen:
                    duplicate = True
                    self.duplicate_events += 1
                elif len(seen) < self.max_events:
                    seen.add(key)
            label = name if name in by_name or len(by_name) < _MAX_EVENT_NAMES else _OTHER_NAMES
            by_name[label] = by_name.get(label, 0) + 1
            if keep > 0:
                self.events.append(
                    AcceptedEvent(
                        event.event_id,
                        name,
                        pixel,
                        test_code or event.test_event_code,
                        received_at,
                        duplicate,
                        source,
                        match_keys(event, source),
                    )
                )
                keep -= 1
            else:
                self.unrecorded_events += 1
        self.accepted_events_total += len(request.data)
        self.accepted_requests += 1

    def record_request(self, record: RequestRecord, rejected_events: int) -> None:
        self.requests_total += 1
        if record.http_status is None:
            code_key = "disconnect"
        elif record.code is not None:
            code_key = str(record.code)
        else:
            code_key = f"http_{record.http_status}"
        self.requests_by_code[code_key] = self.requests_by_code.get(code_key, 0) + 1
        status_key = str(record.http_status) if record.http_status is not None else "none"
        self.requests_by_status[status_key] = self.requests_by_status.get(status_key, 0) + 1
        if record.fault is not None:
            self.faults_applied[record.fault] = self.faults_applied.get(record.fault, 0) + 1
        if record.code != CODE_OK or record.http_status != 200:  # any answer but success
            self.rejected_requests += 1
            self.rejected_events_total += rejected_events
        self.requests.append(record)

    def accepted_event_ids(self) -> set[str]:
        """The event_ids of every recorded accepted event."""
        return {e.event_id for e in self.events if e.event_id is not None}

    def stats(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_by_code": dict(self.requests_by_code),
            "requests_by_status": dict(self.requests_by_status),
            "accepted_requests": self.accepted_requests,
            "rejected_requests": self.rejected_requests,
            "accepted_events_total": self.accepted_events_total,
            "accepted_events_by_name": dict(self.accepted_events_by_name),
            "unique_events": self.accepted_events_total - self.duplicate_events,
            "duplicate_events": self.duplicate_events,
            "rejected_events_total": self.rejected_events_total,
            "recorded_events": len(self.events),
            "unrecorded_events": self.unrecorded_events,
            "faults_applied": dict(self.faults_applied),
        }


class _QpsLimiter:
    """Sliding one-second log of admitted requests (throttled ones are not counted)."""

    __slots__ = ("_admitted", "_limit", "_window_s")

    def __init__(self, qps: float) -> None:
        if qps <= 0:
            raise FakeSpecError(f"throttle_qps must be > 0, got {qps}")
        # Below 1 req/s, widen the window so that at least one request fits in it.
        self._window_s = max(1.0, 1.0 / qps)
        self._limit = max(1, int(qps * self._window_s))
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> bool:
        admitted = self._admitted
        horizon = now - self._window_s
        while admitted and admitted[0] <= horizon:
            admitted.popleft()
        if len(admitted) >= self._limit:
            return False
        admitted.append(now)
        return True


@dataclass(slots=True)
class _Answer:
    status: int | None  # None: drop the connection
    code: int | None = None
    message: str = ""
    text: str | None = None  # a non-JSON body
    retry_after_s: float | None = None
    fault: str | None = None
    accepted: bool = False  # the events were recorded as accepted


_ENCODER: Final = msgspec.json.Encoder()
_FAULT_DECODER: Final = msgspec.json.Decoder(FaultSpec | list[FaultSpec])
_CONFIG_DECODER: Final = msgspec.json.Decoder(FakeConfig)


def _message_for(code: int, pixel: str | None, default: str) -> str:
    return MESSAGES.get(code, default).replace("{pixel}", pixel or "")


def _request_id(now: float) -> str:
    # TikTok's shape: UTC YYYYMMDDhhmmss + 20 uppercase hex characters.
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + os.urandom(10).hex().upper()


class FakeTikTok:
    """The fake Events API server; see the module docstring for behaviour.

    `tokens`: accepted `Access-Token` values (None: any non-empty token).
    `token_pixels`: optional token → pixels it may send to (others get 40001).
    `fault_rate`: share of requests answered with a random kind from `random_fault_kinds`.
    `throttle_qps`: above this many admitted requests per second, answer 40100.
    """

    def __init__(
        self,
        *,
        tokens: Collection[str] | None = None,
        token_pixels: Mapping[str, Collection[str]] | None = None,
        fault_rate: float = 0.0,
        throttle_qps: float | None = None,
        random_fault_kinds: Sequence[str] = RANDOM_FAULT_KINDS_DEFAULT,
        timeout_delay_s: float = 30.0,
        policy: ValidationPolicy | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_recorded_events: int = 1_000_000,
        max_recorded_requests: int = 100_000,
        shutdown_timeout_s: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if tokens is not None and any(not t for t in tokens):
            raise FakeSpecError("tokens must be non-empty strings")
        self._tokens = frozenset(tokens) if tokens is not None else None
        self._token_pixels = (
            {t: frozenset(p) for t, p in token_pixels.items()} if token_pixels else {}
        )
        self._fault_rate = 0.0
        self._random_kinds: tuple[str, ...] = ()
        self._timeout_delay_s = 0.0
        self._limiter: _QpsLimiter | None = None
        self._throttle_qps: float | None = None
        self.configure(
            FakeConfig(
                fault_rate=fault_rate,
                throttle_qps=throttle_qps,
                random_fault_kinds=list(random_fault_kinds),
                timeout_delay_s=timeout_delay_s,
            )
        )
        self._policy = policy if policy is not None else ValidationPolicy()
        self._max_body_bytes = max_body_bytes
        self._shutdown_timeout_s = shutdown_timeout_s
        self._rng = random.Random(seed)
        self.state = FakeState(max_events=max_recorded_events, max_requests=max_recorded_requests)
        self._faults: list[_ActiveFault] = []
        self._next_fault_id = 1
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (`http://host:port`), valid after `start()`."""
        if self._url is None:
            raise RuntimeError("FakeTikTok is not started")
        return self._url

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes)
        app.router.add_post(ENDPOINT_PATH, self._handle_track)
        app.router.add_post("/_fake/faults", self._handle_add_faults)
        app.router.add_get("/_fake/faults", self._handle_list_faults)
        app.router.add_delete("/_fake/faults", self._handle_clear_faults)
        app.router.add_get("/_fake/config", self._handle_get_config)
        app.router.add_post("/_fake/config", self._handle_set_config)
        app.router.add_get("/_fake/events", self._handle_events)
        app.router.add_get("/_fake/requests", self._handle_requests)
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_post("/_fake/reset", self._handle_reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("FakeTikTok is already started")
        self._stopping = asyncio.Event()
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self._url = f"http://{shown}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop listening; requests held by timeout/slow faults are released first."""
        self._stopping.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeTikTok:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- programmatic control (the control API calls these) --------------------------------

    def configure(self, config: FakeConfig) -> None:
        """Apply the given knobs (None fields are left as they are). ValueError if invalid."""
        if config.fault_rate is not None:
            if not 0.0 <= config.fault_rate <= 1.0:
                raise FakeSpecError("fault_rate: must be between 0 and 1")
            self._fault_rate = config.fault_rate
        if config.random_fault_kinds is not None:
            bad = [k for k in config.random_fault_kinds if k not in FAULT_KINDS or k == "slow"]
            if bad or not config.random_fault_kinds:
                raise FakeSpecError("random_fault_kinds: non-empty list of fault kinds but slow")
            if {"code", "reject_event_ids"} & set(config.random_fault_kinds):
                raise FakeSpecError("random_fault_kinds: code and reject_event_ids need parameters")
            self._random_kinds = tuple(config.random_fault_kinds)
        if config.timeout_delay_s is not None:
            if config.timeout_delay_s < 0:
                raise FakeSpecError("timeout_delay_s: must be >= 0")
            self._timeout_delay_s = config.timeout_delay_s
        if config.throttle_qps is not None:
            # 0 switches throttling off (the JSON API has no other way to say "none").
            qps = config.throttle_qps
            self._limiter = _QpsLimiter(qps) if qps > 0 else None
            self._throttle_qps = qps if qps > 0 else None

    def config(self) -> dict[str, Any]:
        return {
            "fault_rate": self._fault_rate,
            "throttle_qps": self._throttle_qps,
            "random_fault_kinds": list(self._random_kinds),
            "timeout_delay_s": self._timeout_delay_s,
        }

    def add_fault(self, spec: FaultSpec) -> int:
        """Queue a fault; returns its id. ValueError if the spec is invalid."""
        spec.check()
        if len(self._faults) >= _MAX_FAULTS:
            raise FakeSpecError(f"too many active faults (max {_MAX_FAULTS})")
        now = time.monotonic()
        fault = _ActiveFault(
            id=self._next_fault_id,
            spec=spec,
            remaining=spec.count,
            expires_at=None if spec.duration_s is None else now + spec.duration_s,
            event_ids=frozenset(spec.event_ids or ()),
        )
        self._next_fault_id += 1
        self._faults.append(fault)
        return fault.id

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [f.describe(now) for f in self._faults if f.live(now)]

    def reset(self) -> None:
        """Forget recorded events, requests, counters and faults (configuration stays)."""
        self.state.reset()
        self._faults.clear()

    @property
    def events(self) -> list[AcceptedEvent]:
        return self.state.events

    def accepted_event_ids(self) -> set[str]:
        return self.state.accepted_event_ids()

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    # -- the Events API endpoint -----------------------------------------------------------

    async def _handle_track(self, request: web.Request) -> web.StreamResponse:
        received_mono = time.monotonic()
        received_unix = time.time()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            answer = _Answer(413, text="Request Entity Too Large")
            self._record(received_mono, received_unix, None, None, answer)
            return self._respond(request, answer, received_unix)

        decoded, rejection = validate(body, now=received_unix, policy=self._policy)
        pixel = decoded.event_source_id if decoded is not None else None

        delay, fault = self._match_faults(pixel, decoded)
        if fault is None and self._fault_rate > 0 and self._rng.random() < self._fault_rate:
            fault = _ActiveFault(
                0, FaultSpec(kind=self._rng.choice(self._random_kinds)), None, None, frozenset()
            )
        if fault is not None and fault.spec.kind == "timeout":
            spec_delay = fault.spec.delay_s
            delay += spec_delay if spec_delay is not None else self._timeout_delay_s
        if delay > 0:
            await self._sleep(delay)

        if fault is None:
            answer = self._process(request, decoded, rejection, pixel, received_unix)
        elif fault.spec.process:  # take the events, then lose the answer
            processed = self._process(request, decoded, rejection, pixel, received_unix)
            answer = self._fault_answer(fault, decoded, pixel)
            answer.accepted = processed.accepted
        else:
            answer = self._fault_answer(fault, decoded, pixel)
        self._record(received_mono, received_unix, pixel, decoded, answer)
        return self._respond(request, answer, received_unix)

    def _process(
        self,
        request: web.Request,
        decoded: TrackRequest | None,
        rejection: Rejection | None,
        pixel: str | None,
        received_unix: float,
    ) -> _Answer:
        token = request.headers.get("Access-Token", "")
        if not token:
            return _Answer(200, CODE_EMPTY_TOKEN, MESSAGES[CODE_EMPTY_TOKEN])
        if self._tokens is not None and token not in self._tokens:
            return _Answer(200, CODE_INVALID_TOKEN, MESSAGES[CODE_INVALID_TOKEN])
        allowed = self._token_pixels.get(token)
        if allowed is not None and pixel is not None and pixel not in allowed:
            return _Answer(200, CODE_PERMISSION, MESSAGES[CODE_PERMISSION].format(pixel=pixel))
        if self._limiter is not None and not self._limiter.admit(time.monotonic()):
            return _Answer(200, CODE_THROTTLED, MESSAGES[CODE_THROTTLED])
        if rejection is not None:
            return _Answer(200, rejection.code, rejection.message)
        assert decoded is not None  # validate() returns a request whenever it has no rejection
        self.state.record_accepted(decoded, received_unix)
        return _Answer(200, CODE_OK, MESSAGES[CODE_OK], accepted=True)

    def _match_faults(
        self, pixel: str | None, decoded: TrackRequest | None
    ) -> tuple[float, _ActiveFault | None]:
        """Sum the delays of matching slow faults; pick the first matching other fault."""
        if not self._faults:
            return 0.0, None
        now = time.monotonic()
        delay = 0.0
        chosen: _ActiveFault | None = None
        for fault in self._faults:
            if not fault.live(now) or not fault.matches(pixel, decoded):
                continue
            if fault.spec.kind != "slow" and chosen is not None:
                continue
            if fault.spec.probability < 1.0 and self._rng.random() >= fault.spec.probability:
                continue
            fault.consume()
            if fault.spec.kind == "slow":
                delay += fault.spec.delay_s or 0.0
            else:
                chosen = fault
        self._faults = [f for f in self._faults if f.live(now)]
        return delay, chosen

    def _fault_answer(
        self, fault: _ActiveFault, decoded: TrackRequest | None, pixel: str | None
    ) -> _Answer:
        spec = fault.spec
        kind = spec.kind
        retry_after = spec.retry_after_s
        if kind == "http_500":
            return _Answer(500, 50000, spec.message or MESSAGES[50000], fault=kind)
        if kind == "http_502":
            html = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            return _Answer(502, text=html, fault=kind)
        if kind == "http_503":
            return _Answer(503, text="Service Unavailable", retry_after_s=retry_after, fault=kind)
        if kind == "http_429":
            return _Answer(429, text="Too Many Requests", retry_after_s=retry_after, fault=kind)
        if kind == "throttle":
            message = spec.message or MESSAGES[CODE_THROTTLED]
            return _Answer(200, CODE_THROTTLED, message, retry_after_s=retry_after, fault=kind)
        if kind == "timeout":
            return _Answer(504, text="Gateway Timeout", fault=kind)
        if kind == "auth":
            code = spec.code if spec.code is not None else CODE_INVALID_TOKEN
            message = spec.message or _message_for(code, pixel, "Authentication error.")
            return _Answer(200, code, message, fault=kind)
        if kind == "disconnect":
            return _Answer(None, fault=kind)
        if kind == "code":
            code = spec.code if spec.code is not None else 50000
            message = spec.message or _message_for(code, pixel, "Injected error.")
            return _Answer(200, code, message, retry_after_s=retry_after, fault=kind)
        # reject_event_ids
        index = fault.rejected_index(decoded) if decoded is not None else None
        where = f"data.{index}.event_id" if index is not None else "event_id"
        message = spec.message or f"Invalid value for {where}: rejected."
        return _Answer(200, CODE_PARAM_ERROR, message, fault=kind)

    def _record(
        self,
        received_mono: float,
        received_unix: float,
        pixel: str | None,
        decoded: TrackRequest | None,
        answer: _Answer,
    ) -> None:
        events = len(decoded.data) if decoded is not None else 0
        record = RequestRecord(
            received_mono=received_mono,
            received_unix=received_unix,
            pixel=pixel,
            events=events,
            http_status=answer.status,
            code=answer.code,
            fault=answer.fault,
            latency_s=time.monotonic() - received_mono,
        )
        self.state.record_request(record, 0 if answer.accepted else events)

    def _respond(self, request: web.Request, answer: _Answer, now: float) -> web.StreamResponse:
        if answer.status is None:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        request_id = _request_id(now)
        headers = {"X-Tt-Logid": request_id}
        if answer.retry_after_s is not None:
            headers["Retry-After"] = f"{answer.retry_after_s:g}"
        if answer.text is not None:
            return web.Response(status=answer.status, text=answer.text, headers=headers)
        payload: dict[str, object] = {
            "code": answer.code,
            "message": answer.message,
            "request_id": request_id,
            "data": {},
        }
        return web.Response(
            status=answer.status,
            body=_ENCODER.encode(payload),
            content_type="application/json",
            headers=headers,
        )

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # -- the control API -------------------------------------------------------------------

    @staticmethod
    def _json(payload: object, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=_ENCODER.encode(payload), content_type="application/json"
        )

    async def _handle_add_faults(self, request: web.Request) -> web.Response:
        try:
            decoded = _FAULT_DECODER.decode(await request.read())
            specs = decoded if isinstance(decoded, list) else [decoded]
            for spec in specs:
                spec.check()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return self._json({"error": str(exc)}, status=400)
        try:
            ids = [self.add_fault(spec) for spec in specs]
        except ValueError as exc:
            return self._json({"error": str(exc)}, status=400)
        return self._json({"ids": ids})

    async def _handle_list_faults(self, request: web.Request) -> web.Response:
        return self._json(self.faults())

    async def _handle_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return self._json({"cleared": True})

    async def _handle_get_config(self, request: web.Request) -> web.Response:
        return self._json(self.config())

    async def _handle_set_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(_CONFIG_DECODER.decode(await request.read()))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return self._json({"error": str(exc)}, status=400)
        return self._json(self.config())

    async def _handle_events(self, request: web.Request) -> web.Response:
        try:
            offset = int(request.query.get("offset", "0"))
            limit_text = request.query.get("limit")
            limit = int(limit_text) if limit_text is not None else None
        except ValueError:
            return self._json({"error": "offset and limit must be integers"}, status=400)
        if offset < 0 or (limit is not None and limit < 0):
            return self._json({"error": "offset and limit must be >= 0"}, status=400)
        pixel = request.query.get("pixel")
        events = self.state.events
        if pixel is not None:
            events = [e for e in events if e.pixel == pixel]
        end = None if limit is None else offset + limit
        return self._json(events[offset:end])

    async def _handle_requests(self, request: web.Request) -> web.Response:
        records = list(self.state.requests)
        limit_text = request.query.get("limit")
        if limit_text is not None:
            try:
                limit = int(limit_text)
            except ValueError:
                return self._json({"error": "limit must be an integer"}, status=400)
            records = records[-limit:] if limit > 0 else []
        return self._json(records)

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return self._json(self.stats())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return self._json({"reset": True})
