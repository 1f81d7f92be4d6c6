"""Producing records whose broker acknowledgement finishes work: dead letters, parked events.

Records are produced with an idempotent producer and ``acks=all``. A record counts as written
only when the broker acknowledges it (the delivery report); only then may the source offset be
finished. Delivery reports are served on the event loop (`start` polls every 20 ms), so the
callbacks run there too.

A record too large for its topic (the broker's or the client's size limit) is not a reason to
stop: the caller's `on_too_large` writes a reference-only record instead (headers and
provenance, no value). Any other refusal is fatal (`on_fatal`): these topics are where an event
goes when it cannot go anywhere else, so the worker stops rather than lose it.

The librdkafka settings are `worker.kafka.settings.producer_settings`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer

from worker.errors import DeadLetterUnavailable

POLL_INTERVAL_S: Final = 0.02

Headers = Sequence[tuple[str, str | bytes | None]]


def too_large(err: KafkaError) -> bool:
    return err.code() == KafkaError.MSG_SIZE_TOO_LARGE


class AckedProducer:
    """Produces records and reports each broker acknowledgement on the event loop."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        what: str,
        on_fatal: Callable[[BaseException], None],
        producer: Any | None = None,
    ) -> None:
        self.topic = topic
        self._what = what  # "dead-letter topic", "retry topic": for the one-line error
        self._on_fatal = on_fatal
        self._producer = producer if producer is not None else Producer(config)
        self._pending = 0
        self._failed = False
        self._poller: asyncio.Task[None] | None = None

    def _produce(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Headers,
        on_written: Callable[[], None],
        on_too_large: Callable[[], None] | None = None,
        partition: int | None = None,
    ) -> None:
        """Produce one record; `on_written` runs once the broker has acknowledged it."""

        def refused(text: str) -> None:
            self._failed = True
            self._on_fatal(
                DeadLetterUnavailable(f"cannot write to {self._what} {self.topic!r}: {text}")
            )

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            self._pending -= 1
            if err is None:
                on_written()
            elif on_too_large is not None and too_large(err):
                on_too_large()
            else:
                refused(err.str())

        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=headers if isinstance(headers, list) else list(headers),
                    on_delivery=delivered,
                    **extra,
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then try again.
                self._producer.poll(0.05)
            except KafkaException as exc:
                # Refused before sending (e.g. over message.max.bytes). Raising here instead
                # would abandon the rest of the consumed batch mid-way.
                err = exc.args[0]
                if on_too_large is not None and too_large(err):
                    on_too_large()
                else:
                    refused(err.str())
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
        """Wait until every produced record is acknowledged (or failed)."""
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


# A key longer than this is left out of a reference-only record too (it may be the culprit).
MAX_REFERENCE_KEY_BYTES: Final = 1024


def omitted_headers(prefix: str, value: bytes | None) -> list[tuple[str, bytes]]:
    """The header that marks a reference-only record: the size of the value left out."""
    return [(prefix + "value_omitted", str(len(value or b"")).encode())]


def short_key(key: bytes | None) -> bytes | None:
    return key if key is None or len(key) <= MAX_REFERENCE_KEY_BYTES else None
