"""PII normalisation and SHA-256 hashing, as Segment's TikTok Conversions destination does it.

"Smart hashing" (Segment `hashing-utils.ts`): an empty or whitespace-only input gives `""`;
an already-hashed input (64 hex characters, any case) passes through; anything else is
normalised and hashed to lowercase hex SHA-256 of its UTF-8 bytes.

Per field (docs/segment-tiktok-destination.md §5), with the two deliberate improvements of
SPEC §3 marked:
- email: trimmed (improvement 1) and lowercased; the pre-hash check sees the normalised value;
- phone: the pre-hash check sees the raw value; then every non-digit is dropped, `+` is
  prefixed and the result cut to 15 characters; with a default region (improvement 2) a number
  without a leading `+` is parsed for that region and formatted E.164 first;
- external_id: lowercased only (no trim);
- first_name, last_name, zip_code: all whitespace removed, lowercased;
- city, state, country: every character outside [A-Za-z0-9] removed, lowercased, NOT hashed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Final, NamedTuple, Protocol, cast

import phonenumbers

__all__ = [
    "PLAIN_HASHERS",
    "Hashers",
    "cached_address_part",
    "cached_hash_name",
    "format_address_part",
    "hash_email",
    "hash_external_id",
    "hash_name",
    "hash_phone",
    "is_hashed",
    "normalise_phone",
    "sha256_hex",
    "smart_hash",
]

_HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}\Z")
_HEX64_BYTES_RE: Final = re.compile(rb"[0-9a-fA-F]{64}\Z")
_ASCII_JS_WS: Final = b" \t\n\x0b\x0c\r"
# JavaScript's \s, so "remove all whitespace" removes exactly what Segment removes.
_JS_WS_RE: Final = re.compile(
    "[\t\n\x0b\x0c\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+"
)
_NON_DIGIT_BYTES: Final = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
_NON_ALNUM_RE: Final = re.compile(r"[^A-Za-z0-9]+")
_ASCII_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_NON_ALNUM_BYTES: Final = bytes(
    b for b in range(256) if not (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A)
)
_PHONE_MAX_CHARS: Final = 15  # Segment keeps "+" and at most 14 digits


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


def _fastest_sha256() -> Callable[[bytes], _Hash]:
    """CPython's built-in SHA-256 (`_sha2` in 3.12+, `_sha256` before) is ~20% faster than
    OpenSSL's for the short inputs hashed here; fall back to hashlib if it is missing."""
    for module in ("_sha2", "_sha256"):
        try:
            candidate = importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            continue
        if candidate(b"abc").hexdigest() == hashlib.sha256(b"abc").hexdigest():
            return cast(Callable[[bytes], _Hash], candidate)
    return hashlib.sha256


_sha256: Final = _fastest_sha256()


def is_hashed(value: str) -> bool:
    """True for 64 hexadecimal characters (either case): a value that was hashed upstream."""
    return len(value) == 64 and _HEX64_RE.match(value) is not None


