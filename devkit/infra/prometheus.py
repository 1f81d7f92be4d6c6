"""A real Prometheus for tests: the Debian `prometheus` binary scraping given targets.

`PrometheusServer` writes prometheus.yml (one job whose static targets are `targets`, scrape
and rule evaluation every second, the given rule files), keeps its TSDB in the work dir and
listens on 127.0.0.1 on a free port. Ready means /-/ready answers 200. Queries go through the
HTTP API (/api/v1/...). `promtool_check_rules()` runs Debian's `promtool check rules`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from devkit.infra import SETUP_HINT, which
from devkit.infra.errors import InfraError
from devkit.infra.procs import LOOPBACK, ManagedServer, free_port

__all__ = ["PrometheusError", "PrometheusServer", "promtool_check_rules"]

_HOW = f"{SETUP_HINT} (Debian package prometheus)"


class PrometheusError(InfraError):
    """The Prometheus HTTP API answered with an error (bad expression, ...)."""


class PrometheusServer(ManagedServer):
    """Prometheus on 127.0.0.1:`port` scraping `targets` ("host:port") every `scrape_interval`."""

    kind = "prometheus"
    log_file = "prometheus.log"
    ready_what = "ready (/-/ready)"

    def __init__(
        self,
        *,
        targets: Sequence[str] = (),
        rule_files: Sequence[Path | str] = (),
        job: str = "tiktok-worker",
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        extra_scrape_configs: Sequence[Mapping[str, Any]] = (),
        port: int | None = None,
        workdir: Path | None = None,
        binary: str = "prometheus",
        startup_timeout: float = 30.0,
        die_with_parent: bool = True,
    ) -> None:
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.extra_scrape_configs = [dict(c) for c in extra_scrape_configs]
        self.port = port if port is not None else free_port()
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="prom-"))
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent

    # -- addresses and files ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def process_name(self) -> str:
        return f"prometheus {LOOPBACK}:{self.port}"

    def config(self) -> dict[str, Any]:
        """The prometheus.yml content."""
        scrape: list[dict[str, Any]] = []
        if self.targets:
            scrape.append(
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.targets}],
                }
            )
        scrape += self.extra_scrape_configs
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": scrape,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def _launch(self) -> list[str]:
        binary = which(self.binary, _HOW)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def reload(self) -> None:
        """Rewrite prometheus.yml from the current attributes and ask Prometheus to reload it."""
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise PrometheusError(f"reload answered HTTP {r.status}")

    # -- HTTP API -------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path` and return its `data`; PrometheusError when status != success."""
        qs = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{qs}" if qs else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            # Errors (bad expression, ...) come back as 4xx with a JSON body.
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            raise PrometheusError(f"GET {url}: {e}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> dict[str, Any]:
        """Instant query: {"resultType": ..., "result": [...]} from /api/v1/query."""
        data: dict[str, Any] = self.api("query", query=expr)
        return data

    def query_value(self, expr: str) -> float | None:
        """Value of an instant query that yields one series or a scalar; None when empty.

        PrometheusError when the result has more than one series.
        """
        data = self.query(expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return float(result[1])
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def wait_for_value(
        self,
        expr: str,
        predicate: Callable[[float], bool] = lambda _v: True,
        *,
        timeout: float = 30.0,
    ) -> float:
        """Poll `expr` until it has a value satisfying `predicate`; return that value."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while True:
            last = self.query_value(expr)
            if last is not None and predicate(last):
                return last
            if time.monotonic() >= deadline:
                raise InfraError(f"{expr!r} = {last} after {timeout:.0f}s at {self.url}")
            time.sleep(0.2)

    def active_targets(self) -> list[dict[str, Any]]:
        """/api/v1/targets activeTargets (scrapeUrl, health, lastError, labels, ...)."""
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets

    def wait_for_target_up(self, timeout: float = 30.0, *, job: str | None = None) -> None:
        """Wait until every active target (of `job`, default all) has health "up"."""
        deadline = time.monotonic() + timeout
        while True:
            targets = [
                t
                for t in self.active_targets()
                if job is None or t.get("labels", {}).get("job") == job
            ]
            if targets and all(t.get("health") == "up" for t in targets):
                return
            if time.monotonic() >= deadline:
                states = ", ".join(
                    f"{t.get('scrapeUrl')}={t.get('health')} {t.get('lastError') or ''}".strip()
                    for t in targets
                )
                raise InfraError(f"targets not up after {timeout:.0f}s: {states or 'none'}")
            time.sleep(0.2)

    def rule_groups(self) -> list[dict[str, Any]]:
        """/api/v1/rules groups (with each rule's health, lastError and, for alerts, state)."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        """/api/v1/alerts: active (pending or firing) alerts."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts


def promtool_check_rules(*paths: Path | str) -> str:
    """`promtool check rules PATH...`; its output, or InfraError with the output when invalid."""
    promtool = which("promtool", _HOW)
    res = subprocess.run(
        [promtool, "check", "rules", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise InfraError(f"promtool check rules failed (exit {res.returncode}):\n{out}")
    return out
