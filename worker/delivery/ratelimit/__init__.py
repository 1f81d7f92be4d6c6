"""Rate limiting of Events API requests: one budget per (app, endpoint) shared by all pods.

Public interface (used by the sender):

- `RateLimiter` — `acquire(key)` waits for a slot and returns the seconds waited;
  `throttled(key, retry_after_s)` reports a 40100/429; `close()`.
- `rate_limit_key(app_id=..., access_token=..., endpoint=...)` — the key to pass.
- `build_rate_limiter(backend=..., qps=..., headroom=..., redis_url=..., expected_replicas=...,
  metrics=...)`; then `await limiter.start()` before taking work (`ready` says when it is done)
  and `set_share(assigned, total)` on every rebalance.

Semantics (SPEC §5): GCRA without burst at `qps * (1 - headroom)`, so that no 1-second window
*by arrival at TikTok* holds more than `qps + 1` requests of one key across all pods; Redis
decides atomically on its own clock; when Redis fails each pod falls back to its share of the
source partitions locally and returns to Redis when it answers; throttling lowers this pod's
rate on top of the shared limit. See `worker.ratelimit.limiter` for the details.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from worker.delivery.ratelimit.adaptive import AdaptiveGate, AdaptiveSettings
from worker.delivery.ratelimit.gcra import LocalGcra
from worker.delivery.ratelimit.limiter import (
    DEFAULT_HEADROOM,
    LocalRateLimiter,
    RedisRateLimiter,
)
from worker.delivery.ratelimit.redis_gcra import RedisGcra, RedisUnavailable, connect
from worker.observability.metrics import Metrics

__all__ = [
    "DEFAULT_HEADROOM",
    "AdaptiveGate",
    "AdaptiveSettings",
    "LocalGcra",
    "LocalRateLimiter",
    "RateLimiter",
    "RedisGcra",
    "RedisRateLimiter",
    "RedisUnavailable",
    "build_rate_limiter",
    "rate_limit_key",
]

DEFAULT_REDIS_TIMEOUT_S = 0.25
# A script call that timed out is asked once more with this timeout before falling back.
DEFAULT_REDIS_RETRY_TIMEOUT_S = 1.0


class RateLimiter(Protocol):
    async def acquire(self, key: str) -> float:
        """Wait until one request of `key` may be sent; return seconds waited.

        Observes `tiktok_worker_rate_limit_wait_seconds`.
        """
        ...

    def throttled(self, key: str, retry_after_s: float | None) -> None:
        """TikTok said 40100/429: slow this worker down for a while, honour Retry-After."""
        ...

    @property
    def ready(self) -> bool:
        """False until `start()` is done (readiness waits for it)."""
        ...

    async def start(self) -> None:
        """Connect to the shared store, if any, before the worker takes work."""
        ...

    def set_share(self, assigned: int, total: int) -> None:
        """This pod holds `assigned` of the `total` source partitions (fallback share)."""
        ...

    async def close(self) -> None: ...


def rate_limit_key(*, app_id: str | None, access_token: str, endpoint: str) -> str:
    """The limiter key of one (TikTok app, endpoint) pair.

    With `app_id` the key is `app:<app_id>:<endpoint>`. Without it, the app is identified by
    a 16-hex-digit prefix of the token's SHA-256 (`tok:<digest>:<endpoint>`): stable across
    pods, safe to show in Redis and logs, and the token cannot be recovered from it.
    """
    if app_id:
        ident = f"app:{app_id}"
    else:
        digest = hashlib.sha256(access_token.encode("utf-8")).hexdigest()[:16]
        ident = f"tok:{digest}"
    return f"{ident}:{endpoint}"


def build_rate_limiter(
    *,
    backend: str,
    qps: float,
    redis_url: str,
    expected_replicas: int,
    redis_password: str | None = None,
    metrics: Metrics,
    headroom: float = DEFAULT_HEADROOM,
    logger: Any | None = None,
    redis_timeout_s: float = DEFAULT_REDIS_TIMEOUT_S,
    redis_retry_timeout_s: float = DEFAULT_REDIS_RETRY_TIMEOUT_S,
    probe_interval_s: float = 1.0,
    adaptive: AdaptiveSettings | None = None,
    late_tolerance_s: float | None = None,
) -> RateLimiter:
    """The limiter for `rate_limit.backend` (`redis` or `local`).

    Creating a Redis limiter does not connect; `start()` does (and falls back to the local
    schedule if Redis is not there in time).
    """
    if backend == "local":
        return LocalRateLimiter(
            qps=qps,
            headroom=headroom,
            metrics=metrics,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
        )
    if backend == "redis":
        return RedisRateLimiter(
            client=connect(redis_url, timeout_s=redis_timeout_s, password=redis_password),
            patient_client=connect(
                redis_url, timeout_s=redis_retry_timeout_s, password=redis_password
            ),
            qps=qps,
            headroom=headroom,
            expected_replicas=expected_replicas,
            metrics=metrics,
            logger=logger,
            probe_interval_s=probe_interval_s,
            adaptive=adaptive,
            late_tolerance_s=late_tolerance_s,
        )
    raise ValueError(f"rate_limit.backend: unknown backend {backend!r} (expected redis or local)")
