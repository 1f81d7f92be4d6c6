"""End-to-end harness: the worker and the fake TikTok server as real processes.

Used by the integration tests, the chaos suite, the demo and the benchmarks. Everything runs on
loopback; every process is stopped by whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from devkit.infra.procs import free_port, port_open

if TYPE_CHECKING:
    from devkit.infra.kafka import KafkaEndpoint

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKER_CMD = [str(BIN / "tiktok-worker")]
FAKE_TIKTOK_CMD = [sys.executable, "-m", "devkit.fake_tiktok"]
PIXEL = "C5PIXEL0000000000001"
TOKEN = "test-token-0123456789abcdef"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


class FakeTikTokProcess:
    """`python -m devkit.fake_tiktok` as a subprocess, with its control API."""

    def __init__(self, log_dir: Path, *, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_dir / f"fake-tiktok-{self.port}.log"
        self._args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeTikTokProcess:
        log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [*FAKE_TIKTOK_CMD, "--port", str(self.port), *self._args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if not wait_until(lambda: port_open(self.port), 20):
            raise RuntimeError(f"fake TikTok did not start; log: {self._log_path}")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def events(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = http_json(self.url + "/_fake/events")
        return result

    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.events()]

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.url + "/_fake/stats")
        return result

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = http_json(self.url + "/_fake/requests")
        return result

    def fault(self, **spec: Any) -> None:
        http_json(self.url + "/_fake/faults", method="POST", body=spec)

    def clear_faults(self) -> None:
        http_json(self.url + "/_fake/faults", method="DELETE")

    def reset(self) -> None:
        http_json(self.url + "/_fake/reset", method="POST")

    def __enter__(self) -> FakeTikTokProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def destination(
    name: str = "web-shop",
    *,
    pixel: str = PIXEL,
    token: str = TOKEN,
    **extra: Any,
) -> dict[str, Any]:
    return {"name": name, "pixel_code": pixel, "access_token": token, **extra}


def retry_topic_for(dlq_topic: str) -> str:
    """The retry topic the test configs use next to a dead-letter topic (create both)."""
    return dlq_topic + ".retry"


def worker_config(
    *,
    bootstrap: str,
    topic: str,
    dlq_topic: str,
    base_url: str,
    group_id: str = "tiktok-conversions",
    destinations: Sequence[Mapping[str, Any]] | None = None,
    http_port: int | None = None,
    redis_url: str | None = None,
    kafka: Mapping[str, Any] | None = None,
    tiktok: Mapping[str, Any] | None = None,
    rate_limit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete worker config dict for tests (short linger, fast retries, console-free logs)."""
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            "group_id": group_id,
            "dead_letter_topic": dlq_topic,
            "retry_topic": retry_topic_for(dlq_topic),
            "commit_interval_s": 0.5,
            "drain_timeout_s": 10,
            **(kafka or {}),
        },
        "tiktok": {
            "base_url": base_url,
            "batch_linger_ms": 50,
            "request_timeout_s": 2,
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "deadline_s": 60},
            **(tiktok or {}),
        },
        "rate_limit": {
            "qps": 1000,
            "backend": "redis" if redis_url else "local",
            **({"redis_url": redis_url} if redis_url else {}),
            **(rate_limit or {}),
        },
        "http": {"host": "127.0.0.1", "port": http_port or free_port()},
        "logging": {"level": "info", "format": "json"},
        "destinations": list(destinations or [destination()]),
    }


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


@dataclass(frozen=True)
class TopicSet:
    """A source topic with its dead-letter and retry topics, and the group id to consume it."""

    topic: str
    dlq_topic: str
    group: str

    @property
    def retry_topic(self) -> str:
        return retry_topic_for(self.dlq_topic)

    @classmethod
    def create(
        cls,
        kafka: KafkaEndpoint,
        prefix: str,
        partitions: int = 1,
        *,
        dlq_partitions: int = 1,
        retry_partitions: int = 1,
        config: Mapping[str, str] | None = None,
        dlq_config: Mapping[str, str] | None = None,
        retry_config: Mapping[str, str] | None = None,
    ) -> TopicSet:
        """Creates the three topics under names no other test uses (`<prefix>-<random>`)."""
        topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
        made = cls(topic=topic, dlq_topic=topic + ".dlq", group=topic)
        kafka.create_topic(made.topic, partitions=partitions, config=config)
        kafka.create_topic(made.dlq_topic, partitions=dlq_partitions, config=dlq_config)
        kafka.create_topic(made.retry_topic, partitions=retry_partitions, config=retry_config)
        return made


