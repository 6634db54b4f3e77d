# SPDX-License-Identifier: Apache-2.0
"""Per-partition offset window: commit only up to the lowest unfinished record.

Tasks finish out of order, so the committable offset of a partition is the lowest
offset still in flight (or one past the last seen offset when none is). The window is
bounded: when it is full, the gateway pauses the partition instead of buffering more.
"""

from __future__ import annotations

from collections import deque


class OffsetWindow:
    """Offsets of one partition that were consumed but are not finished yet."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("window capacity must be at least 1")
        self.capacity = capacity
        self._order: deque[int] = deque()  # consumed offsets, ascending
        self._members: set[int] = set()  # the same offsets, for O(1) membership
        self._done: set[int] = set()  # finished offsets not yet at the low end
        self._next: int | None = None  # one past the highest offset seen

    def add(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} arrived after {self._next - 1}")
        self._order.append(offset)
        self._members.add(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> bool:
        """Mark ``offset`` done; True when the commit point moved."""
        # Unknown offsets are ignored: a late callback for a revoked-and-reassigned
        # partition must not finish a record this window never handed out.
        if offset not in self._members or offset in self._done:
            return False
        self._done.add(offset)
        moved = False
        while self._order and self._order[0] in self._done:
            low = self._order.popleft()
            self._done.discard(low)
            self._members.discard(low)
            moved = True
        return moved

    @property
    def commit_point(self) -> int | None:
        """The offset to commit (the next one to read after a restart), or None if unknown."""
        if self._order:
            return self._order[0]
        return self._next

    @property
    def used(self) -> int:
        """Records held in the window: unfinished, or finished above an unfinished one."""
        return len(self._order)

    @property
    def in_flight(self) -> int:
        return len(self._order) - len(self._done)

    @property
    def room(self) -> int:
        """How many more offsets fit before the window is full."""
        return max(0, self.capacity - len(self._order))

    @property
    def full(self) -> bool:
        # Finished-but-blocked offsets count too: they hold memory until the low end moves.
        return len(self._order) >= self.capacity
