# SPDX-License-Identifier: Apache-2.0
"""Running one task on the car's backend: with preemption checkpoints, the energy
account, and the car's own measured speed for dwell-aware dispatch."""

from __future__ import annotations

import threading
import time
from typing import Any

from parkpool.schemas import Preempted, TaskChunk
from parkpool.worker.backend import Backend
from parkpool.worker.cancel import Cancel
from parkpool.worker.guard import OwnerGuard
from parkpool.worker.kernels import execute

RATE_SMOOTHING = 0.2  # weight of the newest task in the measured GFLOP/s
# A simulated kernel under an owner guard sleeps on the guard's stop event, and looks at
# the worker's own stop this often (stop() does not wait for kernels: latency is cheap).
WORKER_STOP_POLL_S = 0.25
# A simulated kernel without a guard looks this often whether its task was let go: the
# car's energy it would spend is simulated, and a thousand cars poll in one process.
CANCEL_POLL_S = 1.0


class TaskRunner:
    def __init__(
        self,
        backend: Backend,
        guard: OwnerGuard | None,
        stopping: threading.Event,
        gflops_per_s: float = 0.0,
        simulated_delay_s: float = 0.0,
    ) -> None:
        self.backend = backend
        self.guard = guard
        self.gflops_per_s = gflops_per_s  # announced in every pull; learned from each task
        self.busy_s = 0.0  # kernel time since start, reported in heartbeats
        self._stopping = stopping
        self._simulated_delay_s = simulated_delay_s

    def run(self, task: TaskChunk, cancel: Cancel | None = None) -> tuple[dict[str, Any], float]:
        """Outputs and seconds; raises Preempted if the owner took the car back meanwhile
        or the task was let go (``cancel``: revoked, say), and the kernel's own errors
        (ValidationError, KernelError, ...) otherwise."""
        generation = self.guard.kernel_started() if self.guard else 0
        started = time.perf_counter()
        try:
            checkpoint = self._checkpoint(generation, cancel)
            self._simulated_delay(checkpoint, generation, cancel is not None)
            outputs = execute(
                task.kernel, task.params, task.inputs, self.backend, checkpoint=checkpoint
            )
        finally:
            self._kernel_done(time.perf_counter() - started)
        seconds = time.perf_counter() - started
        self._learn_rate(task, seconds)
        return outputs, seconds

    def _checkpoint(self, generation: int, cancel: Cancel | None) -> Any:
        def checkpoint() -> None:
            if self._stopping.is_set():
                raise Preempted("worker stopping")
            if self.guard is not None:
                self.guard.checkpoint(generation)
            if cancel is not None and cancel.is_set():
                # Its lease was revoked (the job cancelled, the gateway shutting down):
                # the rest of the run would be the owner's energy spent on nothing.
                raise Preempted("task let go")

        return checkpoint

    def _kernel_done(self, busy_s: float) -> None:
        self.busy_s += busy_s
        if self.guard is None:
            return
        self.guard.kernel_finished(busy_s)
        if not self.guard.decision.runs and self.guard.running == 0:
            self.backend.free_memory()  # the car is the owner's again: give the GPU back

    def _learn_rate(self, task: TaskChunk, seconds: float) -> None:
        if task.cost_gflop > 0 and seconds > 0:
            rate = task.cost_gflop / seconds
            last = self.gflops_per_s or rate
            self.gflops_per_s = (1 - RATE_SMOOTHING) * last + RATE_SMOOTHING * rate

    def _simulated_delay(self, checkpoint: Any, generation: int, cancellable: bool) -> None:
        """Take ``simulated_delay_s`` as a kernel would, and stop as one would: at once
        when the owner's stop ends the generation, and within a poll when the worker
        stops or the task is let go. It sleeps on events rather than polling fast,
        because a simulated fleet runs a thousand of these in one process."""
        if self._simulated_delay_s <= 0:
            return
        deadline = time.monotonic() + self._simulated_delay_s
        if self.guard is None:
            wake, slice_s = self._stopping, self._simulated_delay_s
        else:
            wake, slice_s = self.guard.generation_over(generation), WORKER_STOP_POLL_S
        if cancellable:
            slice_s = min(slice_s, CANCEL_POLL_S)
        while (left := deadline - time.monotonic()) > 0:
            wake.wait(min(slice_s, left))
            checkpoint()
