"""Consumer lag per held partition, measured by asking Kafka: high watermark - committed offset.

Why not librdkafka's statistics (`consumer_lag`)? Checked against a real broker: they report
nothing (-1) until the group has committed a partition, so a new group with a backlog shows no
lag at all; and a paused partition stops fetching, so its high watermark freezes and the lag
is under-reported exactly when backpressure says the worker is behind.

`LagMonitor` asks the brokers every `interval_s` with its own AdminClient, batched: ListOffsets
(earliest and latest) and the group's OffsetFetch, for the partitions this worker currently
holds. The OffsetFetch goes through a consumer of its own that never subscribes (so it never
joins the group): librdkafka 2.16's AdminClient `list_consumer_group_offsets` aborts the
whole process (`rd_kafka_enq_once_del_source_return` assertion) when the broker goes away
while a request is pending, which the chaos suite hit on broker restarts. Per partition:

    lag = latest - clamp(committed, earliest, latest)
    no committed offset: latest - earliest when `auto.offset.reset` is earliest (the worker's
    default: every retained message is still to be read), 0 when it is latest.

Series of partitions this worker no longer holds are removed, so summing over pods counts each
partition once (a partition moving between pods can briefly appear on both; the dashboard takes
`max by (topic, partition)`). While Kafka cannot be reached the last values stay.

Nothing here blocks: admin calls return futures, awaited on the event loop with a timeout; the
consumer thread is never involved, so a slow or unreachable broker cannot stall consumption or
liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Final

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from prometheus_client import Gauge

from worker.kafka.settings import TopicPartitionKey, admin_settings, reader_settings
from worker.observability.logs import Logger
from worker.observability.metrics import Metrics

DEFAULT_INTERVAL_S: Final = 5.0
_LATEST: Final = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_EARLIEST: Final = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST_RESETS: Final = frozenset({"latest", "largest", "end"})


def compute_lag(*, latest: int, earliest: int, committed: int | None, reset_to_latest: bool) -> int:
    """Messages of one partition still to be processed by the group (never negative)."""
    if committed is None or committed < 0:
        return 0 if reset_to_latest else max(0, latest - earliest)
    return max(0, latest - min(max(committed, earliest), latest))


class LagMonitor:
    """Keeps `tiktok_worker_consumer_lag_messages{topic,partition}` current for held partitions.

    `partitions()` returns the partitions this worker holds now (callable from the event loop).
    `admin` is a confluent_kafka AdminClient (or a stand-in with `list_offsets`,
    `list_consumer_group_offsets` and `poll`). `offsets_reader`, when given, is a consumer
    that never subscribes (or a stand-in with a blocking `committed(partitions, timeout)`);
    it then reads the group's committed offsets instead of the admin client.
    """

    def __init__(
        self,
        *,
        admin: Any,
        group_id: str,
        partitions: Callable[[], Iterable[TopicPartitionKey]],
        metrics: Metrics,
        log: Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float | None = None,
        reset_to_latest: bool = False,
        read_committed: bool = True,
        offsets_reader: Any | None = None,
        gauge: Gauge | None = None,
    ) -> None:
        self._admin = admin
        self._offsets_reader = offsets_reader
        self._group_id = group_id
        self._partitions = partitions
        # The retry intake's monitor reports into `parked_backlog` instead (see the app).
        self._gauge = gauge if gauge is not None else metrics.consumer_lag
        self._log = log
        self._interval_s = interval_s
        self._timeout_s = timeout_s if timeout_s is not None else max(interval_s, 5.0)
        self._reset_to_latest = reset_to_latest
        self._isolation = (
            IsolationLevel.READ_COMMITTED if read_committed else IsolationLevel.READ_UNCOMMITTED
        )
        self._reported: set[TopicPartitionKey] = set()
        self._failing = False

    @classmethod
    def for_consumer(
        cls,
        *,
        bootstrap_servers: str,
        group_id: str,
        client: Mapping[str, Any],
        partitions: Callable[[], Iterable[TopicPartitionKey]],
        metrics: Metrics,
        log: Logger,
        logger: logging.Logger | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        gauge: Gauge | None = None,
        start_from: str = "earliest",
    ) -> LagMonitor:
        """A monitor whose reset and isolation rules match a consumer built from `client`
        and `start_from` (kafka.start_from)."""
        reset = start_from
        isolation = str(client.get("isolation.level", "read_committed")).lower()
        admin = AdminClient(
            admin_settings(
                bootstrap_servers=bootstrap_servers, client=client, job="lag", logger=logger
            )
        )
        reader = Consumer(
            reader_settings(
                bootstrap_servers=bootstrap_servers,
                group_id=group_id,
                client=client,
                job="lag-offsets",
                logger=logger,
            )
        )
        return cls(
            admin=admin,
            offsets_reader=reader,
            group_id=group_id,
            partitions=partitions,
            metrics=metrics,
            log=log,
            interval_s=interval_s,
            reset_to_latest=reset in _LATEST_RESETS,
            read_committed=isolation != "read_uncommitted",
            gauge=gauge,
        )

    async def run(self) -> None:
        """Measure every `interval_s` until cancelled."""
        while True:
            try:
                await self.measure_once()
            except Exception as exc:  # a metric must never take the worker down
                self._report_failure(exc)
            await asyncio.sleep(self._interval_s)

    async def measure_once(self) -> dict[TopicPartitionKey, int]:
        """One measurement; returns the lag set per partition (empty when Kafka did not answer)."""
        self._admin.poll(0)  # serve the admin client's log callbacks
        keys = sorted(set(self._partitions()))
        self._forget_unheld(set(keys))
        if not keys:
            return {}
        try:
            latest, earliest, committed = await asyncio.wait_for(
                asyncio.gather(
                    self._list_offsets(keys, _LATEST),
                    self._list_offsets(keys, _EARLIEST),
                    self._committed(keys),
                ),
                self._timeout_s + 1.0,
            )
        except (KafkaException, TimeoutError) as exc:
            self._report_failure(exc)
            return {}
        if self._failing:
            self._failing = False
            self._log.info("consumer lag measured again")
        held = set(self._partitions())  # a rebalance may have happened meanwhile
        result: dict[TopicPartitionKey, int] = {}
        for key in keys:
            if key not in held or key not in latest or key not in earliest:
                continue
            lag = compute_lag(
                latest=latest[key],
                earliest=earliest[key],
                committed=committed.get(key),
                reset_to_latest=self._reset_to_latest,
            )
            self._gauge.labels(topic=key[0], partition=str(key[1])).set(lag)
            self._reported.add(key)
            result[key] = lag
        self._forget_unheld(held)
        return result

    def _forget_unheld(self, held: set[TopicPartitionKey]) -> None:
        for key in self._reported - held:
            with contextlib.suppress(KeyError):  # the consumer may have removed it already
                self._gauge.remove(key[0], str(key[1]))
            self._reported.discard(key)

    def _report_failure(self, exc: BaseException) -> None:
        detail = str(exc.args[0]) if isinstance(exc, KafkaException) and exc.args else repr(exc)
        if not self._failing:
            self._failing = True
            self._log.warning("consumer lag unavailable", error=detail)

    async def _list_offsets(
        self, keys: list[TopicPartitionKey], spec: OffsetSpec
    ) -> dict[TopicPartitionKey, int]:
        futures: dict[TopicPartition, Future[Any]] = self._admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in keys},
            isolation_level=self._isolation,
            request_timeout=self._timeout_s,
        )
        result: dict[TopicPartitionKey, int] = {}
        for tp, future in futures.items():
            try:
                info = await asyncio.wrap_future(future)
            except KafkaException:
                continue  # e.g. no leader right now: skip this partition this round
            if info.offset >= 0:
                result[(tp.topic, tp.partition)] = int(info.offset)
        if keys and not result:
            raise KafkaException("ListOffsets answered for no partition")
        return result

    async def _committed(self, keys: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        tps = [TopicPartition(t, p) for t, p in keys]
        if self._offsets_reader is not None:
            reader = self._offsets_reader
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                None, lambda: reader.committed(tps, timeout=self._timeout_s)
            )
            return {
                (tp.topic, tp.partition): int(tp.offset)
                for tp in found
                if tp.error is None and tp.offset >= 0
            }
        request = ConsumerGroupTopicPartitions(self._group_id, tps)
        futures: dict[str, Future[Any]] = self._admin.list_consumer_group_offsets(
            [request], request_timeout=self._timeout_s
        )
        answer = await asyncio.wrap_future(futures[self._group_id])
        return {
            (tp.topic, tp.partition): int(tp.offset)
            for tp in answer.topic_partitions or []
            if tp.error is None and tp.offset >= 0
        }
