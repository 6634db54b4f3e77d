# SPDX-License-Identifier: Apache-2.0
"""The queue that holds failed tasks until their backoff is over
(``parkpool.runtime.backoff``)."""

from __future__ import annotations

import heapq
import itertools
import time

from parkpool.gateway.tasks import PendingTask


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
