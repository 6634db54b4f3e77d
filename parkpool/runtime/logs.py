# SPDX-License-Identifier: Apache-2.0
"""structlog set-up: JSON when not on a terminal, pretty on one, level from the environment."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog once per process. PARKPOOL_LOG_LEVEL and PARKPOOL_LOG_JSON apply."""
    name = (level or os.environ.get("PARKPOOL_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json is None:
        forced = os.environ.get("PARKPOOL_LOG_JSON")
        json = forced == "1" if forced in ("0", "1") else not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
