# SPDX-License-Identifier: Apache-2.0
"""A submitted job as the caller sees it: progress, each chunk once, the assembled answer."""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, overload

import numpy as np

from parkpool.producer.plans import Assembler
from parkpool.producer.streams import ChunkStream, ProgressStream, awaitable
from parkpool.runtime import logs
from parkpool.schemas import DeadLetter, ParkpoolError, Result, ValidationError, same_submission
from parkpool.schemas.reputation import Level

log = logs.get_logger("parkpool.producer")


class JobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # a chunk was dead-lettered; the answer cannot be assembled
    CANCELLED = "cancelled"


class JobFailed(ParkpoolError):  # noqa: N818 - reads as what happened, like Retry/Reject
    """A job cannot complete: some chunks were dead-lettered."""

    def __init__(self, job_id: str, reasons: Mapping[int, str]) -> None:
        self.job_id = job_id
        self.reasons = dict(reasons)
        shown = ", ".join(f"chunk {c}: {r}" for c, r in sorted(self.reasons.items())[:5])
        super().__init__(f"job {job_id} failed: {shown}")


@dataclass(frozen=True)
class Progress:
    state: JobState
    done: int
    total: int
    duplicates: int
    dead_lettered: int
    rejected: int  # results that did not fit the job (wrong shape): redone or failed

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: int
    outputs: Mapping[str, np.ndarray]
    vehicle_id: str
    latency_s: float  # from the chunk's submission to its arrival here
    verification: Level = Level.UNCHECKED  # how this result was checked before it came


class JobObserver(Protocol):
    """Told what happens to a job's chunks (the SDK's metrics); called under the handle's
    lock, so implementations must be quick and must not call back into the handle."""

    def chunk_completed(self, latency_s: float) -> None: ...

    def chunk_duplicate(self) -> None: ...

    def chunk_dead_lettered(self) -> None: ...

    def job_ended(self, state: JobState) -> None: ...


class _Unobserved:
    def chunk_completed(self, latency_s: float) -> None:
        return None

    def chunk_duplicate(self) -> None:
        return None

    def chunk_dead_lettered(self) -> None:
        return None

    def job_ended(self, state: JobState) -> None:
        return None


R = TypeVar("R")  # the job's answer, as its assembler gives it


