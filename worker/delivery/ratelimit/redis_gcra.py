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

import contextlib
import urllib.parse
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")


def connect(url: str, *, timeout_s: float, password: str | None = None) -> aioredis.Redis:
    """An asyncio Redis client for `url` that fails fast instead of retrying.

    `redis://`, `rediss://` (TLS) and passwords in the URL are handled by `from_url`;
    `redis+sentinel://` (see `sentinel_client`) asks Sentinel for the master. The options
    below only add timeouts and limit redis-py's own retries to one immediate retry on a
    connection error (a pooled connection that the server closed, e.g. after a Redis restart
    or its idle `timeout`, or a master that Sentinel replaced). Timeouts are not retried here:
    `RedisGcra` decides whether to ask again with a longer timeout or fall back. `password`
    (rate_limit.redis_password) is used verbatim, so it needs no percent-encoding; config
    validation refuses it when the URL has a password too.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }
    if password is not None:
        options["password"] = password
    if urllib.parse.urlsplit(url).scheme.lower() in SENTINEL_SCHEMES:
        return sentinel_client(url, **options)
    return aioredis.Redis.from_url(url, **options)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """(sentinel host/port pairs, master name, db) of a `redis+sentinel://` URL.

    Raises ValueError with a message that does not repeat the URL (it may hold a password).
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    sentinels: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("redis+sentinel URL: expected host:port[,host:port...] of sentinels")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("redis+sentinel URL: expected /<master name>[/<db>] after the hosts")
    return sentinels, path[0], int(path[1]) if len(path) == 2 else 0


def sentinel_client(url: str, **options: Any) -> aioredis.Redis:
    """The master of a Sentinel-managed Redis, for `redis+sentinel://` URLs.

    Form: `redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/<master>[/<db>]`,
    `rediss+sentinel://` for TLS to the master. The password (and user) authenticate to the
    master; the sentinels are asked without one unless the query says `sentinel_auth=yes`.
    redis-py's Sentinel pool looks the master up for every new connection and drops its
    connections when the master changes, so the limiter follows a failover: the requests in
    between fail, the limiter falls back to its local share, and the probe finds the new master.
    """
    parts = urllib.parse.urlsplit(url)
    sentinels, master_name, db = parse_sentinel_url(url)
    query = urllib.parse.parse_qs(parts.query)
    auth: dict[str, Any] = {}
    if parts.username:
        auth["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        auth["password"] = urllib.parse.unquote(parts.password)
    if "password" in options:  # rate_limit.redis_password
        auth["password"] = options.pop("password")
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    if query.get("sentinel_auth", ["no"])[0].lower() in ("yes", "true", "1"):
        sentinel_kwargs.update(auth)
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master: aioredis.Redis = sentinel.master_for(
        master_name,
        db=db,
        ssl=parts.scheme.lower().startswith("rediss"),
        **auth,
        **options,
    )
    return master


class RedisGcra:
    """Reservation GCRA shared through Redis at `qps` requests/s per key.

    `client` answers within a short timeout; when it times out, the same call is made once
    more on `patient` (the same server, a longer timeout) before the error counts: a single
    slow answer (a busy machine, a fork for a snapshot) is not an outage. The first attempt
    may have reserved a slot that nobody uses: the budget is under-used, never exceeded.
    """

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        qps: float,
        burst: int = 1,
        key_prefix: str = KEY_PREFIX,
        patient: aioredis.Redis | None = None,
    ) -> None:
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self._client = client
        self._patient = patient
        self._interval_us = 1e6 / qps
        self._tolerance_us = (burst - 1) * self._interval_us
        self._prefix = key_prefix
        self._script = client.register_script(GCRA_LUA)
        self._patient_script = patient.register_script(GCRA_LUA) if patient else None
        self.slow_retries = 0

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def clients(self) -> list[aioredis.Redis]:
        return [c for c in (self._client, self._patient) if c is not None]

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def load(self) -> None:
        """Connect and load the script (`SCRIPT LOAD`), on the patient client if there is one.

        Raises `RedisUnavailable` when Redis does not answer or refuses (wrong password).
        """
        client = self._patient or self._client
        try:
            await client.script_load(GCRA_LUA)
            if self._patient is not None:
                await self._client.ping()  # open the fast pool's first connection too
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def reserve(self, key: str, cost: int = 1) -> float:
        """Reserve `cost` consecutive slots of `key`; return seconds until the first one.

        `cost=0` reserves nothing and only reports the wait (a probe). Raises
        `RedisUnavailable` on any Redis or socket error, including a timeout of the retry.
        """
        args: list[Any] = [repr(self._interval_us), repr(self._tolerance_us), str(max(cost, 0))]
        keys = [self.redis_key(key)]
        try:
            try:
                raw = await self._script(keys=keys, args=args)
            except (RedisTimeoutError, TimeoutError):
                if self._patient_script is None:
                    raise
                self.slow_retries += 1
                raw = await self._patient_script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            wait_us = int(raw)
        except (TypeError, ValueError) as exc:
            raise RedisUnavailable(f"unexpected script reply {raw!r}") from exc
        if wait_us < 0:
            raise RedisUnavailable(f"unexpected script reply {raw!r}")
        return wait_us / 1e6

    async def aclose(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.aclose()
