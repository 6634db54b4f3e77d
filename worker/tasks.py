# SPDX-License-Identifier: Apache-2.0
"""A car's tasks, from the assignment to the answer: let it in, hold it, wait for a
slot, run it under the owner's guard, and send its result or a nack saying why not.

The worker owns the connection, the pulls and the owner's policy; it hands this line
every assignment and revoke it receives, and hears back when room frees up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from parkpool.runtime import logs
from parkpool.schemas import (
    Assignment,
    BrokerError,
    DecodeError,
    KernelError,
    NackReason,
    Preempted,
    Reject,
    Result,
    Retry,
    Revoke,
    TaskChunk,
    ValidationError,
    decode,
)
from parkpool.worker.admission import Admission
from parkpool.worker.dataplane import CarData
from parkpool.worker.grants import GatewayBook
from parkpool.worker.held import Held, HeldTasks, task_context
from parkpool.worker.outbox import Outbox
from parkpool.worker.policy import Decision
from parkpool.worker.replies import nack_of, result_of
from parkpool.worker.runner import TaskRunner

Refusal = tuple[NackReason, str]
# How often a task waiting for a kernel slot looks whether it was let go. Only its
# thread is at stake, not the owner's car, and a simulated fleet has a thousand such
# waits: a slow poll costs the process a thousand wake-ups a second at most.
SLOT_POLL_S = 1.0


class TaskLine:
    """The tasks one car holds, and what becomes of each."""

    def __init__(
        self,
        vehicle_id: str,
        *,
        capacity: int,
        concurrency: int,
        admission: Admission,
        gateways: GatewayBook,
        runner: TaskRunner,
        data: CarData,
        outbox: Outbox,
        pool: Executor,
        stopping: threading.Event,
        decision: Callable[[], Decision],
        on_room: Callable[[], None],
        on_preempted: Callable[[], None],
    ) -> None:
        self.vehicle_id = vehicle_id
        self.capacity = capacity
        self.held = HeldTasks()
        self.completed = 0
        self._slots = threading.Semaphore(concurrency)
        self._admission = admission
        self._gateways = gateways
        self._runner = runner
        self._data = data
        self._outbox = outbox
        self._pool = pool
        self._stopping = stopping
        self._decision = decision
        self._on_room = on_room  # a task ended: the worker may pull again
        self._on_preempted = on_preempted
        self._log = logs.get_logger("parkpool.worker").bind(vehicle_id=vehicle_id)

    # ---------------------------------------------------------------- receiving

    def receive(self, payload: bytes) -> Assignment | None:
        """Take one encoded assignment; the assignment when it was authentic and ours."""
        try:
            assignment = decode(payload, Assignment)
        except DecodeError as exc:
            # Without a readable epoch there is nothing to nack; the lease will expire.
            self._log.warning("assignment_malformed", reason=str(exc))
            return None
        if not self._admission.authentic(assignment):
            return None
        if assignment.vehicle_id != self.vehicle_id:  # another car's epochs mean nothing here
            detail = "assignment addressed to another vehicle"
            self.nack(assignment, NackReason.INVALID_TASK, detail)
            return None
        self._gateways.received(assignment.gateway_id, assignment.epoch)
        refusal = self._refusal(assignment)
        if refusal is not None:
            self.nack(assignment, *refusal)
            return assignment
        task = self._readable(assignment)
        if task is not None:
            self.held.add(assignment, task)
            if self._taken_back(assignment, task):
                return assignment
            self._log.debug("task_received", **task_context(assignment, task))
            self._pool.submit(self._run, assignment.epoch)
        return assignment

    def _taken_back(self, assignment: Assignment, task: TaskChunk) -> bool:
        """Whether the owner took the car back while the task was being opened. The
        guard's stop hands back the tasks it finds held; one added after it looked would
        stay held for good, its lease kept alive by heartbeats and its slot lost. Asked
        after ``add``: a stop either found the task, or its decision is seen here."""
        decision = self._decision()
        if decision.runs:
            return False
        if self.held.pop(assignment.epoch) is not None:
            self.nack(assignment, NackReason.RELEASED, f"owner policy: {decision.reason}", task)
        return True

    def _readable(self, assignment: Assignment) -> TaskChunk | None:
        """The task in clear, or None once it has been nacked as unreadable."""
        try:
            task = decode(assignment.task, TaskChunk)
        except DecodeError as exc:
            self.nack(assignment, NackReason.INVALID_TASK, str(exc))
            return None
        try:
            return self._admission.open(assignment, task)
        except DecodeError as exc:
            # Sealed to another key (this car restarted since its pull, say): counted as a
            # failed attempt, so a task no car can open still ends in the dead-letter topic.
            self.nack(assignment, NackReason.KERNEL_ERROR, f"sealed inputs: {exc}", task)
            return None

    def _refusal(self, assignment: Assignment) -> Refusal | None:
        decision = self._decision()
        if self._stopping.is_set():
            return NackReason.RELEASED, "worker stopping"
        if not decision.runs:
            return NackReason.RELEASED, f"owner policy: {decision.reason}"
        if assignment.lease_deadline < time.time():
            return NackReason.EXPIRED, "lease deadline passed before the task could start"
        if len(self.held) >= self.capacity:
            return NackReason.BUSY, "more tasks than credits given"
        return None

    def revoke(self, payload: bytes) -> None:
        try:
            revoke = decode(payload, Revoke)
        except DecodeError as exc:
            self._log.warning("revoke_malformed", reason=str(exc))
            return
        held = self.held.pop(revoke.epoch)
        if held is not None:
            self._log.info("lease_revoked", job_id=held.task.job_id, reason=revoke.reason)
            self._on_room()

    # ---------------------------------------------------------------- running

    def _run(self, epoch: int) -> None:
        # Stored inputs are fetched before waiting for a slot, so a prefetched task's
        # bytes arrive while the running kernel computes. A shared fleet pool has threads
        # to spare; the car runs only `concurrency` kernels at once.
        item = self.held.get(epoch)
        if item is None or self._stopping.is_set():
            return  # released or revoked meanwhile
        try:
            inputs = self._inputs(item)
            if not self._slot_for(item):
                return  # let go while it waited: its thread is free for the next task
            try:
                self._run_held(epoch, inputs)
            finally:
                self._slots.release()
        except Preempted as exc:
            # Its inputs' download was cut because the task was let go (revoked, handed
            # back, the car stopping): whoever let it go said what there was to say, and
            # this is no fault of the car's. _finish sends nothing for a task no longer
            # held, nor from a stopping car; one still held would be handed back.
            self._finish(epoch, nack=(NackReason.RELEASED, exc.reason))
            context = task_context(item.assignment, item.task)
            self._log.info("task_inputs_abandoned", **context, reason=exc.reason)
        except Exception as exc:
            # A fault of the car's own (a bug, a library's unexpected error) would end
            # this pool thread silently and keep the task held: the car would run one
            # slot short for good and the gateway would wait out the lease. Hand it back.
            self._log.exception("task_crashed", **task_context(item.assignment, item.task))
            self._finish(epoch, nack=(NackReason.KERNEL_ERROR, f"car fault: {exc!r}"[:512]))

    def _slot_for(self, item: Held) -> bool:
        """Wait for a kernel slot; False once the task is let go meanwhile (revoked,
        handed back), so that a task no longer held does not keep a pool thread, which
        the next prefetched task needs for its downloads, until the kernel ends."""
        while not self._slots.acquire(timeout=SLOT_POLL_S):
            if item.cancel.is_set() or self._stopping.is_set():
                return False
        return True

    def _run_held(self, epoch: int, inputs: TaskChunk | Refusal) -> None:
        item = self.held.start(epoch)
        if item is None or self._stopping.is_set():
            return  # released or revoked meanwhile
        try:
            answer = self._answer(item, inputs)
        except Preempted:
            # Stopped by the owner's guard: the worker hands back every task still held
            # (the guard's stop, or its own look after, finds this one), counted as
            # released once. A task let go otherwise (revoked) was taken out by whoever
            # let it go, and handing it back here raced the guard's own hand-back.
            if not self._decision().runs:
                self._on_preempted()
            return
        if isinstance(answer, Result):
            self._finish(epoch, result=answer)
        else:
            self._finish(epoch, nack=answer)

    def _answer(self, item: Held, task: TaskChunk | Refusal) -> Result | Refusal:
        """Run and wrap one task whose inputs are in hand: its result, or why not."""
        if not isinstance(task, TaskChunk):
            return task
        try:
            outputs, seconds = self._runner.run(task, item.cancel)
        except (ValidationError, Reject) as exc:
            return NackReason.INVALID_TASK, str(exc)
        except (KernelError, Retry) as exc:
            return NackReason.KERNEL_ERROR, str(exc)
        try:
            result = result_of(item, self.vehicle_id, outputs, seconds)
        except DecodeError as exc:  # a reply_key nothing can be sealed to: no car can answer
            return NackReason.INVALID_TASK, f"reply_key: {exc}"
        return self._offloaded(item, result)

    def _offloaded(self, item: Held, result: Result) -> Result | Refusal:
        """The result with large outputs in the store, or why they cannot go there."""
        try:
            return self._data.offload(result, item.assignment, item.cancel)
        except BrokerError as exc:
            return NackReason.FETCH_FAILED, f"outputs: {exc}"
        except ValidationError as exc:
            # Terminal, as for a result too large to send inline (_finish): every car's
            # outputs would be as large. Counted with those.
            self._outbox.too_large += 1
            return NackReason.INVALID_TASK, f"outputs: {exc}"

    def _inputs(self, item: Held) -> TaskChunk | Refusal:
        """The task with its stored inputs fetched, checked and, when sealed, opened; on
        this task's thread, so a slow store never holds up the car's connection. Raises
        Preempted as soon as the task is let go."""
        if not item.task.refs:
            return item.task
        try:
            task = self._data.hydrate(item.assignment, item.task, item.cancel)
            return self._admission.open(item.assignment, task) if task.sealed_inputs else task
        except BrokerError as exc:  # store unreachable or URL refused: another try may work
            return NackReason.FETCH_FAILED, str(exc)
        except ValidationError as exc:  # no car may take it: refused before any fetch
            return NackReason.INVALID_TASK, str(exc)
        except DecodeError as exc:  # not the bytes the task names, or they do not open
            return NackReason.BAD_DATA, str(exc)

    def _finish(
        self, epoch: int, result: Result | None = None, nack: Refusal | None = None
    ) -> None:
        item = self.held.pop(epoch)
        if item is None or self._stopping.is_set():
            return  # already released by stop(): the gateway has our nack
        if result is not None:
            too_large = self._outbox.result(result)
            if too_large is None:
                self.completed += 1
                self._log.debug("task_done", **task_context(item.assignment, item.task))
            else:
                # Terminal: every car's answer would be as large, so the gateway
                # dead-letters the task now instead of waiting out the lease.
                nack = (NackReason.INVALID_TASK, too_large)
        if nack is not None:
            context = task_context(item.assignment, item.task)
            self._log.warning("task_failed", **context, reason=nack[0].value, detail=nack[1])
            self.nack(item.assignment, *nack, item.task)
        self._on_room()

    def nack(
        self,
        assignment: Assignment,
        reason: NackReason,
        detail: str,
        task: TaskChunk | None = None,
    ) -> None:
        self._outbox.nack(nack_of(assignment, self.vehicle_id, reason, detail, task))
