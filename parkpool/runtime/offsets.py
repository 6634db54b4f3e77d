# SPDX-License-Identifier: Apache-2.0
"""Which offsets of each partition a reader has had: to tell a record it never had from
one it reads again, and to notice a hole and read it again.

A Kafka partition's offsets have no holes where nothing is compacted or transactional,
as in parkpool's topics. Tansu 0.6 on its S3 engine can show a later batch before an
earlier one when two producers write to one partition at once (both reserve offsets,
then store their batches); a reader fetching in between is handed the later batch, and
librdkafka moves past the earlier one for good. The earlier batch is there a moment
later, so a reader that goes back for the hole gets it.

Holes are kept as ranges, so a wide one (several producers' batches of thousands of
records) costs no more than a narrow one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Where = tuple[str, int]  # a topic's partition

# How long a hole is waited for, counted while its partition is read (``hold``), before
# its offsets are taken for a real gap (retention, compaction) and counted lost.
PATIENCE_S = 30.0
# Between two reads again of one partition's holes: each costs a fetch.
REREAD_EVERY_S = 0.5


@dataclass
class _Hole:
    start: int
    end: int  # one past the last missed offset
    waited: float = 0.0  # seconds it was looked for while its partition was read


@dataclass
class _Partition:
    top: int  # the offset after the highest one had
    holes: list[_Hole] = field(default_factory=list)  # ascending, disjoint
    reread_at: float = 0.0
    aged_at: float = 0.0


class OffsetLedger:
    """Per partition, the offsets a reader has had; not thread-safe (one reader's)."""

    def __init__(
        self,
        patience_s: float = PATIENCE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._patience_s = patience_s
        self._clock = clock
        self._parts: dict[Where, _Partition] = {}
        self._holed: set[Where] = set()  # partitions with a hole
        self._held: set[Where] = set()  # partitions not read for now (paused)
        self.filled = 0  # hole offsets whose record came on a read again
        self.lost = 0  # hole offsets given up on after the patience
        self._told = (0, 0)  # (filled, lost) at the last ``news``

    def start(self, where: Where, offset: int) -> None:
        """Reading of ``where`` begins at ``offset``; nothing before it is missed."""
        self._parts.setdefault(where, _Partition(offset))

    def forget(self, where: Where) -> None:
        """The partition went to another reader: what it had no longer matters here."""
        self._parts.pop(where, None)
        self._holed.discard(where)
        self._held.discard(where)

    def hold(self, where: Where, held: bool) -> None:
        """Whether ``where`` is not being read (paused): its holes do not age then, since
        nothing could have filled them."""
        if held:
            self._held.add(where)
        else:
            self._held.discard(where)

    def top(self, where: Where) -> int | None:
        """The offset after the highest one had."""
        part = self._parts.get(where)
        return part.top if part else None

    def admit(self, where: Where, offset: int) -> bool:
        """Whether the record at ``offset`` is one never had (hand it on) rather than
        one read again; a record past the next one expected leaves a hole."""
        part = self._parts.setdefault(where, _Partition(offset))
        if offset < part.top:
            return self._fill(where, part, offset)
        if offset > part.top:
            if not part.holes:
                part.aged_at = self._clock()
            part.holes.append(_Hole(part.top, offset))
            self._holed.add(where)
        part.top = offset + 1
        return True

    def _fill(self, where: Where, part: _Partition, offset: int) -> bool:
        for index, hole in enumerate(part.holes):
            if hole.start <= offset < hole.end:
                tail = _Hole(offset + 1, hole.end, hole.waited)
                hole.end = offset
                part.holes[index : index + 1] = [h for h in (hole, tail) if h.end > h.start]
                self.filled += 1
                if not part.holes:
                    self._holed.discard(where)
                return True
        return False

    def due(self) -> list[tuple[Where, int]]:
        """The partitions to read again, each from its first hole, now: at most once per
        ``REREAD_EVERY_S`` each; holes looked for longer than the patience are given up
        (``lost``)."""
        if not self._holed:
            return []
        now = self._clock()
        wanted = []
        for where in list(self._holed):
            part = self._parts[where]
            if where not in self._held:
                self._age(part, now - part.aged_at)
            part.aged_at = now
            if not part.holes:
                self._holed.discard(where)
            elif now - part.reread_at >= REREAD_EVERY_S:
                part.reread_at = now
                wanted.append((where, part.holes[0].start))
        return wanted

    def _age(self, part: _Partition, elapsed: float) -> None:
        kept = []
        for hole in part.holes:
            hole.waited += elapsed
            if hole.waited >= self._patience_s:
                self.lost += hole.end - hole.start
            else:
                kept.append(hole)
        part.holes = kept

    def news(self) -> tuple[int, int]:
        """Offsets filled and lost since the last call: what a reader's counters add."""
        now = (self.filled, self.lost)
        news = (now[0] - self._told[0], now[1] - self._told[1])
        self._told = now
        return news

    def first_hole(self, where: Where) -> int | None:
        """The lowest offset still missed: a reader that commits must not pass it."""
        part = self._parts.get(where)
        return part.holes[0].start if part and part.holes else None

    def holes(self, where: Where) -> list[int]:
        part = self._parts.get(where)
        return [o for h in part.holes for o in range(h.start, h.end)] if part else []
