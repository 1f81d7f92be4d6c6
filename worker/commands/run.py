"""`tiktok-worker run`: the worker."""

from __future__ import annotations

import argparse
import asyncio

from worker.app import run_worker
from worker.config import load_config
from worker.logs import configure_logging, get_logger


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(level=config.logging.level, fmt=config.logging.format)
    return asyncio.run(run_worker(config, log=get_logger("worker")))
