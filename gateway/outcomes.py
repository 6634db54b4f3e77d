# SPDX-License-Identifier: Apache-2.0
"""How a task leaves the gateway's hands: done, skipped as cancelled, back in the queue
for another car (now or after a backoff), or dead-lettered once it has failed too often.

Every task ends in exactly one of these, which is what lets its partition's commit point
move on. Runs on the gateway's loop thread, like everything that touches its state.
"""

from __future__ import annotations

import time

from parkpool.gateway.deadletters import MAX_ATTEMPTS_KEPT
from parkpool.gateway.leases import LeaseTable
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.tasklog import TaskLog
from parkpool.gateway.tasks import PendingTask, ReadyQueue, TaskState
from parkpool.runtime.backoff import compute_backoff
from parkpool.runtime.logs import Logger
from parkpool.schemas import AttemptRecord

MAX_DETAIL = 512


class TaskOutcomes:
    def __init__(
        self,
        *,
        max_attempts: int,
        shun_s: float,
        log: TaskLog,
        leases: LeaseTable,
        ready: ReadyQueue,
        delayed: DelayQueue[PendingTask],
        metrics: GatewayMetrics,
        events: Logger,
    ) -> None:
        self._max_attempts = max_attempts
        self._shun_s = shun_s
        self._log = log
        self._leases = leases
        self._ready = ready
        self._delayed = delayed
        self._metrics = metrics
        self._events = events

    def finish(self, task: PendingTask) -> None:
        """Its result is durable: the task's offset may be committed."""
        task.state = TaskState.DONE
        self._log.finish(task.tp, task.offset)

    def skip_cancelled(self, task: PendingTask) -> None:
        self._metrics.tasks.labels("cancelled").inc()
        self.finish(task)

    def dead_letter(self, task: PendingTask, reason: str, detail: str) -> None:
        task.state = TaskState.FINISHING
        self._log.letters.send(task.tp, task.offset, task.raw, reason, detail, task)

    def release_vehicle(
        self, vehicle_id: str, cause: str, detail: str, *, counts: bool = True
    ) -> None:
        """Every lease the car holds goes back to the queue (it left, or was stopped),
        and the car is shunned for each: that it had to stop is only its word."""
        for lease in self._leases.of_vehicle(vehicle_id):
            self._leases.end(lease.epoch)
            self._metrics.redelivered.labels(cause).inc()
            self.requeue(lease.task, cause, vehicle_id, detail, counts=counts, shun=True)

    def requeue(
        self,
        task: PendingTask,
        reason: str,
        vehicle_id: str,
        detail: str,
        *,
        counts: bool,
        shun: bool = False,
        terminal: bool = False,
        backoff: bool = False,
    ) -> None:
        """Record a failed attempt; then try the task again, or give up on it.

        A counted failure shuns the car; so does ``shun``, a return the car chose (a nack,
        its suspension) that costs the task no attempt.
        """
        if not self._log.owns(task.tp):
            return  # partition revoked: its new owner has the task
        task.history.append(AttemptRecord(vehicle_id, reason, time.time(), detail[:MAX_DETAIL]))
        # Attempts that do not count ("busy", "released", a suspended car) never end in a
        # dead letter, so without a bound a task bounced for days would grow for ever;
        # a dead letter reports only the last MAX_ATTEMPTS_KEPT anyway.
        del task.history[:-MAX_ATTEMPTS_KEPT]
        task.failures += int(counts)
        if counts or shun:
            # A car is not trusted to end a task alone, nor to keep it: while another car
            # here grants work, the next attempt is another car's (dispatch._fit_for), so a
            # hostile car can neither spend a task's attempts by being handed it back at
            # once, nor hold it to its deadline by handing it back uncounted ("busy").
            task.shun(vehicle_id, time.monotonic(), self._shun_s)
        if counts:
            self._metrics.tasks.labels("failed").inc()
            self._metrics.failures.labels(reason).inc()
        self._events.info(
            "task_requeued",
            **task.log_context(),
            vehicle_id=vehicle_id,
            reason=reason,
            failures=task.failures,
        )
        if terminal or task.failures >= self._max_attempts:
            self.dead_letter(task, reason, detail or f"failed {task.failures} times")
            return
        task.state = TaskState.QUEUED
        if backoff:
            self._delayed.push(task, compute_backoff(max(1, task.failures)))
        else:
            self._ready.push_front(task)
