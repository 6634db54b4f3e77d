# SPDX-License-Identifier: Apache-2.0
"""Turning SIGTERM and SIGINT into a stop event, the same way for every long-running role."""

from __future__ import annotations

import signal
import threading


def stop_event() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT; a second one exits at once."""
    event = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if event.is_set():
            raise SystemExit(128 + signum)
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop child brokers.

    Python's default SIGTERM ends the process at once, which leaves the embedded brokers
    of a killed ``make bench`` or ``make chaos`` running with no parent.
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
