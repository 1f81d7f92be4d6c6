"""The operations server: /healthz fails when the consumer loop is stuck, /readyz follows its
check, /metrics serves the registry. Readiness against a real broker that stops and starts is
in tests/integration/test_observability_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from confluent_kafka import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import consumer_thread, eventually, stop
from worker import __version__
from worker.observability.health import HealthCheck, HealthServer, liveness_check
from worker.observability.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[HealthServer] = []
    session = aiohttp.ClientSession()

    async def start(
        *, live: HealthCheck, ready: HealthCheck, metrics: Metrics | None = None
    ) -> Callable[[str], Any]:
        server = HealthServer(
            host="127.0.0.1",
            port=0,
            registry=(metrics or Metrics()).registry,
            live=live,
            ready=ready,
        )
        await server.start()
        servers.append(server)
        assert server.port != 0

        async def get(path: str) -> tuple[int, str, str]:
            async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
                return resp.status, await resp.text(), resp.headers.get("Content-Type", "")

        return get

    yield start
    await session.close()
    for server in servers:
        await server.stop()


def ok() -> tuple[bool, str]:
    return True, "ok"


def test_liveness_check_fails_once_the_heartbeat_is_older_than_the_timeout() -> None:
    clock = Clock()
    beat = {"at": clock.now}
    check = liveness_check(heartbeat=lambda: beat["at"], timeout_s=60, clock=clock)
    assert check() == (True, "ok")
    clock.now += 60
    assert check() == (True, "ok")  # exactly at the limit: still alive
    clock.now += 1
    alive, detail = check()
    assert not alive
    assert detail == "consumer loop stuck for 61s (limit 60s)"
    beat["at"] = clock.now  # the loop turns again
    assert check() == (True, "ok")


async def test_healthz_turns_503_when_the_heartbeat_is_stuck(serve: Any) -> None:
    clock = Clock()
    beat = {"at": clock.now}
    get = await serve(
        live=liveness_check(heartbeat=lambda: beat["at"], timeout_s=5, clock=clock), ready=ok
    )
    assert (await get("/healthz"))[:2] == (200, "ok\n")
    clock.now += 30  # the loop stamped nothing for 30 s
    status, body, _ = await get("/healthz")
    assert status == 503
    assert "consumer loop stuck for 30s" in body
    assert (await get("/readyz"))[0] == 200  # readiness is a separate question
    beat["at"] = clock.now
    assert (await get("/healthz"))[0] == 200


async def test_a_stuck_consumer_thread_fails_liveness(serve: Any) -> None:
    """The real consumer loop over a consume() call that never returns."""
    metrics = Metrics()
    thread, fake, _sink = consumer_thread(metrics)
    live = liveness_check(heartbeat=lambda: thread.heartbeat, timeout_s=1.0)
    get = await serve(live=live, ready=ok)
    thread.start()
    try:
        assert await eventually(
            lambda: metrics.registry.get_sample_value("tiktok_worker_assigned_partitions") == 2
        )
        await asyncio.sleep(1.3)  # longer than the timeout, but the loop keeps turning
        assert (await get("/healthz"))[0] == 200
        fake.gate.clear()  # the next consume() blocks
        await asyncio.sleep(1.5)
        status, body, _ = await get("/healthz")
        assert status == 503, body
        assert body.startswith("consumer loop stuck")
        fake.gate.set()
        assert await eventually(lambda: live()[0])
        assert (await get("/healthz"))[0] == 200
    finally:
        await stop(thread, fake)


async def test_readyz_follows_its_check_and_a_raising_check_fails(serve: Any) -> None:
    state: dict[str, Any] = {"ready": False, "detail": "all Kafka brokers down"}

    def ready() -> tuple[bool, str]:
        if state.get("raise"):
            raise RuntimeError("boom")
        return state["ready"], state["detail"]

    get = await serve(live=ok, ready=ready)
    assert (await get("/readyz"))[:2] == (503, "all Kafka brokers down\n")
    state.update(ready=True, detail="ok")
    assert (await get("/readyz"))[:2] == (200, "ok\n")
    state["raise"] = True
    assert (await get("/readyz"))[:2] == (503, "check failed: RuntimeError\n")


async def test_consumer_reports_all_brokers_down_until_a_broker_is_up() -> None:
    """What /readyz reads (`brokers_down`): set by librdkafka's error, cleared by its stats."""
    thread, fake, _sink = consumer_thread(Metrics())
    assert thread.brokers_down is False
    fake.error(KafkaError._ALL_BROKERS_DOWN)
    assert thread.brokers_down is True
    fake.error(KafkaError._TRANSPORT)  # another error does not clear it
    assert thread.brokers_down is True
    fake.stats({"brokers": {"bootstrap": {"nodeid": -1, "state": "UP"}}})
    assert thread.brokers_down is True  # a bootstrap connection is not a broker
    fake.stats({"brokers": {"b1": {"nodeid": 1, "state": "UP"}}})
    assert thread.brokers_down is False


async def test_metrics_endpoint_serves_the_registry(serve: Any) -> None:
    metrics = Metrics()
    metrics.messages_consumed.labels(topic="segment").inc(3)
    get = await serve(live=ok, ready=ok, metrics=metrics)
    status, body, content_type = await get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    consumed = families["tiktok_worker_messages_consumed"]
    assert [(s.name, s.labels, s.value) for s in consumed.samples] == [
        ("tiktok_worker_messages_consumed_total", {"topic": "segment"}, 3.0)
    ]
    info = families["tiktok_worker_build_info"].samples
    assert [(s.labels, s.value) for s in info] == [({"version": __version__}, 1.0)]
    assert "_created" not in body  # no extra series per counter
