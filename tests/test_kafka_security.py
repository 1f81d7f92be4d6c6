"""kafka.security: validation, the librdkafka properties it becomes, the AWS MSK IAM token
callback (with a stubbed signer: no AWS), and the one-line diagnosis of connection errors.
The same settings against a real broker: tests/integration/test_secured_kafka.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from devkit.infra.certs import make_test_pki
from worker.config import Config, KafkaSecurityConfig, masked, parse_config, secret_values
from worker.errors import ConfigError
from worker.kafka.security import (
    SIGNER_MODULE,
    check_security,
    client_properties,
    explain_failure,
    explain_refused_client,
    msk_iam_token_callback,
    security_properties,
    token_failure,
)

DEST = "destinations: [{name: web, pixel_code: P1, access_token: t0ken-value}]\n"


def load(kafka_yaml: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(f"kafka:\n{kafka_yaml}\n" + DEST, environ=environ or {})


def config_error(kafka_yaml: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(kafka_yaml, environ)
    return str(info.value)


# -- validation --------------------------------------------------------------------------------


def test_scram_over_tls_from_the_environment() -> None:
    config = load(
        "  security: {mechanism: scram-sha-512, username: worker, password: '${KAFKA_PW}'}",
        {"KAFKA_PW": "pw-from-env-123"},
    )
    props = client_properties(config.kafka)
    assert props == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": "pw-from-env-123",
    }
    assert "pw-from-env-123" in secret_values(config)
    assert "pw-from-env-123" not in json.dumps(masked(config))


@pytest.mark.parametrize("key", ["password", "key_password"])
def test_a_literal_secret_in_the_file_is_refused(key: str) -> None:
    message = config_error(
        "  security: {mechanism: client-cert-auth, cert_file: c, key_file: k, "
        f"{key}: hunter2-literal}}"
        if key == "key_password"
        else "  security: {mechanism: plain, username: u, password: hunter2-literal}"
    )
    assert message.startswith(f"kafka.security.{key}: must not be written in the file")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("security", "expected"),
    [
        ("{mechanism: scram-sha-256, password_file: /p}", "kafka.security.username: required"),
        ("{mechanism: plain, username: u}", "kafka.security.password: mechanism plain needs"),
        (
            "{mechanism: plain, username: u, password: '${X}', password_file: /p}",
            "kafka.security.password: mechanism plain needs exactly one",
        ),
        ("{mechanism: none, username: u}", "kafka.security.username: only used with mechanism"),
        ("{mechanism: client-cert-auth, cert_file: c}", "kafka.security.key_file: required"),
        ("{cert_file: c, tls: true}", "kafka.security.key_file: a client certificate needs"),
        ("{mechanism: aws, tls: false}", "kafka.security.tls: mechanism aws needs TLS"),
        ("{tls: true, aws_region: eu-west-1}", "kafka.security.aws_region: only used"),
        ("{ca_file: /ca.pem}", "kafka.security.ca_file: only used with TLS"),
        ("{mechanism: kerberos}", "kafka.security.mechanism: must be one of: none, plain"),
        ("{mechanism: aws, region: x}", "kafka.security.region: unknown key"),
    ],
)
def test_impossible_combinations_name_the_key(security: str, expected: str) -> None:
    assert config_error(f"  security: {security}", {"X": "x-secret"}).startswith(expected)


def test_security_and_client_pass_through_cannot_both_set_authentication() -> None:
    message = config_error(
        "  security: {mechanism: aws}\n  client: {sasl.mechanism: PLAIN, acks: all}"
    )
    assert message.startswith("kafka.client.sasl.mechanism: conflicts with kafka.security")
    # Other librdkafka properties still pass through next to kafka.security.
    config = load("  security: {tls: true}\n  client: {socket.keepalive.enable: true}")
    assert client_properties(config.kafka) == {
        "security.protocol": "SSL",
        "socket.keepalive.enable": True,
    }


def test_without_security_the_client_pass_through_is_unchanged() -> None:
    config = load("  client: {security.protocol: SSL, ssl.endpoint.identification.algorithm: none}")
    assert client_properties(config.kafka) == {
        "security.protocol": "SSL",
        "ssl.endpoint.identification.algorithm": "none",
    }


# -- files -------------------------------------------------------------------------------------


def test_mtls_with_custom_ca_and_password_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("-----BEGIN X-----\n")
    (tmp_path / "pw").write_text("from-a-mounted-file\n")
    sec = KafkaSecurityConfig(
        mechanism="scram-sha-256",
        username="u",
        password_file=str(tmp_path / "pw"),
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "tls.crt"),
        key_file=str(tmp_path / "tls.key"),
        verify_certificates=False,
    )
    props = security_properties(sec)
    assert props["sasl.password"] == "from-a-mounted-file"  # the trailing newline is not in it
    assert props["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert props["ssl.certificate.location"] == str(tmp_path / "tls.crt")
    assert props["ssl.key.location"] == str(tmp_path / "tls.key")
    assert props["enable.ssl.certificate.verification"] is False


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("ca_file", "kafka.security.ca_file: CA certificate file {path} not found"),
        ("cert_file", "kafka.security.cert_file: client certificate file {path} not found"),
        ("key_file", "kafka.security.key_file: client key file {path} not found"),
        ("password_file", "kafka.security.password_file: {path} not found"),
    ],
)
def test_a_missing_file_is_a_configuration_error_naming_it(
    tmp_path: Path, missing: str, expected: str
) -> None:
    files = {k: tmp_path / k for k in ("ca_file", "cert_file", "key_file", "password_file")}
    for key, path in files.items():
        if key != missing:
            path.write_text("x-file-content\n")
    sec = KafkaSecurityConfig(
        mechanism="plain",
        username="u",
        ca_file=str(files["ca_file"]),
        cert_file=str(files["cert_file"]),
        key_file=str(files["key_file"]),
        password_file=str(files["password_file"]),
    )
    with pytest.raises(ConfigError) as info:
        security_properties(sec)
    assert str(info.value) == expected.format(path=files[missing])


# -- AWS MSK IAM -------------------------------------------------------------------------------


class StubSigner:
    """Stands in for aws_msk_iam_sasl_signer.MSKAuthTokenProvider: a new token per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def generate_auth_token(self, region: str) -> tuple[str, int]:
        self.calls.append((region,))
        return f"token-{len(self.calls)}", 1_900_000_000_000 + len(self.calls) * 1000

    def generate_auth_token_from_role_arn(self, region: str, role_arn: str) -> tuple[str, int]:
        self.calls.append((region, role_arn))
        return f"role-token-{len(self.calls)}", 1_900_000_900_000


