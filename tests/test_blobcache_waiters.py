# SPDX-License-Identifier: Apache-2.0
"""Readers waiting on a car's download of a block are handed its bytes, whether or not
the cache can keep them, and the download outlives a reader let go while another still
wants it.

Before, a waiter was served only what the cache kept: a block larger than the cache (or
evicted at once) was downloaded again by each waiter, one after another. The fetches
here are stand-ins gated by events (pure logic); the last test is a real car on the
session's brokers, fetching from a real HTTP server (tests.car_downloads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import Preempted
from parkpool.worker.blobcache import Blob, BlobCache, CacheStats
from parkpool.worker.cancel import Cancel
from parkpool.worker.fleet import Fleet
from tests.car_downloads import BODY, REF, GatedStore, GatewayVoice, Said, X, readers, stored_task
from tests.helpers import wait_for

BLOCK = b"x" * 6
PROMPT_S = 0.5


class Reader:
    """One task's ``fetch_once`` on its own thread: what it got, or raised, and when."""

    def __init__(self, cache: BlobCache, fetch: Callable[[Cancel], Blob]) -> None:
        self.cancel = Cancel()
        self.outcome: list[object] = []
        self.ended = 0.0
        self._thread = threading.Thread(target=self._run, args=(cache, fetch), daemon=True)
        self._thread.start()

    def _run(self, cache: BlobCache, fetch: Callable[[Cancel], Blob]) -> None:
        try:
            self.outcome.append(cache.fetch_once("a", fetch, self.cancel))
        except Exception as exc:
            self.outcome.append(exc)
        self.ended = time.monotonic()

    def join(self) -> object:
        self._thread.join(5)
        assert not self._thread.is_alive(), "the reader is still blocked"
        (outcome,) = self.outcome
        return outcome


class Download:
    """A stand-in fetch that holds until ``gate`` is set, or gives up as a real one does
    once nobody wants it: counts its calls, keeps the cancel it was given."""

    def __init__(self, fails: bool = False) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.unwanted: list[Cancel] = []
        self._fails = fails

    def __call__(self, unwanted: Cancel) -> Blob:
        self.calls += 1
        self.unwanted.append(unwanted)
        with unwanted.hooked(self.gate.set):
            self.gate.wait(5)
        if unwanted.is_set():
            raise Preempted("transfer abandoned")
        if self._fails:
            raise OSError("HTTP 403")
        return BLOCK


def counts(stats: CacheStats) -> tuple[int, int, int, int, int]:
    return stats.hits, stats.misses, stats.bytes_fetched, stats.bytes_served, stats.held_bytes


class TestHandOff:
    """Every reader waiting on a download gets its bytes from it, kept or not."""

    @pytest.mark.parametrize("max_bytes", [0, 5], ids=["no cache", "smaller than the block"])
    def test_waiters_are_handed_a_block_the_cache_cannot_keep(self, max_bytes: int) -> None:
        # Given a download of a block the cache cannot keep, and two readers waiting on it
        cache, download = BlobCache(max_bytes), Download()
        first = Reader(cache, download)
        wait_for(lambda: readers(cache, "a") == 1, 5, "the download")
        waiters = [Reader(cache, download), Reader(cache, download)]
        wait_for(lambda: readers(cache, "a") == 3, 5, "both to wait")
        # When the block arrives
        download.gate.set()
        # Then all three have it, from the one download
        assert [r.join() for r in (first, *waiters)] == [BLOCK] * 3
        assert download.calls == 1
        # And the waiters count as hits: reads that cost no download, served all the same
        assert counts(cache.stats()) == (2, 1, 6, 18, 0)

    def test_a_failed_download_leaves_the_next_waiter_to_fetch_for_the_rest(self) -> None:
        # Given a download that will fail (its URL refused), two readers waiting on it
        # with URLs of their own, and a cache that keeps nothing
        cache, refused, own = BlobCache(0), Download(fails=True), Download()
        first = Reader(cache, refused)
        wait_for(lambda: readers(cache, "a") == 1, 5, "the download")
        waiters = [Reader(cache, own), Reader(cache, own)]
        wait_for(lambda: readers(cache, "a") == 3, 5, "both to wait")
        # When it fails
        refused.gate.set()
        assert isinstance(first.join(), OSError)
        # Then one waiter fetches with its own URL, and the other waits for that
        wait_for(lambda: own.calls == 1 and readers(cache, "a") == 2, 5, "the second try")
        own.gate.set()
        assert [w.join() for w in waiters] == [BLOCK, BLOCK]
        assert own.calls == 1
        assert counts(cache.stats()) == (1, 2, 6, 12, 0)


