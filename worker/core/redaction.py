"""Keeping tokens, passwords and personal data out of everything the worker prints.

One place decides what a secret is, for every path that shows data:
- `is_secret_key(key)`: a config or log key whose value is a secret (librdkafka security
  properties, access tokens, passwords, Authorization headers). `check-config` masks those
  values, the config registers them for scrubbing, and the log processor masks them.
- `register_secrets(values)`: secret values (the configured access tokens, SASL and Redis
  passwords) masked wherever they appear in a log line; `scrub_text` applies them and masks
  email addresses.
- `mask_url_credentials(url)` / `url_secrets(url)`: the userinfo of `scheme://user:pw@host`.
- `sanitise_message(text, secret=)`: text a server wrote (TikTok's `message`, an aiohttp error)
  made short, single-line, without the token, emails or phone-like digit runs.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Final

MASK: Final = "***"
EMAIL_MASK: Final = "<email>"
NUMBER_MASK: Final = "<number>"
MAX_MESSAGE_CHARS: Final = 200
# Shorter values would mask ordinary words; real tokens and passwords are longer.
MIN_SECRET_CHARS: Final = 6

# Key names holding secrets: librdkafka's sasl.password, ssl.key.password, ssl.keystore.password,
# sasl.oauthbearer.client.secret, sasl.oauthbearer.config, sasl.jaas.config, ssl.key.pem,
# ssl.certificate.pem, and the worker's own access_token / Access-Token / Authorization.
_SECRET_KEY_RE: Final = re.compile(
    r"password|secret|jaas|token|credential|authorization|\.pem$|oauthbearer\.config|api\.key",
    re.I,
)
# An address with a dotted domain, stopping at quotes and brackets: log lines keep their shape.
_EMAIL_RE: Final = re.compile(r"[^\s@\"'<>(),;:]+@[^\s@\"'<>(),;:]+\.[A-Za-z]{2,}")
# Server text only (TikTok's `message`, an aiohttp error), masked more broadly: anything around
# an `@`, and 9+ digits with short space/dash/paren separators (log lines carry offsets and
# timestamps, so these stay out of `scrub_text`); dots excluded so IP addresses survive.
_LOOSE_EMAIL_RE: Final = re.compile(r"[^\s@\"']+@[^\s@\"']+")
_PHONE_RE: Final = re.compile(r"\+?\d(?:[\s()-]{0,2}\d){8,}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")

_secrets: set[str] = set()


def is_secret_key(key: object) -> bool:
    """True when the value stored under `key` is a secret."""
    return isinstance(key, str) and _SECRET_KEY_RE.search(key) is not None


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values wherever they would appear in a log line (idempotent)."""
    for value in values:
        if value and len(value) >= MIN_SECRET_CHARS:
            _secrets.add(value)


def clear_secrets() -> None:
    """Forget the registered secrets (tests)."""
    _secrets.clear()


def mask_emails(text: str) -> str:
    return _EMAIL_RE.sub(EMAIL_MASK, text) if "@" in text else text


def scrub_text(text: str) -> str:
    """`text` with every registered secret and email address masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return mask_emails(text)


def url_userinfo(url: str) -> str:
    """Everything between `scheme://` and the last `@`, however it is written: a password
    with an unencoded `@`, `:` or `/` must not leave a part of itself outside the mask."""
    _scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return ""
    return rest.rpartition("@")[0]


def url_secrets(url: str) -> list[str]:
    """What to scrub for a URL's credentials: the whole userinfo, and its password part both
    as written and percent-decoded."""
    userinfo = url_userinfo(url)
    if not userinfo:
        return []
    values = [userinfo]
    password = userinfo.partition(":")[2]
    if password:
        values += [password, urllib.parse.unquote(password)]
    return values


def mask_url_credentials(url: str) -> str:
    """Replace the whole userinfo of `scheme://userinfo@host/...` by `***`."""
    userinfo = url_userinfo(url)
    if not userinfo:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{MASK}@{rest[len(userinfo) + 1 :]}"


def sanitise_message(text: str, *, secret: str | None = None) -> str:
    """A short, single-line version of `text` with the secret, emails and phones masked."""
    if secret:
        text = text.replace(secret, MASK)
    text = _CONTROL_RE.sub(" ", text)
    text = _LOOSE_EMAIL_RE.sub(EMAIL_MASK, text)
    text = _PHONE_RE.sub(NUMBER_MASK, text)
    text = text.strip()
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def has_control_characters(text: str) -> bool:
    return _CONTROL_RE.search(text) is not None
