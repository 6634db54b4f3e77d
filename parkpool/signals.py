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
