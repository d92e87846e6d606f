"""Logging. A library emits, the application configures (the standard `logging` module's rule):

- Embedded (`open_supervisor`), corral's structlog events go to the standard `logging` module,
  under the ``corral`` logger (``corral.worker``, ``corral.supervisor``, ...), rendered as
  ``event=... key=value`` messages. The ``corral`` logger has a NullHandler: nothing is written
  anywhere unless the application configures logging (``logging.basicConfig(level="INFO")``
  shows them). An application that configured structlog itself keeps its configuration.
- The `corral` command line calls `configure_logging()`: console on a TTY, JSON otherwise,
  contextvars first; to stderr, or to a file (``corral bench`` / ``corral chaos``)."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def library_defaults() -> None:
    """What importing `runtime` does: corral's events to the standard logging module, silent
    unless the application configured logging (the NullHandler keeps logging's last-resort
    handler from printing corral's warnings to stderr)."""
    logging.getLogger("corral").addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def configure_logging(level: str | int = "INFO", *, json: bool | None = None, force: bool = False,
                      cache: bool = True, file=None) -> None:
    """Configure structlog for the corral CLI. ``cache=False`` keeps loggers re-configurable
    (tests that capture logs need that); cached loggers make filtered-out calls nearly free.
    ``file``: where the lines go (default stderr; JSON unless it is a TTY)."""
    global _configured
    if _configured and not force:
        return
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    out = file if file is not None else sys.stderr
    if json is None:
        json = not out.isatty()
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
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )
    _configured = True


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
