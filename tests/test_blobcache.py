# SPDX-License-Identifier: Apache-2.0
"""A car's blob cache: bounded by bytes, least recently used out first, counted."""

from __future__ import annotations

from parkpool.worker.blobcache import BlobCache


def test_hits_misses_and_bytes_are_counted() -> None:
    cache = BlobCache(100)
    assert cache.get("a") is None
    cache.put("a", b"x" * 10)
    assert cache.get("a") == b"x" * 10
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes_fetched, stats.bytes_served) == (1, 1, 10, 20)
    assert stats.hit_rate == 0.5


def test_the_least_recently_used_goes_first() -> None:
    # Given a cache of 30 bytes holding a, b, c (10 each), with a read last
    cache = BlobCache(30)
    for name in "abc":
        cache.put(name, name.encode() * 10)
    cache.get("a")
    # When d arrives, Then b (the least recently used) is dropped, a and c are kept
    cache.put("d", b"d" * 10)
    assert [cache.holds(n) for n in "abcd"] == [True, False, True, True]
    assert cache.stats().held_bytes == 30


def test_a_blob_larger_than_the_cache_is_served_not_kept() -> None:
    cache = BlobCache(5)
    cache.put("big", b"x" * 6)
    assert not cache.holds("big") and cache.stats().held_bytes == 0


def test_clear_drops_the_blobs_and_keeps_the_counts() -> None:
    # Given a cache that served a blob
    cache = BlobCache(100)
    cache.put("a", b"x" * 10)
    cache.get("a")
    # When it is cleared (its car stopped)
    cache.clear()
    # Then it holds nothing, and what it did stays counted
    stats = cache.stats()
    assert not cache.holds("a") and stats.held_bytes == 0
    assert (stats.hits, stats.bytes_fetched, stats.bytes_served) == (1, 10, 20)
