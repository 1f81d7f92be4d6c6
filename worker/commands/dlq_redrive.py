"""`tiktok-worker dlq redrive`: send dead letters again (see `worker.redrive.engine`).

Output: progress on stderr (a bar redrawn in place on a terminal; otherwise a plain line every
few seconds), then one summary line on stdout:

    redrive done: 12 redriven (10 delivered, 1 failed again, 1 not mapped any more);
        30 read, 18 skipped (...)          <- one line in reality

Exit status: 0 when the run reached its end (or `--max`) and nothing failed again; 1 when a
record failed again (it is back in the dead-letter topic), the run was interrupted
(SIGINT/SIGTERM: what finished is committed, run the same command again to resume) or Kafka
failed; 2 for a bad `--reason`, `--destination` or `--max`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from typing import Final, TextIO

from worker.config import Config, load_config, secret_values
from worker.core.redaction import register_secrets
from worker.errors import ConfigError
from worker.mapping.mapper import CONFIG_DEFAULT
from worker.observability.logs import configure_logging, get_logger
from worker.redrive.engine import Redrive, RedriveFilter, RedriveStats, validate_filter

TTY_REDRAW_S: Final = 0.1
PLAIN_EVERY_S: Final = 5.0
BAR_WIDTH: Final = 24


class Progress:
    """Renders `RedriveStats` on `stream`: a redrawn bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._last = 0.0
        self._drawn = False

    def update(self, stats: RedriveStats, *, force: bool = False) -> None:
        now = time.monotonic()
        every = TTY_REDRAW_S if self._tty else PLAIN_EVERY_S
        if not force and now - self._last < every:
            return
        self._last = now
        counts = (
            f"{stats.delivered} delivered, {stats.failed_again} failed again, "
            f"{stats.skipped} skipped, {max(0, stats.inflight)} in flight"
        )
        if self._tty:
            total = max(stats.to_read, 1)
            filled = min(BAR_WIDTH, BAR_WIDTH * stats.read // total)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self._stream.write(f"\r[{bar}] {stats.read}/{stats.to_read} read · {counts}\x1b[K")
            self._drawn = True
        else:
            self._stream.write(f"redrive: {stats.read}/{stats.to_read} read, {counts}\n")
        self._stream.flush()

    def finish(self, stats: RedriveStats) -> None:
        self.update(stats, force=True)
        if self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def summary_line(stats: RedriveStats) -> str:
    """The final one-line summary (stable wording; the demo and tests read it)."""
    skipped = [f"{stats.skipped_filter} by filter", f"{stats.skipped_redriven} already redriven"]
    for name, count in sorted(stats.skipped_unconfigured.items()):
        skipped.append(f"{count} for unconfigured destination {name}")
    if stats.skipped_reference_only:
        skipped.append(f"{stats.skipped_reference_only} reference-only (no value to send)")
    line = (
        f"redrive {'interrupted' if stats.interrupted else 'done'}: "
        f"{stats.redriven} redriven ({stats.delivered} delivered, "
        f"{stats.failed_again} failed again, {stats.unmapped} not mapped any more"
        + (f", {stats.too_old} too old" if stats.too_old else "")
        + "); "
        f"{stats.read} read, {stats.skipped} skipped ({', '.join(skipped)})"
    )
    if stats.interrupted:
        line += f"; {max(0, stats.inflight)} unfinished: run the same command again to resume"
    return line


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    flt = validate_filter(config, args.reason, args.destination)
    configure_logging(level="info" if args.debug else "warning", fmt=config.logging.format)
    register_secrets(secret_values(config))
    max_age = parse_max_age(args.max_age) if args.max_age is not None else CONFIG_DEFAULT
    return asyncio.run(_redrive(config, flt, args.max, max_age))


_DURATION_RE: Final = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_max_age(text: str) -> float | None:
    """`--max-age`: seconds, or a number with s/m/h/d (36h, 7d), or `none` (no limit)."""
    value = text.strip().lower()
    if value == "none":
        return None
    m = _DURATION_RE.fullmatch(value)
    if m is None or float(m.group("n")) <= 0:
        raise ConfigError(
            f"--max-age: expected a positive duration such as 172800, 36h or 7d, or none "
            f"(got {text!r})"
        )
    return float(m.group("n")) * _UNIT_S[m.group("unit")]


async def _redrive(
    config: Config, flt: RedriveFilter, max_records: int | None, max_age: float | object | None
) -> int:
    progress = Progress(sys.stderr)
    redrive = await Redrive.create(
        config,
        flt,
        max_records=max_records,
        log=get_logger("redrive"),
        on_progress=progress.update,
        max_event_age_s=max_age,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, redrive.stop)
    if redrive.ledger_warning:
        sys.stderr.write(f"tiktok-worker: warning: {redrive.ledger_warning}\n")
    sys.stderr.write(
        f"redriving {flt.describe()} from {config.kafka.dead_letter_topic} "
        f"(progress kept in consumer group {redrive.group_id}): "
        f"{redrive.stats.to_read} record(s) to read"
        + (f", at most {max_records} to redrive" if max_records is not None else "")
        + "\n"
    )
    try:
        stats = await redrive.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    progress.finish(stats)
    sys.stdout.write(summary_line(stats) + "\n")
    sys.stdout.flush()
    if stats.too_old:
        limit = max_age if max_age is not CONFIG_DEFAULT else config.tiktok.max_event_age_s
        sys.stderr.write(
            f"tiktok-worker: note: {stats.too_old} dead letter(s) hold events older than "
            f"{_fmt_age(limit)} and were not sent (too_old): TikTok deduplicates for 48 h only, "
            "so sending them could count them twice. They are marked handled; to send such "
            "events on purpose, run a redrive with --max-age before they are read\n"
        )
    for name, count in sorted(stats.skipped_unconfigured.items()):
        sys.stderr.write(
            f"tiktok-worker: note: {count} dead letter(s) for destination {name!r}, which is not "
            "in the configuration, were skipped\n"
        )
    return 1 if stats.interrupted or stats.failed_again else 0


def _fmt_age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "the max age"
    hours = seconds / 3600
    return f"{hours:g} h" if hours >= 1 else f"{seconds:g} s"
