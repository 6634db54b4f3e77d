# SPDX-License-Identifier: Apache-2.0
"""Which offsets of each partition a reader has had: to tell a record it never had from
one it reads again, and to notice a hole and read it again.

A Kafka partition's offsets have no holes where nothing is compacted or transactional,
as in parkpool's topics. Tansu 0.6 on its S3 engine can show a later batch before an
earlier one when two producers write to one partition at once (both reserve offsets,
then store their batches); a reader fetching in between is handed the later batch, and
librdkafka moves past the earlier one for good. The earlier batch is there a moment
later, so a reader that goes back for the hole gets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Where = tuple[str, int]  # a topic's partition

# Holes wider than this are taken for what Kafka allows (compaction, transaction
# markers, retention), not waited for.
MAX_HOLE = 10_000
# How long a hole is waited for before its records are counted lost.
PATIENCE_S = 30.0
# Between two reads again of one partition's holes: each costs a fetch.
REREAD_EVERY_S = 0.5


@dataclass
class _Partition:
    top: int  # the offset after the highest one had
    holes: dict[int, float] = field(default_factory=dict)  # offset -> when first missed
    reread_at: float = 0.0


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
        self.filled = 0  # holes whose record came on a read again
        self.lost = 0  # hole offsets given up on after the patience
        self.skipped = 0  # offsets of holes too wide to wait for

    def start(self, where: Where, offset: int) -> None:
        """Reading of ``where`` begins at ``offset``; nothing before it is missed."""
        self._parts.setdefault(where, _Partition(offset))

    def admit(self, where: Where, offset: int) -> bool:
        """Whether the record at ``offset`` is one never had (hand it on) rather than
        one read again; a record past the next one expected leaves a hole."""
        part = self._parts.setdefault(where, _Partition(offset))
        if offset < part.top:
            if part.holes.pop(offset, None) is None:
                return False
            self.filled += 1
            if not part.holes:
                self._holed.discard(where)
            return True
        if offset - part.top > MAX_HOLE:
            self.skipped += offset - part.top
        elif offset > part.top:
            now = self._clock()
            for missing in range(part.top, offset):
                part.holes[missing] = now
            self._holed.add(where)
        part.top = offset + 1
        return True

    def due(self) -> list[tuple[Where, int]]:
        """The partitions to read again, each from its first hole, now: at most once per
        ``REREAD_EVERY_S`` each; holes older than the patience are given up (``lost``)."""
        if not self._holed:
            return []
        now = self._clock()
        wanted = []
        for where in list(self._holed):
            part = self._parts[where]
            expired = [o for o, seen in part.holes.items() if now - seen >= self._patience_s]
            for offset in expired:
                del part.holes[offset]
            self.lost += len(expired)
            if not part.holes:
                self._holed.discard(where)
            elif now - part.reread_at >= REREAD_EVERY_S:
                part.reread_at = now
                wanted.append((where, min(part.holes)))
        return wanted

    def forget(self, where: Where) -> None:
        """The partition went to another reader: what it had no longer matters here."""
        self._parts.pop(where, None)
        self._holed.discard(where)

    def first_hole(self, where: Where) -> int | None:
        """The lowest offset still missed: a reader that commits must not pass it."""
        part = self._parts.get(where)
        return min(part.holes) if part and part.holes else None

    def holes(self, where: Where) -> list[int]:
        part = self._parts.get(where)
        return sorted(part.holes) if part else []
