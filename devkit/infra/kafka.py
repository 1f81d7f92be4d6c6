"""A real Apache Kafka 4.x broker for tests and the demo: single-node KRaft, plain `java`.

The jars come from Maven Central (infra/kafka/pom.xml, copied by scripts/provision into
~/.cache/tiktok-worker/kafka-<version>/libs). `KafkaServer` writes server.properties into its
work directory, formats the storage once with Kafka's own `kafka.tools.StorageTool`, and runs
`java -cp '<libs>/*' kafka.Kafka server.properties`. Ready means a metadata request from a
librdkafka AdminClient succeeds and lists the broker.

`restart()` (and `start()` after `stop()`/`kill()`) reuses the same ports and the same data
directory, so committed offsets and topic data survive, as chaos tests need.

`KafkaEndpoint` holds the topic helpers shared with the external stand-ins
(devkit/infra/external.py).

Secured listeners (`extra_listeners`, `scram_users`): besides the PLAINTEXT listener the
helpers use, a broker can listen with SASL_SSL, SSL (mutual TLS) and so on, each with its own
`listener.name.<name>.*` properties; `secured_listeners(tls)` builds the usual set (SCRAM-SHA-512
over TLS, mTLS, OAUTHBEARER over TLS with Kafka's unsecured-JWT validator). SCRAM users are
written into the metadata when the storage is formatted (`kafka-storage format --add-scram`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from devkit.infra import REPO_ROOT, SETUP_HINT, cache_dir, which
from devkit.infra.certs import TlsFiles
from devkit.infra.errors import InfraError
from devkit.infra.procs import LOOPBACK, ManagedServer, UnmanagedLifecycle, free_ports

__all__ = [
    "DEFAULT_JVM_FLAGS",
    "KAFKA_POM",
    "KafkaEndpoint",
    "KafkaServer",
    "Listener",
    "kafka_libs_dir",
    "kafka_version",
    "secured_listeners",
]

KAFKA_POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"

# Measured on the 2-core CI machine: serial GC and C1-only JIT start the broker noticeably faster
# than the defaults (G1 + C2) and use fewer threads; test traffic never needs C2 peak speed.
DEFAULT_JVM_FLAGS: tuple[str, ...] = (
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)

_LOG4J2 = """\
# Written by devkit/infra/kafka.py: everything to stdout, which goes to the server log file.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
# The effective-config dumps (hundreds of lines per start) would fill every log tail;
# server.properties beside the log says what was configured.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""

_librdkafka_log = logging.getLogger("devkit.infra.kafka.librdkafka")


def kafka_version() -> str:
    """The Kafka version pinned in infra/kafka/pom.xml (the single source of truth)."""
    m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", KAFKA_POM.read_text())
    if m is None:
        raise InfraError(f"no <kafka.version> in {KAFKA_POM}")
    return m.group(1)


def kafka_libs_dir() -> Path:
    """Directory holding the broker jars: $KAFKA_LIBS, else the provisioned cache.

    Raises InfraError saying how to provide them when the jars are not there.
    """
    env = os.environ.get("KAFKA_LIBS")
    version = kafka_version()
    libs = Path(env) if env else cache_dir() / f"kafka-{version}" / "libs"
    complete = env is not None or (libs.parent / ".complete").exists()
    if not complete or not list(libs.glob("kafka_2.13-*.jar")):
        raise InfraError(
            f"Kafka {version} jars not found in {libs}: {SETUP_HINT}, set KAFKA_LIBS to a "
            "directory of Kafka jars, or set KAFKA_BOOTSTRAP_SERVERS to use a running broker"
        )
    return libs


