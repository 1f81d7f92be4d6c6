"""The delivery stack built from the config: TikTok client → rate limiter → sender.

The worker and `tiktok-worker dlq redrive` deliver through this same stack, so both batch per
request key, share the rate limit, retry, bisect and dead-letter in exactly the same way.
Each part is built from the ones before it; nothing is wired in afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.config import Config
from worker.delivery.circuit import CircuitPolicy
from worker.delivery.client import ENDPOINT_PATH, TikTokClient
from worker.delivery.ratelimit import RateLimiter, build_rate_limiter, rate_limit_key
from worker.delivery.sender import LanePolicy, ParkingPolicy, RetryPolicy, Route, Sender
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics


def build_routes(config: Config) -> dict[str, Route]:
    """Each destination's token and rate-limit key, by destination name."""
    return {
        d.name: Route(
            destination=d.name,
            access_token=d.access_token,
            limiter_key=rate_limit_key(
                app_id=d.app_id, access_token=d.access_token, endpoint=ENDPOINT_PATH
            ),
        )
        for d in config.destinations
    }


def lane_share(lane_concurrency: int, max_concurrent_requests: int, config: Config) -> int:
    """Requests one lane may have in flight: `lane_concurrency`, but never more than its fair
    share of `max_concurrent_requests`, so lanes whose requests hang (timeouts) can never take
    every connection permit from the others."""
    share = max(1, max_concurrent_requests // max(1, len(config.destinations)))
    return min(lane_concurrency, share)


def parking_policy(config: Config) -> ParkingPolicy:
    circuit = config.tiktok.circuit
    return ParkingPolicy(
        # Retrying in memory past the deadline would only delay the dead letter.
        in_memory_s=min(config.tiktok.retry.in_memory_s, config.tiktok.retry.deadline_s),
        circuit=CircuitPolicy(
            failure_threshold=circuit.failure_threshold,
            open_s=circuit.open_s,
            max_open_s=circuit.max_open_s,
        ),
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """The parts that turn mapped events into requests; ``sender.add`` is the entry point."""

    client: TikTokClient
    limiter: RateLimiter
    sender: Sender

    async def close(self) -> None:
        """Abandon deliveries still running, then release connections (idempotent)."""
        await self.sender.close()
        await self.client.close()
        await self.limiter.close()


def build_delivery(
    config: Config,
    *,
    metrics: Metrics,
    log: Logger,
    on_crash: Callable[[BaseException], None],
    parking: bool = False,
) -> Delivery:
    """Build the stack. `on_crash` hears of a delivery task that failed unexpectedly.

    `parking`: retry in memory for `tiktok.retry.in_memory_s`, then hand events to their owner
    to park, with a circuit per destination (the worker). Without it (redrive) a batch is
    retried in memory until `tiktok.retry.deadline_s`."""
    tiktok, rate_limit = config.tiktok, config.rate_limit
    client = TikTokClient(
        base_url=tiktok.base_url,
        timeout_s=tiktok.request_timeout_s,
        max_connections=tiktok.max_concurrent_requests,
    )
    limiter = build_rate_limiter(
        backend=rate_limit.backend,
        qps=rate_limit.qps,
        redis_url=rate_limit.redis_url,
        redis_password=rate_limit.redis_password,
        expected_replicas=rate_limit.expected_replicas,
        headroom=rate_limit.headroom,
        metrics=metrics,
        logger=log,
    )
    sender = Sender(
        client=client,
        limiter=limiter,
        routes=build_routes(config),
        retry=RetryPolicy(
            initial_backoff_s=tiktok.retry.initial_backoff_s,
            max_backoff_s=tiktok.retry.max_backoff_s,
            deadline_s=tiktok.retry.deadline_s,
        ),
        lanes=LanePolicy(
            max_events=tiktok.max_batch_events,
            linger_s=tiktok.batch_linger_ms / 1000,
            concurrency=lane_share(tiktok.lane_concurrency, tiktok.max_concurrent_requests, config),
            max_concurrent_requests=tiktok.max_concurrent_requests,
        ),
        metrics=metrics,
        log=log,
        on_crash=on_crash,
        parking=parking_policy(config) if parking else None,
    )
    return Delivery(client=client, limiter=limiter, sender=sender)
