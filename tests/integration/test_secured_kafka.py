"""The worker against a secured broker, fed exactly what Segment's Kafka destination writes.

One broker (module-scoped) has, besides the PLAINTEXT listener the test helpers use:
- SASL_SSL with SCRAM-SHA-512 (user `worker`, created with `kafka-storage format --add-scram`),
- SSL with required client certificates (mutual TLS),
- SASL_SSL with OAUTHBEARER, where Kafka's unsecured-JWT validator stands in for AWS MSK IAM
  and a stub `aws_msk_iam_sasl_signer` module (put on the worker's PYTHONPATH) signs nothing.
Certificates are made at test time (tests/infra/certs.py).

Messages are shaped as Segment's destination writes them: the value is the JSON of the whole
event (its Payload default), the key a mapped string (here anonymousId), headers string pairs.
They are produced through the same secured listener the worker reads from.

Every run is bounded: the worker's pre-flight reports a refused login or certificate within
seconds, and every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from devkit.harness import (
    WORKER_CMD,
    FakeTikTokProcess,
    TopicSet,
    WorkerProcess,
    committed_offsets,
    metric_value,
    read_topic,
    wait_until,
    worker_config,
    write_config,
)
from devkit.infra import fail
from devkit.infra.certs import TlsFiles, make_test_pki
from devkit.infra.errors import InfraError
from devkit.infra.kafka import KafkaServer, secured_listeners
from devkit.sample_events import SampleEvents

pytestmark = pytest.mark.integration

SCRAM_USER = "worker"
SCRAM_PASSWORD = "scram-Pa55-" + uuid.uuid4().hex[:12]
WRONG_PASSWORD = "wrong-Pa55-" + uuid.uuid4().hex[:12]
CLI_TIMEOUT_S = 60
# (value, key, headers) of one message as Segment's destination writes it.
SegmentMessage = tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]
DELIVERY_TIMEOUT_S = 90


class SecuredCluster:
    def __init__(self, server: KafkaServer, tls: TlsFiles, workdir: Path) -> None:
        self.server = server
        self.tls = tls
        self.workdir = workdir
        self.fake = FakeTikTokProcess(workdir).start()

    def close(self) -> None:
        self.fake.stop()
        self.server.stop()

    def topics(self) -> tuple[str, str]:
        made = TopicSet.create(self.server, "segment", 3)
        return made.topic, made.dlq_topic

    # -- what a user writes in kafka.security, and the same as librdkafka properties ---------

    def scram(self, password_env: str = "KAFKA_SASL_PASSWORD") -> dict[str, Any]:
        return {
            "mechanism": "scram-sha-512",
            "username": SCRAM_USER,
            "password": "${" + password_env + "}",
            "ca_file": str(self.tls.ca_cert),
        }

    def mtls(self) -> dict[str, Any]:
        return {
            "mechanism": "client-cert-auth",
            "ca_file": str(self.tls.ca_cert),
            "cert_file": str(self.tls.client_cert),
            "key_file": str(self.tls.client_key),
        }

    def scram_client(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.server.listener_bootstrap("SASL_SSL"),
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": SCRAM_USER,
            "sasl.password": SCRAM_PASSWORD,
            "ssl.ca.location": str(self.tls.ca_cert),
        }

    def mtls_client(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.server.listener_bootstrap("MTLS"),
            "security.protocol": "SSL",
            "ssl.ca.location": str(self.tls.ca_cert),
            "ssl.certificate.location": str(self.tls.client_cert),
            "ssl.key.location": str(self.tls.client_key),
        }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredCluster]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        fail(
            "the secured-cluster tests start their own broker (SASL_SSL, mTLS and OAUTHBEARER "
            "listeners) and cannot use KAFKA_BOOTSTRAP_SERVERS: unset it"
        )
    workdir = tmp_path_factory.mktemp("secured")
    try:
        tls = make_test_pki(workdir / "pki")
        server = KafkaServer(
            workdir=workdir / "kafka",
            extra_listeners=secured_listeners(tls),
            scram_users={SCRAM_USER: SCRAM_PASSWORD},
        )
        server.start()
    except InfraError as e:
        fail(str(e))
    secured = SecuredCluster(server, tls, workdir)
    try:
        yield secured
    finally:
        secured.close()


def segment_messages(count: int, prefix: str) -> list[SegmentMessage]:
    """(value, key, headers) as Segment's Kafka destination writes them: value =
    JSON.stringify(event) (Payload left at its default, the whole event), key = the mapped
    anonymousId, headers = the mapped string pairs."""
    gen = SampleEvents(seed=17, prefix=prefix)
    out = []
    for i in range(count):
        event = gen.page() if i % 4 == 0 else gen.track("Order Completed")
        value = json.dumps(event, separators=(",", ":")).encode()
        headers: list[tuple[str, str | bytes | None]] = [
            ("segment-source", "web-shop"),
            ("segment-type", event["type"]),
        ]
        out.append((value, event["anonymousId"].encode(), headers))
    return out


def produce_as_segment(client: dict[str, Any], topic: str, messages: list[SegmentMessage]) -> None:
    # kafkajs (what the destination runs) acks with all in-sync replicas by default.
    producer = Producer({**client, "acks": "all", "linger.ms": 20})
    for value, key, headers in messages:
        producer.produce(topic, value=value, key=key, headers=headers)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages not acknowledged by the secured listener"


def message_ids(messages: list[SegmentMessage]) -> set[str]:
    return {json.loads(value)["messageId"] for value, _key, _headers in messages}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WORKER_CMD, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )


def deliver_and_commit(
    cluster: SecuredCluster,
    tmp_path: Path,
    *,
    bootstrap: str,
    security: dict[str, Any],
    producer_client: dict[str, Any],
    count: int,
    env: dict[str, str] | None = None,
) -> tuple[WorkerProcess, str, str, list[SegmentMessage]]:
    """Produce `count` Segment messages plus one undecodable one through the secured listener,
    run the worker through it, and wait until everything is delivered, dead-lettered and
    committed. Returns the running worker (the caller stops it)."""
    source, dlq = cluster.topics()
    group = f"group-{uuid.uuid4().hex[:8]}"
    messages = segment_messages(count, prefix=f"m{uuid.uuid4().hex[:6]}")
    produce_as_segment(producer_client, source, messages)
    produce_as_segment(producer_client, source, [(b"not json", b"k", [("segment-type", "x")])])
    config = worker_config(
        bootstrap=bootstrap,
        topic=source,
        dlq_topic=dlq,
        base_url=cluster.fake.url,
        group_id=group,
        kafka={"security": security},
    )
    path = write_config(tmp_path / f"{group}.yaml", config)
    worker = WorkerProcess(path, env=env).start()
    try:
        worker.wait_ready(60)
        want = message_ids(messages)
        assert wait_until(lambda: want <= set(cluster.fake.event_ids()), DELIVERY_TIMEOUT_S), (
            f"{len(want - set(cluster.fake.event_ids()))} events not delivered: {worker.log_tail()}"
        )

        def all_committed() -> bool:
            offsets = committed_offsets(cluster.server.bootstrap, group, source)
            return sum(max(o, 0) for o in offsets.values()) == count + 1

        assert wait_until(all_committed, 30), f"not all committed: {worker.log_tail()}"
        # The dead-letter producer wrote through the same secured listener.
        (letter,) = read_topic(cluster.server.bootstrap, dlq)
        assert letter.value() == b"not json"
        # The lag reader reads through it too: every held partition reports its lag (0).
        assert wait_until(
            lambda: worker.metrics().count("tiktok_worker_consumer_lag_messages{") == 3, 30
        ), worker.metrics()
        assert metric_value(worker.metrics(), "tiktok_worker_consumer_lag_messages") == 0
    except BaseException:
        worker.stop()
        raise
    return worker, path.name, dlq, messages


def test_scram_sha_512_over_tls_consumes_delivers_and_commits(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    env = {"KAFKA_SASL_PASSWORD": SCRAM_PASSWORD}
    worker, config_name, _dlq, _messages = deliver_and_commit(
        cluster,
        tmp_path,
        bootstrap=cluster.server.listener_bootstrap("SASL_SSL"),
        security=cluster.scram(),
        producer_client=cluster.scram_client(),
        count=400,
        env=env,
    )
    assert worker.terminate(60) == 0
    # The dlq tools connect the same way.
    inspect = run_cli("dlq", "inspect", "--config", str(tmp_path / config_name), env=env)
    assert inspect.returncode == 0, inspect.stderr
    assert "1 record(s)" in inspect.stdout
    assert "decode_error" in inspect.stdout
    # A redrive reads, commits and writes back through it: the undecodable record fails again.
    redrive = run_cli(
        "dlq", "redrive", "--config", str(tmp_path / config_name), "--reason", "decode_error",
        env=env,
    )  # fmt: skip
    assert redrive.returncode == 1, redrive.stderr
    assert "1 redriven (0 delivered, 1 failed again" in redrive.stdout
    check = run_cli("check-config", "--config", str(tmp_path / config_name), env=env)
    assert check.returncode == 0, check.stderr
    outputs = [worker.log_path.read_text(), check.stdout]
    outputs += [p.stdout + p.stderr for p in (inspect, redrive)]
    for text in outputs:
        assert SCRAM_PASSWORD not in text


def test_mutual_tls_consumes_delivers_and_commits(cluster: SecuredCluster, tmp_path: Path) -> None:
    worker, _config, _dlq, _messages = deliver_and_commit(
        cluster,
        tmp_path,
        bootstrap=cluster.server.listener_bootstrap("MTLS"),
        security=cluster.mtls(),
        producer_client=cluster.mtls_client(),
        count=200,
    )
    assert worker.terminate(60) == 0


# -- AWS MSK IAM, wired to a stub signer ---------------------------------------------------------

# A stand-in for aws-msk-iam-sasl-signer-python: MSKAuthTokenProvider.generate_auth_token
# returns (token, expiry in epoch ms) like the real one, but the token is an unsecured JWT that
# Kafka's default OAUTHBEARER validator accepts, valid for a few seconds so that librdkafka
# refreshes it during the test. Each call is recorded (region and time) in $STUB_SIGNER_LOG.
_STUB_SIGNER = """
import base64, json, os, time

