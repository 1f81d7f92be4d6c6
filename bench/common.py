"""Shared pieces of `make bench`: the bench environment, topic filling and small statistics.

`BenchEnv` owns a private Kafka broker (devkit/infra `KafkaServer`), a private Redis
(`RedisServer`) and the fake TikTok server (`python -m devkit.fake_tiktok`, as a process), all on
127.0.0.1, and a scratch directory for configs and logs. Every process it starts it stops.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from devkit.harness import FakeTikTokProcess, retry_topic_for
from devkit.infra.kafka import KafkaServer, kafka_version
from devkit.infra.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]

# Bench topics hold hundreds of MB; big segments keep the broker's file count small.
TOPIC_CONFIG = {"segment.bytes": str(256 * 1024 * 1024), "retention.ms": "-1"}
DLQ_TOPIC = "bench-dlq"
GROUP_JOIN_DELAY_MS = 3000


def log(message: str) -> None:
    """Progress on stderr (stdout stays free for JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summary(values: Sequence[float], digits: int = 0) -> dict[str, Any]:
    """min / median / max (and the runs) of a figure measured several times."""
    if not values:
        return {"min": None, "median": None, "max": None, "runs": []}

    def r(v: float) -> float:
        return round(v, digits) if digits else round(v)

    return {
        "min": r(min(values)),
        "median": r(statistics.median(values)),
        "max": r(max(values)),
        "runs": [r(v) for v in values],
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class BenchEnv:
    """Kafka + Redis + fake TikTok on loopback, and a work directory."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))
    kafka: KafkaServer | None = None
    redis: RedisServer | None = None
    fake: FakeTikTokProcess | None = None
    keep: bool = False
    _topic_counter: int = 0

    def start(self) -> BenchEnv:
        log(f"starting Kafka, Redis and the fake TikTok server (work dir {self.workdir})")
        self.kafka = KafkaServer(
            workdir=self.workdir / "kafka",
            heap="1g",
            # Several worker processes started together join one group before the first
            # assignment, so multi-process runs do not begin with a rebalance.
            properties={"group.initial.rebalance.delay.ms": str(GROUP_JOIN_DELAY_MS)},
        )
        self.kafka.start()
        self.redis = RedisServer(workdir=self.workdir / "redis")
        self.redis.start()
        self.fake = FakeTikTokProcess(self.workdir).start()
        self.kafka.create_topic(DLQ_TOPIC, 1)
        self.kafka.create_topic(retry_topic_for(DLQ_TOPIC), 1)
        return self

    def stop(self) -> None:
        for server in (self.fake, self.redis, self.kafka):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()

    def __enter__(self) -> BenchEnv:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        # The broker's data is over 1 GB after a full run; keep it only to debug a failure.
        if exc_type is None and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def bootstrap(self) -> str:
        assert self.kafka is not None
        return self.kafka.bootstrap

    def new_topic(self, prefix: str, partitions: int) -> str:
        assert self.kafka is not None
        self._topic_counter += 1
        name = f"{prefix}-{self._topic_counter}"
        self.kafka.create_topic(name, partitions, config=TOPIC_CONFIG)
        return name

    @property
    def fake_pid(self) -> int:
        assert self.fake is not None
        assert self.fake._proc is not None
        return self.fake._proc.pid

    def new_group(self, prefix: str) -> str:
        return f"{prefix}-{time.monotonic_ns()}"


def fill_topic(bootstrap: str, topic: str, values: Iterable[bytes]) -> tuple[int, float]:
    """Produce every value (round-robin over partitions); returns (count, seconds)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "none",
            "acks": "1",
            "queue.buffering.max.kbytes": 256 * 1024,
            "sticky.partitioning.linger.ms": 0,
        }
    )
    started = time.perf_counter()
    count = 0
    for value in values:
        while True:
            try:
                producer.produce(topic, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 5000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} messages not delivered to {topic}")
    return count, time.perf_counter() - started


