"""Structured logging: one event per device transition and per phase.

Events go to stderr, so that ``--json`` output on stdout stays parseable.
The level filter is applied when a logger is bound, so that filtered-out
events cost next to nothing on the hot path of a 256-device switchover.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["console", "json"]
LEVELS = ("debug", "info", "warning", "error")


def configure(
    level: str = "info", fmt: LogFormat = "console", stream: TextIO | None = None
) -> None:
    """Configure structlog for the whole process (the CLI calls this once)."""
    rendering: list[structlog.typing.Processor]
    if fmt == "json":
        # An exception logged with its traceback (log.exception) keeps it: the
        # JSON renderer alone would write "exc_info": true and lose it.
        rendering = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Colour on a terminal only: a file or a pipe gets plain text.
        isatty = getattr(stream or sys.stderr, "isatty", None)
        rendering = [structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