def sha256_hex(value: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 bytes of `value`."""
    try:
        data = value.encode()
    except UnicodeEncodeError:  # lone surrogates: encode them as U+FFFD like JavaScript does
        data = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
    return _sha256(data).hexdigest()


# The functions below are on the per-event hot path: each does its whole job in one call
# (smart-hash rules inlined) rather than composing helpers.


def smart_hash(value: str) -> str:
    """Empty/whitespace -> "", already hashed -> unchanged, otherwise SHA-256."""
    if not value or value.isspace():
        return ""
    if len(value) == 64 and _HEX64_RE.match(value) is not None:
        return value
    return sha256_hex(value)


def hash_email(value: str, *, trim: bool = True) -> str:
    """Email: trim (SPEC §3 improvement 1; `trim=False` is Segment's rule) and lowercase."""
    value = value.strip().lower() if trim else value.lower()
    if not value or value.isspace():
        return ""
    if len(value) == 64 and _HEX64_RE.match(value) is not None:
        return value
    try:
        return _sha256(value.encode()).hexdigest()
    except UnicodeEncodeError:
        return sha256_hex(value)


def hash_external_id(value: str) -> str:
    """External id: lowercased, not trimmed (Segment's rule, kept for matching parity)."""
    value = value.lower()
    if not value or value.isspace():
        return ""
    if len(value) == 64 and _HEX64_RE.match(value) is not None:
        return value
    return sha256_hex(value)


def hash_name(value: str) -> str:
    """first_name, last_name and zip_code: every whitespace character removed, lowercased."""
    if value.isascii():
        # One C pass: delete JavaScript's ASCII whitespace and lowercase A-Z.
        data = value.encode().translate(_ASCII_LOWER, _ASCII_JS_WS)
        if not data:
            return ""
        if len(data) == 64 and _HEX64_BYTES_RE.match(data) is not None:
            return data.decode()
        return _sha256(data).hexdigest()
    value = _JS_WS_RE.sub("", value).lower()
    if not value:
        return ""
    if len(value) == 64 and _HEX64_RE.match(value) is not None:
        return value
    return sha256_hex(value)


def format_address_part(value: str) -> str:
    """city, state, country: only ASCII letters and digits, lowercased. Plain text."""
    if value.isascii() and value.isalnum():
        return value.lower()
    try:
        data = value.encode()
    except UnicodeEncodeError:
        return _NON_ALNUM_RE.sub("", value).lower()
    # One pass over the UTF-8 bytes: lowercase A-Z, delete everything but [a-z0-9] (bytes
    # of multi-byte characters are >= 0x80 and go too, like JavaScript's [^A-Za-z0-9]).
    return data.translate(_ASCII_LOWER, _NON_ALNUM_BYTES).decode()


# Bounded caches for the low-cardinality values (first and last names, zip codes, city, state,
# country): a hit costs a dict lookup instead of a normalisation and a SHA-256. Measured on the
# bench mix (docs/benchmarks.md, issue 18): +5-8% decode + map. Phones, emails and external ids
# are per user, so mostly unique: caching them measured as no gain or a loss, and they are not
# cached. The caches hold the raw values in this process's memory, like in-flight messages do.
cached_hash_name: Final = lru_cache(maxsize=8192)(hash_name)
cached_address_part: Final = lru_cache(maxsize=4096)(format_address_part)


def normalise_phone(value: str, region: str | None = None) -> str:
    """The phone text that gets hashed (before hashing; exposed for tests and docs)."""
    return _phone_bytes(value, region).decode()


def _phone_bytes(value: str, region: str | None) -> bytes:
    if region is not None and not value.lstrip().startswith("+"):
        e164 = _e164(value, region)
        if e164 is not None:
            return e164.encode()
    try:
        data = value.encode()
    except UnicodeEncodeError:
        data = value.encode("utf-8", "replace")
    # Deleting every byte that is not an ASCII digit from the UTF-8 bytes drops exactly the
    # characters JavaScript's /\D/g drops (multi-byte characters have no ASCII bytes), and is
    # several times faster than a regex substitution.
    return (b"+" + data.translate(None, _NON_DIGIT_BYTES))[:_PHONE_MAX_CHARS]


def hash_phone(value: str, region: str | None = None) -> str:
    """Phone: the pre-hash check looks at the raw value, then normalise and hash."""
    if not value or value.isspace():
        return ""
    if len(value) == 64 and _HEX64_RE.match(value) is not None:
        return value
    return _sha256(_phone_bytes(value, region)).hexdigest()


@lru_cache(maxsize=8192)
def _e164(value: str, region: str) -> str | None:
    """E.164 for a number written without a country code, or None if it is not possible."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


class Hashers(NamedTuple):
    """The per-user hash functions a plan calls (email, external id, phone with a region)."""

    email: Callable[[str], str]
    external_id: Callable[[str], str]
    phone: Callable[[str, str | None], str]


PLAIN_HASHERS: Final = Hashers(hash_email, hash_external_id, hash_phone)


def remembering_hashers() -> Hashers:
    """Hashers that return their last result again when given the same string object.

    For a mapper whose destinations evaluate several plans of one event (web, crm, offline,
    app): each plan reads the same email, phone and id objects from the decoded event, and
    only the first plan pays for the SHA-256. Identity (not equality) keeps the miss cheap,
    and the remembered argument stays referenced, so its identity cannot be reused. One set
    per Mapper; the worker maps on one thread."""

    def remember(fn: Callable[[str], str]) -> Callable[[str], str]:
        last_in: object = None
        last_out = ""

        def hashed(value: str) -> str:
            nonlocal last_in, last_out
            if value is last_in:
                return last_out
            out = fn(value)
            last_in, last_out = value, out
            return out

        return hashed

    last_phone: object = None
    last_region: str | None = None
    last_phone_out = ""

    def phone(value: str, region: str | None = None) -> str:
        nonlocal last_phone, last_region, last_phone_out
        if value is last_phone and region == last_region:
            return last_phone_out
        out = hash_phone(value, region)
        last_phone, last_region, last_phone_out = value, region, out
        return out

    return Hashers(remember(hash_email), remember(hash_external_id), phone)
