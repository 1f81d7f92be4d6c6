"""The exception taxonomy. Its classes decide how a failure is routed and how the CLI exits."""

from __future__ import annotations


class WorkerError(Exception):
    """A failure reported to the user as one line; exit status 1."""


class ConfigError(WorkerError):
    """Invalid configuration or command line; exit status 2. The message names the key path."""


class DeadLetterUnavailable(WorkerError):
    """The dead-letter topic cannot be written: the worker stops instead of losing events."""
