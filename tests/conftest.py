"""Shared pytest fixtures: real Kafka, Redis and Prometheus, started lazily by the tests.

Session fixtures (started on first use, stopped at session end):
- `kafka`            KafkaServer on free loopback ports; or ExternalKafka when
                     KAFKA_BOOTSTRAP_SERVERS is set, or a testcontainers broker when
                     TEST_INFRA=docker and a Docker engine answers.
- `kafka_bootstrap`  its "host:port" string.
- `redis`            RedisServer; or ExternalRedis for REDIS_URL / TEST_INFRA=docker.
- `redis_url`        its URL.
Function fixtures:
- `topic`               a fresh topic with 3 partitions on `kafka`; its name.
- `prometheus_factory`  `prometheus_factory(targets=[...], rule_files=[...]) -> PrometheusServer`.
- `kafka_factory`       `kafka_factory(**KafkaServer kwargs) -> KafkaServer`, a private broker
                        for tests that must not disturb the session one.
- `redis_factory`       `redis_factory(**RedisServer kwargs) -> RedisServer`, likewise.

Tests that run Helm, promtool, node or a wheel build are marked `tools` (see tests/tools.py).

A test that cannot get its infrastructure fails (never skips) with a message that says how to
provide it. When a test fails, the tails of the logs of the servers it used are attached to
its report. A test that stops the session broker or Redis should start it again; if it does
not, the next test that needs it gets it restarted.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from devkit.infra import fail
from devkit.infra.errors import InfraError
from devkit.infra.external import (
    ExternalKafka,
    ExternalRedis,
    docker_engine_answers,
    start_docker_kafka,
    start_docker_redis,
)
from devkit.infra.kafka import KafkaEndpoint, KafkaServer
from devkit.infra.procs import tail
from devkit.infra.prometheus import PrometheusServer
from devkit.infra.redis_server import RedisEndpoint, RedisServer
from tests import tools

_LOG_TAIL_LINES = 60
_STARTUP_KEY = pytest.StashKey[dict[str, float]]()

_S = TypeVar("_S", KafkaServer, RedisServer, PrometheusServer)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tools.allow(item.get_closest_marker("tools") is not None)


class ServerFactory(Generic[_S]):
    """Calls `cls(workdir=<tmp>/<prefix>N, **kwargs).start()`; `close()` stops them all.

    A server that cannot start fails the test with its message (and log tail).
    """

    def __init__(self, cls: type[_S], tmp_path: Path, prefix: str) -> None:
        self._cls: type[_S] = cls
        self._tmp_path = tmp_path
        self._prefix = prefix
        self.servers: list[_S] = []

    def __call__(self, **kwargs: Any) -> _S:
        kwargs.setdefault("workdir", self._tmp_path / f"{self._prefix}{len(self.servers)}")
        server: _S = self._cls(**kwargs)
        self.servers.append(server)
        try:
            server.start()
        except InfraError as e:
            fail(str(e))
        return server

    def log_sources(self) -> list[tuple[str, Path]]:
        return [src for server in self.servers for src in server.log_sources()]

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def _use_docker() -> bool:
    """TEST_INFRA=docker and an engine answers. Without an engine: local processes, warned."""
    mode = os.environ.get("TEST_INFRA", "local").strip().lower()
    if mode in ("", "local"):
        return False
    if mode != "docker":
        fail(f"TEST_INFRA={mode!r}: expected 'local' (default) or 'docker'")
    if docker_engine_answers():
        return True
    warnings.warn(
        "TEST_INFRA=docker but no Docker engine answers: using local processes instead",
        stacklevel=2,
    )
    return False


def _started(config: pytest.Config, name: str, seconds: float | None) -> None:
    if seconds is not None:
        config.stash.setdefault(_STARTUP_KEY, {})[name] = seconds


# -- Kafka ----------------------------------------------------------------------------------------


def _open_kafka(tmp_path_factory: pytest.TempPathFactory) -> KafkaEndpoint:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if external:
            ext = ExternalKafka(external, source="KAFKA_BOOTSTRAP_SERVERS")
            ext.wait_ready()
            return ext
        if _use_docker():
            return start_docker_kafka()
        server = KafkaServer(workdir=tmp_path_factory.mktemp("kafka"))
        server.start()
        return server
    except InfraError as e:
        fail(str(e))


@pytest.fixture(scope="session")
def kafka(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[KafkaEndpoint]:
    """The session's Kafka broker (see the module docstring for where it comes from)."""
    endpoint = _open_kafka(tmp_path_factory)
    if isinstance(endpoint, KafkaServer):
        _started(pytestconfig, "kafka", endpoint.startup_seconds)
    try:
        yield endpoint
    finally:
        endpoint.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: KafkaEndpoint) -> str:
    """bootstrap.servers of the session broker, e.g. "127.0.0.1:40123"."""
    return kafka.bootstrap


