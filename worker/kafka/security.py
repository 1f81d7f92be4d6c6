"""kafka.security → librdkafka properties, applied to every Kafka client the worker makes.

`client_properties(kafka)` is the one place the consumer, the dead-letter producer, the lag
reader and the `dlq` tools get their connection settings from: the security properties
derived from `kafka.security`, then the user's `kafka.client` pass-through (config validation
refuses security keys in both). Files (CA, client certificate and key, password file) are
checked here, when a client is about to be built, not when the config is parsed, so
`tiktok-worker map` works on a laptop without the cluster's certificates.

`explain_failure(...)` turns the librdkafka errors seen while connecting into one line that
names the real cause (wrong credentials, untrusted certificate, rejected client certificate)
instead of librdkafka's generic "Broker transport failure".

AWS MSK IAM: SASL OAUTHBEARER whose token comes from `aws-msk-iam-sasl-signer-python` (the
`aws` extra), signed with the standard AWS credential chain (IRSA, instance role, env keys).
librdkafka calls the callback again before the token expires (at about 80 % of its life).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Final

from confluent_kafka import KafkaError

from worker.config import KafkaConfig, KafkaSecurityConfig
from worker.core.redaction import register_secrets
from worker.errors import ConfigError

SIGNER_MODULE: Final = "aws_msk_iam_sasl_signer"
_SASL_MECHANISMS: Final = {
    "plain": "PLAIN",
    "scram-sha-256": "SCRAM-SHA-256",
    "scram-sha-512": "SCRAM-SHA-512",
    "aws": "OAUTHBEARER",
}
_WHERE: Final = "kafka.security"


def client_properties(kafka: KafkaConfig) -> dict[str, Any]:
    """Security properties from kafka.security, then kafka.client (without bootstrap.servers).

    Raises ConfigError (one line naming the key) when a file is missing or unreadable, or
    when mechanism aws lacks its optional dependency or a region.
    """
    props = security_properties(kafka.security)
    props.update(kafka.client)
    return props


def security_properties(sec: KafkaSecurityConfig) -> dict[str, Any]:
    """The librdkafka security settings for `sec` (empty for mechanism none without TLS)."""
    props: dict[str, Any] = {}
    sasl = _SASL_MECHANISMS.get(sec.mechanism)
    tls = sec.tls_enabled
    if sasl is not None:
        props["security.protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        props["sasl.mechanism"] = sasl
    elif tls:
        props["security.protocol"] = "SSL"
    if sec.mechanism in ("plain", "scram-sha-256", "scram-sha-512"):
        assert sec.username is not None  # config validation
        props["sasl.username"] = sec.username
        props["sasl.password"] = _password(sec)
    elif sec.mechanism == "aws":
        props["oauth_cb"] = msk_iam_token_callback(
            region=_aws_region(sec), role_arn=sec.aws_role_arn
        )
    if sec.ca_file is not None:
        props["ssl.ca.location"] = _readable(sec.ca_file, "ca_file", "CA certificate")
    if sec.cert_file is not None and sec.key_file is not None:
        props["ssl.certificate.location"] = _readable(
            sec.cert_file, "cert_file", "client certificate"
        )
        props["ssl.key.location"] = _readable(sec.key_file, "key_file", "client key")
        if sec.key_password is not None:
            props["ssl.key.password"] = sec.key_password
    if tls and not sec.verify_certificates:
        props["enable.ssl.certificate.verification"] = False
        props["ssl.endpoint.identification.algorithm"] = "none"
    return props


def check_security(sec: KafkaSecurityConfig) -> None:
    """What `check-config` adds for kafka.security: the files exist and librdkafka can load
    the certificates and key (a throw-away client, no broker contacted); `aws` has its
    dependency and a region. Raises ConfigError naming the key, like start-up would."""
    from confluent_kafka import KafkaException, Producer

    props = security_properties(sec)
    tls = {k: v for k, v in props.items() if k.startswith("ssl.")}
    if not tls:
        return
    try:
        Producer({"security.protocol": "SSL", **tls, "logger": _SILENT}).flush(0)
    except KafkaException as exc:
        text = exc.args[0].str()
        raise ConfigError(explain_refused_client(sec, text) or f"{_WHERE}: {text}") from None


# librdkafka's warnings from that throw-away client (no bootstrap.servers) go nowhere.
_SILENT: Final = logging.getLogger("worker.kafka.security.check")
_SILENT.propagate = False
_SILENT.addHandler(logging.NullHandler())


def _readable(path: str, key: str, what: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{_WHERE}.{key}: {what} file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{_WHERE}.{key}: {what} file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(
            f"{_WHERE}.{key}: cannot read {what} file {path}: {exc.strerror or exc}"
        ) from None
    return path


def _password(sec: KafkaSecurityConfig) -> str:
    if sec.password is not None:
        return sec.password
    assert sec.password_file is not None  # config validation
    path = sec.password_file
    try:
        with open(path, encoding="utf-8") as fh:
            # Kubernetes Secrets and `echo` often end the file with a newline.
            password = fh.read().rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{_WHERE}.password_file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{_WHERE}.password_file: cannot read {path}: {reason}") from None
    if not password:
        raise ConfigError(f"{_WHERE}.password_file: {path} is empty")
    register_secrets([password])  # never in a log line, whoever logs it
    return password


def _aws_region(sec: KafkaSecurityConfig) -> str:
    region = sec.aws_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError(
            f"{_WHERE}.aws_region: required for mechanism aws "
            "(or set AWS_REGION in the environment)"
        )
    return region


class MskIamTokenCallback:
    """librdkafka's `oauth_cb` for AWS MSK IAM: returns (token, expiry in epoch seconds).

    `signer` is the `MSKAuthTokenProvider` of aws-msk-iam-sasl-signer-python; its tokens are
    SigV4-signed URLs, valid about 15 minutes. When signing fails (no credentials, a role that
    cannot be assumed) librdkafka only reports "OAuth token not set": `last_error` keeps the
    real cause, without secrets, for the one-line error.
    """

    def __init__(self, *, region: str, role_arn: str | None, signer: Any) -> None:
        self.region = region
        self.role_arn = role_arn
        self._signer = signer
        self.last_error: str | None = None

    def __call__(self, _config: str | None) -> tuple[str, float]:
        try:
            if self.role_arn is not None:
                token, expiry_ms = self._signer.generate_auth_token_from_role_arn(
                    self.region, self.role_arn
                )
            else:
                token, expiry_ms = self._signer.generate_auth_token(self.region)
        except Exception as exc:
            self.last_error = (
                f"AWS MSK IAM: cannot sign a token for region {self.region}: "
                f"{type(exc).__name__}: {exc} (check the pod's AWS credentials or role)"
            )
            raise  # librdkafka marks the token as failed and retries later
        self.last_error = None
        return str(token), float(expiry_ms) / 1000.0


def msk_iam_token_callback(
    *, region: str, role_arn: str | None = None, signer: Any | None = None
) -> MskIamTokenCallback:
    """The `oauth_cb` for AWS MSK IAM (`signer` defaults to the optional dependency)."""
    return MskIamTokenCallback(
        region=region, role_arn=role_arn, signer=signer if signer is not None else _load_signer()
    )


def token_failure(client: Mapping[str, Any]) -> str | None:
    """Why the MSK IAM token callback among these client properties last failed, if it did."""
    callback = client.get("oauth_cb")
    return callback.last_error if isinstance(callback, MskIamTokenCallback) else None


def _load_signer() -> Any:
    try:
        module = importlib.import_module(SIGNER_MODULE)
    except ImportError:
        raise ConfigError(
            f"{_WHERE}.mechanism: aws needs the optional dependency "
            "aws-msk-iam-sasl-signer-python (pip install 'tiktok-conversions-worker[aws]')"
        ) from None
    return module.MSKAuthTokenProvider


# --------------------------------------------------------------------------- diagnosis


def explain_failure(sec: KafkaSecurityConfig, errors: Iterable[KafkaError]) -> str | None:
    """One line naming the real cause among the errors seen while connecting, or None."""
    seen = list(errors)
    for err in seen:
        if err.code() == KafkaError._AUTHENTICATION:
            return _auth_failed(sec, err.str())
    for err in seen:
        text = err.str()
        if err.code() == KafkaError._SSL or any(m in text for m in _TLS_MARKERS):
            return _tls_failed(sec, text)
    return None


# librdkafka reports some TLS failures as plain transport errors (the broker's alert about
# our certificate arrives after the handshake): recognise them by OpenSSL's wording.
_TLS_MARKERS: Final = (
    "SSL handshake failed",
    "certificate verify failed",
    "alert bad certificate",
    "alert certificate required",
    "alert unknown ca",
)


# The librdkafka properties kafka.security fills with a file, and the key that names it.
_FILE_PROPERTIES: Final = {
    "ssl.ca.location": "ca_file",
    "ssl.certificate.location": "cert_file",
    "ssl.key.location": "key_file",
}


def explain_refused_client(sec: KafkaSecurityConfig, text: str) -> str | None:
    """When librdkafka refuses to build a client because of a certificate or key file that
    kafka.security names, the configuration error naming that key; otherwise None."""
    for prop, key in _FILE_PROPERTIES.items():
        path = getattr(sec, key)
        if path is not None and f"{prop} failed" in text:
            reason = text.split(f"{prop} failed:", 1)[-1].strip()
            hint = " (or kafka.security.key_password is wrong)" if key == "key_file" else ""
            return f"{_WHERE}.{key}: {path} is not a usable PEM file{hint}: {reason}"
    return None


def _auth_failed(sec: KafkaSecurityConfig, text: str) -> str:
    if sec.mechanism == "aws":
        return (
            "Kafka authentication failed with mechanism AWS MSK IAM (SASL OAUTHBEARER): check "
            "the pod's AWS credentials or role and its kafka-cluster permissions"
        )
    mechanism = _SASL_MECHANISMS.get(sec.mechanism)
    if mechanism is not None:
        source = "password_file" if sec.password_file is not None else "password"
        return (
            f"Kafka authentication failed for user {sec.username!r} with mechanism "
            f"{mechanism}: check kafka.security.username and kafka.security.{source}"
        )
    # SASL set through kafka.client: name what librdkafka said, it holds no secret.
    return f"Kafka authentication failed: {text}"


def _tls_failed(sec: KafkaSecurityConfig, text: str) -> str:
    low = text.lower()
    if "certificate verify failed" in low or "could not be verified" in low:
        hint = (
            f"kafka.security.ca_file ({sec.ca_file}) did not sign it"
            if sec.ca_file is not None
            else "set kafka.security.ca_file to the CA that signed it"
        )
        return f"TLS to Kafka failed: the broker's certificate is not trusted ({hint})"
    if any(word in low for word in ("certificate required", "bad certificate", "unknown ca")):
        which = (
            "kafka.security.cert_file was not accepted"
            if sec.cert_file is not None
            else "it requires one: set kafka.security.cert_file and key_file"
        )
        return f"TLS to Kafka failed: the broker rejected the client certificate ({which})"
    if "wrong version number" in low or "packet length too long" in low:
        return "TLS to Kafka failed: the listener does not speak TLS (check kafka.security.tls)"
    return f"TLS to Kafka failed: {text}"