class WorkerProcess:
    """`tiktok-worker run` as a subprocess; logs go to a file next to its config."""

    def __init__(
        self,
        config_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cmd: Sequence[str] = WORKER_CMD,
    ) -> None:
        self.config_path = config_path
        self._cmd = list(cmd)
        self.config = yaml.safe_load(config_path.read_text())
        self.http_port: int = self.config["http"]["port"]
        self.log_path = config_path.with_suffix(f".{time.monotonic_ns()}.log")
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*self._cmd, "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env,
        )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"worker exited {self._proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
                ).read()
            except OSError:
                return False
            return True

        if not wait_until(ready, timeout, 0.2):
            raise RuntimeError(f"worker not ready after {timeout}s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        return self._proc.wait(timeout)

    def kill(self) -> None:
        """kill -9: no drain, no commit."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def wait(self, timeout: float) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/metrics", timeout=5
        ) as resp:
            text: str = resp.read().decode()
        return text

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.running():
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Stack:
    """A `TopicSet` on one broker, a fake TikTok server and the worker processes of one test."""

    def __init__(
        self,
        kafka: KafkaEndpoint,
        workdir: Path,
        *,
        prefix: str,
        partitions: int = 1,
        dlq_partitions: int = 1,
        retry_partitions: int = 1,
        fake_args: Sequence[str] = (),
    ) -> None:
        self.kafka = kafka
        self.workdir = workdir
        self.topics = TopicSet.create(
            kafka,
            prefix,
            partitions,
            dlq_partitions=dlq_partitions,
            retry_partitions=retry_partitions,
        )
        self.topic = self.topics.topic
        self.dlq_topic = self.topics.dlq_topic
        self.retry_topic = self.topics.retry_topic
        self.group = self.topics.group
        self.fake = FakeTikTokProcess(workdir, args=fake_args).start()
        self.workers: list[WorkerProcess] = []
        self._configs = 0

    def config(self, **overrides: Any) -> dict[str, Any]:
        return worker_config(
            bootstrap=self.kafka.bootstrap,
            topic=self.topic,
            dlq_topic=self.dlq_topic,
            base_url=self.fake.url,
            group_id=self.group,
            **overrides,
        )

    def config_path(self, **overrides: Any) -> Path:
        """`config(**overrides)` written to a new file in the work dir."""
        self._configs += 1
        path = self.workdir / f"{self.topic}-{self._configs}.yaml"
        return write_config(path, self.config(**overrides))

    def start_worker(
        self, *, cmd: Sequence[str] = WORKER_CMD, wait: bool = True, **overrides: Any
    ) -> WorkerProcess:
        worker = WorkerProcess(self.config_path(**overrides), cmd=cmd).start()
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.fake.stop()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Stoppable)


@contextlib.contextmanager
def stopping_all(make: Callable[..., _S]) -> Iterator[Callable[..., _S]]:
    """A factory for a fixture to yield: everything it made is stopped on the way out."""
    made: list[_S] = []

    def tracked(*args: Any, **kwargs: Any) -> _S:
        item = make(*args, **kwargs)
        made.append(item)
        return item

    try:
        yield tracked
    finally:
        for item in made:
            item.stop()


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total


def produce(bootstrap: str, topic: str, values: Iterable[bytes], *, key_every: int = 0) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    count = 0
    for value in values:
        key = str(count % key_every).encode() if key_every else None
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(30)
    if remaining:
        raise RuntimeError(f"{remaining} messages not delivered to {topic}")
    return count


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 2.0) -> list[Any]:
    """Every record of ``topic`` from the beginning (no group commit), until idle."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = list(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list[Any] = []
    last = time.monotonic()
    while time.monotonic() - last < idle_s:
        batch = consumer.consume(1000, 0.2)
        for msg in batch:
            if msg.error() is None:
                records.append(msg)
                last = time.monotonic()
    consumer.close()
    return records


def committed_offsets(bootstrap: str, group_id: str, topic: str) -> dict[int, int]:
    """The group's committed offsets; a group coordinator still loading or moving (right after
    the group's first commit) is asked again for up to 10 s."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        tps = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        deadline = time.monotonic() + 10
        while True:
            try:
                committed = consumer.committed(tps, timeout=10)
                break
            except KafkaException as exc:
                transient = exc.args[0].code() in _COORDINATOR_MOVING
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)


def headers_of(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}
