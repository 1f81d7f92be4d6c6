"""Background Kafka / Redis for developers and the demo (`scripts/local-kafka`, `local-redis`).

    python -m devkit.infra.local kafka|redis start|stop|status|reset

Uses the same KafkaServer / RedisServer as the tests (one broker configuration), but with
fixed ports and a fixed state directory, and leaves the server running after this process
exits:
- state: ${TIKTOK_WORKER_CACHE:-~/.cache/tiktok-worker}/run/<kafka|redis>/ (data, server log,
  pid file); Kafka's data survives stop/start, `reset` deletes it;
- ports: KAFKA_PORT (9092) and KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), REDIS_PORT (6379),
  all on 127.0.0.1; REDIS_PASSWORD sets requirepass.

`start` prints the bootstrap address / URL alone on stdout (so `$(scripts/local-kafka start)`
works) and notes on stderr. Exit status: 0 success (status: running and answering), 1 not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from devkit.infra import cache_dir
from devkit.infra.errors import InfraError
from devkit.infra.kafka import KafkaServer
from devkit.infra.procs import LOOPBACK, port_open
from devkit.infra.redis_server import RedisServer

_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Service:
    kind: str  # "kafka" | "redis"
    state: Path
    port: int

    @property
    def pid_file(self) -> Path:
        return self.state / "pid.json"

    def address(self) -> str:
        server = self.make()
        return server.bootstrap if isinstance(server, KafkaServer) else server.url

    def make(self) -> KafkaServer | RedisServer:
        if self.kind == "kafka":
            controller = int(os.environ.get("KAFKA_CONTROLLER_PORT", self.port + 1))
            return KafkaServer(
                workdir=self.state,
                port=self.port,
                controller_port=controller,
                die_with_parent=False,
            )
        return RedisServer(
            workdir=self.state,
            port=self.port,
            password=os.environ.get("REDIS_PASSWORD") or None,
            die_with_parent=False,
        )

    def log_path(self) -> Path:
        return self.make().log_path


def _service(kind: str) -> Service:
    default_port = {"kafka": 9092, "redis": 6379}[kind]
    port = int(os.environ.get(f"{kind.upper()}_PORT", default_port))
    return Service(kind=kind, state=cache_dir() / "run" / kind, port=port)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) may contain spaces; the fields after its ")" are plain.
    return stat.rsplit(")", 1)[1].split()[19]


def _running_pid(svc: Service) -> int | None:
    """The pid from the pid file if that very process (same start time) is still alive."""
    try:
        saved = json.loads(svc.pid_file.read_text())
        pid = int(saved["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    started = _start_time(pid)
    return pid if started is not None and started == saved.get("started") else None


def _as_running(svc: Service) -> Service:
    """`svc` with the port the running server was started on (the env may have changed)."""
    try:
        return replace(svc, port=int(json.loads(svc.pid_file.read_text())["port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return svc


def start(svc: Service) -> int:
    if _running_pid(svc) is not None:
        svc = _as_running(svc)
        _note(f"{svc.kind}: already running (state {svc.state})")
        print(svc.address())
        return 0
    if port_open(svc.port):
        _note(
            f"{svc.kind}: port {svc.port} on {LOOPBACK} is taken by another process; "
            f"set {svc.kind.upper()}_PORT to another port"
        )
        return 1
    server = svc.make()
    try:
        server.start()
    except InfraError as e:
        _note(f"{svc.kind}: {e}")
        return 1
    assert server.pid is not None
    started = _start_time(server.pid)
    svc.pid_file.write_text(json.dumps({"pid": server.pid, "port": svc.port, "started": started}))
    extra = ""
    if isinstance(server, KafkaServer) and server.startup_seconds is not None:
        extra = f", ready in {server.startup_seconds:.1f}s"
    _note(f"{svc.kind}: started pid {server.pid}{extra}; log {server.log_path}")
    print(svc.address())
    return 0


def stop(svc: Service) -> int:
    pid = _running_pid(svc)
    if pid is None:
        _note(f"{svc.kind}: not running")
        svc.pid_file.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _running_pid(svc) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running_pid(svc) is not None:
        _note(f"{svc.kind}: still running after {_STOP_TIMEOUT_S:.0f}s, sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
    svc.pid_file.unlink(missing_ok=True)
    _note(f"{svc.kind}: stopped (pid {pid})")
    return 0


def status(svc: Service) -> int:
    pid = _running_pid(svc)
    if pid is None:
        _note(f"{svc.kind}: not running (state {svc.state})")
        return 1
    server = _as_running(svc).make()
    answering = server.broker_ready() if isinstance(server, KafkaServer) else server.ping()
    state = "answering" if answering else "NOT answering"
    addr = server.bootstrap if isinstance(server, KafkaServer) else server.display_url
    _note(f"{svc.kind}: running pid {pid} at {addr}, {state}; log {server.log_path}")
    return 0 if answering else 1


def reset(svc: Service) -> int:
    stop(svc)
    shutil.rmtree(svc.state, ignore_errors=True)
    _note(f"{svc.kind}: state {svc.state} deleted")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.infra.local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("kind", choices=["kafka", "redis"])
    parser.add_argument("action", choices=["start", "stop", "status", "reset"])
    args = parser.parse_args(argv)
    svc = _service(args.kind)
    svc.state.mkdir(parents=True, exist_ok=True)
    action = {"start": start, "stop": stop, "status": status, "reset": reset}[args.action]
    return action(svc)


if __name__ == "__main__":
    sys.exit(main())
