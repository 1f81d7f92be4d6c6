"""`worker.kafka.settings`: every librdkafka client the worker builds takes the user's
security properties, and only the consumers take consumer properties."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from worker.kafka.settings import (
    admin_settings,
    consumer_settings,
    preflight_settings,
    producer_settings,
    reader_settings,
)

SECURITY = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "u",
    "sasl.password": "p",
    "ssl.ca.location": "/etc/ca.pem",
}
CONSUMER_ONLY = {
    "group.instance.id": "x",
    "auto.offset.reset": "latest",
    "session.timeout.ms": 10000,
    "fetch.min.bytes": 1,
    "isolation.level": "read_uncommitted",
    "enable.auto.commit": True,
    "partition.assignment.strategy": "range",
}
CLIENT = {**SECURITY, **CONSUMER_ONLY}
B = "b:9092"

BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "consumer": lambda: consumer_settings(bootstrap_servers=B, group_id="g", client=CLIENT),
    "reader": lambda: reader_settings(bootstrap_servers=B, group_id="r", client=CLIENT, job="t"),
    "producer": lambda: producer_settings(bootstrap_servers=B, client=CLIENT),
    "admin": lambda: admin_settings(bootstrap_servers=B, client=CLIENT, job="lag"),
    "preflight": lambda: preflight_settings(bootstrap_servers=B, client=CLIENT),
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_every_client_keeps_the_security_properties(kind: str) -> None:
    conf = BUILDERS[kind]()
    assert conf["bootstrap.servers"] == B
    assert {k: conf[k] for k in SECURITY} == SECURITY


@pytest.mark.parametrize("kind", ["producer", "admin"])
def test_producer_and_admin_get_no_consumer_property(kind: str) -> None:
    conf = BUILDERS[kind]()
    assert not set(conf) & set(CONSUMER_ONLY)
    assert "statistics.interval.ms" not in conf


def test_consumer_takes_user_properties_but_not_over_at_least_once() -> None:
    conf = BUILDERS["consumer"]()
    assert conf["group.id"] == "g"
    assert conf["auto.offset.reset"] == "latest"  # a default the user may change
    assert conf["session.timeout.ms"] == 10000
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["client.id"] == "tiktok-worker"


def test_reader_never_commits_by_itself_and_reads_from_the_start() -> None:
    conf = BUILDERS["reader"]()
    assert conf["group.id"] == "r"
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["enable.partition.eof"] is True
    assert conf["client.id"] == "tiktok-worker-t"


def test_producer_is_safe_whatever_the_user_sets() -> None:
    client = {"acks": "1", "enable.idempotence": False, "client.id": "shop"}
    conf = producer_settings(bootstrap_servers=B, client=client)
    assert (conf["acks"], conf["enable.idempotence"]) == ("all", True)
    assert conf["client.id"] == "shop-dlq"
    assert conf["message.max.bytes"] == 64 * 1024 * 1024


def test_preflight_sees_every_user_property() -> None:
    conf = BUILDERS["preflight"]()
    assert {k: conf[k] for k in CLIENT} == CLIENT


def test_logger_is_passed_when_given() -> None:
    logger = logging.getLogger("kafka")
    conf = admin_settings(bootstrap_servers=B, client={"logger": None}, job="x", logger=logger)
    assert conf["logger"] is logger
    assert "logger" not in admin_settings(bootstrap_servers=B, client={}, job="x")
