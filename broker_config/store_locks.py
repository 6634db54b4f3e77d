# SPDX-License-Identifier: Apache-2.0
"""A lock per object for the embedded store's conditional writes, kept only while held.

A conditional write (If-Match, If-None-Match) checks and writes under its object's lock
(broker_config.objectstore). Every content-addressed block and every lease's outputs is
written conditionally once, so a table that kept each object's lock for good would grow
by every key ever written, for as long as ``parkpool brokers up`` runs.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

__all__ = ["KeyLocks"]


class KeyLocks:
    """``hold(key)`` serialises holders of one key; a key nobody holds or waits for takes
    no memory."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[Hashable, tuple[threading.Lock, list[int]]] = {}

    def __len__(self) -> int:
        with self._guard:
            return len(self._held)

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock, users = self._held.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1  # a waiter counts too: the entry stays until the last one is done
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._held[key]