LIFETIME_S = 6


def _b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


class MSKAuthTokenProvider:
    @staticmethod
    def generate_auth_token(region, aws_debug_creds=False):
        if os.environ.get("STUB_SIGNER_FAIL"):
            raise RuntimeError("Unable to locate credentials")
        now = time.time()
        with open(os.environ["STUB_SIGNER_LOG"], "a") as log:
            log.write(f"{region} {now}\\n")
        claims = {"sub": "msk-iam-stub", "iat": int(now), "exp": int(now) + LIFETIME_S}
        token = _b64({"alg": "none"}) + "." + _b64(claims) + "."
        return token, int((now + LIFETIME_S) * 1000)
"""


def _stub_signer_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment that puts the stub signer on the worker's import path; its call log."""
    stub_dir = tmp_path / "stub"
    (stub_dir / "aws_msk_iam_sasl_signer").mkdir(parents=True)
    (stub_dir / "aws_msk_iam_sasl_signer" / "__init__.py").write_text(textwrap.dedent(_STUB_SIGNER))
    calls = tmp_path / "signer-calls.log"
    calls.touch()
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(stub_dir), os.environ.get("PYTHONPATH")])),
        "STUB_SIGNER_LOG": str(calls),
        "AWS_REGION": "eu-west-1",
    }
    return env, calls


