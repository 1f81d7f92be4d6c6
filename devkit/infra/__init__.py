"""Local test and demo infrastructure: real Kafka, Redis and Prometheus as child processes.

- `devkit.infra.kafka.KafkaServer`     single-node KRaft broker+controller (Maven Central jars)
- `devkit.infra.redis_server.RedisServer`  Debian `redis-server`
- `devkit.infra.prometheus.PrometheusServer`  Debian `prometheus`
- `devkit.infra.external`              stand-ins for KAFKA_BOOTSTRAP_SERVERS / REDIS_URL / Docker

Everything listens on 127.0.0.1 on free ports. What is missing is reported, never skipped:
`require()` fails the test with a message that says how to provide the missing piece.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

from devkit.infra.errors import InfraError

__all__ = ["REPO_ROOT", "SETUP_HINT", "InfraError", "cache_dir", "fail", "require", "which"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = "run `make setup` (scripts/provision)"


def cache_dir() -> Path:
    """Where provisioned artefacts live (outside the repository)."""
    env = os.environ.get("TIKTOK_WORKER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tiktok-worker"


def which(binary: str, how_to_provide: str) -> str:
    """Absolute path of `binary` on PATH, or InfraError "<binary> not found: <how_to_provide>"."""
    path = shutil.which(binary)
    if path is None:
        raise InfraError(f"{binary} not found: {how_to_provide}")
    return path


def fail(message: str) -> NoReturn:
    """Fail the current test (not skip) with `message` and no traceback noise."""
    import pytest  # imported here so the classes stay usable outside pytest

    pytest.fail(message, pytrace=False)


def require(binary: str, how_to_provide: str) -> str:
    """Like `which`, but fails the current pytest test with the message instead of raising.

    Example: require("redis-server", f"{SETUP_HINT} or set REDIS_URL") fails with
    "redis-server not found: run `make setup` (scripts/provision) or set REDIS_URL".
    """
    try:
        return which(binary, how_to_provide)
    except InfraError as e:
        fail(str(e))