@pytest.fixture
def topic(kafka: KafkaEndpoint, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new topic with 3 partitions, named after the test plus a random suffix."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60].strip("-.")
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    try:
        kafka.create_topic(name, partitions=3)
    except InfraError as e:
        fail(str(e))
    yield name
    # Topics on our temporary broker vanish with it; do not litter someone else's cluster.
    if not isinstance(kafka, KafkaServer):
        try:
            kafka.delete_topic(name, timeout=10)
        except Exception as e:  # cleanup must not turn a pass into an error
            warnings.warn(f"could not delete topic {name}: {e}", stacklevel=1)


@pytest.fixture
def kafka_factory(tmp_path: Path) -> Iterator[ServerFactory[KafkaServer]]:
    """Start private brokers (`kafka_factory(**KafkaServer kwargs)`), stopped after the test."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        fail(
            "this test starts its own Kafka broker and cannot use KAFKA_BOOTSTRAP_SERVERS: "
            "unset it (the broker jars come from `make setup`)"
        )
    factory = ServerFactory(KafkaServer, tmp_path, "kafka")
    try:
        yield factory
    finally:
        factory.close()


# -- Redis ----------------------------------------------------------------------------------------


def _open_redis(tmp_path_factory: pytest.TempPathFactory) -> RedisEndpoint:
    external = os.environ.get("REDIS_URL")
    try:
        if external:
            ext = ExternalRedis(external, source="REDIS_URL")
            ext.wait_ready()
            return ext
        if _use_docker():
            return start_docker_redis()
        server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
        server.start()
        return server
    except InfraError as e:
        fail(str(e))


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisEndpoint]:
    """The session's Redis (see the module docstring for where it comes from)."""
    endpoint = _open_redis(tmp_path_factory)
    try:
        yield endpoint
    finally:
        endpoint.close()


@pytest.fixture(scope="session")
def redis_url(redis: RedisEndpoint) -> str:
    """URL of the session Redis, e.g. "redis://127.0.0.1:40123/0"."""
    return redis.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[ServerFactory[RedisServer]]:
    """Start private redis-servers (`redis_factory(**RedisServer kwargs)`), stopped after."""
    factory = ServerFactory(RedisServer, tmp_path, "redis")
    try:
        yield factory
    finally:
        factory.close()


# -- Prometheus -----------------------------------------------------------------------------------


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[ServerFactory[PrometheusServer]]:
    """`prometheus_factory(targets=["127.0.0.1:PORT"], rule_files=[...], **kwargs)` starts a
    PrometheusServer (1s scrape and evaluation interval) that is stopped after the test."""
    factory = ServerFactory(PrometheusServer, tmp_path, "prometheus")
    try:
        yield factory
    finally:
        factory.close()


# -- keep session servers running, show logs on failure, report start times ----------------------


@pytest.fixture(autouse=True)
def _session_servers_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that stopped the session broker or Redis, start it again for the next."""
    yield
    for name in ("kafka", "redis"):
        if name not in request.fixturenames:
            continue
        server = request.getfixturevalue(name)
        if isinstance(server, KafkaServer | RedisServer) and not server.running:
            try:
                server.start()
            except InfraError as e:
                warnings.warn(f"could not restart the session {name}: {e}", stacklevel=1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        seen: set[Path] = set()
        for value in getattr(item, "funcargs", {}).values():
            sources = getattr(value, "log_sources", None)
            if not callable(sources):
                continue
            for name, path in sources():
                if path in seen:
                    continue
                seen.add(path)
                text = tail(path, _LOG_TAIL_LINES) or "(empty)"
                report.sections.append((f"{name} log, last {_LOG_TAIL_LINES} lines: {path}", text))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    times = config.stash.get(_STARTUP_KEY, {})
    if times:
        line = ", ".join(f"{name} ready in {secs:.2f}s" for name, secs in sorted(times.items()))
        terminalreporter.write_line(f"test infrastructure: {line}")
