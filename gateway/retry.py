# SPDX-License-Identifier: Apache-2.0
"""When to try a failed task again: exponential backoff with full jitter, and the queue
that holds tasks until then."""

from __future__ import annotations

import heapq
import itertools
import random
import time

from parkpool.gateway.tasks import PendingTask


def compute_backoff(
    failures: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``failures + 1``: uniform in [0, min(cap, base*2^n)].

    Full jitter spreads the retries of tasks that failed together (a bad car, a bad
    driver version), so they do not come back as one burst.
    """
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    return (rng or random).uniform(0.0, ceiling)


class DelayQueue:
    """Tasks waiting out their backoff, ordered by the time they become ready."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, PendingTask]] = []
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, task: PendingTask, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._serial), task))

    def pop_due(self, now: float | None = None) -> list[PendingTask]:
        now = time.monotonic() if now is None else now
        due: list[PendingTask] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def remove_where(self, predicate: object) -> list[PendingTask]:
        removed = [t for _, _, t in self._heap if predicate(t)]  # type: ignore[operator]
        if removed:
            gone = {id(t) for t in removed}
            self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
            heapq.heapify(self._heap)
        return removed
