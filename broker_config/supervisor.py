# SPDX-License-Identifier: Apache-2.0
"""Keep embedded brokers running: restart any that dies, on its own port, or give up.

``parkpool brokers up`` runs a :class:`Supervisor` over its :class:`EmbeddedBrokers`. A
broker that exits (a crash, the OOM killer, a stray ``kill``) is logged, started again on
the same port (the store over the same folder, so a durable Kafka keeps its log), and
counted. One that keeps crashing fast is not restarted for ever: after ``max_crashes``
exits within ``window_s``, or ``max_crashes`` failed restarts in a row (one that fails
slowly, waiting out its start timeout each time, never makes the window), the
supervisor raises, naming it, with its log's tail. A stop asked for meanwhile is
answered before the next restart, not after.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Protocol

from parkpool.runtime import logs
from parkpool.schemas.errors import BrokerError

__all__ = ["Supervised", "Supervisor"]

log = logs.get_logger("parkpool.brokers")


class Supervised(Protocol):
    """What the supervisor needs of a set of brokers (EmbeddedBrokers has it)."""

    def exited(self) -> dict[str, int | None]: ...

    def revive(self, name: str) -> None: ...

    def log_tail(self, name: str) -> str: ...


class Supervisor:
    """Restarts dead brokers; ``restarts`` counts them by name."""

    def __init__(
        self,
        brokers: Supervised,
        *,
        on_restart: Callable[[str], None] = lambda _name: None,
        max_crashes: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.brokers = brokers
        self.on_restart = on_restart  # after a restart, e.g. to check the topics
        self.max_crashes = max_crashes
        self.window_s = window_s
        self.restarts = collections.Counter[str]()
        self._clock = clock
        self._crashes: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self._failed = collections.Counter[str]()  # restarts failed since the last that worked

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Check every ``interval_s`` until ``stop`` is set; raises BrokerError on giving up."""
        while not stop.wait(interval_s):
            self.check(stop)

    def check(self, stop: threading.Event | None = None) -> list[str]:
        """Restart every broker that has exited, in start order, unless ``stop`` is
        set; returns their names."""
        restarted = []
        for name, status in self.brokers.exited().items():
            if stop is not None and stop.is_set():
                break  # (a signal to the whole group may be what killed it)
            self._count_crash(name, status)
            log.error("broker_died", broker=name, status=status, restarts=self.restarts[name])
            try:
                self.brokers.revive(name)
            except BrokerError as exc:
                # Still dead: the next check counts it again, until a limit says stop.
                log.warning("broker_restart_failed", broker=name, error=str(exc))
                self._failed[name] += 1
                if self._failed[name] >= self.max_crashes:
                    raise BrokerError(
                        f"{name} failed to restart {self._failed[name]} times in a row; "
                        f"giving up. Last error: {exc}"
                    ) from None
                continue
            self._failed[name] = 0
            self.restarts[name] += 1
            log.warning("broker_restarted", broker=name, restarts=self.restarts[name])
            self.on_restart(name)
            restarted.append(name)
        return restarted

    def _count_crash(self, name: str, status: int | None) -> None:
        now = self._clock()
        crashes = self._crashes[name]
        crashes.append(now)
        while crashes and crashes[0] < now - self.window_s:
            crashes.popleft()
        if len(crashes) >= self.max_crashes:
            raise BrokerError(
                f"{name} died {len(crashes)} times within {self.window_s:.0f} s (last exit "
                f"status {status}); not restarting it again. Log tail:\n"
                f"{self.brokers.log_tail(name)}"
            )
