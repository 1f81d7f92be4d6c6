"""Delivery of mapped events: lanes, slots, requests, retries, bisection, dead letters.

`Sender.add(key, event)` queues an event in the lane of its request key (`worker.delivery.
lanes`); each lane's pump waits for a batch, one of the lane's own permits, then a rate-limit
slot of its app (fair across the app's lanes), seals the batch and sends it while holding one
of the global connection permits. Events report their fate to their own `WorkOwner`.

Response classes (`worker.delivery.client.classify_answer`, `worker.delivery.codes`):
- success: every event is delivered;
- throttled (40100/429): the app's schedule backs off (`Retry-After`, capped at
  `max_backoff_s`), and the batch is retried;
- retryable (5xx, 5xxxx, timeouts, connection errors): capped exponential backoff with full
  jitter until `retry.deadline_s` after the batch's first attempt, then `retries_exhausted`.
  A batch of several events that failed `SPLIT_AFTER_FAILURES` times in a row is split in
  halves, so one poison event cannot hold the others back; a half splits again only once its
  sibling got through, so an outage of the whole destination costs two requests per batch,
  not one per event;
- request-level (auth codes, a 40002 on a top-level field, HTTP 3xx/404/405): the whole batch
  fails at once (`auth_error` or `permanent_api_error`), never bisected;
- permanent per event: when TikTok's text names the event (`data[3]`, `Batch.3.`) that one is
  dead-lettered and the rest resent; otherwise the batch is split in halves, and when both
  halves repeat the parent's error word for word it was request-level after all.

Parking (`ParkingPolicy`, the worker; redrive sends without it): a retryable or throttled
batch is retried in memory for `in_memory_s` after its first failure, then its events are
handed to their owner to park in the retry topic (`WorkOwner.on_parked`). An auth answer parks
at once. Each destination has a circuit (`worker.delivery.circuit`): failed requests open it,
and while it is open the destination's batches are parked without a request; after the pause
one batch goes as the probe. Any answer that is not a failure of the destination (success,
permanent errors) closes it.

Events of dropped messages (a partition no longer ours) are left out of every request from
the moment they are dropped, and their fate is reported to nobody.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from worker.core.vocabulary import DeadLetterReason
from worker.delivery.circuit import Circuit, CircuitPolicy, CircuitState, Verdict
from worker.delivery.client import Outcome, SendResult, TikTokClient, backoff_delay
from worker.delivery.codes import event_index
from worker.delivery.inflight import Failure, Parking, PendingEvent, WorkOwner
from worker.delivery.lanes import DEFAULT_MAX_BATCH_BYTES, AppBudget, Lane, spawn
from worker.delivery.ratelimit import RateLimiter
from worker.mapping.body import BatchKey, build_body
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics

__all__ = [
    "SPLIT_AFTER_FAILURES",
    "Failure",
    "LanePolicy",
    "ParkingPolicy",
    "RetryPolicy",
    "Route",
    "Sender",
]

# Consecutive retryable failures after which a batch of several events is split in halves.
SPLIT_AFTER_FAILURES: Final = 3
# The error of events parked because their lane held more than its share (`Sender.shed`).
SHED_ERROR: Final = "lane over its share of the in-flight bound (destination slower than its input)"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a destination's requests go: its token and its rate-limit key."""

    destination: str
    access_token: str
    limiter_key: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float
    max_backoff_s: float
    deadline_s: float


@dataclass(frozen=True, slots=True)
class ParkingPolicy:
    """Retry in memory for `in_memory_s`, then park; a circuit per destination."""

    in_memory_s: float
    circuit: CircuitPolicy


@dataclass(frozen=True, slots=True)
class LanePolicy:
    max_events: int
    linger_s: float
    concurrency: int
    max_concurrent_requests: int
    max_bytes: int = DEFAULT_MAX_BATCH_BYTES


