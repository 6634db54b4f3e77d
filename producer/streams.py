# SPDX-License-Identifier: Apache-2.0
"""Reading a job as it runs, from threads or from asyncio: chunks, progress, the answer.

The SDK's own threads feed a ``JobHandle``; these readers never add threads of their
own. A blocking reader waits on the handle's condition; an asyncio reader parks on a
future of its own loop, which the handle wakes with ``call_soon_threadsafe``, so an
event loop is never blocked and no executor is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
C = TypeVar("C")  # a chunk's result
P = TypeVar("P")  # a progress snapshot
C_co = TypeVar("C_co", covariant=True)
P_co = TypeVar("P_co", covariant=True)


class Feed(Protocol[C_co, P_co]):
    """What the readers need of a job handle (producer.jobs.JobHandle)."""

    job_id: str

    def _chunk_at(self, index: int) -> tuple[C_co | None, bool]: ...

    def _wait_chunk(self, index: int, timeout: float | None) -> C_co | None: ...

    def _wait_version(self, seen: int, timeout: float | None) -> tuple[int, P_co, bool]: ...

    def _watch(self, wake: Callable[[], None]) -> None: ...

    def _unwatch(self, wake: Callable[[], None]) -> None: ...


def awaitable(future: Future[T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
    """An asyncio future mirroring ``future``. Unlike ``asyncio.wrap_future``, cancelling
    it (a task that stops awaiting) does not cancel ``future``, that is, the job."""
    mirror: asyncio.Future[T] = loop.create_future()

    def copy(done: Future[T]) -> None:
        if mirror.done():
            return
        if done.cancelled():
            mirror.set_exception(CancelledError())
        elif (error := done.exception()) is not None:
            mirror.set_exception(error)
        else:
            mirror.set_result(done.result())

    def forward(done: Future[T]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits it
            loop.call_soon_threadsafe(copy, done)

    future.add_done_callback(forward)
    return mirror


class ChunkStream(Generic[C]):
    """One reader's pass over a job's chunks, from the first; ``for`` or ``async for``."""

    def __init__(self, handle: Feed[C, Any], timeout: float | None) -> None:
        self._handle = handle
        self._timeout = timeout
        self._next = 0

    def __iter__(self) -> Iterator[C]:
        return self

    def __next__(self) -> C:
        item = self._handle._wait_chunk(self._next, self._timeout)
        if item is None:
            raise StopIteration
        self._next += 1
        return item

    def __aiter__(self) -> AsyncIterator[C]:
        return self

    async def __anext__(self) -> C:
        probe = lambda: self._handle._chunk_at(self._next)  # noqa: E731 - read at each wake
        item: C | None = await _when(self._handle, probe, self._timeout)
        if item is None:
            raise StopAsyncIteration
        self._next += 1
        return item


class ProgressStream(Generic[P]):
    """Progress snapshots: the current one, then one per change until the job ends."""

    def __init__(self, handle: Feed[Any, P], timeout: float | None) -> None:
        self._handle = handle
        self._timeout = timeout
        self._seen = -1
        self._over = False

    def __iter__(self) -> Iterator[P]:
        return self

    def __next__(self) -> P:
        if self._over:
            raise StopIteration
        self._seen, progress, running = self._handle._wait_version(self._seen, self._timeout)
        self._over = not running
        return progress


async def _when(
    handle: Feed[Any, Any], probe: Callable[[], tuple[Any, bool]], timeout: float | None
) -> Any:
    """``probe()`` -> (item, more may come): the item once there, None when none will be."""
    loop = asyncio.get_running_loop()
    while True:
        woken: asyncio.Future[None] = loop.create_future()

        def wake(woken: asyncio.Future[None] = woken) -> None:
            with contextlib.suppress(RuntimeError):  # a loop closed under a parked reader
                loop.call_soon_threadsafe(_set, woken)

        handle._watch(wake)  # before probing: a chunk arriving in between still wakes us
        try:
            item, more = probe()
            if item is not None or not more:
                return item
            try:
                await asyncio.wait_for(woken, timeout)
            except TimeoutError:
                raise TimeoutError(f"job {handle.job_id}: no chunk for {timeout} s") from None
        finally:
            handle._unwatch(wake)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
