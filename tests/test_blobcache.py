# SPDX-License-Identifier: Apache-2.0
"""A car's blob cache: bounded by bytes, least recently used out first, counted, and
one download per block however many of the car's tasks want it at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from parkpool.worker.blobcache import BlobCache
from parkpool.worker.cancel import Cancel


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


def _in_thread(call: Callable[[], bytes]) -> tuple[threading.Thread, list[object]]:
    """Run ``call`` on a thread; what it returned or raised lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_second_reader_of_a_blob_being_fetched_waits_for_that_fetch() -> None:
    # Given a car's first task fetching a block, slowly
    cache, release, fetches = BlobCache(100), threading.Event(), []

    def slow(_: Cancel) -> bytes:
        fetches.append("first")
        release.wait(5)
        return b"x" * 10

    def fast(_: Cancel) -> bytes:
        fetches.append("second")
        return b"y" * 10

    first, got_first = _in_thread(lambda: cache.fetch_once("a", slow))
    while not fetches:
        time.sleep(0.001)
    # When its prefetched task wants the same block meanwhile
    second, got_second = _in_thread(lambda: cache.fetch_once("a", fast))
    time.sleep(0.1)
    # Then it waits for the first download rather than starting its own
    assert second.is_alive() and fetches == ["first"]
    release.set()
    first.join(5)
    second.join(5)
    # And both tasks get the one download's bytes, counted as one miss and one hit
    assert got_first == got_second == [b"x" * 10]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes_fetched, stats.bytes_served) == (1, 1, 10, 20)


def test_a_failed_fetch_leaves_the_next_reader_to_fetch_with_its_own_url() -> None:
    # Given a fetch that will fail (its URL refused) while a second reader waits on it
    cache, release = BlobCache(100), threading.Event()

    def refused(_: Cancel) -> bytes:
        release.wait(5)
        raise OSError("HTTP 403")

    first, got_first = _in_thread(lambda: cache.fetch_once("a", refused))
    time.sleep(0.05)
    second, got_second = _in_thread(lambda: cache.fetch_once("a", lambda _: b"z" * 10))
    time.sleep(0.05)
    # When the first fails
    release.set()
    first.join(5)
    second.join(5)
    # Then the first reader sees its error, and the second fetched the block itself
    assert isinstance(got_first[0], OSError)
    assert got_second == [b"z" * 10] and cache.holds("a")
    assert cache.stats().misses == 2


def test_a_blob_too_large_to_keep_is_fetched_by_each_reader() -> None:
    cache = BlobCache(5)
    assert cache.fetch_once("big", lambda _: b"x" * 6) == b"x" * 6
    assert cache.fetch_once("big", lambda _: b"y" * 6) == b"y" * 6
    assert cache.stats().misses == 2 and not cache.holds("big")
