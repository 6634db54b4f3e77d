# SPDX-License-Identifier: Apache-2.0
"""One task's cancel signal, set when the car lets the task go: its lease revoked, the
owner taking the car back, the car stopping.

A flag is not enough: a thread blocked in a socket read looks at nothing until the next
byte comes, and a store that drips bytes (or a large input on the owner's slow link)
would keep it there. Whatever such a thread blocks on hooks itself here, and the hook
wakes it at once, from the thread that cancels: a download shuts its socket, a wait for
another task's download is woken.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator

__all__ = ["Cancel"]

Hook = Callable[[], None]


class Cancel:
    """Set once, from any thread. Hooks run on the thread that sets it, so they must be
    quick and must not block: a revoke arrives on the car's network thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = threading.Event()
        self._hooks: dict[int, Hook] = {}
        self._keys = itertools.count()

    def set(self) -> None:
        """Cancel, and run every hook still registered; a second call does nothing."""
        with self._lock:
            if self._set.is_set():
                return
            self._set.set()
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._set.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, or until cancelled; whether it was."""
        return self._set.wait(timeout)

    def hook(self, hook: Hook) -> Hook:
        """Run ``hook`` once cancelled (now, on this thread, if it already is); the
        function returned takes it off again."""
        with self._lock:
            key = None if self._set.is_set() else next(self._keys)
            if key is not None:
                self._hooks[key] = hook
        if key is None:
            hook()
            return _nothing
        return lambda: self._unhook(key)

    @contextlib.contextmanager
    def hooked(self, hook: Hook) -> Iterator[None]:
        """``hook`` runs if cancelled while the block runs."""
        unhook = self.hook(hook)
        try:
            yield
        finally:
            unhook()

    def _unhook(self, key: int) -> None:
        with self._lock:
            self._hooks.pop(key, None)


def _nothing() -> None:
    pass