def fetcher_and_waiter() -> tuple[BlobCache, Download, Reader, Reader]:
    """A cache that keeps nothing, a reader downloading block "a" and one waiting on it."""
    cache, download = BlobCache(0), Download()
    fetcher = Reader(cache, download)
    wait_for(lambda: readers(cache, "a") == 1, 5, "the download")
    waiter = Reader(cache, download)
    wait_for(lambda: readers(cache, "a") == 2, 5, "the waiter")
    return cache, download, fetcher, waiter


class TestLetGo:
    """A download is given up when the last reader that wanted it is let go."""

    def test_a_fetcher_let_go_downloads_on_for_its_waiter(self) -> None:
        # Given a reader fetching a block and a second waiting for it
        _cache, download, fetcher, waiter = fetcher_and_waiter()
        # When the fetching one's task is let go
        fetcher.cancel.set()
        # Then the download goes on (the cancel acts before set() returns)
        assert not download.unwanted[0].is_set()
        download.gate.set()
        # And the waiter gets the block from it
        assert waiter.join() == BLOCK and download.calls == 1
        fetcher.join()

    def test_a_waiter_let_go_stops_waiting_at_once(self) -> None:
        # Given a reader fetching a block and a second waiting for it
        cache, download, fetcher, waiter = fetcher_and_waiter()
        # When the waiting one's task is let go
        cancelled = time.monotonic()
        waiter.cancel.set()
        # Then it stops waiting at once, and the download goes on for the fetcher
        assert isinstance(waiter.join(), Preempted)
        assert waiter.ended - cancelled < PROMPT_S
        assert not download.unwanted[0].is_set()
        download.gate.set()
        assert fetcher.join() == BLOCK
        assert counts(cache.stats()) == (0, 1, 6, 6, 0)

    def test_the_download_is_given_up_with_its_last_reader(self) -> None:
        # Given a reader fetching a block and a second waiting for it
        cache, download, fetcher, waiter = fetcher_and_waiter()
        # When both tasks are let go
        fetcher.cancel.set()
        waiter.cancel.set()
        # Then the download's own cancel is set (it shuts the socket), and both end
        assert download.unwanted[0].is_set()
        assert isinstance(fetcher.join(), Preempted)
        assert isinstance(waiter.join(), Preempted)
        # And the next reader fetches afresh: nothing was kept or counted as fetched
        again = Download()
        again.gate.set()
        assert cache.fetch_once("a", again) == BLOCK and again.calls == 1
        assert counts(cache.stats()) == (0, 2, 6, 6, 0)


class TestCancel:
    """A cancel runs each hook once, on the thread that sets it."""

    def test_hooks_run_once_and_a_late_hook_at_once(self) -> None:
        cancel, ran = Cancel(), []
        cancel.hook(lambda: ran.append("early"))
        unhooked = cancel.hook(lambda: ran.append("unhooked"))
        unhooked()
        cancel.set()
        cancel.set()
        cancel.hook(lambda: ran.append("late"))
        assert ran == ["early", "late"] and cancel.is_set()

    def test_wait_ends_when_cancelled(self) -> None:
        cancel = Cancel()
        assert not cancel.wait(0.01)
        threading.Timer(0.05, cancel.set).start()
        assert cancel.wait(5)


@pytest.fixture
def store() -> Iterator[GatedStore]:
    gated = GatedStore(BODY)
    yield gated
    gated.close()


@pytest.mark.integration
def test_a_car_downloads_a_block_it_cannot_keep_once_for_two_tasks(
    store: GatedStore,
    fleet_factory: Callable[..., Fleet],
    mqtt_conn: MqttConnection,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a car that keeps nothing, holding two tasks on one block: the first
    # fetching it, the second waiting for that fetch
    (car,) = fleet_factory(1, prefix="ho", cache_bytes=0).vehicles.values()
    said, gateway = Said(car, monkeypatch), GatewayVoice(mqtt_conn, namespace, car)
    try:
        gateway.assign(stored_task(store, car, 1))
        assert store.requested.wait(10)
        gateway.assign(stored_task(store, car, 2))
        wait_for(lambda: readers(car.data.cache, REF.sha256) == 2, 10, "the second to wait")
        # When the block arrives
        store.gate.set()
        # Then both tasks ran on it, and it crossed the owner's link once
        wait_for(lambda: len(said.results) == 2, 10, "both results")
        assert sorted(r.epoch for r in said.results) == [1, 2]
        assert {float(r.outputs["value"]) for r in said.results} == {float(X.sum())}
        assert len(store.requests) == 1 and said.nacks == []
        # And the cache counts one miss that fetched it and one hit served by it
        size = len(BODY)
        assert counts(car.data.cache.stats()) == (1, 1, size, 2 * size, 0)
    finally:
        gateway.peer.close()