def test_msk_iam_callback_asks_the_signer_for_a_fresh_token_each_time() -> None:
    signer = StubSigner()
    oauth_cb = msk_iam_token_callback(region="eu-west-1", signer=signer)
    # librdkafka calls it at start and again before each token expires (the refresh).
    assert oauth_cb(None) == ("token-1", 1_900_000_001.0)  # expiry: epoch seconds
    assert oauth_cb("ignored config string") == ("token-2", 1_900_000_002.0)
    assert signer.calls == [("eu-west-1",), ("eu-west-1",)]
    role_cb = msk_iam_token_callback(
        region="us-east-1", role_arn="arn:aws:iam::1:role/r", signer=signer
    )
    assert role_cb(None) == ("role-token-3", 1_900_000_900.0)


def test_a_signer_failure_is_kept_for_the_error_line_and_cleared_by_a_success() -> None:
    class Flaky(StubSigner):
        fail = True

        def generate_auth_token(self, region: str) -> tuple[str, int]:
            if self.fail:
                raise RuntimeError("Unable to locate credentials")
            return super().generate_auth_token(region)

    signer = Flaky()
    oauth_cb = msk_iam_token_callback(region="eu-west-1", signer=signer)
    with pytest.raises(RuntimeError):  # librdkafka needs the exception to mark the failure
        oauth_cb(None)
    assert token_failure({"oauth_cb": oauth_cb}) == (
        "AWS MSK IAM: cannot sign a token for region eu-west-1: RuntimeError: Unable to locate "
        "credentials (check the pod's AWS credentials or role)"
    )
    signer.fail = False
    assert oauth_cb(None)[0] == "token-1"
    assert token_failure({"oauth_cb": oauth_cb}) is None
    assert token_failure({"sasl.mechanism": "PLAIN"}) is None


