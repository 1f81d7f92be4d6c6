"""The shared GCRA in Redis: one Lua script, Redis's own clock, slot reservations.

Every pod of the deployment runs the same script against the same key, so the decision is
atomic (Redis runs one script at a time) and uses one clock (`TIME` on the server), so pod
clock skew can neither widen nor shrink the budget. The script *reserves* the next slot and
returns how long the caller must wait for it, so:

- nobody polls (no thundering herd when a slot frees up);
- callers are served in the order their reservation reached Redis, so every worker that
  wants slots gets a share proportional to the requests it has waiting, and a worker that
  waits keeps its place: a faster one cannot take its slot;
- spacing is exact: with burst 1 the slots are `1 / qps` apart on Redis's clock.

The script is sent once and then run by SHA (`EVALSHA`, redis-py `register_script`, which
reloads it transparently after a Redis restart emptied the script cache). Calling `TIME`
before a write needs effects replication, the only mode since Redis 7 and the default since 5.
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

KEY_PREFIX: Final = "tiktok_worker:ratelimit:"

# KEYS[1]  GCRA state: the theoretical arrival time (TAT), microseconds on Redis's clock
# ARGV[1]  emission interval in microseconds (1e6 / qps)
# ARGV[2]  burst tolerance in microseconds ((burst - 1) * interval; 0 = no burst)
# ARGV[3]  cost: slots to reserve (0 = only report the current wait)
# Returns  microseconds from now until the first reserved slot starts.
GCRA_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[1])
local tat = now
if raw then
  tat = tonumber(raw) or now
  if tat < now then tat = now end
end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if cost > 0 then
  local new_tat = tat + cost * interval
  -- %.17g: the default number-to-string conversion keeps only 14 digits (10 us at epoch scale)
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
end
return math.floor(wait)
"""


class RedisUnavailable(Exception):
    """Redis did not answer (in time) or refused the script; the caller must fall back."""


def connect(url: str, *, timeout_s: float, password: str | None = None) -> aioredis.Redis:
    """An asyncio Redis client for `url` that fails fast instead of retrying.

    `redis://`, `rediss://` (TLS) and passwords in the URL are handled by `from_url`; the
    options below only add timeouts and limit redis-py's own retries to one immediate retry
    on a connection error (a pooled connection that the server closed, e.g. after a Redis
    restart or its idle `timeout`). Timeouts are not retried: the limiter falls back to a local
    schedule instead of stalling requests. `password` (rate_limit.redis_password) is used
    verbatim, so it needs no percent-encoding; config validation refuses it when the URL has
    a password too.
    """
    extra: dict[str, Any] = {"password": password} if password is not None else {}
    return aioredis.Redis.from_url(
        url,
        **extra,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
    )


class RedisGcra:
    """Reservation GCRA shared through Redis at `qps` requests/s per key."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        qps: float,
        burst: int = 1,
        key_prefix: str = KEY_PREFIX,
    ) -> None:
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self._client = client
        self._interval_us = 1e6 / qps
        self._tolerance_us = (burst - 1) * self._interval_us
        self._prefix = key_prefix
        self._script = client.register_script(GCRA_LUA)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def reserve(self, key: str, cost: int = 1) -> float:
        """Reserve `cost` consecutive slots of `key`; return seconds until the first one.

        `cost=0` reserves nothing and only reports the wait (a probe). Raises
        `RedisUnavailable` on any Redis or socket error, including timeouts.
        """
        args: list[Any] = [repr(self._interval_us), repr(self._tolerance_us), str(max(cost, 0))]
        try:
            raw = await self._script(keys=[self.redis_key(key)], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            wait_us = int(raw)
        except (TypeError, ValueError) as exc:
            raise RedisUnavailable(f"unexpected script reply {raw!r}") from exc
        if wait_us < 0:
            raise RedisUnavailable(f"unexpected script reply {raw!r}")
        return wait_us / 1e6
