# SPDX-License-Identifier: Apache-2.0
"""A worker's settings, and what it keeps about each task it holds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import Assignment, TaskChunk


@dataclass(frozen=True)
class WorkerSettings:
    vehicle_id: str
    mqtt: MqttConnection = field(default_factory=MqttConnection)
    namespace: str = "parkpool"
    concurrency: int = 1  # kernels running at once; one GPU runs one stream well
    prefetch: int = 1  # extra tasks held so the next is already here when one finishes
    heartbeat_s: float = 15.0
    # Re-send a pull while there is room: a gateway may have restarted and forgotten it.
    # Jittered per vehicle, so a large fleet does not refresh in lockstep.
    pull_refresh_s: float = 10.0
    backend: str = "auto"
    simulated_delay_s: float = 0.0  # the fleet simulator's stand-in for a slower car
    gflops_per_s: float = 0.0  # the rate announced before any task was measured; 0 = unknown
    # Public keys of the gateways allowed to issue work; empty: unsigned work is accepted
    # (a development fleet). With keys, anything not signed by one of them is refused.
    trusted_keys: tuple[Path, ...] = ()
    result_key: Path | None = None  # this car's own Ed25519 key; signs every result

    @property
    def capacity(self) -> int:
        return self.concurrency + self.prefetch


@dataclass(slots=True)
class Held:
    assignment: Assignment
    task: TaskChunk
    received_at: float = field(default_factory=time.time)
    running: bool = False
    next_beat: float = 0.0  # wall clock of the next lease heartbeat while running

    @property
    def beat_every(self) -> float:
        """A third of the lease, so two heartbeats may be lost before it expires."""
        return max(0.5, (self.assignment.lease_deadline - self.received_at) / 3)


def task_context(assignment: Assignment, task: TaskChunk) -> dict[str, object]:
    """The keys every task event carries (the vehicle id is bound to the logger)."""
    return {
        "job_id": task.job_id,
        "task_id": f"{task.job_id}:{task.chunk_id}",
        "gateway_id": assignment.gateway_id,
        "epoch": assignment.epoch,
        "attempt": assignment.attempt,
    }
