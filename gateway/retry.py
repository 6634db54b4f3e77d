# SPDX-License-Identifier: Apache-2.0
"""Things waiting out a backoff (``parkpool.runtime.backoff``): failed tasks, and Kafka
writes to try again, each released once its time has come."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DelayQueue(Generic[T]):
    """Items ordered by the time they become due; ties keep the order they came in."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._serial), item))

    def pop_due(self, now: float | None = None) -> list[T]:
        now = time.monotonic() if now is None else now
        due: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        removed = [item for _, _, item in self._heap if predicate(item)]
        if removed:
            gone = {id(item) for item in removed}
            self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
            heapq.heapify(self._heap)
        return removed
