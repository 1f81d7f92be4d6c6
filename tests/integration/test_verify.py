"""`tiktok-worker verify` as a process against `python -m devkit.fake_tiktok`: exit statuses,
one line per destination, one-line errors, and never the token."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import WORKER_CMD, FakeTikTokProcess, destination, worker_config, write_config
from devkit.infra.procs import free_port

pytestmark = pytest.mark.integration

GOOD = "cli-good-token-0123456789abcdef"
BAD = "cli-revoked-token-fedcba9876543210"
PIXEL_A = "C5PIXELAAAAAAAAAAAA1"
PIXEL_B = "C5PIXELBBBBBBBBBBBB2"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeTikTokProcess]:
    with FakeTikTokProcess(tmp_path, args=["--token", GOOD]) as server:
        yield server


def write(tmp_path: Path, base_url: str, *destinations: dict[str, Any]) -> Path:
    config = worker_config(
        bootstrap="127.0.0.1:9",  # verify never talks to Kafka
        topic="unused",
        dlq_topic="unused.dlq",
        base_url=base_url,
        destinations=list(destinations),
    )
    return write_config(tmp_path / f"verify-{free_port()}.yaml", config)


def verify(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WORKER_CMD, "verify", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_one_line_per_destination_and_exit_1_when_any_fails(
    fake: FakeTikTokProcess, tmp_path: Path
) -> None:
    config = write(
        tmp_path,
        fake.url,
        destination("shop-a", pixel=PIXEL_A, token=GOOD, test_event_code="TEST12345"),
        destination("shop-b", pixel=PIXEL_B, token=BAD),
    )
    proc = verify(config)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert (
        lines[0] == f"shop-a: OK (event PlaceAnOrder, pixel {PIXEL_A}, test_event_code TEST12345)"
    )
    assert lines[1].startswith(
        "shop-b: FAILED: TikTok code 40105: Access token is incorrect or has been revoked."
    )
    assert "hint: bad or expired access token" in lines[1]
    assert "destinations[1].access_token" in lines[1]
    assert len(lines) == 2
    assert GOOD not in proc.stdout + proc.stderr
    assert BAD not in proc.stdout + proc.stderr
    [event] = fake.events()
    assert (event["pixel"], event["test_event_code"]) == (PIXEL_A, "TEST12345")


def test_destination_option(fake: FakeTikTokProcess, tmp_path: Path) -> None:
    config = write(
        tmp_path,
        fake.url,
        destination("shop-a", pixel=PIXEL_A, token=GOOD),
        destination("shop-b", pixel=PIXEL_B, token=BAD),
    )
    ok = verify(config, "--destination", "shop-a")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("shop-a: OK (event PlaceAnOrder")
    assert ok.stdout.count("\n") == 1

    unknown = verify(config, "--destination", "shop-c")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr == (
        "tiktok-worker: configuration error: --destination: no destination named 'shop-c' "
        "(configured: shop-a, shop-b)\n"
    )
    assert len(fake.events()) == 1


def test_unreachable_tiktok(tmp_path: Path) -> None:
    config = write(tmp_path, f"http://127.0.0.1:{free_port()}", destination("shop-a", token=GOOD))
    proc = verify(config)
    assert proc.returncode == 1
    assert proc.stdout.startswith("shop-a: FAILED: connection_error: ")
    assert "hint: TikTok unreachable or busy" in proc.stdout
    assert GOOD not in proc.stdout + proc.stderr
