"""The start-up check every Kafka-using command runs first: is the cluster reachable with these
settings (credentials and certificates accepted), and does the dead-letter topic exist? One
line naming the cause and a bounded wait, never a hang.

`tiktok-worker run` also checks the retry topic (`kafka.retry_topic`): it must exist and take
a write. The write is one probe record (no value, header `retry.probe`) that the workers skip
when they read it back."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from worker.config import Config, librdkafka_error
from worker.errors import ConfigError, WorkerError
from worker.kafka.parking import PROBE_HEADER
from worker.kafka.security import (
    client_properties,
    explain_failure,
    explain_refused_client,
    token_failure,
)
from worker.kafka.settings import preflight_settings, producer_settings
from worker.observability.logs import Logger, kafka_logger

PREFLIGHT_TIMEOUT_S = 15.0
# Metadata is asked for in steps this long, so a rejected login or certificate (which
# librdkafka retries forever) is reported as soon as it is seen, not after the whole timeout.
PREFLIGHT_STEP_S: Final = 1.0

# librdkafka's own lines during the pre-flight (connection retries, the SASL or TLS error
# that explain_failure reports in one line) would only repeat that line: swallow them.
_preflight_log = logging.getLogger("worker.preflight.librdkafka")
_preflight_log.propagate = False
_preflight_log.addHandler(logging.NullHandler())


def preflight(
    config: Config,
    client: Mapping[str, Any] | None = None,
    log: Logger | None = None,
    *,
    retry_topic: bool = False,
) -> None:
    """Fail fast, in one line, when Kafka is unreachable, refuses our credentials or
    certificate, or the dead-letter topic is missing (with `retry_topic`: or the retry topic is
    missing or refuses a write). `client`: the connection properties
    (default: `client_properties(config.kafka)`). With `log`, say what is being waited for:
    an unreachable Kafka takes up to PREFLIGHT_TIMEOUT_S to give up."""
    kafka = config.kafka
    errors: list[KafkaError] = []
    conf = preflight_settings(
        bootstrap_servers=kafka.bootstrap_servers,
        client=client if client is not None else client_properties(kafka),
        logger=_preflight_log,
    )
    conf["error_cb"] = errors.append
    try:
        admin = AdminClient(conf)
    except KafkaException as exc:
        # An MSK IAM token that could not be signed stops the client from being built.
        failure = token_failure(conf)
        if failure is not None:
            raise WorkerError(f"{failure} (Kafka at {kafka.bootstrap_servers})") from None
        # Otherwise a property or file librdkafka refuses: a configuration error.
        text = exc.args[0].str()
        raise ConfigError(
            explain_refused_client(kafka.security, text) or librdkafka_error(text, kafka.client)
        ) from None
    if log is not None:
        log.info(
            "waiting for Kafka",
            bootstrap_servers=kafka.bootstrap_servers,
            dead_letter_topic=kafka.dead_letter_topic,
            timeout_s=PREFLIGHT_TIMEOUT_S,
        )
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    while True:
        try:
            metadata = admin.list_topics(timeout=PREFLIGHT_STEP_S)
            break
        except KafkaException as exc:
            admin.poll(0)  # serves error_cb
            cause = token_failure(conf) or explain_failure(kafka.security, errors)
            if cause is not None:
                raise WorkerError(f"{cause} (Kafka at {kafka.bootstrap_servers})") from None
            if time.monotonic() >= deadline:
                raise WorkerError(
                    f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc.args[0].str()}"
                ) from None
    dlq_topic = kafka.dead_letter_topic
    if dlq_topic not in metadata.topics or metadata.topics[dlq_topic].error is not None:
        raise WorkerError(
            f"dead-letter topic {dlq_topic!r} does not exist on "
            f"{kafka.bootstrap_servers}: create it before starting the worker"
        )
    if retry_topic:
        _check_retry_topic(
            config, metadata, client if client is not None else client_properties(kafka)
        )


def _check_retry_topic(config: Config, metadata: Any, client: Mapping[str, Any]) -> None:
    kafka = config.kafka
    topic = kafka.retry_topic
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise WorkerError(
            f"retry topic {topic!r} does not exist on {kafka.bootstrap_servers}: "
            "create it before starting the worker (kafka.retry_topic)"
        )
    conf = producer_settings(
        bootstrap_servers=kafka.bootstrap_servers,
        client=client,
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
