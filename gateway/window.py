# SPDX-License-Identifier: Apache-2.0
"""Per-partition offset window: commit only up to the lowest unfinished record.

Tasks finish out of order, so the committable offset of a partition is the lowest
offset still in flight (or one past the last seen offset when none is). Two bounds make
the gateway pause a partition instead of reading on:

- ``capacity``: records read but not finished (in flight). It counts tasks, not
  offsets, so one slow car holding one record cannot stop the partition: the records
  after it are read, dispatched and finished meanwhile.
- ``max_span``: offsets from the commit point to the next one to read. A crash makes
  the next owner read all of them again, and the window remembers every one, so this
  bounds both the work redone and the memory held.
"""

from __future__ import annotations

import bisect
from collections import deque

# max_span when none is given, as a multiple of capacity: with the default window of
# 1,024 that is 65,536 offsets, so a partition doing 1,400 tasks a second reads on for
# 45 s (until a silent car is given up) past the one record that car holds.
SPAN_PER_SLOT = 64


class OffsetWindow:
    """Offsets of one partition that were consumed but are not committable yet."""

    def __init__(self, capacity: int, max_span: int = 0) -> None:
        max_span = max_span or SPAN_PER_SLOT * capacity
        if capacity < 1:
            raise ValueError("window capacity must be at least 1")
        if max_span < capacity:
            raise ValueError(f"window span {max_span} is below the window capacity {capacity}")
        self.capacity = capacity
        self.max_span = max_span
        self._held: deque[int] = deque()  # consumed offsets from the commit point, ascending
        self._unfinished: set[int] = set()  # the held offsets not finished yet
        self._next: int | None = None  # one past the highest offset seen

    def add(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} arrived after {self._next - 1}")
        self._held.append(offset)
        self._unfinished.add(offset)
        self._next = offset + 1

    def add_late(self, offset: int) -> None:
        """A record below the next one to read: one a fetch passed over and a read again
        found (``runtime.offsets``). Held in order, as if it had come in its turn."""
        if self._next is None or offset >= self._next:
            self.add(offset)
            return
        if offset in self._unfinished or (self._held and offset in self._held):
            raise ValueError(f"offset {offset} was already read")
        bisect.insort(self._held, offset)
        self._unfinished.add(offset)

    def is_late(self, offset: int) -> bool:
        """Whether ``offset`` is below one already added: a record a fetch passed over."""
        return self._next is not None and offset < self._next

    def finish(self, offset: int) -> bool:
        """Mark ``offset`` done; True when the commit point moved. O(1) amortised."""
        # Unknown offsets are ignored: a late callback for a revoked-and-reassigned
        # partition must not finish a record this window never handed out.
        if offset not in self._unfinished:
            return False
        self._unfinished.discard(offset)
        if offset != self._held[0]:
            return False  # an older record is still in flight: the point stays
        held = self._held
        while held and held[0] not in self._unfinished:
            held.popleft()  # each offset leaves once: amortised O(1) per finish
        return True

    @property
    def commit_point(self) -> int | None:
        """The offset to commit (the next one to read after a restart), or None if unknown."""
        if self._held:
            return self._held[0]
        return self._next

    @property
    def in_flight(self) -> int:
        """Records read and not finished: what ``capacity`` bounds."""
        return len(self._unfinished)

    @property
    def used(self) -> int:
        """Records remembered: unfinished, or finished above an unfinished one."""
        return len(self._held)

    @property
    def span(self) -> int:
        """Offsets from the commit point to the next to read: what ``max_span`` bounds.

        At least ``used`` (Kafka may skip offsets), and 0 when every record is finished.
        """
        if not self._held or self._next is None:
            return 0
        return self._next - self._held[0]

    @property
    def room(self) -> int:
        """At most how many more records may be read before the window is full."""
        return max(0, min(self.capacity - self.in_flight, self.max_span - self.span))

    @property
    def full(self) -> bool:
        return self.room == 0