def new_cluster_id() -> str:
    """A KRaft cluster id in Kafka's format: a random UUID, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids ids that look like command-line flags
            return cid


@dataclass(frozen=True)
class Listener:
    """One more listener of a `KafkaServer` on 127.0.0.1.

    `name` is the listener name (upper case, e.g. "SASL_SSL", "MTLS"), `protocol` its
    security protocol (SASL_SSL, SSL, SASL_PLAINTEXT), `properties` the settings that
    apply to it alone, without the `listener.name.<name>.` prefix (e.g. "ssl.client.auth").
    `port` 0 means a free port picked when the server is made.
    """

    name: str
    protocol: str
    properties: Mapping[str, str] = field(default_factory=dict)
    port: int = 0


def secured_listeners(tls: TlsFiles) -> list[Listener]:
    """SASL_SSL with SCRAM-SHA-512, SSL with required client certificates (MTLS), and
    SASL_SSL with OAUTHBEARER (OAUTH; Kafka's default validator accepts unsecured JWTs, which
    stands in for AWS MSK IAM's tokens): every one with the test CA's broker certificate."""
    keystore = {
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(tls.broker_keystore),
        "ssl.keystore.password": tls.keystore_password,
        "ssl.key.password": tls.keystore_password,
    }
    return [
        Listener(
            "SASL_SSL",
            "SASL_SSL",
            {
                **keystore,
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "scram-sha-512.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
            },
        ),
        Listener(
            "MTLS",
            "SSL",
            {
                **keystore,
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(tls.ca_cert),
                "ssl.client.auth": "required",
            },
        ),
        Listener(
            "OAUTH",
            "SASL_SSL",
            {
                **keystore,
                "sasl.enabled.mechanisms": "OAUTHBEARER",
                "oauthbearer.sasl.jaas.config": (
                    "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule "
                    'required unsecuredLoginStringClaim_sub="broker";'
                ),
            },
        ),
    ]


class KafkaEndpoint(UnmanagedLifecycle):
    """Topic helpers for any broker reachable at `bootstrap` (ours or an external one)."""

    #: replication factor for new topics; -1 = the broker's default.replication.factor
    replication_factor = -1

    @property
    def bootstrap(self) -> str:
        raise NotImplementedError

    def admin(self, **config: Any) -> AdminClient:
        """A new AdminClient for this broker (librdkafka logs go to Python logging)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": _librdkafka_log,
            "socket.connection.setup.timeout.ms": 2000,
            "reconnect.backoff.max.ms": 500,
        }
        conf.update(config)
        return AdminClient(conf)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        config: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Create `name` and wait until every partition has a leader.

        Raises InfraError if the topic already exists or is not usable within `timeout`.
        """
        admin = self.admin()
        new = NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=self.replication_factor,
            config=dict(config or {}),
        )
        deadline = time.monotonic() + timeout
        while True:
            fut = admin.create_topics([new], operation_timeout=timeout, request_timeout=timeout)
            try:
                fut[name].result()
                break
            except KafkaException as e:
                err = e.args[0]
                # A broker that just started may not accept topic creation for a moment.
                if err.retriable() and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise InfraError(f"cannot create topic {name!r} on {self.bootstrap}: {err}") from e
        self._wait_topic(admin, name, partitions, deadline)

    def _wait_topic(self, admin: AdminClient, name: str, partitions: int, deadline: float) -> None:
        last = "no metadata"
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(topic=name, timeout=5)
            except KafkaException as e:
                last = str(e)
            else:
                t = md.topics.get(name)
                if t is not None and t.error is None:
                    ready = [p for p in t.partitions.values() if p.error is None and p.leader >= 0]
                    if len(t.partitions) == partitions and len(ready) == partitions:
                        return
                    last = f"{len(ready)}/{partitions} partitions with a leader"
                elif t is not None:
                    last = str(t.error)
            time.sleep(0.1)
        raise InfraError(f"topic {name!r} on {self.bootstrap} not ready: {last}")

    def delete_topic(self, name: str, *, timeout: float = 30.0) -> None:
        """Delete `name` and wait until the metadata no longer lists it (missing is fine)."""
        admin = self.admin()
        fut = admin.delete_topics([name], operation_timeout=timeout, request_timeout=timeout)
        try:
            fut[name].result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise InfraError(f"cannot delete topic {name!r}: {e.args[0]}") from e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name not in admin.list_topics(timeout=5).topics:
                return
            time.sleep(0.1)
        raise InfraError(f"topic {name!r} still listed {timeout:.0f}s after deletion")

    def topics(self) -> set[str]:
        """Names of the topics the broker lists (internal ones included)."""
        return set(self.admin().list_topics(timeout=10).topics)

    def broker_ready(self, timeout: float = 2.0) -> bool:
        """True when a metadata request succeeds and names at least one broker."""
        try:
            md = self.admin().list_topics(timeout=timeout)
        except KafkaException:
            return False
        return bool(md.brokers)

    # Lifecycle: only servers this process started can be stopped; stand-ins override nothing.
    def _unsupported(self, what: str) -> InfraError:
        return InfraError(
            f"cannot {what} the Kafka at {self.bootstrap}: it was not started by devkit/infra "
            "(unset KAFKA_BOOTSTRAP_SERVERS / TEST_INFRA to let the tests start their own broker)"
        )


class KafkaServer(ManagedServer, KafkaEndpoint):
    """A single-node KRaft broker+controller on 127.0.0.1 (see the module docstring).

    Ports default to free ones picked at construction time and never change afterwards.
    `workdir` defaults to a new temporary directory; it holds server.properties, log4j2
    config, `data/` (log.dirs) and `server.log` (stdout+stderr of every run, appended).
    Storage is formatted on the first start; stop(), kill() and restart() keep the data.
    `startup_seconds` is from launching java to the first successful metadata request.
    """

    replication_factor = 1
    kind = "kafka"
    log_file = "server.log"
    ready_what = "ready (metadata request)"

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        libs_dir: Path | None = None,
        heap: str = "512m",
        jvm_flags: Sequence[str] = DEFAULT_JVM_FLAGS,
        properties: Mapping[str, str] | None = None,
        extra_listeners: Sequence[Listener] = (),
        scram_users: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        die_with_parent: bool = True,
    ) -> None:
        if workdir is None:
            import tempfile

            workdir = Path(tempfile.mkdtemp(prefix="kafka-"))
        self.workdir = workdir
        picked = free_ports(2 + len(extra_listeners))
        self.port = port if port is not None else picked[0]
        self.controller_port = controller_port if controller_port is not None else picked[1]
        if self.controller_port == self.port:
            raise InfraError("Kafka port and controller port must differ")
        #: the secured listeners, ports fixed for the life of this object
        self.listeners = [
            Listener(lst.name, lst.protocol, dict(lst.properties), lst.port or picked[2 + i])
            for i, lst in enumerate(extra_listeners)
        ]
        #: SCRAM-SHA-512 users (name -> password), created when the storage is formatted
        self.scram_users = dict(scram_users or {})
        self._libs_dir = libs_dir
        self.heap = heap
        self.jvm_flags = tuple(jvm_flags)
        self.extra_properties = dict(properties or {})
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self._cds: _CdsArchive | None = None

    # -- paths and addresses ------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def listener_bootstrap(self, name: str) -> str:
        """bootstrap.servers of the extra listener called `name`, e.g. "127.0.0.1:40125"."""
        for lst in self.listeners:
            if lst.name == name:
                return f"{LOOPBACK}:{lst.port}"
        raise InfraError(f"no listener {name!r} (have: {[x.name for x in self.listeners]})")

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def process_name(self) -> str:
        return f"kafka {self.bootstrap}"

    # -- configuration ------------------------------------------------------------------------

    def server_properties(self) -> dict[str, str]:
        """The broker configuration (extra `properties` override these)."""
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            # One broker: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # After a SIGKILL the controller keeps the dead broker's registration until its
            # session expires (default 9s) and refuses the restarted broker until then; chaos
            # tests kill and restart the broker, so expire sessions sooner.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            # Tests start consumers right away; no reason to wait for more members.
            "group.initial.rebalance.delay.ms": "0",
            # Small files: tests write little and many topics come and go.
            "log.segment.bytes": str(1024 * 1024),
            "log.index.size.max.bytes": str(1024 * 1024),
            "log.retention.check.interval.ms": "60000",
            # Two cores shared with the tests: few threads.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
        }
        for lst in self.listeners:
            address = f"{lst.name}://{LOOPBACK}:{lst.port}"
            props["listeners"] += "," + address
            props["advertised.listeners"] += "," + address
            props["listener.security.protocol.map"] += f",{lst.name}:{lst.protocol}"
            prefix = f"listener.name.{lst.name.lower()}."
            props.update({prefix + k: v for k, v in lst.properties.items()})
        props.update(self.extra_properties)
        return props

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["# Written by devkit/infra/kafka.py"]
        lines += [f"{k}={v}" for k, v in self.server_properties().items()]
        self.properties_path.write_text("\n".join(lines) + "\n")
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)

    def _java_argv(self, main_class: str, *args: str) -> tuple[list[str], _CdsArchive | None]:
        java_home = os.environ.get("JAVA_HOME")
        java = (
            str(Path(java_home) / "bin" / "java")
            if java_home
            else which("java", f"{SETUP_HINT} (installs a JDK 17)")
        )
        libs = self._libs_dir if self._libs_dir is not None else kafka_libs_dir()
        cds = _CdsArchive.for_run(java, libs, main_class, self.jvm_flags)
        argv = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{min(64, _mb(self.heap))}m",
            *self.jvm_flags,
            *(cds.jvm_flags() if cds is not None else ()),
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main_class,
            *args,
        ]
        return argv, cds

    def _format_storage(self) -> None:
        # Formatting is once per data directory; meta.properties marks a formatted one.
        if (self.data_dir / "meta.properties").exists():
            return
        argv, cds = self._java_argv(
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            new_cluster_id(),
            "--config",
            str(self.properties_path),
            "--ignore-formatted",
            *(
                arg
                for user, password in self.scram_users.items()
                for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")
            ),
        )
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        with self.log_path.open("a") as log:
            log.write(f"===== kafka storage format\n{res.stdout}{res.stderr}")
        if res.returncode != 0:
            raise InfraError(
                f"Kafka storage format failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
            )
        if cds is not None:
            cds.publish()

    # -- lifecycle ------------------------------------------------------------------------------

    def _launch(self) -> list[str]:
        self._write_config()
        self._format_storage()
        argv, self._cds = self._java_argv("kafka.Kafka", str(self.properties_path))
        return argv

    def _ready(self) -> bool:
        return self.broker_ready(timeout=1.0)

    def stop(self, timeout: float = 20.0) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after `timeout` seconds. Data is kept."""
        super().stop(timeout)
        if self._cds is not None:
            # The JVM writes a class-data archive on a clean exit only (not after SIGKILL).
            self._cds.publish()
            self._cds = None


