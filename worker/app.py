"""Wiring and lifecycle of `tiktok-worker run`.

Start: check Kafka and the dead-letter topic (one-line errors, no hang), then start the
operations server, the dead-letter producer, the consumer thread and the periodic committer.
Stop (SIGTERM/SIGINT, or a fatal error): the consumer thread stops consuming and closes the
consumer, which revokes its partitions; the pipeline drains them within ``drain_timeout_s`` and
what finished is committed. Exit status 0 after a requested stop, 1 after a fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from worker.config import Config, liveness_timeout_s, secret_values
from worker.core.redaction import register_secrets
from worker.delivery.factory import build_delivery
from worker.errors import WorkerError
from worker.kafka.consumer import ConsumerThread
from worker.kafka.deadletters import DeadLetterProducer
from worker.kafka.lag import LagMonitor
from worker.kafka.preflight import preflight
from worker.kafka.security import client_properties
from worker.kafka.settings import consumer_settings, producer_settings
from worker.mapping.mapper import Mapper
from worker.observability.health import HealthServer, liveness_check
from worker.observability.logs import Logger, kafka_logger
from worker.observability.metrics import Metrics
from worker.pipeline.pipeline import Pipeline

SHUTDOWN_MARGIN_S = 10.0


async def run_worker(config: Config, *, log: Logger, metrics: Metrics | None = None) -> int:
    """Run until SIGTERM/SIGINT or a fatal error; returns the exit status."""
    register_secrets(secret_values(config))
    kafka = config.kafka
    # One set of connection properties (security included) for every client below.
    client = client_properties(kafka)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, preflight, config, client, log)
    metrics = metrics if metrics is not None else Metrics()
    metrics.describe_destinations({d.name: d.event_source for d in config.destinations})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pipeline: Pipeline | None = None

    def on_fatal(exc: BaseException) -> None:
        if pipeline is not None:
            pipeline.on_fatal(exc)

    dead_letters = DeadLetterProducer(
        config=producer_settings(
            bootstrap_servers=kafka.bootstrap_servers, client=client, logger=kafka_logger()
        ),
        topic=kafka.dead_letter_topic,
        metrics=metrics,
        on_fatal=on_fatal,
    )
    delivery = build_delivery(
        config,
        metrics=metrics,
        log=log,
        on_delivered=lambda events: pipeline.on_delivered(events) if pipeline else None,
        on_failed=lambda events, failure: pipeline.on_failed(events, failure) if pipeline else None,
    )
    pipeline = Pipeline(
        mapper=Mapper(config),
        batcher=delivery.batcher,
        dead_letters=dead_letters,
        metrics=metrics,
        log=log,
        max_inflight_messages=kafka.max_inflight_messages,
        drain_timeout_s=kafka.drain_timeout_s,
    )
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
        on_share=delivery.limiter.set_share,
    )
    pipeline.attach(consumer)

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
        if stop.is_set() or pipeline.fatal is not None:
            return False, "stopping"
        if not delivery.limiter.ready:
            return False, "connecting to the rate-limit store"
        if not consumer.alive:
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
    # The shared rate limit first: work taken before it is connected would be sent unshared.
    limiter_start = loop.create_task(delivery.limiter.start())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([limiter_start, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not limiter_start.done():  # SIGTERM while connecting: nothing was taken yet
        limiter_start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await limiter_start
        await delivery.close()
        await health.stop()
        log.info("worker stopped", messages=0)
        return 0
    limiter_start.result()
    dead_letters.start()
    consumer.start()
    committer = loop.create_task(pipeline.run_committer(kafka.commit_interval_s))
    lag_task = loop.create_task(lag.run())
    closed = loop.run_in_executor(None, consumer.closed.wait)
    log.info(
        "worker started",
        topics=list(kafka.topics),
        group_id=kafka.group_id,
        destinations=[d.name for d in config.destinations],
        http_port=health.port,
    )
    waiters: list[asyncio.Future[Any]] = [
        loop.create_task(stop.wait()),
        loop.create_task(pipeline.fatal_event.wait()),
    ]
    await asyncio.wait([*waiters, closed], return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    log.info("worker stopping", inflight=pipeline.inflight_messages)
    consumer.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closed, kafka.drain_timeout_s + SHUTDOWN_MARGIN_S)
    for task in (committer, lag_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await delivery.close()
    await dead_letters.close()
    await health.stop()
    if pipeline.fatal is not None:
        raise WorkerError(str(pipeline.fatal))
    log.info("worker stopped", messages=pipeline.messages_finished)
    return 0
