"""Every librdkafka client configuration the worker builds, from `kafka.bootstrap_servers` and
the user's `kafka.client` properties (security.protocol, sasl.*, ssl.*, ...).

One rule for all of them: defaults, then the user's properties that apply to the client kind,
then the settings the client's job depends on (user properties cannot override those).
- `consumer_settings`: the worker's group member (at-least-once: no auto commit, no auto
  offset store, cooperative-sticky).
- `reader_settings`: a consumer that never joins its group (dlq inspect/redrive, reading a
  group's committed offsets for the lag metric and the redrive ledger).
- `producer_settings`: the dead-letter and retry-topic producers (idempotent, acks=all).
- `admin_settings`: AdminClient (lag watermarks, listing redrive groups).
- `preflight_settings`: the start-up check, with every user property, so that a property
  librdkafka refuses is a configuration error before anything else starts.
Producers and admin clients get no consumer-only property (librdkafka warns about each).
`client.id` is the user's (default `tiktok-worker`) plus a suffix naming the client's job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

TopicPartitionKey = tuple[str, int]

CLIENT_ID: Final = "tiktok-worker"
STATS_INTERVAL_MS: Final = 5000
# librdkafka refuses to produce anything over `message.max.bytes` (default 1 MB), but a
# dead letter carries the original message, which may be larger when the source topic allows
# it. Let the broker (the dead-letter topic's max.message.bytes) be the judge instead.
DEFAULT_MESSAGE_MAX_BYTES: Final = 64 * 1024 * 1024
# Kubernetes defaults: a pod killed with -9 (an OOM kill) has its partitions moved after about
# 10 s instead of librdkafka's 45 s; heartbeats at a third of it, as Kafka recommends. With
# static membership (`group.instance.id`, see docs/configuration.md) a restarted pod that is
# back within the session timeout gets its partitions back without a rebalance.
SESSION_TIMEOUT_MS: Final = 10000
HEARTBEAT_INTERVAL_MS: Final = 3000

_CONSUMER_DEFAULTS: Final[dict[str, Any]] = {
    "statistics.interval.ms": STATS_INTERVAL_MS,
    "max.poll.interval.ms": 300000,
    "session.timeout.ms": SESSION_TIMEOUT_MS,
    "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
    # librdkafka pre-fetches up to 64 MiB by default; 16 MiB keeps a pod's memory low
    # without slowing consumption (the pipeline, not the fetch, is the bottleneck).
    "queued.max.messages.kbytes": 16384,
    # With the smaller queue librdkafka backs off 1 s whenever it fills; 20 ms keeps
    # fetching close behind consumption (measured by `make bench`).
    "fetch.queue.backoff.ms": 20,
}
# Settings at-least-once depends on; user properties cannot override them.
_CONSUMER_FORCED: Final[dict[str, Any]] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "partition.assignment.strategy": "cooperative-sticky",
}
# A reader commits nothing by itself and reports partition ends (it reads to a watermark).
_READER_FORCED: Final[dict[str, Any]] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": True,
}
# Producer settings the dead-letter path relies on; user properties cannot weaken them.
_PRODUCER_FORCED: Final[dict[str, Any]] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
    "message.timeout.ms": 60000,
}
# Client properties only a consumer understands.
_CONSUMER_ONLY_PREFIXES: Final = (
    "group.",
    "fetch.",
    "auto.",
    "enable.auto.",
    "queued.",
    "partition.assignment",
    "coordinator.",
)
_CONSUMER_ONLY_KEYS: Final = frozenset(
    {
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "max.partition.fetch.bytes",
        "offset.store.method",
        "consume.callback.max.messages",
        "statistics.interval.ms",  # the consumer sets its own; nothing else reads statistics
    }
)


def is_consumer_only(key: str) -> bool:
    return key.startswith(_CONSUMER_ONLY_PREFIXES) or key in _CONSUMER_ONLY_KEYS


def consumer_settings(
    *,
    bootstrap_servers: str,
    group_id: str,
    client: Mapping[str, Any],
    start_from: str = "earliest",
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """The worker's group consumer: defaults, the user's properties, then the forced ones.
    `start_from` (kafka.start_from) is where a group without a committed offset begins."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    conf.update({"group.id": group_id, "auto.offset.reset": start_from, "client.id": CLIENT_ID})
    conf.update(_CONSUMER_DEFAULTS)
    conf.update(client)
    conf.update(_CONSUMER_FORCED)
    return _with_logger(conf, logger)


def reader_settings(
    *,
    bootstrap_servers: str,
    group_id: str,
    client: Mapping[str, Any],
    job: str,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """A consumer that reads with `group_id`'s offsets but never joins or auto-commits it."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    conf.update(client)
    conf.update(_READER_FORCED)
    conf.update({"group.id": group_id, "client.id": _client_id(client, job)})
    return _with_logger(conf, logger)


def producer_settings(
    *,
    bootstrap_servers: str,
    client: Mapping[str, Any],
    logger: logging.Logger | None = None,
    job: str = "dlq",
) -> dict[str, Any]:
    """The dead-letter and retry-topic producers (`job`: dlq, retry, preflight): the user's
    client properties, then the safe ones."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    conf["message.max.bytes"] = DEFAULT_MESSAGE_MAX_BYTES
    conf.update(_shared(client))
    conf.update(_PRODUCER_FORCED)
    conf["client.id"] = _client_id(client, job)
    return _with_logger(conf, logger)


def admin_settings(
    *,
    bootstrap_servers: str,
    client: Mapping[str, Any],
    job: str,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """An AdminClient: the user's client properties (security, ...) minus consumer ones."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    conf.update(_shared(client))
    conf["client.id"] = _client_id(client, job)
    return _with_logger(conf, logger)


def preflight_settings(
    *, bootstrap_servers: str, client: Mapping[str, Any], logger: logging.Logger | None = None
) -> dict[str, Any]:
    """The start-up check's AdminClient, with every user property (so each one is validated)."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    conf.update(client)
    return _with_logger(conf, logger)


def _with_logger(conf: dict[str, Any], logger: logging.Logger | None) -> dict[str, Any]:
    """librdkafka's own log lines go to `logger` (JSON, see `kafka_logger`) when one is given."""
    if logger is not None:
        conf["logger"] = logger
    return conf


def _shared(client: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in client.items() if not is_consumer_only(k)}


def _client_id(client: Mapping[str, Any], job: str) -> str:
    return f"{client.get('client.id', CLIENT_ID)}-{job}"
