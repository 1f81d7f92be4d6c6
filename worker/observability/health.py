"""The operations HTTP server: /metrics, /healthz (liveness) and /readyz (readiness).

- `/metrics`: the Prometheus text format of the worker's registry.
- `/healthz`: 200 while `live()` holds, else 503. The worker's liveness is
  `liveness_check(heartbeat=..., timeout_s=http.liveness_timeout_s)`: the consumer loop stamps a
  monotonic heartbeat on every turn; a heartbeat older than the timeout means the loop is stuck
  and Kubernetes should restart the pod. An event loop that is itself blocked cannot answer at
  all, which the probe's own timeout turns into a failure.
- `/readyz`: 200 while `ready()` holds (connected to Kafka and able to work), else 503.

A check answers `(ok, detail)`; the detail is the response body (one line, no secrets). A check
that raises counts as failing, never as a server error.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

HealthCheck = Callable[[], tuple[bool, str]]


def liveness_check(
    *,
    heartbeat: Callable[[], float],
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> HealthCheck:
    """Live while `clock() - heartbeat()` (seconds since the loop last turned) ≤ `timeout_s`."""

    def check() -> tuple[bool, str]:
        age = clock() - heartbeat()
        if age > timeout_s:
            return False, f"consumer loop stuck for {age:.0f}s (limit {timeout_s:g}s)"
        return True, "ok"

    return check


class HealthServer:
    """Serves metrics and probes on ``host:port`` from the worker's event loop.

    ``port=0`` picks a free port; ``self.port`` holds the bound one after ``start()``.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        live: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._live = live
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._probe(self._live))
        app.router.add_get("/readyz", self._probe(self._ready))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    def _probe(check: HealthCheck) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(_request: web.Request) -> web.StreamResponse:
            try:
                ok, detail = check()
            except Exception as exc:  # a broken check must fail the probe, not crash it
                ok, detail = False, f"check failed: {type(exc).__name__}"
            return web.Response(
                status=200 if ok else 503,
                text=detail + "\n",
                headers={"Cache-Control": "no-store"},
            )

        return handler
