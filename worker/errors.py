"""The exception taxonomy. Its classes decide how a failure is routed and how the CLI exits."""

from __future__ import annotations

from collections.abc import Callable


class WorkerError(Exception):
    """A failure reported to the user as one line; exit status 1."""


class ConfigError(WorkerError):
    """Invalid configuration or command line; exit status 2. The message names the key path."""


class DeadLetterUnavailable(WorkerError):
    """The dead-letter topic cannot be written: the worker stops instead of losing events."""


class FatalLatch:
    """The first fatal error of a run, shared by everything that can hit one.

    Built before the parts that report to it (dead-letter producer, sender, pipeline), so none
    of them needs a callback wired in afterwards; the run waits on `tripped`.
    """

    __slots__ = ("_listeners", "error")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._listeners: list[Callable[[BaseException], None]] = []

    def subscribe(self, listener: Callable[[BaseException], None]) -> None:
        """Call `listener` with the error when the latch trips (at once if it has)."""
        self._listeners.append(listener)
        if self.error is not None:
            listener(self.error)

    def trip(self, error: BaseException) -> None:
        """Record `error` if it is the first; later ones are ignored (the first is the cause)."""
        if self.error is not None:
            return
        self.error = error
        for listener in self._listeners:
            listener(error)
