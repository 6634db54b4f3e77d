# SPDX-License-Identifier: Apache-2.0
"""When a reader of a growing topic should wait longer per fetch.

On its S3 engine, Tansu looks for records by listing a partition's batch objects in the
store, and gives up on a partition whose listing has not finished within the fetch's
wait: the partition comes back empty, with a high watermark past the reader. A topic
that only grows (Tansu 0.6 has no retention there) thus stops being readable with a
short wait once it holds a few thousand batches. A long wait has its own price: an
empty fetch sleeps half of what is left of its wait before it looks again, so a record
that arrives meanwhile waits up to half the wait before anyone reads it.

So a reader starts with a short wait and doubles it when a partition stays behind its
high watermark while the reader gets nothing at all; it never shortens it again, since
the partition only grows. Nothing at all, not merely nothing from that partition: a
reader of large records (16 MiB inline tasks) gets them one or two per fetch, so a
partition can wait its turn for seconds while the others are read, on Apache Kafka as
well. A reader with one stalled partition among others that keep coming raises its wait
once they pause; a topic's partitions grow alike, so their listings outgrow it together.
"""

from __future__ import annotations

from collections.abc import Iterable

Where = tuple[str, int]  # a topic's partition

# How far a wait is raised: Tansu's listing takes ~50 ms per 4,000 batches from the
# embedded store, and librdkafka's socket timeout (60 s) must stay far above the wait.
MAX_FETCH_WAIT_MS = 5000
# How long a partition may stay behind, with nothing read at all, before the wait is
# raised; at least this many fetch waits, so that a fetch still on its way is not a stall.
STALL_PATIENCE_S = 1.0
STALL_PATIENCE_WAITS = 4


class FetchWaitLadder:
    """The fetch wait a reader should use, raised when a partition stalls. Not
    thread-safe: one reader thread owns it."""

    def __init__(
        self, wait_ms: int, most_ms: int = MAX_FETCH_WAIT_MS, patience_s: float = STALL_PATIENCE_S
    ) -> None:
        if wait_ms < 1 or most_ms < wait_ms:
            raise ValueError(f"a fetch wait of {wait_ms} ms, at most {most_ms} ms")
        self.wait_ms = wait_ms
        self.most_ms = most_ms
        self._patience_s = patience_s
        self._behind_since: dict[Where, float] = {}

    @property
    def patience_s(self) -> float:
        return max(self._patience_s, STALL_PATIENCE_WAITS * self.wait_ms / 1000)

    def read(self) -> None:
        """A record came: the reader is moving, and every partition's patience starts
        again."""
        self._behind_since.clear()

    def due(self, behind: Iterable[Where], now: float) -> bool:
        """Whether to raise the wait: one of ``behind`` (partitions whose high watermark
        is past the next offset to read) has stayed so, with nothing read since, for
        longer than the patience, and the wait can still grow. Partitions not named are
        caught up. The reader then checks that the broker answers (an outage looks the
        same from here) and calls ``raise_wait``, or ``read`` to start over."""
        behind = set(behind)
        for where in set(self._behind_since) - behind:
            del self._behind_since[where]
        stalled = False
        for where in behind:
            since = self._behind_since.setdefault(where, now)
            stalled = stalled or now - since >= self.patience_s
        return stalled and self.wait_ms < self.most_ms

    def raise_wait(self) -> int:
        """Double the wait, up to the most; every partition gets the new patience."""
        self.wait_ms = min(self.most_ms, self.wait_ms * 2)
        self._behind_since.clear()
        return self.wait_ms
