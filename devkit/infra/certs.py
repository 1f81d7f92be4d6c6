"""Test certificates made at test time with the `openssl` command line: a CA, a broker
certificate for 127.0.0.1, a client certificate for mutual TLS, and a second, unrelated CA
(what "a certificate the worker does not trust" looks like).

Keys are EC P-256 (fast to make). The broker reads a PKCS#12 keystore and a PEM truststore;
librdkafka reads the PEM files. Nothing here is secret beyond the test that made it.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devkit.infra import which
from devkit.infra.errors import InfraError

_DAYS = "2"
_CURVE = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one test PKI (all PEM unless named otherwise)."""

    ca_cert: Path
    broker_keystore: Path  # PKCS#12: broker key + certificate + CA chain
    keystore_password: str
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # signed nothing the broker uses


def _openssl(*args: str, cwd: Path) -> None:
    exe = which("openssl", "install the openssl package (Debian: apt-get install openssl)")
    res = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if res.returncode != 0:
        raise InfraError(f"openssl {args[0]} failed: {res.stderr.strip()[-500:]}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_CURVE, "-keyout", key.name, "-out", cert.name, "-days", _DAYS,
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}{s}" for s in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl("req", *_CURVE, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name,
        "-CAcreateserial", "-out", cert.name, "-days", _DAYS, "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_test_pki(directory: Path) -> TlsFiles:
    """Create the CA, broker and client certificates in `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    other = _ca(directory, "other-ca")
    broker = _signed(
        directory,
        "broker",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    client = _signed(directory, "worker-client", ca, "extendedKeyUsage=clientAuth")
    password = secrets.token_hex(12)
    keystore = directory / "broker.p12"
    _openssl(
        "pkcs12", "-export", "-in", broker[0].name, "-inkey", broker[1].name,
        "-certfile", ca[0].name, "-name", "broker", "-out", keystore.name,
        "-passout", f"pass:{password}",
        cwd=directory,
    )  # fmt: skip
    return TlsFiles(
        ca_cert=ca[0],
        broker_keystore=keystore,
        keystore_password=password,
        client_cert=client[0],
        client_key=client[1],
        other_ca_cert=other[0],
    )