def chunks(values: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def versions(kafka_server_version: str | None = None) -> dict[str, Any]:
    """Core count and the versions the figures were measured with."""
    import aiohttp
    import confluent_kafka
    import msgspec

    def cmd(*argv: str) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return None
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else None

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_build": python_build(),
        "python_details": python_details(),
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": kafka_server_version or kafka_version(),
        "msgspec": msgspec.__version__,
        "aiohttp": aiohttp.__version__,
        "redis_server": cmd("redis-server", "--version"),
        "java": cmd("java", "-version"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "code": code_state(),
    }


def python_build() -> str:
    """How this interpreter was built, in one line for the report header (issue 18: the bench
    must measure the build the image ships). CPython's own `--enable-optimizations`
    (PGO) and `--with-lto` show in CONFIG_ARGS; Debian's python3.11 package (what `make setup`
    and the image use) does its PGO+LTO in its own rules, so those flags are not there and the
    package is named instead (docs/benchmarks.md, "Interpreter build", shows how that build was
    checked). Also whether libpython is linked into the executable or loaded as a shared
    library (the shared one is built position-independent, which costs time)."""
    import sysconfig

    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    pgo, lto = "--enable-optimizations" in args, "--with-lto" in args
    debian = _debian_package(Path(sys._base_executable).resolve())  # type: ignore[attr-defined]
    if debian:
        build = f"Debian {debian} (Debian's PGO+LTO build)"
    elif pgo and lto:
        build = "PGO+LTO"
    else:
        build = "+".join(x for x, on in (("PGO", pgo), ("LTO", lto)) if on) or "no PGO, no LTO"
    return f"{build}, libpython {'shared' if _libpython_mapped() else 'static'}"


def python_details() -> dict[str, Any]:
    """The interpreter measured, for results.json: its full version, executable and build."""
    import sysconfig

    return {
        "version": sys.version,
        "executable": str(Path(sys._base_executable).resolve()),  # type: ignore[attr-defined]
        "config_args": sysconfig.get_config_var("CONFIG_ARGS"),
        "opt": sysconfig.get_config_var("OPT"),
    }


def _debian_package(executable: Path) -> str | None:
    """The Debian package that owns `executable` and its version, or None."""
    if not str(executable).startswith("/usr/bin/") or shutil.which("dpkg-query") is None:
        return None
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", str(executable)], capture_output=True, text=True, timeout=10
        )
        package = owner.stdout.split(":", 1)[0].strip()
        if owner.returncode != 0 or not package:
            return None
        version = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{package} {version}".strip()


def _libpython_mapped() -> bool:
    with contextlib.suppress(OSError):
        return "/libpython" in Path("/proc/self/maps").read_text()
    return False


def code_state() -> dict[str, Any]:
    """The commit measured, and worker/ files that differ from it (uncommitted edits)."""

    def git(*argv: str) -> str:
        try:
            out = subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            return ""
        return out.stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "worker").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "worker_uncommitted": dirty}


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of `pid`, split into `main` (the thread whose tid is the pid: the event loop
    of a worker) and `other` (librdkafka's threads, executors; JVM threads for Kafka)."""
    out = {"main": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out["main" if int(tid) == pid else "other"] += seconds
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat, everything but idle/iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


class CpuMeter:
    """CPU used by named processes and by the whole machine between `start()` and `stop()`.

    `others_cores` (machine busy minus the named processes, per second of wall time) says how
    much the rest of the machine (other jobs, the bench driver itself) competed for the 2 cores.
    """

    def __init__(self, pids: Mapping[str, Sequence[int]]) -> None:
        self.pids = {name: list(p) for name, p in pids.items()}
        self._t0 = 0.0
        self._busy0 = 0.0
        self._cpu0: dict[str, dict[str, float]] = {}

    def _sample(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, pids in self.pids.items():
            total = {"main": 0.0, "other": 0.0}
            for pid in pids:
                for k, v in thread_cpu(pid).items():
                    total[k] += v
            out[name] = total
        return out

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_s()
        self._cpu0 = self._sample()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        busy = machine_busy_s() - self._busy0
        now = self._sample()
        used = {
            name: {k: now[name][k] - self._cpu0[name][k] for k in ("main", "other")} for name in now
        }
        ours = sum(v for u in used.values() for v in u.values())
        return {
            "wall_s": round(wall, 3),
            "cpu_s": {n: {k: round(v, 2) for k, v in u.items()} for n, u in used.items()},
            "cores": {
                n: round(sum(u.values()) / wall, 2) if wall > 0 else None for n, u in used.items()
            },
            "machine_cores": round(busy / wall, 2) if wall > 0 else None,
            "others_cores": round(max(0.0, busy - ours) / wall, 2) if wall > 0 else None,
        }