class _CdsArchive:
    """A dynamic AppCDS archive per (java, jars, main class, flags), kept in the cache.

    Loading the broker's classes from an archive roughly halves its start time (about 2s to
    about 1.1s on the CI machine). The first run of a main class records the archive
    (-XX:ArchiveClassesAtExit, written by the JVM when it exits cleanly) into a private file
    that `publish()` renames into place; later runs map it (-XX:SharedArchiveFile). The JVM
    validates the archive itself and runs without it, just slower, when it does not match.
    Set KAFKA_CDS=0 to turn this off.
    """

    def __init__(self, path: Path, recording: Path | None) -> None:
        self.path = path
        self.recording = recording

    @classmethod
    def for_run(
        cls, java: str, libs: Path, main_class: str, flags: Sequence[str]
    ) -> _CdsArchive | None:
        if os.environ.get("KAFKA_CDS", "1") == "0":
            return None
        # The JVM checks the jars' sizes and times against the archive; keying on them too
        # means re-provisioned jars get a fresh archive instead of a rejected one.
        jars = sorted(
            f"{p.name}:{st.st_size}:{st.st_mtime_ns}"
            for p in libs.glob("*.jar")
            for st in [p.stat()]
        )
        parts = [os.path.realpath(java), str(libs.resolve()), main_class, *flags, *jars]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path = libs.parent / f"cds-{main_class.rsplit('.', 1)[-1]}-{key}.jsa"
        if path.exists():
            return cls(path, None)
        if not os.access(libs.parent, os.W_OK):
            return None
        return cls(path, path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"))

    def jvm_flags(self) -> list[str]:
        if self.recording is not None:
            return [f"-XX:ArchiveClassesAtExit={self.recording}"]
        return [f"-XX:SharedArchiveFile={self.path}"]

    def publish(self) -> None:
        """Move a finished recording into place (atomic; concurrent recorders are harmless)."""
        rec, self.recording = self.recording, None
        if rec is None:
            return
        if rec.exists() and rec.stat().st_size > 0:
            os.replace(rec, self.path)
        else:
            rec.unlink(missing_ok=True)


def _mb(size: str) -> int:
    """'512m' -> 512, '1g' -> 1024 (for -Xms, which must not exceed -Xmx)."""
    unit = size[-1].lower()
    n = int(size[:-1]) if unit in "kmg" else int(size)
    return {"k": n // 1024, "m": n, "g": n * 1024}.get(unit, n // (1024 * 1024))
