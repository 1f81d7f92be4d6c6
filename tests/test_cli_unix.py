"""The command line behaves like a Unix tool (issue 19): a reader that goes away ends a command
quietly, `--debug` is accepted after the sub-command, and a missing sub-command is named in
words the user typed. Run as the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "tiktok-worker"
CONFIG = """
destinations:
  - name: web-shop
    pixel_code: COQDA8RC77U2TMR44LI0
    access_token: tok-0123456789
"""
PAGE = {"type": "page", "messageId": "m", "timestamp": "2024-01-08T13:52:50Z"}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def many_events(tmp_path: Path) -> Path:
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({**PAGE, "messageId": f"m{i}"}) + "\n" for i in range(50)))
    return path


def run_with_reader_gone(args: list[str], stdin_path: Path | None = None) -> tuple[int, str]:
    """Run the command with stdout a pipe whose read end is closed before anything is written
    (what `| head -1` leaves behind once head has exited); returns (status, stderr)."""
    stdin = stdin_path.open("rb") if stdin_path is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [str(EXE), *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    finally:
        if stdin_path is not None:
            stdin.close()  # type: ignore[union-attr]
    assert proc.stdout is not None
    proc.stdout.close()  # the reader goes away
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def test_check_config_exits_quietly_when_the_reader_goes_away(config_file: Path) -> None:
    status, stderr = run_with_reader_gone(["check-config", "--config", str(config_file)])
    assert stderr == ""
    assert status == 1


def test_map_blames_nothing_when_the_reader_goes_away(config_file: Path, many_events: Path) -> None:
    status, stderr = run_with_reader_gone(
        ["map", "--config", str(config_file), "--input", str(many_events)]
    )
    assert stderr == ""  # not "many.jsonl: cannot read: Broken pipe"
    assert status == 1


def test_map_from_stdin_exits_quietly_when_the_reader_goes_away(
    config_file: Path, many_events: Path
) -> None:
    status, stderr = run_with_reader_gone(["map", "--config", str(config_file)], many_events)
    assert stderr == ""
    assert status == 1


def test_map_still_reports_an_unreadable_input(config_file: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(EXE), "map", "--config", str(config_file), "--input", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"tiktok-worker: error: {tmp_path}: cannot read: ")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_sub_command(tmp_path: Path, where: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("destinations: []\n")
    args = ["check-config", "--config", str(bad)]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    proc = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr  # --debug took effect
    assert proc.stderr.splitlines()[-1].startswith("tiktok-worker: configuration error: ")


def test_without_debug_there_is_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("destinations: []\n")
    proc = subprocess.run(
        [str(EXE), "check-config", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_dlq_without_a_sub_command_names_the_choices() -> None:
    proc = subprocess.run([str(EXE), "dlq"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "dlq_command" not in proc.stderr
    assert "inspect" in proc.stderr
    assert "redrive" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_no_command_names_the_choices() -> None:
    proc = subprocess.run([str(EXE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "required: COMMAND" in proc.stderr
