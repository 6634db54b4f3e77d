# SPDX-License-Identifier: Apache-2.0
"""Per-vehicle token buckets, so one misbehaving car cannot starve the others.

A car that floods pulls or results has the excess dropped and counted; its honest work is
unaffected (pulls are absolute and refreshed, and a dropped result only means its lease
runs out and the task is redone). The table of buckets is bounded by ``max_keys``, which
the gateway sizes from the cars it keeps state for: a flood of made-up vehicle ids evicts
the least recently seen buckets instead of growing memory.

An eviction is counted. Evicting a bucket that had refilled to its burst loses nothing
(a new one starts full too); evicting one that had not (``lossy_evictions``) hands that
car a fresh burst, so a steady count of those means the table is too small for the cell
and limits are being lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_KEYS = 200_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        if max_keys < 1:
            raise ValueError("a rate limit needs room for at least one key")
        self.rate = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self.evictions = 0  # buckets dropped to make room, lossy or not
        self.lossy_evictions = 0  # of those, buckets not yet back at their burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` at time ``now`` (monotonic seconds), if there is one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._evict_oldest(now)
        else:
            self._buckets.move_to_end(key)
            self._refill(bucket, now)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _refill(self, bucket: _Bucket, now: float) -> None:
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now

    def _evict_oldest(self, now: float) -> None:
        _key, oldest = self._buckets.popitem(last=False)
        self.evictions += 1
        self._refill(oldest, now)
        if oldest.tokens < self.burst:
            self.lossy_evictions += 1

    def __len__(self) -> int:
        return len(self._buckets)
