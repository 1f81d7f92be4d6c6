"""One notion of a secret (`worker.core.redaction`) for check-config, log scrubbing and the
client's server messages."""

from __future__ import annotations

import json

import pytest

from worker.config import masked, parse_config, secret_values
from worker.core.redaction import (
    MASK,
    is_secret_key,
    mask_url_credentials,
    sanitise_message,
    scrub_text,
    url_secrets,
)
from worker.observability.logs import scrub

SECRET_KEYS = [
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.jaas.config",
    "ssl.key.pem",
    "ssl.certificate.pem",
    "access_token",
    "Access-Token",
    "Authorization",
    "token",
]
PLAIN_KEYS = ["sasl.username", "ssl.key.location", "security.protocol", "client.id", "acks"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [*PLAIN_KEYS, 3, None])
def test_plain_keys(key: object) -> None:
    assert not is_secret_key(key)


def test_config_masking_log_scrubbing_and_registration_agree() -> None:
    # Values librdkafka accepts: the config check builds real clients from them.
    client = {
        "sasl.password": "pw-123456",
        "ssl.key.password": "kp-123456",
        "sasl.oauthbearer.client.secret": "cs-123456",
        "sasl.oauthbearer.config": "principal=svc-123456",
        "sasl.username": "user-123456",
        "client.id": "shop-123456",
        "acks": "all",
    }
    kafka_keys = list(client)
    destination = {"name": "a", "pixel_code": "P", "access_token": "tok-123456"}
    text = json.dumps({"kafka": {"client": client}, "destinations": [destination]})
    config = parse_config(text, environ={})
    shown = masked(config)["kafka"]["client"]
    logged = scrub(None, "info", {"kafka": dict(client)})["kafka"]
    registered = set(secret_values(config))
    for key in kafka_keys:
        secret = is_secret_key(key)
        assert (shown[key] == MASK) is secret, key
        assert (logged[key] == MASK) is secret, key
        assert (client[key] in registered) is secret, key
    assert "tok-123456" in registered


def test_url_credentials() -> None:
    url = "rediss://default:p%40ss-word@redis:6380/0"
    assert url_secrets(url) == ["default:p%40ss-word", "p%40ss-word", "p@ss-word"]
    assert mask_url_credentials(url) == "rediss://***@redis:6380/0"
    assert url_secrets("redis://redis:6379/0") == []
    assert mask_url_credentials("redis://redis:6379/0") == "redis://redis:6379/0"


def test_sanitise_message_keeps_addresses_and_short_numbers() -> None:
    text = "bad field data[3].user.email mail a.b@example.org from 10.0.0.1 code 40002"
    assert sanitise_message(text) == (
        "bad field data[3].user.email mail <email> from 10.0.0.1 code 40002"
    )


def test_server_text_masks_any_address_log_text_only_dotted_ones() -> None:
    assert sanitise_message("bad email jane@localhost") == "bad email <email>"
    assert scrub_text("bad email jane@localhost") == "bad email jane@localhost"
    assert scrub_text("to (jane@example.com)") == "to (<email>)"
