"""The dead-letter producer: the original message, byte for byte, with headers saying why.

Records are produced with an idempotent producer and ``acks=all``. A record counts as written
only when the broker acknowledges it (the delivery report); only then may the message's offset
be finished. When the broker refuses a dead letter the worker must stop rather than go on
(``on_fatal``): dead-lettering is the last place an event can go.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer

from worker.errors import DeadLetterUnavailable
from worker.observability.metrics import Metrics

HEADER_PREFIX: Final = "dlq."
REDRIVE_COUNT_HEADER: Final = "redrive.count"
POLL_INTERVAL_S: Final = 0.02
# librdkafka refuses to produce anything over `message.max.bytes` (default 1 MB), but a
# dead letter carries the original message, which may be larger when the source topic allows
# it. Let the broker (the dead-letter topic's max.message.bytes) be the judge instead.
DEFAULT_MESSAGE_MAX_BYTES: Final = 64 * 1024 * 1024

# Producer settings the worker relies on; user properties cannot weaken them.
_SAFE_PRODUCER_SETTINGS: Final[dict[str, Any]] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
    "message.timeout.ms": 60000,
}


class DeadLetter:
    """What is known about one dead letter besides its bytes."""

    __slots__ = (
        "attempts",
        "batch_index",
        "code",
        "destination",
        "error",
        "original_offset",
        "original_partition",
        "original_timestamp_ms",
        "original_topic",
        "reason",
        "redrive_count",
    )

    def __init__(
        self,
        *,
        reason: str,
        error: str,
        original_topic: str,
        original_partition: int,
        original_offset: int,
        original_timestamp_ms: int | None,
        destination: str | None = None,
        code: int | None = None,
        attempts: int = 0,
        batch_index: int | None = None,
        redrive_count: int | None = None,
    ) -> None:
        self.reason = reason
        self.error = error
        self.original_topic = original_topic
        self.original_partition = original_partition
        self.original_offset = original_offset
        self.original_timestamp_ms = original_timestamp_ms
        self.destination = destination
        self.code = code
        self.attempts = attempts
        self.batch_index = batch_index
        # Set only on letters written back by `dlq redrive` (header `dlq.redrive.count`).
        self.redrive_count = redrive_count

    def headers(self, *, now: dt.datetime | None = None) -> list[tuple[str, str | bytes | None]]:
        """The SPEC §4 header set, in a stable order."""
        failed_at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="milliseconds")
        ts = self.original_timestamp_ms
        items: list[tuple[str, str]] = [
            ("reason", self.reason),
            ("error", self.error[:500]),
            ("original.topic", self.original_topic),
            ("original.partition", str(self.original_partition)),
            ("original.offset", str(self.original_offset)),
            ("original.timestamp", "" if ts is None else str(ts)),
            ("destination", self.destination or ""),
        ]
        if self.code is not None:
            items.append(("tiktok.code", str(self.code)))
        items.append(("attempts", str(self.attempts)))
        items.append(("failed_at", failed_at.replace("+00:00", "Z")))
        if self.batch_index is not None:
            items.append(("batch_index", str(self.batch_index)))
        if self.redrive_count is not None:
            items.append((REDRIVE_COUNT_HEADER, str(self.redrive_count)))
        return [(HEADER_PREFIX + k, v.encode()) for k, v in items]


def producer_config(bootstrap_servers: str, client: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka producer settings: the user's client properties, then the safe ones."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "message.max.bytes": DEFAULT_MESSAGE_MAX_BYTES,
    }
    conf.update({k: v for k, v in client.items() if not _consumer_only(k)})
    conf.update(_SAFE_PRODUCER_SETTINGS)
    conf["client.id"] = str(client.get("client.id", "tiktok-worker")) + "-dlq"
    return conf


def _consumer_only(key: str) -> bool:
    return key.startswith(("group.", "auto.offset", "enable.auto", "partition.assignment")) or (
        key
        in {
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "max.poll.interval.ms",
            "fetch.min.bytes",
            "isolation.level",
        }
    )


class DeadLetterProducer:
    """Writes dead letters and reports each broker acknowledgement on the event loop."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None],
        producer: Any | None = None,
    ) -> None:
        self.topic = topic
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._producer = producer if producer is not None else Producer(config)
        self._pending = 0
        self._failed = False
        self._poller: asyncio.Task[None] | None = None

    def send(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        letter: DeadLetter,
        on_written: Callable[[], None],
    ) -> None:
        """Produce one dead letter; ``on_written`` runs once the broker has acknowledged it."""

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            self._pending -= 1
            if err is not None:
                self._failed = True
                self._on_fatal(
                    DeadLetterUnavailable(
                        f"cannot write to dead-letter topic {self.topic!r}: {err.str()}"
                    )
                )
                return
            self._metrics.dead_letters.labels(
                reason=letter.reason, destination=letter.destination or ""
            ).inc()
            on_written()

        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=letter.headers(),
                    on_delivery=delivered,
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then try again.
                self._producer.poll(0.05)
            except KafkaException as exc:
                # Refused before sending (e.g. over message.max.bytes): like a refusal by the
                # broker, the worker must stop rather than finish this message. Raising here
                # instead would abandon the rest of the consumed batch mid-way.
                self._failed = True
                self._on_fatal(
                    DeadLetterUnavailable(
                        f"cannot write to dead-letter topic {self.topic!r}: {exc.args[0].str()}"
                    )
                )
                return
        self._pending += 1

    @property
    def pending(self) -> int:
        return self._pending

    def poll(self) -> None:
        """Serve delivery reports; callbacks run on the calling (event-loop) thread."""
        self._producer.poll(0)

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_INTERVAL_S)

    async def wait_acknowledged(self, timeout_s: float) -> bool:
        """Wait until every produced dead letter is acknowledged (or failed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._pending and loop.time() < deadline:
            self.poll()
            await asyncio.sleep(POLL_INTERVAL_S)
        return self._pending == 0

    async def close(self, timeout_s: float = 10.0) -> None:
        await self.wait_acknowledged(timeout_s)
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._producer.flush(0)
