"""`tiktok-worker` command line: argument parsing, dispatch and exit statuses.

Exit status: 0 success, 2 configuration or usage error, 1 anything else. Errors are one line
on stderr; a traceback only with `--debug` (accepted before or after the sub-command).
A reader that goes away (`tiktok-worker map ... | head -1`) ends the command quietly, like a
Unix tool: no message, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import traceback
from collections.abc import Sequence

from worker import __version__
from worker.errors import ConfigError, WorkerError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit with EXIT_CONFIG."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_CONFIG)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("TIKTOK_WORKER_CONFIG"),
        help="config YAML file (default: $TIKTOK_WORKER_CONFIG)",
    )
    _add_debug(parser)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-command's parser must not reset a --debug given before the sub-command.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiktok-worker", description="Segment events from Kafka to TikTok.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        title="commands",
        parser_class=_Parser,
    )

    run = sub.add_parser("run", help="run the worker")
    _add_config(run)

    check = sub.add_parser("check-config", help="validate and print the effective config")
    _add_config(check)

    mapping = sub.add_parser("map", help="dry run: Segment JSON lines to TikTok bodies")
    _add_config(mapping)
    mapping.add_argument("--input", default="-", help="JSON-lines file (default: stdin)")

    verify = sub.add_parser("verify", help="send one test event per destination")
    _add_config(verify)
    verify.add_argument("--destination", help="only this destination")

    dlq = sub.add_parser("dlq", help="inspect or redrive dead letters")
    _add_debug(dlq)
    dlq_sub = dlq.add_subparsers(
        dest="dlq_command",
        required=True,
        metavar="{inspect,redrive}",
        title="dlq commands",
        parser_class=_Parser,
    )
    inspect = dlq_sub.add_parser("inspect", help="counts of dead letters")
    _add_config(inspect)
    inspect.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    redrive = dlq_sub.add_parser("redrive", help="send dead letters again")
    _add_config(redrive)
    redrive.add_argument("--reason", help="only dead letters with this dlq.reason")
    redrive.add_argument("--destination", help="only dead letters for this destination")
    redrive.add_argument("--max", type=int, help="stop after this many records")
    redrive.add_argument(
        "--max-age",
        help="send events up to this old (seconds, 36h, 7d, or none) instead of "
        "tiktok.max_event_age_s: older ones may be counted twice by TikTok (48 h dedup)",
    )

    return parser


_COMMAND_MODULES = {
    "run": "worker.commands.run",
    "check-config": "worker.commands.check_config",
    "map": "worker.commands.map",
    "verify": "worker.commands.verify",
    "dlq inspect": "worker.commands.dlq_inspect",
    "dlq redrive": "worker.commands.dlq_redrive",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command if args.command != "dlq" else f"dlq {args.dlq_command}"
    if hasattr(args, "config") and not args.config:
        sys.stderr.write("tiktok-worker: error: --config is required (or TIKTOK_WORKER_CONFIG)\n")
        return EXIT_CONFIG
    try:
        module = importlib.import_module(_COMMAND_MODULES[name])
        status: int = module.run(args)
        sys.stdout.flush()  # inside the try: a reader that went away is handled below
        return status
    except ConfigError as exc:
        _report(args, f"configuration error: {exc}")
        return EXIT_CONFIG
    except WorkerError as exc:
        _report(args, f"error: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as exc:
        if _stdout_closed():
            return _reader_gone()
        _report(args, f"unexpected error: {type(exc).__name__}: {exc}")  # a socket, not stdout
        return EXIT_FAILURE
    except Exception as exc:  # last line of defence: one line, no traceback
        _report(args, f"unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _fd, mask in events)


def _reader_gone() -> int:
    """stdout's reader closed the pipe: exit quietly. Later writes, and the interpreter's
    final flush, go to /dev/null so no second BrokenPipeError is printed at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_FAILURE


def _report(args: argparse.Namespace, line: str) -> None:
    if args.debug:
        traceback.print_exc()
    sys.stderr.write(f"tiktok-worker: {line}\n")


if __name__ == "__main__":
    sys.exit(main())
