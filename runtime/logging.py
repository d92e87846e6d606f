"""structlog configuration: one place, contextvars first; console on a TTY, JSON otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str | int = "INFO", *, json: bool | None = None, force: bool = False,
                      cache: bool = True) -> None:
    """Configure structlog for corral. ``cache=False`` keeps loggers re-configurable (tests that
    capture logs need that); cached loggers make filtered-out calls nearly free."""
    global _configured
    if _configured and not force:
        return
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if json is None:
        json = not sys.stderr.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors = shared + [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors = shared + [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )
    _configured = True


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
