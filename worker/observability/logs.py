"""structlog configuration: JSON lines (or console) on stderr, every other logger routed through it.

- `configure_logging(level=, fmt=)`: structlog loggers and the stdlib root logger share one
  handler and one processor chain, so aiohttp, asyncio, redis and librdkafka (through
  `kafka_logger()`, given to confluent-kafka clients as their `logger`) print the same JSON
  lines: `{"event", "level", "timestamp", "logger", ...}`; `fmt="console"` renders them for a
  terminal instead. Python warnings go through logging too.
- Context: `structlog.contextvars` are merged into every line (the sender binds a batch id to the
  task that delivers a batch, so its attempts, halves and dead-lettering share it).
- Secrets and PII: callers log names, counts and codes only. As a second line of defence the
  `scrub` processor, which runs after exceptions are formatted and before rendering, masks the
  value of any secret key, every occurrence of a value given to
  `worker.core.redaction.register_secrets` (the configured access tokens, SASL passwords) and
  anything shaped like an email address, in every string of the line, whichever library
  logged it (what counts as a secret is decided in `worker.core.redaction`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO, TypeAlias

import structlog
from structlog.typing import FilteringBoundLogger

from worker.core.redaction import MASK, is_secret_key, scrub_text

KAFKA_LOGGER_NAME: Final = "kafka"
# What components take as `log`: structlog's bound logger (`configure_logging` installs
# `make_filtering_bound_logger`): `info(event, **fields)`, `bind(**fields)`, ...
Logger: TypeAlias = FilteringBoundLogger
_MAX_DEPTH: Final = 4


def _scrub_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: MASK if is_secret_key(k) else _scrub_value(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_value(v, depth + 1) for v in value]
    return value


def scrub(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask secrets and email addresses in every value of the line (see the module doc)."""
    for key, value in event.items():
        if is_secret_key(key):
            event[key] = MASK
        elif key.startswith("_"):
            continue  # structlog's own bookkeeping (_record, _from_structlog)
        else:
            event[key] = _scrub_value(value, 0)
    return event


def kafka_logger() -> logging.Logger:
    """The logger to pass as `logger` to confluent-kafka clients, so librdkafka's own log lines
    come out as JSON instead of raw text on stderr (delivered when the client polls)."""
    return logging.getLogger(KAFKA_LOGGER_NAME)


def configure_logging(
    *, level: str = "info", fmt: str = "json", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger (aiohttp, asyncio, redis, kafka) alike."""
    stream = stream if stream is not None else sys.stderr
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    logging.captureWarnings(True)
    # aiohttp's access log would repeat every scrape of /metrics and every probe.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str = "worker") -> Logger:
    logger: Logger = structlog.get_logger(name)
    return logger