class _Halves:
    """The two halves of a batch split after retryable failures.

    A half splits again only once its sibling was delivered: then the failure follows some
    events (a poison event) and splitting isolates them. When neither half gets through, the
    destination itself is failing (an outage), and splitting further would only multiply
    requests against an app budget other destinations share.
    """

    __slots__ = ("delivered",)

    def __init__(self) -> None:
        self.delivered = False


def _live(events: Sequence[PendingEvent]) -> list[PendingEvent]:
    return [e for e in events if not e.message.dropped]


def _signature(result: SendResult) -> tuple[int | None, int | None, str]:
    return (result.http_status, result.code, result.message)


class Sender:
    """Turns queued events into Events API requests and reports each event's fate."""

    def __init__(
        self,
        *,
        client: TikTokClient,
        limiter: RateLimiter,
        routes: Mapping[str, Route],
        retry: RetryPolicy,
        lanes: LanePolicy,
        metrics: Metrics,
        log: Logger,
        on_crash: Callable[[BaseException], None],
        parking: ParkingPolicy | None = None,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._routes = routes
        self._retry = retry
        self._policy = lanes
        self._connections = asyncio.Semaphore(lanes.max_concurrent_requests)
        self._metrics = metrics
        self._log = log
        self._on_crash = on_crash
        self._lanes: dict[BatchKey, Lane] = {}
        self._parking = parking
        self._circuits: dict[str, Circuit] = {}
        self._circuit_watchers: list[Callable[[str, CircuitState], None]] = []
        # Each destination's last failed request, for events parked unsent (circuit open).
        self._last_failure: dict[str, tuple[str, SendResult]] = {}
        if parking is not None:
            for destination in routes:
                self._circuits[destination] = Circuit(
                    destination, parking.circuit, on_change=self._circuit_changed
                )
                metrics.circuit_state.labels(destination=destination).set(0)
        self._budgets: dict[str, AppBudget] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_ids = itertools.count(1)
        self._gate = asyncio.Event()
        self._gate.set()
        self.on_wire = 0
        self._starting = 0  # batches sealed whose delivery task has not run yet
        self._spilled: list[PendingEvent] = []

    # -- the face ----------------------------------------------------------------------------

    def add(self, key: BatchKey, event: PendingEvent) -> None:
        """Queue `event` in its lane (created on first use)."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._new_lane(key)
        cap = lane.cap
        if cap is not None and len(lane.queue) + lane.active_events >= cap:
            self._spill(lane, event)
            return
        lane.add(event)

    def requests_ready(self) -> bool:
        """Whether a request could start now and has not yet: a batch sealed but its task not
        yet run, or a lane with a whole batch waiting and a permit free. The source consumer
        holds consumed batches back while this is true (`ConsumerThread`, `defer_while`)."""
        if self._starting:
            return True
        return any(
            lane.full.is_set() and not lane.permits.locked() for lane in self._lanes.values()
        )

    @property
    def lane_count(self) -> int:
        return len(self._lanes)

    def shed(self, share: int) -> int:
        """Hold every lane to `share` events (queued and on the wire): park the newest queued
        beyond it (reason `throttled`), and its new events beyond it as they come, until its
        queue empties.

        The pipeline calls this when the in-flight bound has kept the source paused for a
        while (`Pipeline`, `SHED_AFTER_S`): a lane slowed by its own rate limit or a slow
        API then holds only its share of the bound instead of pausing every destination.
        Without a retry topic nothing is shed. Returns how many events were parked now."""
        if self._parking is None:
            return 0
        shed = 0
        for lane in list(self._lanes.values()):
            excess = len(lane.queue) + lane.active_events - share  # only queued ones go
            if excess <= 0:
                continue
            if lane.cap is None:
                self._log.warning(
                    "lane over its share of the in-flight bound: parking its newest events",
                    destination=lane.key.destination,
                    queued=len(lane.queue),
                    share=share,
                )
            lane.cap = share
            events = lane.take_newest(excess)
            self._gauge(lane)
            shed += len(events)
            self._park_shed(events)
        return shed

    def _spill(self, lane: Lane, event: PendingEvent) -> None:
        """An event beyond its capped lane's share: parked with the others of this turn."""
        if not self._spilled:
            asyncio.get_running_loop().call_soon(self._park_spilled)
        self._spilled.append(event)

    def _park_spilled(self) -> None:
        spilled, self._spilled = self._spilled, []
        self._park_shed(spilled)

    def _park_shed(self, events: list[PendingEvent]) -> None:
        events = _live(events)
        if not events:
            return
        parking = Parking("throttled", "throttled", SHED_ERROR, None, 0, None, 0.0)
        for owner, group in _by_owner(events):
            owner.on_parked(group, parking)

    def flush(self) -> None:
        """Every lane sends what it holds without lingering (rebalance, shutdown)."""
        for lane in self._lanes.values():
            lane.flush()

    def purge(self) -> int:
        """Forget queued events of dropped messages at once; returns how many."""
        return sum(lane.purge() for lane in self._lanes.values())

    def close_gate(self) -> None:
        """Start no new request from now on (requests on the wire finish)."""
        self._gate.clear()

    def circuit(self, destination: str) -> Circuit | None:
        """The destination's circuit (None when the sender does not park)."""
        return self._circuits.get(destination)

    def watch_circuits(self, watcher: Callable[[str, CircuitState], None]) -> None:
        """Call `watcher(destination, state)` on every change of a circuit (the retry intake
        releases a destination's parked events when its circuit closes)."""
        self._circuit_watchers.append(watcher)

    @property
    def queued_events(self) -> int:
        return sum(lane.queued_events for lane in self._lanes.values())

    @property
    def active_tasks(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Abandon everything still running (its offsets stay uncommitted)."""
        self.close_gate()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for budget in self._budgets.values():
            await budget.close()

    # -- lanes ---------------------------------------------------------------------------------

    def _new_lane(self, key: BatchKey) -> Lane:
        route = self._routes[key.destination]
        budget = self._budgets.get(route.limiter_key)
        if budget is None:
            budget = self._budgets[route.limiter_key] = AppBudget(self._limiter, route.limiter_key)
        policy = self._policy
        lane = self._lanes[key] = Lane(
            key,
            budget,
            concurrency=policy.concurrency,
            max_events=policy.max_events,
            max_bytes=policy.max_bytes,
        )
        lane.task = spawn(self._tasks, self._pump(lane), self._task_done, f"lane {key.destination}")
        return lane

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("delivery task crashed", error=f"{type(exc).__name__}: {exc}")
            self._on_crash(exc)

    async def _pump(self, lane: Lane) -> None:
        """Forever: wait for a batch, a lane permit and a slot; seal; send in the background."""
        linger_s = self._policy.linger_s
        circuit = self._circuits.get(lane.key.destination)
        while True:
            await lane.wait_for_batch(linger_s)
            probe = False
            if circuit is not None:
                verdict = circuit.allow()
                if verdict is Verdict.PARK:
                    # Open: no slot, no request; the events wait in the retry topic.
                    self._park_unsent(lane.seal(), circuit)
                    await asyncio.sleep(0)
                    continue
                probe = verdict is Verdict.PROBE
            await self._take_turn(lane)
            batch = lane.seal()
            if probe and not batch and circuit is not None:
                circuit.probe_unused()
            if not batch:
                lane.permits.release()
                continue
            lane.active_events += len(batch)
            self._gauge(lane)
            self._starting += 1
            spawn(
                self._tasks,
                self._deliver_batch(lane, batch),
                self._task_done,
                f"batch {lane.key.destination}",
            )

    async def _take_turn(self, lane: Lane) -> None:
        """One of the lane's permits, then a slot of its app (the order SPEC §4 asks for), with
        the gate open once both are held: after `close_gate` no request starts, even one that
        was already waiting for its slot."""
        while True:
            await self._gate.wait()
            await lane.permits.acquire()
            try:
                await lane.budget.slot(lane)
            except BaseException:
                lane.permits.release()
                raise
            if self._gate.is_set():
                return
            lane.permits.release()

    def _gauge(self, lane: Lane) -> None:
        self._metrics.lane_inflight_events.labels(destination=lane.key.destination).set(
            lane.active_events + lane.queued_events
        )

    def _settle(self, lane: Lane, count: int) -> None:
        lane.active_events -= count
        self._gauge(lane)

    # -- one batch -----------------------------------------------------------------------------

    async def _deliver_batch(self, lane: Lane, batch: list[PendingEvent]) -> None:
        # Each batch has its own task, hence its own context: every log line of its attempts,
        # halves and dead letters carries the same batch_id.
        self._starting -= 1
        structlog.contextvars.bind_contextvars(batch_id=next(self._batch_ids))
        deadline = asyncio.get_running_loop().time() + self._retry.deadline_s
        try:
            await self._deliver(lane, batch, deadline, holding=True)
        finally:
            self._settle(lane, len(batch))

    async def _deliver(
        self,
        lane: Lane,
        events: Sequence[PendingEvent],
        deadline: float,
        *,
        holding: bool = False,
        attempt: int = 0,
        repeat_of: tuple[int | None, int | None, str] | None = None,
        halves: _Halves | None = None,
        failing_since: tuple[float, float] | None = None,
    ) -> SendResult | None:
        """Deliver `events` until each is delivered, failed or parked.

        `holding`: a lane permit and a slot are already held for the first request.
        `failing_since`: (wall time of the first failure, loop time the in-memory retrying
        ends) of the batch these events were split from, so halves keep the parent's window.
        `repeat_of`: when the first permanent answer is exactly this error, hand it back to
        the caller (bisection decides) instead of handling it. Returns None otherwise.
        `halves`: set when `events` is half of a batch split after retryable failures.
        """
        route = self._routes[lane.key.destination]
        circuit = self._circuits.get(route.destination)
        parking = self._parking
        loop = asyncio.get_running_loop()
        failures = 0
        # Wall time of this delivery's first failed request; loop time in-memory retrying ends.
        first_failed, park_after = failing_since if failing_since is not None else (None, None)
        last: SendResult | None = None
        while True:
            if holding and not self._gate.is_set():  # closed since the turn was taken
                lane.permits.release()
                holding = False
            if not holding:
                if circuit is not None and circuit.allow() is Verdict.PARK:
                    self._park(events, "circuit_open", last, attempt, first_failed, circuit)
                    return None
                await self._take_turn(lane)
            holding = False
            live = _live(events)
            if not live:
                lane.permits.release()
                return None
            events = live
            attempt += 1
            body = build_body(lane.key, [event.mapped.payload for event in events])
            try:
                async with self._connections:
                    self.on_wire += 1
                    try:
                        result = await self._client.send(body, access_token=route.access_token)
                    finally:
                        self.on_wire -= 1
            finally:
                lane.permits.release()
            self._record(route, len(events), attempt, result)
            last = result
            outcome = result.outcome
            failed = outcome.retryable and outcome is not Outcome.THROTTLED
            if circuit is not None:
                if failed or outcome is Outcome.AUTH:
                    circuit.failed()
                    kind = "auth_error" if outcome is Outcome.AUTH else "retryable"
                    self._last_failure[route.destination] = (kind, result)
                elif outcome is not Outcome.THROTTLED:
                    circuit.succeeded()  # TikTok answered, and not with a failure of its own
            events = _live(events)
            if not events:
                return None
            if outcome is Outcome.SUCCESS:
                if halves is not None:
                    halves.delivered = True
                self._delivered(events)
                return None
            if outcome.retryable:
                now = loop.time()
                if first_failed is None:
                    first_failed = time.time()
                    if parking is not None:
                        park_after = now + parking.in_memory_s
                retry_after = result.retry_after_s
                if retry_after is not None:
                    retry_after = min(retry_after, self._retry.max_backoff_s)
                if outcome is Outcome.THROTTLED:
                    self._limiter.throttled(route.limiter_key, retry_after)
                else:
                    failures += 1
                delay = backoff_delay(
                    attempt,
                    initial_s=self._retry.initial_backoff_s,
                    max_s=self._retry.max_backoff_s,
                    retry_after_s=retry_after,
                )
                if park_after is not None and now + delay > park_after:
                    if outcome is Outcome.THROTTLED and circuit is not None:
                        circuit.failed()  # throttled past the in-memory window
                        self._last_failure[route.destination] = ("throttled", result)
                    reason = "throttled" if outcome is Outcome.THROTTLED else "retryable"
                    self._park(events, reason, result, attempt, first_failed, circuit, delay)
                    return None
                if now + delay > deadline:
                    self._fail(events, DeadLetterReason.RETRIES_EXHAUSTED, result, attempt)
                    return None
                self._metrics.retries.labels(destination=route.destination).inc()
                await asyncio.sleep(delay)
                splittable = halves is None or halves.delivered
                if failures >= SPLIT_AFTER_FAILURES and len(events) > 1 and splittable:
                    # One poison event (a 5xx or a timeout it causes) must not hold the rest.
                    left, right = self._halves(_live(events))
                    pair = _Halves()
                    since = (first_failed, park_after) if park_after is not None else None
                    await asyncio.gather(
                        self._deliver(
                            lane, left, deadline, attempt=attempt, halves=pair, failing_since=since
                        ),
                        self._deliver(
                            lane, right, deadline, attempt=attempt, halves=pair, failing_since=since
                        ),
                    )
                    return None
                continue
            if outcome is Outcome.AUTH and parking is not None:
                # A revoked token may be fixed within the deadline: park, never bisect.
                first_failed = first_failed if first_failed is not None else time.time()
                self._park(events, "auth_error", result, attempt, first_failed, circuit)
                return None
            if result.request_level or outcome is Outcome.AUTH:
                if result.http_status is not None and 300 <= result.http_status < 400:
                    self._log.error(
                        "configuration error: tiktok.base_url answered with a redirect, "
                        "which is not followed",
                        destination=route.destination,
                        http_status=result.http_status,
                    )
                reason = (
                    DeadLetterReason.AUTH_ERROR
                    if outcome is Outcome.AUTH
                    else DeadLetterReason.PERMANENT_API_ERROR
                )
                self._fail(events, reason, result, attempt)
                return None
            if repeat_of is not None and _signature(result) == repeat_of:
                return result
            await self._bisect(lane, events, result, deadline, attempt)
            return None

    async def _bisect(
        self,
        lane: Lane,
        events: list[PendingEvent],
        result: SendResult,
        deadline: float,
        attempt: int,
    ) -> None:
        """Isolate the events a permanent per-event error is about."""
        index = event_index(result.message)
        if index is not None and 0 <= index < len(events):
            self._fail([events[index]], DeadLetterReason.PERMANENT_API_ERROR, result, attempt)
            rest = events[:index] + events[index + 1 :]
            if rest:
                await self._deliver(lane, rest, deadline)
            return
        if len(events) == 1:
            self._fail(events, DeadLetterReason.PERMANENT_API_ERROR, result, attempt)
            return
        left, right = self._halves(events)
        signature = _signature(result)
        repeated_left = await self._deliver(lane, left, deadline, repeat_of=signature)
        if repeated_left is None:  # the left half is settled; the error must be on the right
            await self._deliver(lane, right, deadline)
            return
        repeated_right = await self._deliver(lane, right, deadline, repeat_of=signature)
        if repeated_right is None:  # the right half is settled: go on in the left one
            await self._bisect(lane, _live(left), repeated_left, deadline, attempt + 1)
            return
        # Both halves answer exactly like the whole: not about an event, so no split helps.
        self._fail(
            _live(left) + _live(right),
            DeadLetterReason.PERMANENT_API_ERROR,
            repeated_right,
            attempt + 2,
        )

    @staticmethod
    def _halves(events: list[PendingEvent]) -> tuple[list[PendingEvent], list[PendingEvent]]:
        middle = len(events) // 2
        return events[:middle], events[middle:]

    # -- fates ---------------------------------------------------------------------------------

    def _delivered(self, events: list[PendingEvent]) -> None:
        for owner, group in _by_owner(events):
            owner.on_delivered(group)

    def _fail(
        self,
        events: Sequence[PendingEvent],
        reason: DeadLetterReason,
        result: SendResult,
        attempts: int,
    ) -> None:
        events = _live(events)
        if not events:
            return
        status = f"HTTP {result.http_status}" if result.http_status is not None else "no response"
        error = f"{result.outcome.value}: {status}, {result.message}"
        failure = Failure(reason, error, result.code, attempts)
        for owner, group in _by_owner(events):
            owner.on_failed(group, failure)

    def _park_unsent(self, batch: list[PendingEvent], circuit: Circuit) -> None:
        """Park a batch the open circuit does not let through (no request made)."""
        if batch:
            self._park(batch, "circuit_open", None, 0, None, circuit)

    def _park(
        self,
        events: Sequence[PendingEvent],
        reason: str,
        result: SendResult | None,
        attempts: int,
        first_failed_at: float | None,
        circuit: Circuit | None,
        backoff_s: float = 0.0,
    ) -> None:
        events = _live(events)
        if not events:
            return
        destination = events[0].mapped.destination
        if result is None or reason == "circuit_open":
            # Unsent, or sent before the circuit opened: the failure that opened it speaks.
            failure, last = self._last_failure.get(destination, ("retryable", result))
        else:
            failure, last = reason, result
        if last is None:
            error, code = "circuit open: destination failing", None
        else:
            status = f"HTTP {last.http_status}" if last.http_status is not None else "no response"
            error, code = f"{last.outcome.value}: {status}, {last.message}", last.code
        retry_in = max(backoff_s, circuit.retry_in() if circuit is not None else 0.0)
        parking = Parking(reason, failure, error, code, attempts, first_failed_at, retry_in)
        self._log.info(
            "parking events",
            destination=destination,
            reason=reason,
            events=len(events),
            retry_in_s=round(retry_in, 3),
        )
        for owner, group in _by_owner(events):
            owner.on_parked(group, parking)

    def _circuit_changed(self, destination: str, state: CircuitState) -> None:
        self._metrics.circuit_state.labels(destination=destination).set(int(state))
        log = self._log.warning if state is CircuitState.OPEN else self._log.info
        log("circuit " + state.name.lower().replace("_", "-"), destination=destination)
        for watcher in self._circuit_watchers:
            watcher(destination, state)

    def _record(self, route: Route, events: int, attempt: int, result: SendResult) -> None:
        destination = route.destination
        self._metrics.requests.labels(destination=destination, outcome=result.outcome.value).inc()
        self._metrics.request_duration.labels(destination=destination).observe(result.latency_s)
        self._metrics.batch_events.labels(destination=destination).observe(events)
        self._log.info(
            "tiktok request",
            destination=destination,
            events=events,
            outcome=result.outcome.value,
            http_status=result.http_status,
            code=result.code,
            attempt=attempt,
            latency_ms=round(result.latency_s * 1000, 1),
            request_id=result.request_id,
            # Why it failed, in TikTok's words (sanitised by the client: no token, no PII).
            **({} if result.outcome is Outcome.SUCCESS else {"message": result.message}),
        )


def _by_owner(events: Sequence[PendingEvent]) -> list[tuple[WorkOwner, list[PendingEvent]]]:
    """Events grouped by the owner of their message (almost always one group)."""
    first = events[0].message.owner
    if all(e.message.owner is first for e in events):
        return [(first, list(events))]
    groups: dict[int, tuple[WorkOwner, list[PendingEvent]]] = {}
    for event in events:
        owner = event.message.owner
        groups.setdefault(id(owner), (owner, []))[1].append(event)
    return list(groups.values())
