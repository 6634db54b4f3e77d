# SPDX-License-Identifier: Apache-2.0
"""When a car asks its gateways for work; what it asks each for is ``worker.grants``.

A pull is absolute, so sending one again is always safe, but never free: a gateway
serves thousands of cars. So a car pulls when something changed, refreshes a pull that
may have been lost only while it has had room for a whole refresh period, and backs off
while its refreshes go unanswered.
"""

from __future__ import annotations

import random
import threading
import time

from parkpool.worker.grants import GatewayBook, PullTo
from parkpool.worker.held import HeldTasks, WorkerSettings

__all__ = ["PullSchedule"]


class PullSchedule:
    """One car's pull timing. Pulls are asked for from the network thread, the ticker
    and the kernel pool at once, so every decision is made under one lock."""

    def __init__(self, settings: WorkerSettings, gateways: GatewayBook) -> None:
        self.settings = settings
        self.gateways = gateways
        self._lock = threading.Lock()
        self._last_pull = 0.0  # monotonic time of the last pull sent
        self._pull_at: float | None = None  # a jittered pull waiting for its time
        self._room_since: float | None = None  # monotonic; free slots ever since
        self._refresh_s = settings.pull_refresh_s * random.uniform(0.75, 1.25)
        self._refresh_wait = self._refresh_s  # doubles while refreshes go unanswered

    def due(self, held: HeldTasks, *, force: bool, refresh: bool) -> list[PullTo]:
        """The pulls to send now, often none; ``force`` and ``refresh`` mean what they
        do to ``VehicleWorker.pull``."""
        credits = self.settings.capacity - len(held)
        with self._lock:
            now = time.monotonic()
            # Room kept for a whole refresh period, not the instant between a result and
            # the gateway's refill: a car in steady work never refreshes.
            if credits <= 0:
                self._room_since, self._refresh_wait = None, self._refresh_s
            elif self._room_since is None:
                self._room_since = now
            idle = self._room_since is not None and now - self._room_since >= self._refresh_s
            periodic = idle and now - self._last_pull >= self._refresh_wait
            if not self.gateways.any_online() or not (force or refresh or periodic):
                return []
            if refresh:
                self.gateways.reset()
            pulls = self.gateways.pulls(self.settings.capacity, held.sources(), periodic)
            if periodic or pulls:
                self._last_pull = now
            if periodic and pulls:
                # Unanswered again: the gateway most likely has the pull and no work or no
                # time for us, so each further refresh waits twice as long (up to 8x).
                self._refresh_wait = min(2 * self._refresh_wait, 8 * self._refresh_s)
            return pulls

    def soon(self) -> None:
        """Pull within ``pull_jitter_s``: a gateway that appeared, or whose work did,
        is not met by all its cars in the same instant."""
        due = time.monotonic() + random.uniform(0.0, self.settings.pull_jitter_s)
        with self._lock:
            if self._pull_at is None or due < self._pull_at:
                self._pull_at = due

    def take_jittered(self) -> bool:
        """Whether a pull ``soon`` asked for is due now; if so, it is taken."""
        with self._lock:
            due, self._pull_at = self._pull_at, None
            if due is not None and due > time.monotonic():
                self._pull_at, due = due, None
        return due is not None
