"""structlog configuration: JSON lines (or console) on stderr, stdlib loggers routed through it.

Nothing here ever logs a token or raw PII: callers log names, counts and codes only, and the
``redact`` processor masks any value under a key that names a secret, as a second line of
defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

_SECRET_KEYS: Final = frozenset(
    {"access_token", "token", "password", "authorization", "access-token", "sasl.password"}
)


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask values under secret-looking keys."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
    return event


def configure_logging(
    *, level: str = "info", fmt: str = "json", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger (aiohttp, asyncio, redis) alike."""
    stream = stream if stream is not None else sys.stderr
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # aiohttp's access log would repeat every scrape of /metrics.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str = "worker") -> Any:
    return structlog.get_logger(name)
