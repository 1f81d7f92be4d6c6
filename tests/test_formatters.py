"""PII normalisation and hashing: the verified vectors and Segment's edge cases."""

from __future__ import annotations

import hashlib

import pytest

from worker.mapping.hashing import (
    format_address_part,
    hash_email,
    hash_external_id,
    hash_name,
    hash_phone,
    is_hashed,
    normalise_phone,
    sha256_hex,
    smart_hash,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# Verified vectors (docs/tiktok-events-api.md §6, docs/segment-tiktok-destination.md §5).
EMAIL_VECTOR = "eb9869a32b532840dd6aa714f7a872d21d6f650fc5aa933d9feefc64708969c7"
PHONE_VECTOR = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
EXTERNAL_ID_VECTOR = "481f202262e9c5ccc48d24e60798fadaa5f6ff1f8369f7ab927c04c3aa682a7f"


def test_documented_vectors() -> None:
    assert hash_email("coreytest1231@gmail.com") == EMAIL_VECTOR
    assert hash_phone("+1555-555-5555") == PHONE_VECTOR
    assert hash_external_id("testId123") == EXTERNAL_ID_VECTOR
    assert hash_email(" ALICE_abc@gmail.com ") == (
        "848a771458438fc2ec420560d769fb9b9b86851ee338ec56517baabd79d3bb4f"
    )
    assert hash_phone("(+1)2133734253") == (
        "9f7ec22d72092cd3c0b58726ed9c2d91b92e51a3f29837508fb2948bb22dd2fd"
    )
    assert hash_phone("12345678901234") == (
        "00a63bd0437d6ca0fa7b95c00ab2e7c020faa71440e5246750d6b517689e6777"
    )


def test_email_is_trimmed_only_with_the_improvement() -> None:
    assert hash_email("  CoreyTest1231@Gmail.com\t") == EMAIL_VECTOR
    # Segment's own rule (trim=False) hashes the spaces too.
    assert hash_email(" coreytest1231@gmail.com", trim=False) == sha(" coreytest1231@gmail.com")


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_blank_values_hash_to_empty(blank: str) -> None:
    assert smart_hash(blank) == ""
    assert hash_email(blank) == ""
    assert hash_phone(blank) == ""
    assert hash_external_id(blank) == ""
    assert hash_name(blank) == ""


def test_already_hashed_values_pass_through() -> None:
    upper = EMAIL_VECTOR.upper()
    assert is_hashed(upper)
    assert not is_hashed(EMAIL_VECTOR[:-1])
    assert not is_hashed(EMAIL_VECTOR[:-1] + "g")
    # email / external_id: checked after lowercasing, so they come out lower-case.
    assert hash_email(upper) == EMAIL_VECTOR
    assert hash_external_id(upper) == EMAIL_VECTOR
    # phone: checked on the raw value, so the case is kept (Segment's behaviour).
    assert hash_phone(upper) == upper
    assert hash_name(upper) == EMAIL_VECTOR
    assert smart_hash(EMAIL_VECTOR) == EMAIL_VECTOR


def test_external_id_is_lowercased_not_trimmed() -> None:
    assert hash_external_id(" User_123 ") == sha(" user_123 ")


def test_names_and_zip_lose_all_whitespace() -> None:
    assert hash_name(" Mary\tAnn \n") == sha("maryann")
    assert hash_name("O'Neil") == sha("o'neil")  # punctuation is kept, like Segment
    assert hash_name("SW1A 1AA") == sha("sw1a1aa")
    assert hash_name("Ängström") == sha("ängström")
    assert hash_name("a\u00a0b\u3000c") == sha("abc")  # JavaScript's \s includes these


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("São Paulo", "sopaulo"),
        ("New York", "newyork"),
        ("N.Y.", "ny"),
        ("US", "us"),
        ("Zürich-2", "zrich2"),
        ("", ""),
    ],
)
def test_address_parts_are_plain_ascii_alphanumerics(raw: str, plain: str) -> None:
    assert format_address_part(raw) == plain


@pytest.mark.parametrize(
    ("raw", "region", "normalised"),
    [
        ("+1555-555-5555", None, "+15555555555"),
        ("(+1)2133734253", None, "+12133734253"),
        ("0044 7700 900123", None, "+00447700900123"),
        ("123456789012345678", None, "+12345678901234"),  # cut to 15 characters
        ("abc", None, "+"),
        ("١٢٣ 45", None, "+45"),  # only ASCII digits count, like JavaScript's \D
        ("(213) 373-4253", "US", "+12133734253"),
        ("07700 900123", "GB", "+447700900123"),
        ("0044 7700 900123", "DE", "+447700900123"),  # international prefix understood
        ("+1 213 373 4253", "GB", "+12133734253"),  # a country code wins over the region
        ("12", "US", "+12"),  # not a possible number: Segment's rule
    ],
)
def test_phone_normalisation(raw: str, region: str | None, normalised: str) -> None:
    assert normalise_phone(raw, region) == normalised
    assert hash_phone(raw, region) == sha(normalised)


def test_lone_surrogates_hash_like_javascript() -> None:
    assert sha256_hex("a\ud800b") == hashlib.sha256("a\ufffdb".encode()).hexdigest()
