# SPDX-License-Identifier: Apache-2.0
"""A submitted job as the caller sees it: progress, each chunk once, the assembled answer."""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from parkpool.producer.splitters import Assembler
from parkpool.schemas import DeadLetter, ParkpoolError, Result, ValidationError
from parkpool.schemas.reputation import Level


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
    rejected: int  # results that did not fit the job (wrong shape), counted and dropped

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


class JobHandle:
    """Tracks one job. Thread-safe: the client's reader thread feeds it."""

    def __init__(
        self,
        job_id: str,
        n_chunks: int,
        assembler: Assembler | None,
        canceller: Callable[[str], None] | None = None,
        observer: JobObserver | None = None,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self._on_end = on_end  # called once, as the job ends: the SDK deletes its objects
        self._observer: JobObserver = observer or _Unobserved()
        self._canceller = canceller
        self.n_chunks = n_chunks
        self.submitted_at = time.time()
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
        self._chunks: queue.SimpleQueue[ChunkResult | None] = queue.SimpleQueue()

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

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends; return the assembled answer (None without assembler)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._state is JobState.RUNNING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {self.job_id}: {self._done}/{self.n_chunks} chunks")
                self._changed.wait(left)
            if self._error is not None:
                raise self._error
            if self._state is JobState.FAILED:
                raise JobFailed(self.job_id, self._dead)
            if self._state is JobState.CANCELLED or self._assembler is None:
                return None
        return self._assembler.result()

    def chunks(self, timeout: float | None = None) -> Iterator[ChunkResult]:
        """Each chunk's outputs as they arrive, each exactly once, until the job ends."""
        while True:
            item = self._chunks.get(timeout=timeout)
            if item is None:
                return
            yield item

    def cancel(self) -> Progress:
        """Cancel the job: gateways skip its queued chunks and stop vehicles running them.

        Returns the final progress, whose ``done`` says how many chunks had completed.
        Results still in flight are ignored once the job is cancelled.
        """
        with self._lock:
            if self._state is not JobState.RUNNING:
                return self._progress()
            self._end(JobState.CANCELLED)
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

    def deliver(self, result: Result, received_at: float, level: Level = Level.UNCHECKED) -> bool:
        """Take a result, verified to ``level``; False when it is a duplicate or does not
        fit the job."""
        with self._lock:
            if self._state is not JobState.RUNNING or result.n_chunks != self.n_chunks:
                return False
            if self._seen[result.chunk_id]:
                self._duplicates += 1
                self._observer.chunk_duplicate()
                return False
            if not self._assemble(result):
                return False
            self._seen[result.chunk_id] = 1
            # A result beats a dead letter: another gateway may have redone the chunk
            # after the one that gave up on it crashed before committing.
            self._dead.pop(result.chunk_id, None)
            self._done += 1
            latency = max(0.0, received_at - result.task_created_at)
            self._latencies.append(latency)
            self._observer.chunk_completed(latency)
            self._chunks.put(
                ChunkResult(result.chunk_id, result.outputs, result.vehicle_id, latency, level)
            )
            if self._done == self.n_chunks:
                self._end(JobState.DONE)
            elif self._dead and self._done + len(self._dead) == self.n_chunks:
                self._end(JobState.FAILED)
            self._changed.notify_all()
            return True

    def awaits(self, chunk_id: int) -> bool:
        """Whether a result for this chunk would still count (running, not yet seen)."""
        with self._lock:
            running = self._state is JobState.RUNNING
            return running and 0 <= chunk_id < self.n_chunks and not self._seen[chunk_id]

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
            self._changed.notify_all()

    def _assemble(self, result: Result) -> bool:
        if self._assembler is None:
            return True
        try:
            self._assembler.add(result.chunk_id, result.outputs)
        except ValidationError:
            self._rejected += 1
            return False
        return True

    def _end(self, state: JobState) -> None:
        self._state = state
        self._observer.job_ended(state)
        if self._on_end is not None:
            self._on_end(self.job_id)
        self._chunks.put(None)
        self._changed.notify_all()
