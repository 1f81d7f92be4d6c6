"""The dead-letter producer: the original message, byte for byte, with headers saying why.

A dead letter too large for the dead-letter topic is written reference-only: the same headers
plus `dlq.value_omitted` (the original size in bytes), no value, so a group never crash-loops
on it; the `dlq.original.*` headers find the source record.

Records are produced with an idempotent producer and ``acks=all``. A record counts as written
only when the broker acknowledges it (the delivery report); only then may the message's offset
be finished. When the broker refuses a dead letter the worker must stop rather than go on
(``on_fatal``): dead-lettering is the last place an event can go.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Final

from worker.core.vocabulary import DeadLetterReason
from worker.kafka.acked import AckedProducer, omitted_headers, short_key
from worker.observability.metrics import Metrics

__all__ = [
    "HEADER_PREFIX",
    "REDRIVE_COUNT_HEADER",
    "DeadLetter",
    "DeadLetterProducer",
]

HEADER_PREFIX: Final = "dlq."
# Header of letters written back by `dlq redrive` (without the prefix).
REDRIVE_COUNT_HEADER: Final = "redrive.count"


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
        "value_omitted",
    )

    def __init__(
        self,
        *,
        reason: DeadLetterReason,
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
        value_omitted: int | None = None,
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
        # Set on a reference-only letter: the size of the original value left out.
        self.value_omitted = value_omitted

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
        if self.value_omitted is not None:
            items.append(("value_omitted", str(self.value_omitted)))
        return [(HEADER_PREFIX + k, v.encode()) for k, v in items]


class DeadLetterProducer(AckedProducer):
    """Writes dead letters; a letter too large for the topic becomes a reference-only one."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        topic: str,
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None],
        producer: Any | None = None,
    ) -> None:
        super().__init__(
            config=config,
            topic=topic,
            what="dead-letter topic",
            on_fatal=on_fatal,
            producer=producer,
        )
        self._metrics = metrics

    def send(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        letter: DeadLetter,
        on_written: Callable[[], None],
    ) -> None:
        """Produce one dead letter; ``on_written`` runs once the broker has acknowledged it."""

        def written() -> None:
            self._metrics.dead_letters.labels(
                reason=letter.reason, destination=letter.destination or ""
            ).inc()
            on_written()

        def reference_only() -> None:
            # The provenance headers find the source record; the value stays behind.
            headers = letter.headers()
            if letter.value_omitted is None:
                headers += omitted_headers(HEADER_PREFIX, value)
            self._produce(value=None, key=short_key(key), headers=headers, on_written=written)

        self._produce(
            value=value,
            key=key,
            headers=letter.headers(),
            on_written=written,
            on_too_large=reference_only,
        )
