# SPDX-License-Identifier: Apache-2.0
"""What a car says back: results, nacks, lease heartbeats and its status, built from
what it holds. Publishing them is the worker's job; this module only decides content.

Nothing here carries the owner's data: a status holds the state, a reason code, and the
car's own kernel time, energy and stops; no location, no signal values.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import numpy as np

from parkpool.runtime.sealing import seal_outputs
from parkpool.schemas import (
    Assignment,
    DecodeError,
    LeaseHeartbeat,
    Nack,
    NackReason,
    PreemptionRecord,
    Result,
    TaskChunk,
    VehicleState,
    VehicleStatus,
    decode,
)
from parkpool.worker.guard import OwnerGuard
from parkpool.worker.held import Held

MAX_DETAIL = 1024


def result_of(
    item: Held, vehicle_id: str, outputs: Mapping[str, np.ndarray], seconds: float
) -> Result:
    """The result of a held task; sealed to the producer when the task names its key."""
    a, t = item.assignment, item.task
    result = Result(
        job_id=t.job_id,
        chunk_id=t.chunk_id,
        n_chunks=t.n_chunks,
        vehicle_id=vehicle_id,
        gateway_id=a.gateway_id,
        epoch=a.epoch,
        attempt=a.attempt,
        outputs=outputs,
        exec_seconds=seconds,
        finished_at=time.time(),
        task_created_at=t.created_at,
    )
    return seal_outputs(result, t.reply_key) if t.reply_key else result


def nack_of(
    assignment: Assignment,
    vehicle_id: str,
    reason: NackReason,
    detail: str,
    task: TaskChunk | None = None,
) -> Nack:
    """A nack naming the assignment's task, read from its bytes when not given."""
    if task is None:
        # Unreadable: the gateway cannot match this nack, and the lease expiry covers it.
        with contextlib.suppress(DecodeError):
            task = decode(assignment.task, TaskChunk)
    job_id, chunk_id = (task.job_id, task.chunk_id) if task else ("unreadable", 0)
    return Nack(
        job_id,
        chunk_id,
        vehicle_id,
        assignment.gateway_id,
        assignment.epoch,
        reason,
        detail[:MAX_DETAIL],
    )


def heartbeat_of(item: Held, vehicle_id: str, now: float) -> LeaseHeartbeat:
    a, t = item.assignment, item.task
    return LeaseHeartbeat(t.job_id, t.chunk_id, vehicle_id, a.gateway_id, a.epoch, now)


def status_of(
    vehicle_id: str,
    state: VehicleState,
    reason: str,
    held: int,
    busy_s: float,
    guard: OwnerGuard | None,
) -> VehicleStatus:
    """State, reason, and the figures the fleet's metrics are made of; takes the guard's
    stop reports, so each stop is reported once."""
    stops = guard.take_reports() if guard else []
    return VehicleStatus(
        vehicle_id,
        state,
        time.time(),
        reason,
        held=held,
        busy_s=busy_s,
        energy_j=guard.energy.total_kwh * 3.6e6 if guard else 0.0,
        preemptions=tuple(PreemptionRecord(p.reason, (p.stop_ms or 0.0) / 1000.0) for p in stops),
    )
