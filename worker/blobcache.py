# SPDX-License-Identifier: Apache-2.0
"""A car's bounded cache of verified blobs, keyed by content hash.

A car that runs several tiles of one column block fetches the block once. Only bytes
whose SHA-256 was checked go in, so a hit is as good as a fresh fetch; the key is the
hash, so nothing stale can be served. Least recently used goes first.

A car holds a running task and a prefetched one, and both often read the same block:
``fetch_once`` lets the second wait for the first's download rather than start its own
(request coalescing, as groupcache's singleflight does).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Blob", "BlobCache", "CacheStats"]

# What a car fetched: read-only bytes, or a read-only view of the buffer they were read into.
Blob = bytes | memoryview


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
        self._items: OrderedDict[str, Blob] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._fetched = self._served = 0
        self._fetching: dict[str, threading.Event] = {}  # sha256 -> set when its fetch ends

    def get(self, sha256: str) -> Blob | None:
        with self._lock:
            data = self._hit(sha256)
            if data is None:
                self._misses += 1
            return data

    def fetch_once(self, sha256: str, fetch: Callable[[], Blob]) -> Blob:
        """The blob from the cache, or from ``fetch``, which must return verified bytes.
        While one caller fetches a hash, others wanting it wait and are served what it
        kept (a hit: one download served both). Should that fetch fail, or its bytes not
        be kept, the next caller fetches with its own ``fetch``: its URL may still work."""
        while True:
            with self._lock:
                data = self._hit(sha256)
                if data is not None:
                    return data
                running = self._fetching.get(sha256)
                if running is None:
                    self._misses += 1
                    done = self._fetching[sha256] = threading.Event()
                    break
            running.wait()
        try:
            data = fetch()
            self.put(sha256, data)
            return data
        finally:
            with self._lock:
                del self._fetching[sha256]
            done.set()

    def _hit(self, sha256: str) -> Blob | None:
        """The held blob, counted as served; the caller holds the lock."""
        data = self._items.get(sha256)
        if data is not None:
            self._items.move_to_end(sha256)
            self._hits += 1
            self._served += len(data)
        return data

    def put(self, sha256: str, data: Blob) -> None:
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
