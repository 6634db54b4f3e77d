# SPDX-License-Identifier: Apache-2.0
"""structlog set-up: JSON when not on a terminal, pretty on one, level from the environment."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from parkpool.schemas.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog once per process. PARKPOOL_LOG_LEVEL and PARKPOOL_LOG_JSON apply.

    A bad value in either is a ConfigError naming the variable: a typo must not quietly
    leave a fleet logging at the wrong level or in the wrong format.
    """
    name = (level or os.environ.get("PARKPOOL_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        raise ConfigError(f"PARKPOOL_LOG_LEVEL={name!r} is not one of {', '.join(LEVELS)}")
    numeric = logging.getLevelName(name.upper())
    if json is None:
        forced = os.environ.get("PARKPOOL_LOG_JSON") or ""
        if forced not in ("", "0", "1"):
            raise ConfigError(f"PARKPOOL_LOG_JSON={forced!r} must be 0 or 1")
        json = forced == "1" if forced else not sys.stderr.isatty()
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
