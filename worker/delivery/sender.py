"""Delivery of closed batches: rate limit, send, classify, retry, bisect, dead-letter.

Each batch is delivered by its own task, so a batch waiting out a backoff never holds up
another pixel's batches or the consumer. Concurrency is bounded by a semaphore held only for
the rate-limit wait and the request itself, never during a backoff sleep.

Outcomes (see ``worker.delivery.client.classify``):
- success: every event is delivered;
- throttled / retryable: back off (capped exponential, full jitter, ``Retry-After`` as a floor)
  and try again until ``retry.deadline_s`` after the first attempt, then dead-letter
  (``retries_exhausted``);
- auth: the whole batch is dead-lettered (``auth_error``): no event of it could succeed;
- permanent: a batch of several events is split in two and each half delivered on its own,
  so only the offending events are dead-lettered (``permanent_api_error``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from worker.core.vocabulary import DeadLetterReason
from worker.delivery.batcher import Batch
from worker.delivery.client import Outcome, SendResult, TikTokClient, backoff_delay
from worker.delivery.inflight import PendingEvent
from worker.delivery.ratelimit import RateLimiter
from worker.mapping.body import BatchKey, build_body
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics


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
class Failure:
    """Why events are being dead-lettered after delivery attempts."""

    reason: DeadLetterReason
    error: str
    code: int | None
    attempts: int


class Sender:
    """Turns batches into Events API requests and reports each event's fate."""

    def __init__(
        self,
        *,
        client: TikTokClient,
        limiter: RateLimiter,
        routes: Mapping[str, Route],
        retry: RetryPolicy,
        max_concurrent_requests: int,
        metrics: Metrics,
        log: Logger,
        on_delivered: Callable[[Sequence[PendingEvent]], None],
        on_failed: Callable[[Sequence[PendingEvent], Failure], None],
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._routes = routes
        self._retry = retry
        self._semaphore = asyncio.Semaphore(max_concurrent_requests)
        self._metrics = metrics
        self._log = log
        self._on_delivered = on_delivered
        self._on_failed = on_failed
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, batch: Batch) -> None:
        """Start delivering ``batch`` in the background."""
        task = asyncio.get_running_loop().create_task(self._deliver_batch(batch))
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)

    @property
    def active_batches(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no batch is being delivered; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Abandon deliveries still running (their offsets stay uncommitted)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._log.error("batch delivery crashed", error=f"{type(exc).__name__}: {exc}")

    async def _deliver_batch(self, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry.deadline_s
        # Each batch has its own task, hence its own context: every log line of its attempts,
        # bisected halves and dead-lettering carries the same batch_id.
        structlog.contextvars.bind_contextvars(batch_id=next(self._batch_ids))
        await self._deliver(batch.key, batch.events, deadline)

    async def _deliver(
        self, key: BatchKey, events: Sequence[PendingEvent], deadline: float
    ) -> None:
        route = self._routes[key.destination]
        body = build_body(key, [event.payload for event in events])
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            async with self._semaphore:
                await self._limiter.acquire(route.limiter_key)
                result = await self._client.send(body, access_token=route.access_token)
            self._record(route, len(events), attempt, result)
            outcome = result.outcome
            if outcome is Outcome.SUCCESS:
                self._on_delivered(events)
                return
            if outcome is Outcome.THROTTLED:
                self._limiter.throttled(route.limiter_key, result.retry_after_s)
            if outcome.retryable:
                delay = backoff_delay(
                    attempt,
                    initial_s=self._retry.initial_backoff_s,
                    max_s=self._retry.max_backoff_s,
                    retry_after_s=result.retry_after_s,
                )
                if loop.time() + delay > deadline:
                    self._fail(events, DeadLetterReason.RETRIES_EXHAUSTED, result, attempt)
                    return
                self._metrics.retries.labels(destination=route.destination).inc()
                await asyncio.sleep(delay)
                continue
            if outcome is Outcome.AUTH:
                self._fail(events, DeadLetterReason.AUTH_ERROR, result, attempt)
                return
            if len(events) > 1:
                middle = len(events) // 2
                await self._deliver(key, events[:middle], deadline)
                await self._deliver(key, events[middle:], deadline)
                return
            self._fail(events, DeadLetterReason.PERMANENT_API_ERROR, result, attempt)
            return

    def _fail(
        self,
        events: Sequence[PendingEvent],
        reason: DeadLetterReason,
        result: SendResult,
        attempts: int,
    ) -> None:
        status = f"HTTP {result.http_status}" if result.http_status is not None else "no response"
        error = f"{result.outcome.value}: {status}, {result.message}"
        self._on_failed(events, Failure(reason, error, result.code, attempts))

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
