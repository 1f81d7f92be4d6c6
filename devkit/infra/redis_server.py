"""A real Redis for tests and the demo: the Debian `redis-server` binary as a child process.

No persistence (`--save '' --appendonly no`), bound to 127.0.0.1 on a free port (or the one
given), working directory in a temp dir. `restart()` and `start()` after `stop()`/`kill()`
reuse the same port, so the same URL works again (with empty data: nothing is persisted).
Ready means PING is answered.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import quote

import redis

from devkit.infra import SETUP_HINT, which
from devkit.infra.errors import InfraError
from devkit.infra.procs import LOOPBACK, ManagedServer, UnmanagedLifecycle, free_port
from worker.core.redaction import mask_url_credentials

__all__ = ["RedisEndpoint", "RedisServer"]


class RedisEndpoint(UnmanagedLifecycle):
    """What tests need from any Redis: its URL and a client. Lifecycle is for ours only."""

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def display_url(self) -> str:
        """`url` with any password masked, for messages and logs."""
        return mask_url_credentials(self.url)

    def client(self) -> redis.Redis:
        """A new synchronous client for `url` (short timeouts: tests must not hang)."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def ping(self) -> bool:
        """True when PING is answered."""
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def _unsupported(self, what: str) -> InfraError:
        return InfraError(
            f"cannot {what} the Redis at {self.display_url}: it was not started by devkit/infra "
            "(unset REDIS_URL / TEST_INFRA to let the tests start their own redis-server)"
        )


class RedisServer(ManagedServer, RedisEndpoint):
    """`redis-server` on 127.0.0.1:`port` (free port by default), optionally with a password.

    `stop()` is SIGTERM (redis exits at once without persistence); `restart()` keeps the port,
    not the data (nothing is persisted).
    """

    kind = "redis"
    log_file = "redis.log"
    ready_what = "answering PING"
    ready_interval = 0.02

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        password: str | None = None,
        binary: str = "redis-server",
        startup_timeout: float = 15.0,
        die_with_parent: bool = True,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="redis-"))
        self.password = password
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def process_name(self) -> str:
        return f"redis-server {LOOPBACK}:{self.port}"

    def argv(self) -> list[str]:
        binary = which(self.binary, f"{SETUP_HINT} or set REDIS_URL")
        argv = [
            binary,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to the log file
            "--databases", "16",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def _launch(self) -> list[str]:
        return self.argv()

    def _ready(self) -> bool:
        return self.ping()
