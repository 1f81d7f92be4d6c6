"""`tiktok-worker run`: the worker."""

from __future__ import annotations

import argparse
import asyncio
import gc

from worker.app import run_worker
from worker.config import load_config
from worker.observability.logs import configure_logging, get_logger


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(level=config.logging.level, fmt=config.logging.format)
    # The hot path allocates many short-lived objects and few cycles: collect the young
    # generation less often, and keep start-up objects out of every collection.
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()
    return asyncio.run(run_worker(config, log=get_logger("worker")))
