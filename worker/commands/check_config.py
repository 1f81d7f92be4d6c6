"""`tiktok-worker check-config`: validate the configuration and print it, secrets masked."""

from __future__ import annotations

import argparse
import sys

import yaml

from worker.config import load_config, masked
from worker.kafka.security import check_security
from worker.mapping.mapper import Mapper


def run(args: argparse.Namespace) -> int:
    """Exit 0 and print the effective config as YAML; a bad config raises ConfigError."""
    config = load_config(args.config)
    Mapper(config)  # compiles every trigger, path and plan exactly as the worker will
    check_security(config.kafka.security)  # its files, as a Kafka client will load them
    names = ", ".join(d.name for d in config.destinations)
    sys.stdout.write(f"# configuration OK: {len(config.destinations)} destination(s): {names}\n")
    sys.stdout.write(yaml.safe_dump(masked(config), sort_keys=False, allow_unicode=True))
    return 0