class JobHandle(Generic[R]):
    """Tracks one job. Thread-safe: the client's reader thread feeds it.

    Typed by its answer: ``JobHandle[np.ndarray]`` for a gemm, ``JobHandle[float]`` for
    a reduce, ``JobHandle[None]`` for a job without an assembler.
    """

    @overload
    def __init__(
        self: JobHandle[None],
        job_id: str,
        n_chunks: int,
        assembler: None,
        canceller: Callable[[str], None] | None = None,
        observer: JobObserver | None = None,
        on_end: Callable[[str, JobState, bool], None] | None = None,
        created_at: float = 0.0,
    ) -> None: ...

    @overload
    def __init__(
        self: JobHandle[R],
        job_id: str,
        n_chunks: int,
        assembler: Assembler[R],
        canceller: Callable[[str], None] | None = None,
        observer: JobObserver | None = None,
        on_end: Callable[[str, JobState, bool], None] | None = None,
        created_at: float = 0.0,
    ) -> None: ...

    def __init__(
        self,
        job_id: str,
        n_chunks: int,
        assembler: Assembler[R] | None,
        canceller: Callable[[str], None] | None = None,
        observer: JobObserver | None = None,
        on_end: Callable[[str, JobState, bool], None] | None = None,
        created_at: float = 0.0,
    ) -> None:
        self.job_id = job_id
        # Called once, as the job ends, with its state and whether the client stopped
        # following it (lost, closed): the SDK deletes its objects only when nothing of
        # it can still run, or once gateways were told to drop it.
        self._on_end = on_end
        self._observer: JobObserver = observer or _Unobserved()
        self._canceller = canceller
        self.n_chunks = n_chunks
        self.submitted_at = time.time()
        # Its tasks' created_at, which every result and letter of this submission carries
        # (0.0: unknown, an older submitter's job followed by id; any is taken then).
        self.created_at = created_at
        self._assembler = assembler
        self._seen = bytearray(n_chunks)
        self._done = 0
        self._duplicates = 0
        self._rejected = 0
        self._dead: dict[int, str] = {}
        self._error: ParkpoolError | None = None  # why the outcome cannot be known
        self._state = JobState.RUNNING
        self._latencies: list[float] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._delivered: list[ChunkResult] = []  # every chunk so far, for any reader
        self._version = 0  # bumped on every change, for progress readers
        self._watchers: list[Callable[[], None]] = []  # woken on every change
        self._listeners: list[Callable[[Progress], None]] = []
        # The assembled answer, as a concurrent.futures.Future: settled once the job
        # ends, outside the lock (its callbacks may call back into this handle).
        self._future: Future[R] = Future()
        self._settled = False
        self._future.add_done_callback(self._future_cancelled)

    # ---------------------------------------------------------------- caller side

    @property
    def progress(self) -> Progress:
        with self._lock:
            return self._progress()

    def _progress(self) -> Progress:
        return Progress(
            self._state,
            self._done,
            self.n_chunks,
            self._duplicates,
            len(self._dead),
            self._rejected,
        )

    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    @property
    def latencies(self) -> list[float]:
        with self._lock:
            return list(self._latencies)

    @property
    def future(self) -> Future[R]:
        """The assembled answer as a ``concurrent.futures.Future``: it raises JobFailed
        (or the BrokerError that cut the job off), and is cancelled with the job.
        Cancelling it cancels the job."""
        return self._future

    def wait(self, timeout: float | None = None) -> R | None:
        """Block until the job ends; return the assembled answer (None without assembler,
        or when the job was cancelled)."""
        try:
            return self._future.result(timeout)
        except CancelledError:
            return None
        except TimeoutError:
            progress = self.progress
            raise TimeoutError(
                f"job {self.job_id}: {progress.done}/{self.n_chunks} chunks"
            ) from None

    def __await__(self) -> Generator[Any, None, R | None]:
        """``await job``: the answer, as ``wait()`` gives it, without blocking the loop;
        a task cancelled while it awaits leaves the job running."""
        return self._result().__await__()

    async def _result(self) -> R | None:
        try:
            return await awaitable(self._future, asyncio.get_running_loop())
        except CancelledError:
            return None

    def chunks(self, timeout: float | None = None) -> ChunkStream[ChunkResult]:
        """Each chunk's outputs as they arrive, each once, until the job ends; every call
        starts from the first chunk, so several readers, threads or ``async for`` loops
        each see them all. ``timeout``: TimeoutError when no chunk comes for that long."""
        return ChunkStream(self, timeout)

    def progress_updates(self, timeout: float | None = None) -> ProgressStream[Progress]:
        """A ``Progress`` snapshot now and after every change, until the job ends."""
        return ProgressStream(self, timeout)

    def on_progress(self, callback: Callable[[Progress], None]) -> None:
        """Call ``callback(progress)`` after every change (on the SDK's reader threads,
        so it must be quick), and once now."""
        with self._lock:
            self._listeners.append(callback)
            progress = self._progress()
        callback(progress)

    # ---------------------------------------------------------------- for the streams

    def _chunk_at(self, index: int) -> tuple[ChunkResult | None, bool]:
        """The chunk at ``index`` if it came, and whether more may still come."""
        with self._lock:
            item = self._delivered[index] if index < len(self._delivered) else None
            return item, self._state is JobState.RUNNING

    def _wait_chunk(self, index: int, timeout: float | None) -> ChunkResult | None:
        """The chunk at ``index`` once it comes; None once the job ended without it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while index >= len(self._delivered) and self._state is JobState.RUNNING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {self.job_id}: no chunk for {timeout} s")
                self._changed.wait(left)
            return self._delivered[index] if index < len(self._delivered) else None

    def _wait_version(self, seen: int, timeout: float | None) -> tuple[int, Progress, bool]:
        """The next snapshot after version ``seen``, its version, and whether the job
        still runs (the last snapshot is the final one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._version == seen and self._state is JobState.RUNNING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {self.job_id}: no progress for {timeout} s")
                self._changed.wait(left)
            return self._version, self._progress(), self._state is JobState.RUNNING

    def _watch(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._watchers.append(wake)

    def _unwatch(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._watchers:
                self._watchers.remove(wake)

    def cancel(self) -> Progress:
        """Cancel the job: gateways skip its queued chunks and stop vehicles running them.

        Returns the final progress, whose ``done`` says how many chunks had completed.
        Results still in flight are ignored once the job is cancelled.
        """
        with self._lock:
            if self._state is not JobState.RUNNING:
                return self._progress()
            self._end(JobState.CANCELLED)
        self._after_change()
        if self._canceller is not None:
            self._canceller(self.job_id)
        return self.progress

    # ---------------------------------------------------------------- reader side

    def lost(self, error: ParkpoolError) -> None:
        """The client cannot read results any more: a running job fails with ``error``,
        which ``wait()`` raises, rather than waiting for chunks that cannot arrive."""
        with self._lock:
            if self._state is not JobState.RUNNING:
                return
            self._error = error
            self._end(JobState.FAILED)
        self._after_change()

    def deliver(self, result: Result, received_at: float, level: Level = Level.UNCHECKED) -> bool:
        """Take a result, verified to ``level``; False when it is a duplicate or not of
        this job. Outputs the job's assembler refuses (a wrong name, shape or kind) are
        counted and raise its ValidationError: the gateway has passed the chunk on, so
        the caller must have it redone or failed, or the job would wait for ever."""
        with self._lock:
            if self._state is not JobState.RUNNING or result.n_chunks != self.n_chunks:
                return False
            if self._seen[result.chunk_id]:
                self._duplicates += 1
                self._observer.chunk_duplicate()
                return False
            self._assemble(result)
            self._seen[result.chunk_id] = 1
            # A result beats a dead letter: another gateway may have redone the chunk
            # after the one that gave up on it crashed before committing.
            self._dead.pop(result.chunk_id, None)
            self._done += 1
            latency = max(0.0, received_at - result.task_created_at)
            self._latencies.append(latency)
            self._observer.chunk_completed(latency)
            self._delivered.append(
                ChunkResult(result.chunk_id, result.outputs, result.vehicle_id, latency, level)
            )
            if self._done == self.n_chunks:
                self._end(JobState.DONE)
            elif self._dead and self._done + len(self._dead) == self.n_chunks:
                self._end(JobState.FAILED)
            self._changed_locked()
        self._after_change()
        return True

    def of_this_submission(self, created_at: float) -> bool:
        """Whether a result or letter stamped ``created_at`` is of this submission, not
        of another one under the same job id (an old one's late results would otherwise
        be taken for this one's, inputs and all)."""
        return same_submission(self.created_at, created_at)

    def awaits(self, chunk_id: int) -> bool:
        """Whether a result for this chunk would still count (running, not yet seen)."""
        with self._lock:
            running = self._state is JobState.RUNNING
            return running and 0 <= chunk_id < self.n_chunks and not self._seen[chunk_id]

    def count_rejected(self) -> None:
        """A result whose outputs a check found not to fit the job, before its assembler
        saw them."""
        with self._lock:
            self._rejected += 1
            self._changed_locked()

    def refused(self, chunk_id: int, reason: str) -> None:
        """A result came back whose outputs cannot be used (their bytes are not what the
        car named): the chunk counts as failed with ``reason`` unless another attempt's
        result still arrives, rather than the job waiting for ever."""
        self._fail_chunk(chunk_id, reason)

    def dead_lettered(self, letter: DeadLetter) -> None:
        self._fail_chunk(letter.chunk_id, letter.reason)

    def _fail_chunk(self, chunk: int, reason: str) -> None:
        with self._lock:
            if self._state is not JobState.RUNNING or not 0 <= chunk < self.n_chunks:
                return
            if self._seen[chunk] or chunk in self._dead:
                return  # an earlier attempt's result already came back: that one counts
            self._dead[chunk] = reason
            self._observer.chunk_dead_lettered()
            if self._done + len(self._dead) == self.n_chunks:
                self._end(JobState.FAILED)
            self._changed_locked()
        self._after_change()

    def _assemble(self, result: Result) -> None:
        if self._assembler is None:
            return
        try:
            self._assembler.add(result.chunk_id, result.outputs)
        except ValidationError:
            self._rejected += 1
            self._changed_locked()
            raise

    def _end(self, state: JobState) -> None:
        self._state = state
        self._observer.job_ended(state)
        if self._on_end is not None:
            self._on_end(self.job_id, state, self._error is not None)
        self._changed_locked()

    def _changed_locked(self) -> None:
        """Under the lock: something changed; wake blocked readers and async ones."""
        self._version += 1
        self._changed.notify_all()
        for wake in self._watchers:
            wake()  # only schedules a wake-up on its loop: never blocks, never re-enters

    def _after_change(self) -> None:
        """Outside the lock: tell progress listeners, and settle the future once the job
        ended (its callbacks may call back into this handle)."""
        with self._lock:
            progress = self._progress()
            listeners = list(self._listeners)
            ending = self._state is not JobState.RUNNING and not self._settled
            self._settled = self._settled or ending
        if ending:  # first: a listener that raises must not leave the future unsettled
            self._settle(progress.state)
        for listener in listeners:
            try:
                listener(progress)
            except Exception:  # the caller's code, on the reader's thread: never fatal
                log.exception("progress_listener_failed", job_id=self.job_id)

    def _settle(self, state: JobState) -> None:
        if state is JobState.CANCELLED:
            self._future.cancel()
            return
        # From here a cancel() of the future returns False, as for a finished call in
        # concurrent.futures, rather than cancel an answer being assembled and leave
        # the future unsettled. False: a cancel won the race (the job is told, in vain).
        if not self._future.set_running_or_notify_cancel():
            return
        if self._error is not None:
            self._future.set_exception(self._error)
        elif state is JobState.FAILED:
            self._future.set_exception(JobFailed(self.job_id, self._dead))
        else:
            try:
                # Without an assembler R is None (the overloads of __init__ say so).
                answer = cast(R, None) if self._assembler is None else self._assembler.result()
            except Exception as exc:  # ParkpoolError as a rule; a bug shows to the caller too
                self._future.set_exception(exc)
            else:
                self._future.set_result(answer)

    def _future_cancelled(self, future: Future[R]) -> None:
        """Whoever cancels the future cancels the job (a no-op once it ended)."""
        if future.cancelled():
            self.cancel()