def test_aws_msk_iam_uses_the_signer_and_refreshes_its_token(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    env, calls = _stub_signer_env(tmp_path)
    worker, _config, _dlq, _messages = deliver_and_commit(
        cluster,
        tmp_path,
        bootstrap=cluster.server.listener_bootstrap("OAUTH"),
        security={"mechanism": "aws", "ca_file": str(cluster.tls.ca_cert)},
        producer_client={
            "bootstrap.servers": cluster.server.listener_bootstrap("OAUTH"),
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "OAUTHBEARER",
            "ssl.ca.location": str(cluster.tls.ca_cert),
            "sasl.oauthbearer.config": "principal=segment-producer",
            "enable.sasl.oauthbearer.unsecure.jwt": True,
        },
        count=100,
        env=env,
    )
    try:
        regions = [line.split()[0] for line in calls.read_text().splitlines()]
        assert regions
        assert set(regions) == {"eu-west-1"}
        # Every client asked once at start; a token lives 6 s, so librdkafka must ask again
        # while the worker runs: a later call is a refresh.
        started = len(regions)
        assert wait_until(lambda: len(calls.read_text().splitlines()) > started, 30), (
            "the MSK IAM token was never refreshed"
        )
        assert "msk-iam-stub" not in worker.log_path.read_text()  # the token is never logged
    finally:
        assert worker.terminate(60) == 0


# -- failures: one line naming the real cause, no secret, non-zero exit --------------------------


def _failing_config(
    cluster: SecuredCluster, tmp_path: Path, bootstrap: str, security: dict[str, Any]
) -> Path:
    source, dlq = cluster.topics()
    config = worker_config(
        bootstrap=bootstrap,
        topic=source,
        dlq_topic=dlq,
        base_url=cluster.fake.url,
        kafka={"security": security},
    )
    return write_config(tmp_path / f"failing-{uuid.uuid4().hex[:6]}.yaml", config)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line on stderr, as the CLI prints it: `tiktok-worker: error: ...`.

    With `logging.format: json` (these configs) `run` writes its log lines and the fatal
    error as JSON (issue 19): then every line must be JSON (no raw librdkafka text) and exactly
    one is the `fatal error`. Otherwise stderr is that one plain line and nothing else."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    if lines and lines[0].startswith("{"):
        records = [json.loads(line) for line in lines]  # fails on any non-JSON line
        fatal = [r for r in records if r.get("event") == "fatal error"]
        assert len(fatal) == 1, result.stderr
        assert {r["level"] for r in records if r is not fatal[0]} <= {"info"}, result.stderr
        error = str(fatal[0]["error"])
        return "tiktok-worker: " + (
            error if error.startswith("configuration error: ") else f"error: {error}"
        )
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tiktok-worker: "), result.stderr
    return lines[0]


def test_wrong_password_is_reported_as_an_authentication_failure(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    bootstrap = cluster.server.listener_bootstrap("SASL_SSL")
    path = _failing_config(cluster, tmp_path, bootstrap, cluster.scram())
    env = {"KAFKA_SASL_PASSWORD": WRONG_PASSWORD}
    for command in (["run"], ["dlq", "inspect"]):
        result = run_cli(*command, "--config", str(path), env=env)
        assert result.returncode == 1, result.stderr
        line = _one_error_line(result)
        assert line == (
            "tiktok-worker: error: Kafka authentication failed for user 'worker' with mechanism "
            "SCRAM-SHA-512: check kafka.security.username and kafka.security.password "
            f"(Kafka at {bootstrap})"
        )
        assert WRONG_PASSWORD not in result.stdout + result.stderr


def test_untrusted_broker_certificate_is_named(cluster: SecuredCluster, tmp_path: Path) -> None:
    bootstrap = cluster.server.listener_bootstrap("SASL_SSL")
    security = {**cluster.scram(), "ca_file": str(cluster.tls.other_ca_cert)}
    path = _failing_config(cluster, tmp_path, bootstrap, security)
    result = run_cli("run", "--config", str(path), env={"KAFKA_SASL_PASSWORD": SCRAM_PASSWORD})
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result)
    assert line.startswith(
        "tiktok-worker: error: TLS to Kafka failed: the broker's certificate is not trusted "
        f"(kafka.security.ca_file ({cluster.tls.other_ca_cert}) did not sign it)"
    ), line
    assert SCRAM_PASSWORD not in result.stdout + result.stderr


def test_missing_client_key_is_a_configuration_error(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "tls.key"
    security = {**cluster.mtls(), "key_file": str(missing)}
    path = _failing_config(cluster, tmp_path, cluster.server.listener_bootstrap("MTLS"), security)
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert _one_error_line(result) == (
        f"tiktok-worker: configuration error: kafka.security.key_file: client key file "
        f"{missing} not found"
    )


def test_broker_requiring_a_client_certificate_says_so(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    security = {"tls": True, "ca_file": str(cluster.tls.ca_cert)}  # no client certificate
    path = _failing_config(cluster, tmp_path, cluster.server.listener_bootstrap("MTLS"), security)
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "the broker rejected the client certificate" in _one_error_line(result)


def test_unreadable_client_key_is_a_configuration_error(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    garbage = tmp_path / "tls.key"
    garbage.write_text("not a PEM key\n")
    security = {**cluster.mtls(), "key_file": str(garbage)}
    path = _failing_config(cluster, tmp_path, cluster.server.listener_bootstrap("MTLS"), security)
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert _one_error_line(result).startswith(
        f"tiktok-worker: configuration error: kafka.security.key_file: {garbage} is not a "
        "usable PEM file"
    )


def test_aws_msk_iam_signing_failure_names_the_cause(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    env, _calls = _stub_signer_env(tmp_path)
    env["STUB_SIGNER_FAIL"] = "1"
    bootstrap = cluster.server.listener_bootstrap("OAUTH")
    security = {"mechanism": "aws", "ca_file": str(cluster.tls.ca_cert)}
    path = _failing_config(cluster, tmp_path, bootstrap, security)
    result = run_cli("run", "--config", str(path), env=env)
    assert result.returncode == 1, result.stderr
    assert _one_error_line(result) == (
        "tiktok-worker: error: AWS MSK IAM: cannot sign a token for region eu-west-1: "
        "RuntimeError: Unable to locate credentials (check the pod's AWS credentials or role) "
        f"(Kafka at {bootstrap})"
    )
