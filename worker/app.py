"""Wiring and lifecycle of `tiktok-worker run`.

Construction runs one way: fatal latch, pause switches and offset ledgers first (plain state
that everything reports to), then TikTok client → rate limiter → sender → dead-letter and
retry producers → parker → pipeline and retry intake → their consumer threads. Nothing is
wired in after construction.

Two consumers: the pipeline's on the source topics (group `kafka.group_id`) and the retry
intake's on `kafka.retry_topic` (group `<group_id>.retry`), each with its own ledger, pause
switch and committer, sharing the sender (lanes, circuits, rate limiter).

Start: check Kafka, the dead-letter topic and the retry topic (one-line errors, no hang), then
start the operations server, the producers, the consumer threads and the periodic committers.
Stop (SIGTERM/SIGINT, or a fatal error): the consumer thread stops consuming and closes the
consumer, which revokes its partitions; the pipeline drains them within ``drain_timeout_s`` and
what finished is committed (nothing after a fatal error). Every resource is closed through one
``AsyncExitStack``, on every path. Exit status 0 after a requested stop, 1 after a fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from worker.config import Config, liveness_timeout_s, secret_values
from worker.core.redaction import register_secrets
from worker.delivery.factory import build_delivery
from worker.errors import FatalLatch, WorkerError
from worker.kafka.consumer import ConsumerThread, PauseSwitch
from worker.kafka.deadletters import DeadLetterProducer
from worker.kafka.lag import LagMonitor
from worker.kafka.offsets import OffsetLedger
from worker.kafka.parking import RetryProducer, retry_group_id
from worker.kafka.preflight import preflight
from worker.kafka.security import client_properties
from worker.kafka.settings import consumer_settings, producer_settings
from worker.mapping.mapper import Mapper
from worker.observability.health import HealthServer, liveness_check
from worker.observability.logs import Logger, kafka_logger
from worker.observability.metrics import Metrics
from worker.pipeline.parker import Parker, ParkingRules
from worker.pipeline.pipeline import SHED_AFTER_S, Pipeline
from worker.pipeline.retries import RetryIntake

SHUTDOWN_MARGIN_S = 10.0


async def run_worker(config: Config, *, log: Logger, metrics: Metrics | None = None) -> int:
    """Run until SIGTERM/SIGINT or a fatal error; returns the exit status."""
    register_secrets(secret_values(config))
    kafka = config.kafka
    # One set of connection properties (security included) for every client below.
    client = client_properties(kafka)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: preflight(config, client, log, retry_topic=True))
    metrics = metrics if metrics is not None else Metrics()
    metrics.describe_destinations({d.name: d.event_source for d in config.destinations})
    stop = asyncio.Event()
    fatal = FatalLatch()
    fatal_event = asyncio.Event()
    fatal.subscribe(lambda _exc: fatal_event.set())
    pause = PauseSwitch()
    ledger = OffsetLedger()
    retry_pause = PauseSwitch()
    retry_ledger = OffsetLedger()

    async with contextlib.AsyncExitStack() as stack:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        delivery = build_delivery(
            config, metrics=metrics, log=log, on_crash=fatal.trip, parking=True
        )
        stack.push_async_callback(delivery.close)
        dead_letters = DeadLetterProducer(
            config=producer_settings(
                bootstrap_servers=kafka.bootstrap_servers,
                client=client,
                logger=kafka_logger(),
            ),
            topic=kafka.dead_letter_topic,
            metrics=metrics,
            on_fatal=fatal.trip,
        )
        stack.push_async_callback(dead_letters.close)
        retry_producer = RetryProducer(
            config=producer_settings(
                bootstrap_servers=kafka.bootstrap_servers,
                client=client,
                logger=kafka_logger(),
                job="retry",
            ),
            topic=kafka.retry_topic,
            metrics=metrics,
            on_fatal=fatal.trip,
            destinations=[d.name for d in config.destinations],
        )
        stack.push_async_callback(retry_producer.close)
        await loop.run_in_executor(None, retry_producer.learn_partitions)
        retry = config.tiktok.retry
        parker = Parker(
            retry=retry_producer,
            dead_letters=dead_letters,
            rules=ParkingRules(
                deadline_s=retry.deadline_s,
                initial_backoff_s=retry.initial_backoff_s,
                max_backoff_s=retry.max_backoff_s,
            ),
            log=log,
        )
        mapper = Mapper(config)
        pipeline = Pipeline(
            mapper=mapper,
            sender=delivery.sender,
            dead_letters=dead_letters,
            ledger=ledger,
            pause=pause,
            fatal=fatal,
            metrics=metrics,
            log=log,
            max_inflight_messages=kafka.max_inflight_messages,
            drain_timeout_s=kafka.drain_timeout_s,
            parker=parker,
            shed_after_s=SHED_AFTER_S,
        )
        intake = RetryIntake(
            mapper=mapper,
            sender=delivery.sender,
            dead_letters=dead_letters,
            parker=parker,
            destinations=[d.name for d in config.destinations],
            ledger=retry_ledger,
            pause=retry_pause,
            fatal=fatal,
            metrics=metrics,
            log=log,
            max_inflight_messages=kafka.max_inflight_messages,
            drain_timeout_s=kafka.drain_timeout_s,
            layout=retry_producer.layout,
            probe_events=config.tiktok.max_batch_events,
        )
        stack.push_async_callback(intake.close)
        consumer = ConsumerThread(
            config=consumer_settings(
                bootstrap_servers=kafka.bootstrap_servers,
                group_id=kafka.group_id,
                client=client,
                start_from=kafka.start_from,
                logger=kafka_logger(),
            ),
            topics=kafka.topics,
            loop=loop,
            sink=pipeline,
            metrics=metrics,
            log=log,
            drain_timeout_s=kafka.drain_timeout_s,
            pause=pause,
            defer_while=delivery.sender.requests_ready,
            on_share=delivery.limiter.set_share,
        )
        retry_consumer = ConsumerThread(
            config={
                **consumer_settings(
                    bootstrap_servers=kafka.bootstrap_servers,
                    group_id=retry_group_id(kafka.group_id),
                    client=client,
                    logger=kafka_logger(),
                ),
                "client.id": str(client.get("client.id", "tiktok-worker")) + "-retry",
                # Parked records are never skipped, whatever kafka.start_from says.
                "auto.offset.reset": "earliest",
            },
            topics=[kafka.retry_topic],
            loop=loop,
            sink=intake,
            metrics=metrics,
            log=log.bind(consumer="retry"),
            drain_timeout_s=kafka.drain_timeout_s,
            pause=retry_pause,
            source_gauges=False,
        )
        intake.attach(retry_consumer)
        retry_lag = LagMonitor.for_consumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=retry_group_id(kafka.group_id),
            client=client,
            partitions=retry_consumer.assignment,
            metrics=metrics,
            log=log,
            logger=kafka_logger(),
            gauge=metrics.parked_backlog,
        )
        lag = LagMonitor.for_consumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=kafka.group_id,
            client=client,
            start_from=kafka.start_from,
            partitions=consumer.assignment,
            metrics=metrics,
            log=log,
            logger=kafka_logger(),
        )

        def ready() -> tuple[bool, str]:
            if stop.is_set() or fatal.error is not None:
                return False, "stopping"
            if not delivery.limiter.ready:
                return False, "connecting to the rate-limit store"
            if not consumer.alive or not retry_consumer.alive:
                return False, "consumer not running"
            if consumer.brokers_down:
                return False, "all Kafka brokers down"
            return True, "ok"

        health = HealthServer(
            host=config.http.host,
            port=config.http.port,
            registry=metrics.registry,
            live=liveness_check(
                heartbeat=lambda: consumer.heartbeat, timeout_s=liveness_timeout_s(config)
            ),
            ready=ready,
        )
        await health.start()
        stack.push_async_callback(health.stop)
        # The shared rate limit first: work taken before it is connected would be sent unshared.
        limiter_start = loop.create_task(delivery.limiter.start())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait([limiter_start, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not limiter_start.done():  # SIGTERM while connecting: nothing was taken yet
            await _cancel(limiter_start)
            log.info("worker stopped", messages=0)
            return 0
        limiter_start.result()
        dead_letters.start()
        retry_producer.start()

        def commit_failed(exc: Exception) -> None:
            log.warning("commit failed", error=str(exc))

        committer = loop.create_task(
            ledger.commit_every(kafka.commit_interval_s, consumer.commit, commit_failed)
        )
        stack.push_async_callback(_cancel, committer)
        retry_committer = loop.create_task(
            retry_ledger.commit_every(kafka.commit_interval_s, retry_consumer.commit, commit_failed)
        )
        stack.push_async_callback(_cancel, retry_committer)
        for monitor in (lag, retry_lag):
            stack.push_async_callback(_cancel, loop.create_task(monitor.run()))
        consumer.start()
        retry_consumer.start()
        closed = loop.run_in_executor(None, consumer.closed.wait)
        retry_closed = loop.run_in_executor(None, retry_consumer.closed.wait)
        # Closing the consumers drains and commits through the pipeline and the intake: that
        # runs first, both at once (each drain is bounded by drain_timeout_s).
        stack.push_async_callback(
            _stop_consumers,
            [(consumer, closed), (retry_consumer, retry_closed)],
            kafka.drain_timeout_s,
        )
        log.info(
            "worker started",
            topics=list(kafka.topics),
            group_id=kafka.group_id,
            destinations=[d.name for d in config.destinations],
            http_port=health.port,
        )
        waiters: list[asyncio.Future[Any]] = [
            loop.create_task(stop.wait()),
            loop.create_task(fatal_event.wait()),
        ]
        try:
            await asyncio.wait(
                [*waiters, closed, retry_closed], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        log.info("worker stopping", inflight=pipeline.inflight_messages)
    if fatal.error is not None:
        raise WorkerError(str(fatal.error))
    log.info("worker stopped", messages=pipeline.messages_finished)
    return 0


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stop_consumers(
    consumers: list[tuple[ConsumerThread, asyncio.Future[Any]]], drain_timeout_s: float
) -> None:
    for consumer, _closed in consumers:
        consumer.stop()
    waits = [asyncio.shield(closed) for _consumer, closed in consumers]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*waits), drain_timeout_s + SHUTDOWN_MARGIN_S)
