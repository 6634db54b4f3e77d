# SPDX-License-Identifier: Apache-2.0
"""A car's bounded cache of verified blobs, keyed by content hash.

A car that runs several tiles of one column block fetches the block once. Only bytes
whose SHA-256 was checked go in, so a hit is as good as a fresh fetch; the key is the
hash, so nothing stale can be served. Least recently used goes first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["BlobCache", "CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes_fetched: int
    bytes_served: int  # hits and misses: what the car's tasks read
    held_bytes: int

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


class BlobCache:
    """Thread-safe: a car's task threads share it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._fetched = self._served = 0

    def get(self, sha256: str) -> bytes | None:
        with self._lock:
            data = self._items.get(sha256)
            if data is None:
                self._misses += 1
                return None
            self._items.move_to_end(sha256)
            self._hits += 1
            self._served += len(data)
            return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep freshly fetched, verified bytes (unless larger than the whole cache)."""
        with self._lock:
            self._fetched += len(data)
            self._served += len(data)
            if len(data) > self.max_bytes or sha256 in self._items:
                return
            self._items[sha256] = data
            self._held += len(data)
            while self._held > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._held -= len(old)

    def clear(self) -> None:
        """Drop every held blob (a stopped car gives its memory back); counters stay."""
        with self._lock:
            self._items.clear()
            self._held = 0

    def holds(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._items

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._fetched, self._served, self._held)
