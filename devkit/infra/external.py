"""Stand-ins with the KafkaServer / RedisServer test interface for infrastructure we did not
start: a broker or Redis named by KAFKA_BOOTSTRAP_SERVERS / REDIS_URL, or containers started by
testcontainers when TEST_INFRA=docker and a Docker engine answers.

They offer `bootstrap`/`create_topic`/`delete_topic` (Kafka) and `url`/`client` (Redis);
`start/stop/kill/restart` raise InfraError saying the test needs infrastructure started by
devkit/infra. `close()` releases what the stand-in owns (a container), nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from devkit.infra.errors import InfraError
from devkit.infra.kafka import KafkaEndpoint
from devkit.infra.redis_server import RedisEndpoint

__all__ = [
    "ExternalKafka",
    "ExternalRedis",
    "docker_engine_answers",
    "start_docker_kafka",
    "start_docker_redis",
]


class ExternalKafka(KafkaEndpoint):
    """A broker someone else runs, reachable at `bootstrap`."""

    def __init__(
        self, bootstrap: str, *, source: str, on_close: Callable[[], None] | None = None
    ) -> None:
        self._bootstrap = bootstrap
        self.source = source  # where the address came from, for messages
        self._on_close = on_close

    @property
    def bootstrap(self) -> str:
        return self._bootstrap

    @property
    def running(self) -> bool:
        return self.broker_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """InfraError when no metadata request succeeds within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.broker_ready(timeout=2.0):
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"no Kafka answers at {self.bootstrap} ({self.source}) after {timeout:.0f}s: "
                    "start it, or unset KAFKA_BOOTSTRAP_SERVERS to let the tests start their own"
                )
            time.sleep(0.5)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class ExternalRedis(RedisEndpoint):
    """A Redis someone else runs, at `url`."""

    def __init__(
        self, url: str, *, source: str, on_close: Callable[[], None] | None = None
    ) -> None:
        self._url = url
        self.source = source
        self._on_close = on_close

    @property
    def url(self) -> str:
        return self._url

    @property
    def running(self) -> bool:
        return self.ping()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """InfraError when PING is not answered within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"no Redis answers PING at {self.source} after {timeout:.0f}s: start it, "
                    "or unset REDIS_URL to let the tests start their own redis-server"
                )
            time.sleep(0.2)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def docker_engine_answers() -> bool:
    """True when the Docker SDK (a testcontainers dependency) can ping an engine."""
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        # No SDK, no socket, no permission, an engine that does not answer: all mean "no".
        return False


def start_docker_kafka() -> ExternalKafka:
    """A KRaft Kafka container (testcontainers); image from $KAFKA_IMAGE if set."""
    from testcontainers.kafka import KafkaContainer

    image = os.environ.get("KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
    container: Any = KafkaContainer(image).with_kraft()
    container.start()
    kafka = ExternalKafka(
        container.get_bootstrap_server(),
        source=f"testcontainers {image}",
        on_close=container.stop,
    )
    try:
        kafka.wait_ready()
    except InfraError:
        kafka.close()
        raise
    return kafka


def start_docker_redis() -> ExternalRedis:
    """A Redis container (testcontainers); image from $REDIS_IMAGE if set."""
    from testcontainers.redis import RedisContainer

    image = os.environ.get("REDIS_IMAGE", "redis:7")
    container: Any = RedisContainer(image)
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    redis = ExternalRedis(
        f"redis://{host}:{port}/0", source=f"testcontainers {image}", on_close=container.stop
    )
    try:
        redis.wait_ready()
    except InfraError:
        redis.close()
        raise
    return redis
