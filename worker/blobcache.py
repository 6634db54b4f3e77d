# SPDX-License-Identifier: Apache-2.0
"""A car's bounded cache of verified blobs, keyed by content hash.

A car that runs several tiles of one column block fetches the block once. Only bytes
whose SHA-256 was checked go in, so a hit is as good as a fresh fetch; the key is the
hash, so nothing stale can be served. Least recently used goes first.

A car holds a running task and a prefetched one, and both often read the same block:
``fetch_once`` lets the second wait for the first's download rather than start its own
(request coalescing, as groupcache's singleflight does), and hands it that download's
bytes even when the cache cannot keep them. The download is shared, so it is given up
only when every task that wanted it was let go: one task's revoke does not cut a block
the other still needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from parkpool.schemas import Preempted
from parkpool.worker.cancel import Cancel

__all__ = ["Blob", "BlobCache", "CacheStats"]

# What a car fetched: read-only bytes, or a read-only view of the buffer they were read into.
Blob = bytes | memoryview


@dataclass(frozen=True)
class CacheStats:
    hits: int  # reads that cost no download: held, or handed over by one in flight
    misses: int  # reads that started a download
    bytes_fetched: int  # what the downloads brought, verified
    bytes_served: int  # hits and misses: what the car's tasks read
    held_bytes: int

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


@dataclass(eq=False)
class _Flight:
    """One download in progress, and how many callers still want its bytes."""

    wanted: int = 1  # its fetcher and its waiters, less those let go
    unwanted: Cancel = field(default_factory=Cancel)  # set when ``wanted`` reaches 0
    done: bool = False
    data: Blob | None = None  # the verified bytes, handed to every waiter; None: failed


class BlobCache:
    """Thread-safe: a car's task threads share it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[str, Blob] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a fetch ended, or a waiter left
        self._hits = self._misses = self._fetched = self._served = 0
        self._fetching: dict[str, _Flight] = {}  # sha256 -> its download in progress

    def get(self, sha256: str) -> Blob | None:
        with self._lock:
            data = self._hit(sha256)
            if data is None:
                self._misses += 1
            return data

    def fetch_once(
        self, sha256: str, fetch: Callable[[Cancel], Blob], cancel: Cancel | None = None
    ) -> Blob:
        """The blob from the cache, or from ``fetch``, which must return verified bytes.

        While one caller fetches a hash, others wanting it wait, and are handed that
        fetch's bytes (a hit: one download served them all), kept or not. Should that
        fetch fail, the next caller fetches with its own ``fetch``: its URL may still
        work. ``fetch`` is given the download's own cancel, set once no caller wants the
        bytes any more: each caller's ``cancel`` (its task let go) takes it out, and a
        caller cancelled while waiting gets Preempted at once."""
        cancel = cancel or Cancel()
        while True:
            with self._lock:
                data = self._hit(sha256)
                if data is not None:
                    return data
                flight = self._fetching.get(sha256)
                if flight is None:
                    self._misses += 1
                    flight = self._fetching[sha256] = _Flight()
                    break
                flight.wanted += 1
            data = self._wait(flight, cancel)
            if data is not None:
                return data
        return self._fetch(sha256, flight, fetch, cancel)

    def _fetch(
        self, sha256: str, flight: _Flight, fetch: Callable[[Cancel], Blob], cancel: Cancel
    ) -> Blob:
        data = None
        try:
            with cancel.hooked(lambda: self._unwanted(flight)):
                data = fetch(flight.unwanted)
            self.put(sha256, data)
            return data
        finally:
            with self._lock:
                flight.data, flight.done = data, True
                del self._fetching[sha256]
                self._changed.notify_all()

    def _wait(self, flight: _Flight, cancel: Cancel) -> Blob | None:
        """The bytes ``flight`` fetched, counted as a hit; None when it failed."""
        with cancel.hooked(lambda: self._unwanted(flight)), self._lock:
            while not flight.done and not cancel.is_set():
                self._changed.wait()
            if flight.data is not None:
                self._hits += 1
                self._served += len(flight.data)
                return flight.data
        if cancel.is_set():
            raise Preempted("wait for an input abandoned: its task was let go")
        return None

    def _unwanted(self, flight: _Flight) -> None:
        """One caller of ``flight`` was let go; the last one takes the download with it."""
        with self._lock:
            flight.wanted -= 1
            abandoned = flight.wanted == 0 and not flight.done
            self._changed.notify_all()  # a waiter that was let go stops waiting
        if abandoned:
            flight.unwanted.set()  # outside the lock: it shuts the download's socket

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
