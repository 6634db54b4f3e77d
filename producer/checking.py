# SPDX-License-Identifier: Apache-2.0
"""The client's side of verification: each job's verifier, the fleet's reputation, redos.

A result goes through its job's ``JobVerifier`` before the caller sees it; this module
carries out what the verifier decides: it hands a checked chunk to the ``JobHandle``
with its level, sends a chunk again (to other cars) for a second opinion, a ringer or
a redo, records each verdict on the reputation topic, and quarantines a car proven
wrong, with the evidence.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from parkpool.producer.freivalds import Prepared
from parkpool.producer.jobs import JobHandle, JobState
from parkpool.producer.metrics import SdkMetrics
from parkpool.producer.plans import ChunkSpec
from parkpool.producer.verify import Accept, Action, Fail, JobVerifier, Judged, Misfit, Redo
from parkpool.runtime import logs
from parkpool.runtime.reputation import ReputationBook, ReputationReader, ReputationWriter
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, ParkpoolError, Result, TaskChunk, ValidationError
from parkpool.schemas.kernels import spec as kernel_spec
from parkpool.schemas.messages import MAX_AVOIDED
from parkpool.schemas.reputation import Level

log = logs.get_logger("parkpool.producer")

SendTask = Callable[[TaskChunk], None]  # produce one task record; raises BrokerError


@dataclasses.dataclass
class _Job:
    verifier: JobVerifier
    tasks: Sequence[TaskChunk]


class ResultChecks:
    """Verification for one client's jobs; thread-safe."""

    def __init__(
        self,
        conn: KafkaConnection,
        topic: str,
        writer: str,
        metrics: SdkMetrics,
        send_task: SendTask,
        rounds: int = 1,
    ) -> None:
        self.book = ReputationBook()
        self.reader = ReputationReader(conn, topic, self.book)
        self.reader.start()
        self.writer = ReputationWriter(conn, topic, writer, self.book)
        self.metrics = metrics
        self.rounds = rounds
        self._send_task = send_task
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def begin(
        self,
        job_id: str,
        kernel: str,
        chunks: Sequence[ChunkSpec],
        tasks: Sequence[TaskChunk],
        minimum: Level,
        prepared: Prepared | None = None,
    ) -> None:
        verifier = JobVerifier(
            job_id,
            kernel_spec(kernel),
            chunks,
            self.book,
            minimum=minimum,
            rounds=self.rounds,
            prepared=prepared,
        )
        with self._lock:
            self._jobs[job_id] = _Job(verifier, tasks)

    def end(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _job(self, job_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def wants(self, handle: JobHandle[Any], result: Result) -> bool:
        """Whether a result is worth reading back: awaited, or needed by a check."""
        job = self._job(handle.job_id)
        if job is None:
            return handle.awaits(result.chunk_id)
        return handle.awaits(result.chunk_id) or job.verifier.wants(result.chunk_id)

    def take(self, handle: JobHandle[Any], result: Result) -> None:
        job = self._job(handle.job_id)
        if job is None or not job.verifier.wants(result.chunk_id):
            try:
                handle.deliver(result, time.time(), Level.UNCHECKED)  # counted as a duplicate
            except ValidationError as exc:
                # A misfit for a chunk already settled, whose answer may not have reached
                # the job yet (another thread hands it over): that answer stands.
                note_misfit(self.metrics, handle.job_id, result, str(exc))
            return
        try:
            actions = job.verifier.take(result)
        except Exception as exc:  # a bug in a check must fail the chunk, not the reader
            log.exception("result_check_failed", job_id=handle.job_id, chunk_id=result.chunk_id)
            self.metrics.results_refused.labels("check_error").inc()
            self.failed(handle, result.chunk_id, f"check_error: {exc}")
            return
        self._act(handle, job, actions)

    def unusable(self, handle: JobHandle[Any], result: Result, detail: str) -> None:
        """A result whose stored outputs are missing or not what its car named: redone
        on another car while tries are left, else the chunk fails (and its check group
        goes on without it)."""
        job = self._job(handle.job_id)
        if job is None or not 0 <= result.chunk_id < len(job.tasks):
            handle.refused(result.chunk_id, f"outputs_unreadable: {detail}")
            return
        self._act(handle, job, job.verifier.unusable(result, detail))

    def failed(self, handle: JobHandle[Any], chunk_id: int, reason: str) -> None:
        """The chunk fails for good: the job is told, and tiles held for its check group
        are judged without it; else they, and the job, would wait for ever."""
        handle.refused(chunk_id, reason)
        self.abandoned(handle, chunk_id)

    def abandoned(self, handle: JobHandle[Any], chunk_id: int) -> None:
        job = self._job(handle.job_id)
        if job is not None and 0 <= chunk_id < len(job.tasks):
            self._act(handle, job, job.verifier.abandoned(chunk_id))

    def close(self) -> None:
        self.reader.stop()
        self.writer.close()
        self._send_task = _closed  # and no cycle back to the client keeps it alive

    # ---------------------------------------------------------------- actions

    def _act(self, handle: JobHandle[Any], job: _Job, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Accept):
                if not self._accept(handle, job, action):
                    # The rest (verdicts of cars that agreed, a ringer) stood on an
                    # answer that turned out to be no answer: the misfit said it all.
                    return
            elif isinstance(action, Judged):
                self._judged(action)
            elif isinstance(action, Redo):
                self._redo(handle, job, action)
            elif isinstance(action, Fail):
                self.failed(handle, action.chunk_id, action.reason)
            elif isinstance(action, Misfit):
                handle.count_rejected()
                self._misfit(handle, job, action.result, action.detail)

    def _accept(self, handle: JobHandle[Any], job: _Job, accept: Accept) -> bool:
        """Hand the answer to the job; False when its assembler refused it."""
        try:
            if handle.deliver(accept.result, time.time(), accept.level):
                self.metrics.chunks_verified.labels(accept.level.value).inc()
        except ValidationError as exc:
            self._misfit(handle, job, accept.result, str(exc))
            return False
        return True

    def _misfit(self, handle: JobHandle[Any], job: _Job, result: Result, detail: str) -> None:
        note_misfit(self.metrics, handle.job_id, result, detail)
        self._act(handle, job, job.verifier.misfit(result, detail))

    def _judged(self, verdict: Judged) -> None:
        outcome = {True: "valid", False: "invalid", None: "unchecked"}[verdict.valid]
        self.metrics.verdicts.labels(outcome).inc()
        self.writer.judge(verdict.vehicle_id, [verdict.valid])
        if verdict.valid is False and verdict.evidence is not None:
            if not self.book.quarantined(verdict.vehicle_id):
                self.metrics.quarantines.inc()
            self.writer.quarantine(verdict.vehicle_id, (verdict.evidence,), "wrong_result")

    def _redo(self, handle: JobHandle[Any], job: _Job, redo: Redo) -> None:
        if handle.state is not JobState.RUNNING:
            # A ringer after the result that ended the job: its checks are gone, so its
            # answer would be judged by no one, and its inputs are being deleted.
            log.info("ringer_not_sent", job_id=handle.job_id, chunk_id=redo.chunk_id)
            return
        task = job.tasks[redo.chunk_id]
        avoid = redo.avoid[-MAX_AVOIDED:]
        self.metrics.redone.labels(self._why(handle, redo)).inc()
        try:
            self._send_task(dataclasses.replace(task, avoid=avoid))
        except ParkpoolError as exc:  # Kafka down, or a record its avoid list outgrew
            self.failed(handle, redo.chunk_id, f"redo_not_sent: {exc}")
            return
        log.info("chunk_redone", job_id=handle.job_id, chunk_id=redo.chunk_id, avoid=avoid)

    def _why(self, handle: JobHandle[Any], redo: Redo) -> str:
        if redo.why:
            return redo.why
        if not handle.awaits(redo.chunk_id):
            return "ringer"
        if any(self.book.quarantined(car) for car in redo.avoid):
            return "quarantined_car"
        return "second_opinion"


def note_misfit(metrics: SdkMetrics, job_id: str, result: Result, detail: str) -> None:
    """Log and count outputs that do not fit their job, whatever becomes of the chunk."""
    log.warning(
        "result_misfit",
        job_id=job_id,
        chunk_id=result.chunk_id,
        vehicle_id=result.vehicle_id,
        detail=detail,
    )
    metrics.results_refused.labels("misfit").inc()


def _closed(task: TaskChunk) -> None:
    raise BrokerError(f"the client is closed; chunk {task.chunk_id} was not sent again")