def test_mechanism_aws_wires_the_signer_module_and_the_region_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signer = StubSigner()
    module = types.ModuleType(SIGNER_MODULE)
    module.MSKAuthTokenProvider = signer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, SIGNER_MODULE, module)
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")
    props = security_properties(KafkaSecurityConfig(mechanism="aws"))
    oauth_cb: Any = props.pop("oauth_cb")
    assert props == {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}
    assert oauth_cb(None)[0] == "token-1"
    assert signer.calls == [("ap-southeast-2",)]


def test_mechanism_aws_without_the_extra_or_a_region_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, SIGNER_MODULE, None)  # import fails
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(ConfigError, match=r"^kafka\.security\.aws_region: required"):
        security_properties(KafkaSecurityConfig(mechanism="aws"))
    with pytest.raises(ConfigError, match=r"tiktok-conversions-worker\[aws\]"):
        security_properties(KafkaSecurityConfig(mechanism="aws", aws_region="eu-west-1"))


# -- diagnosis ---------------------------------------------------------------------------------


def _err(code: int, text: str) -> KafkaError:
    return KafkaError(code, text)


SCRAM = KafkaSecurityConfig(mechanism="scram-sha-512", username="worker", password="pw-123456")


def test_authentication_failure_names_user_and_mechanism_not_the_password() -> None:
    errors = [
        _err(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"),
        _err(
            KafkaError._AUTHENTICATION,
            "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication "
            "failed during authentication due to invalid credentials with SASL mechanism "
            "SCRAM-SHA-512",
        ),
    ]
    line = explain_failure(SCRAM, errors)
    assert line == (
        "Kafka authentication failed for user 'worker' with mechanism SCRAM-SHA-512: check "
        "kafka.security.username and kafka.security.password"
    )
    assert "pw-123456" not in line


def test_tls_failures_name_the_certificate_problem() -> None:
    untrusted = _err(
        KafkaError._SSL,
        "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
        "certificate verify failed: broker certificate could not be verified",
    )
    line = explain_failure(KafkaSecurityConfig(tls=True, ca_file="/etc/ca.pem"), [untrusted])
    assert line is not None
    assert "certificate is not trusted" in line
    assert "/etc/ca.pem" in line
    rejected = _err(
        KafkaError._TRANSPORT,
        "ssl://127.0.0.1:9093/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls "
        "alert bad certificate: SSL alert number 42",
    )
    line = explain_failure(KafkaSecurityConfig(tls=True), [rejected])
    assert line is not None
    assert "rejected the client certificate" in line
    assert explain_failure(SCRAM, [_err(KafkaError._TRANSPORT, "Connection refused")]) is None


def test_a_file_librdkafka_cannot_load_is_named_by_its_kafka_security_key() -> None:
    sec = KafkaSecurityConfig(mechanism="client-cert-auth", cert_file="/c.pem", key_file="/k.pem")
    text = (
        "Failed to create admin client: ssl.key.location failed: "
        "error:1C800064:Provider routines::bad decrypt"
    )
    assert explain_refused_client(sec, text) == (
        "kafka.security.key_file: /k.pem is not a usable PEM file (or "
        "kafka.security.key_password is wrong): error:1C800064:Provider routines::bad decrypt"
    )
    other = "Failed to create admin client: Invalid value for configuration property"
    assert explain_refused_client(sec, other) is None


@pytest.mark.tools  # openssl makes the certificates
def test_check_config_loads_the_certificates_as_librdkafka_will(tmp_path: Path) -> None:
    tls = make_test_pki(tmp_path / "pki")
    good = KafkaSecurityConfig(
        mechanism="client-cert-auth",
        ca_file=str(tls.ca_cert),
        cert_file=str(tls.client_cert),
        key_file=str(tls.client_key),
    )
    check_security(good)  # no error
    check_security(KafkaSecurityConfig())  # nothing to check
    swapped = KafkaSecurityConfig(
        mechanism="client-cert-auth",
        ca_file=str(tls.client_key),  # a key where a certificate belongs
        cert_file=str(tls.client_cert),
        key_file=str(tls.client_key),
    )
    with pytest.raises(ConfigError, match=r"^kafka\.security\.ca_file: .* is not a usable PEM"):
        check_security(swapped)
