# SPDX-License-Identifier: Apache-2.0
"""parkpool's loggers, and the structlog set-up of its own commands.

A process that set structlog up (``configure`` below, which every ``parkpool`` command
calls; a host service's own set-up; ``structlog.testing.capture_logs``) gets parkpool's
events through it. Any other process is a host using the SDK as a library: there each
event goes to the stdlib logger of the same name (``parkpool.producer``, ...), so the
host's handlers and levels decide, and parkpool adds no handler but the library
convention's ``NullHandler`` on ``parkpool``. structlog's own default, printing to
stdout, is never used.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from parkpool.schemas.errors import ConfigError

__all__ = ["LEVELS", "Logger", "configure", "get_logger"]

LEVELS = ("debug", "info", "warning", "error", "critical")
# The record's caller is the code that logged, not structlog's frames or Logger's:
# logging's caller is structlog's _proxy_to_logger, called by BoundLogger's, called by
# its method (info, ...), called by Logger's, called by parkpool's code.
_STACKLEVEL = 5
# What a field's value may hold and still be written bare in ``key=value``.
_QUOTE_IF = frozenset(' ="\n')

logging.getLogger("parkpool").addHandler(logging.NullHandler())


def _to_stdlib(_logger: WrappedLogger, _method: str, event: EventDict) -> Any:
    """The event as stdlib logging's arguments: ``name key=value ...`` as the message,
    for any formatter, and the fields themselves as the record's ``parkpool`` attribute,
    for a formatter that writes JSON."""
    name = str(event.pop("event", ""))
    options = {key: event.pop(key) for key in ("exc_info", "stack_info") if key in event}
    text = " ".join([name, *(f"{key}={_text(value)}" for key, value in event.items())])
    return (text,), {**options, "stacklevel": _STACKLEVEL, "extra": {"parkpool": event}}


def _text(value: object) -> str:
    text = str(value)
    return repr(text) if not text or _QUOTE_IF.intersection(text) else text


_STDLIB_CHAIN = (
    structlog.stdlib.filter_by_level,  # first: a level the host turned off costs nothing
    structlog.contextvars.merge_contextvars,
    _to_stdlib,
)


class Logger:
    """A structlog-style logger (``bind``, ``info(event, **fields)``, ...) that picks its
    way out at each event, not at import: modules make their loggers before anyone has
    set logging up."""

    __slots__ = ("_context", "_name", "_stdlib", "_structlog")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self._name = name
        self._context = dict(context or {})
        # structlog's lazy proxy: bound on first use, and kept where the set-up says to
        # cache (``configure`` does): a debug event the level drops costs about 1 µs.
        self._structlog = structlog.get_logger(name, **self._context)
        self._stdlib = structlog.stdlib.BoundLogger(
            logging.getLogger(name), list(_STDLIB_CHAIN), self._context
        )

    def bind(self, **fields: Any) -> Logger:
        return Logger(self._name, {**self._context, **fields})

    def _target(self) -> Any:
        return self._structlog.bind() if structlog.is_configured() else self._stdlib

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """``error`` with the exception being handled."""
        self._target().exception(event, **fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._target().critical(event, **fields)

    def log(self, level: int, event: str, **fields: Any) -> None:
        self._target().log(level, event, **fields)


def get_logger(name: str) -> Logger:
    """The logger for ``name``, which starts with ``parkpool.``."""
    return Logger(name)


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog once per process. PARKPOOL_LOG_LEVEL and PARKPOOL_LOG_JSON apply.

    For parkpool's own commands only, never the SDK: a library leaves a host's logging
    alone. A bad value in either variable is a ConfigError naming it: a typo must not
    quietly leave a fleet logging at the wrong level or in the wrong format.
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
