"""The start-up check every Kafka-using command runs first: is the cluster reachable with these
settings, and does the dead-letter topic exist? One line and a bounded wait, never a hang.

`tiktok-worker run` also checks the retry topic (`kafka.retry_topic`): it must exist and take
a write. The write is one probe record (no value, header `retry.probe`) that the workers skip
when they read it back."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from worker.config import Config, librdkafka_error
from worker.errors import ConfigError, WorkerError
from worker.kafka.parking import PROBE_HEADER
from worker.kafka.settings import preflight_settings, producer_settings
from worker.observability.logs import Logger, kafka_logger

PREFLIGHT_TIMEOUT_S = 15.0


def preflight(config: Config, log: Logger | None = None, *, retry_topic: bool = False) -> None:
    """Fail fast, in one line, when Kafka is unreachable or the dead-letter topic is missing
    (with `retry_topic`: or the retry topic is missing or refuses a write).
    With `log`, say what is being waited for: an unreachable Kafka takes up to
    PREFLIGHT_TIMEOUT_S to give up."""
    conf = preflight_settings(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client=config.kafka.client,
        logger=kafka_logger(),  # never polled: librdkafka's retries stay off stderr
    )
    try:
        admin = AdminClient(conf)
    except KafkaException as exc:  # a property librdkafka refuses: a configuration error
        raise ConfigError(librdkafka_error(exc.args[0].str(), config.kafka.client)) from None
    if log is not None:
        log.info(
            "waiting for Kafka",
            bootstrap_servers=config.kafka.bootstrap_servers,
            dead_letter_topic=config.kafka.dead_letter_topic,
            timeout_s=PREFLIGHT_TIMEOUT_S,
        )
    try:
        metadata = admin.list_topics(timeout=PREFLIGHT_TIMEOUT_S)
    except KafkaException as exc:
        raise WorkerError(
            f"cannot reach Kafka at {config.kafka.bootstrap_servers}: {exc.args[0].str()}"
        ) from None
    dlq_topic = config.kafka.dead_letter_topic
    if dlq_topic not in metadata.topics or metadata.topics[dlq_topic].error is not None:
        raise WorkerError(
            f"dead-letter topic {dlq_topic!r} does not exist on "
            f"{config.kafka.bootstrap_servers}: create it before starting the worker"
        )
    if retry_topic:
        _check_retry_topic(config, metadata)


def _check_retry_topic(config: Config, metadata: Any) -> None:
    kafka = config.kafka
    topic = kafka.retry_topic
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise WorkerError(
            f"retry topic {topic!r} does not exist on {kafka.bootstrap_servers}: "
            "create it before starting the worker (kafka.retry_topic)"
        )
    conf = producer_settings(
        bootstrap_servers=kafka.bootstrap_servers,
        client=kafka.client,
        logger=kafka_logger(),
        job="preflight",
    )
    conf["message.timeout.ms"] = int(PREFLIGHT_TIMEOUT_S * 1000)
    producer = Producer(conf)
    outcome: list[KafkaError | None] = []
    producer.produce(
        topic,
        value=None,
        headers=[(PROBE_HEADER, b"1")],
        on_delivery=lambda err, _msg: outcome.append(err),
    )
    producer.flush(PREFLIGHT_TIMEOUT_S + 5)
    if not outcome:
        raise WorkerError(f"retry topic {topic!r}: no answer to a test write within the timeout")
    err = outcome[0]
    if err is not None:
        raise WorkerError(f"retry topic {topic!r} is not writable: {err.str()}")
