"""`tiktok-worker run`: the worker.

Once the config is loaded, logging follows `logging.format`; with `json`, a fatal error is
one JSON log line too (level `critical`, event `fatal error`), so a log pipeline that parses
every line sees why the worker stopped. Errors before the config is known stay plain text.
"""

from __future__ import annotations

import argparse
import asyncio
import gc

from worker.app import run_worker
from worker.config import load_config
from worker.errors import ConfigError, WorkerError
from worker.observability.logs import configure_logging, get_logger

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(level=config.logging.level, fmt=config.logging.format)
    log = get_logger("worker")
    # The hot path allocates many short-lived objects and few cycles: collect the young
    # generation less often, and keep start-up objects out of every collection.
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()
    if config.logging.format != "json":
        return asyncio.run(run_worker(config, log=log))  # the CLI prints errors as text
    try:
        return asyncio.run(run_worker(config, log=log))
    except ConfigError as exc:
        log.critical("fatal error", error=f"configuration error: {exc}", exit_status=EXIT_CONFIG)
        return EXIT_CONFIG
    except WorkerError as exc:
        log.critical("fatal error", error=str(exc), exit_status=EXIT_FAILURE)
        return EXIT_FAILURE
    except Exception as exc:  # the CLI's last line of defence, as a JSON line
        log.critical(
            "fatal error",
            error=f"unexpected error: {type(exc).__name__}: {exc}",
            exit_status=EXIT_FAILURE,
            exc_info=bool(getattr(args, "debug", False)),
        )
        return EXIT_FAILURE
