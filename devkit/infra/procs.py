"""Process plumbing shared by the local servers: free ports, child processes, log tails.

Contracts:
- `free_ports(n)` returns n distinct TCP ports that were free on 127.0.0.1 at the time of the
  call (the kernel picked them); a server is expected to bind them soon after.
- `ManagedProcess` runs one child in its own process group with stdout+stderr appended to a
  log file (appended, so a restart keeps the earlier run's lines), and stops it with SIGTERM,
  then SIGKILL after a grace period. With `die_with_parent=True` the child gets SIGKILL when
  the Python process that started it dies, so a crashed test run leaves no server behind.
- `wait_until(...)` polls a predicate until it holds, the process died, or the deadline passed.
- `ManagedServer` is the lifecycle of a server run as one `ManagedProcess` (Kafka, Redis,
  Prometheus): start, wait until ready (or InfraError with the log tail, the child killed),
  stop, kill, restart; `UnmanagedLifecycle` is the same surface for servers reached by address.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

from devkit.infra.errors import InfraError

LOOPBACK = "127.0.0.1"
_log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct ports that are free on `host` right now."""
    socks: list[socket.socket] = []
    try:
        # Hold every socket open until all are bound so the kernel cannot hand out a port twice.
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one port that is free on `host` right now."""
    return free_ports(1, host)[0]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def tail(path: Path | str, lines: int = 80) -> str:
    """The last `lines` lines of a text file ('' when it does not exist)."""
    p = Path(path)
    if not p.exists():
        return ""
    with p.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        # Logs can be large; the tail lives in the last few hundred KiB.
        f.seek(max(0, size - 256 * 1024))
        data = f.read().decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL it when the parent dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ManagedProcess:
    """One child process with its output in a log file."""

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> None:
        """Start the child (error if it is already running)."""
        if self.running:
            raise InfraError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if self.die_with_parent else None,
                )
            except OSError as e:
                raise InfraError(f"cannot start {self.name} ({self.argv[0]}): {e}") from e

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL. No-op when not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the child (and its process group) and reap it. No-op when not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        # The child leads its own process group: signal the group so helpers it forked go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        interval: float = 0.1,
    ) -> float:
        """Poll `predicate` until true; return the seconds it took.

        Raises InfraError with the log tail when the child exits or `timeout` passes first.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if predicate():
                return time.monotonic() - started
            if not self.running:
                raise InfraError(
                    f"{self.name} exited with status {self.returncode} before {what}; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"{self.name} not {what} after {timeout:.0f}s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(interval)


class UnmanagedLifecycle:
    """Lifecycle of a server the tests reach by address only (an external one, or a base
    class before a subclass manages a process): start/stop/kill/restart refuse with
    `_unsupported`, which each endpoint phrases for its own server and environment variable."""

    def _unsupported(self, what: str) -> InfraError:
        raise NotImplementedError

    def start(self) -> None:
        raise self._unsupported("start")

    def stop(self, timeout: float = 20.0) -> None:
        raise self._unsupported("stop")

    def kill(self) -> None:
        raise self._unsupported("kill")

    def restart(self) -> None:
        raise self._unsupported("restart")

    def log_sources(self) -> list[tuple[str, Path]]:
        """(name, log file) pairs worth showing when a test fails."""
        return []

    def close(self) -> None:
        """Release what this object owns (stops a server it started; a no-op otherwise)."""


class ManagedServer:
    """Lifecycle of a server this object runs as one child process in `workdir`.

    A subclass says how to launch it (`_launch`, which may write config files first), how to
    tell it is ready (`_ready`) and what to call it; `start()` waits up to `startup_timeout`
    seconds for readiness and raises InfraError with the log tail (the child killed) when the
    server exits or is not ready in time.
    """

    workdir: Path
    startup_timeout: float
    die_with_parent: bool
    #: short name, for log_sources()
    kind: str
    #: the child's stdout and stderr, in `workdir`
    log_file: str
    #: how readiness reads in errors, e.g. "answering PING"
    ready_what: str = "ready"
    ready_interval: float = 0.05
    #: seconds from launch to ready (last start)
    startup_seconds: float | None = None
    _proc: ManagedProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / self.log_file

    @property
    def process_name(self) -> str:
        raise NotImplementedError

    def _launch(self) -> list[str]:
        """Everything to do before the child starts (config files, ...); returns its argv."""
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.running else None

    def log_sources(self) -> list[tuple[str, Path]]:
        return [(self.kind, self.log_path)]

    def start(self) -> None:
        """Start the server and wait until it is ready; a no-op when it is running."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = self._launch()
        self._proc = ManagedProcess(
            name=self.process_name,
            argv=argv,
            log_path=self.log_path,
            cwd=self.workdir,
            die_with_parent=self.die_with_parent,
        )
        self._proc.start()
        try:
            self.startup_seconds = self._proc.wait_until(
                self._ready,
                timeout=self.startup_timeout,
                what=self.ready_what,
                interval=self.ready_interval,
            )
        except InfraError:
            self._proc.kill()
            raise
        _log.info("%s ready in %.2fs", self.process_name, self.startup_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `timeout` seconds."""
        if self._proc is not None:
            self._proc.stop(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None:
            self._proc.kill()

    def restart(self) -> None:
        """stop() then start(): same ports, same work dir."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Same as stop()."""
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
