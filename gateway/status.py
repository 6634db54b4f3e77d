# SPDX-License-Identifier: Apache-2.0
"""The gateway's ``/status`` JSON: what ``parkpool top`` and an on-call SRE look at.

Built once a second on the gateway's loop thread from its own state, then served as an
immutable snapshot, so the HTTP thread never touches live state.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from parkpool.gateway.fleet_stats import FleetCounts
from parkpool.gateway.leases import LeaseTable
from parkpool.gateway.tasklog import PartitionStat
from parkpool.gateway.tasks import PendingTask, ReadyQueue

TOP_JOBS = 20


def status_snapshot(
    gateway_id: str,
    *,
    ready: bool,
    draining: bool,
    queue: ReadyQueue,
    delayed: int,
    leases: LeaseTable,
    partitions: list[PartitionStat],
    fleet: FleetCounts,
    standby: bool = False,
    cell: str = "",
) -> Mapping[str, Any]:
    return {
        "gateway_id": gateway_id,
        "cell": cell,
        "ready": ready,
        "draining": draining,
        "standby": standby,
        "updated_at": time.time(),
        "leases": len(leases),
        "queued": len(queue) + delayed,
        "partitions": [_partition(p) for p in partitions],
        "jobs": _jobs(queue.tasks(), [lease.task for lease in leases.all()]),
        "fleet": {
            "known": fleet.known,
            "by_state": fleet.by_state,
            "suspended_reasons": {
                reason: n for (state, reason), n in fleet.reasons.items() if state == "suspended"
            },
            "draining_reasons": {
                reason: n for (state, reason), n in fleet.reasons.items() if state == "draining"
            },
            "credits_outstanding": fleet.credits_outstanding,
            "heartbeat_age_max_s": round(fleet.heartbeat_age_max, 3),
        },
    }


def _partition(p: PartitionStat) -> dict[str, Any]:
    return {
        "topic": p.topic,
        "partition": p.partition,
        "window_used": p.window_used,
        "window_size": p.window_size,
        "window_span": p.window_span,
        "paused": p.paused,
        "committed": p.committed,
        "end": p.end if p.end >= 0 else None,  # not reported by the broker yet
        "lag": p.lag if p.end >= 0 else None,
    }


def _jobs(queued: list[PendingTask], leased: list[PendingTask]) -> list[dict[str, Any]]:
    """The jobs with the most tasks in flight here, largest first."""
    waiting = Counter(t.task.job_id for t in queued)
    running = Counter(t.task.job_id for t in leased)
    priority = {t.task.job_id: t.task.priority.value for t in [*queued, *leased]}
    ranked = (waiting + running).most_common(TOP_JOBS)
    return [
        {
            "job_id": job_id,
            "queued": waiting[job_id],
            "leased": running[job_id],
            "priority": priority.get(job_id, "batch"),
        }
        for job_id, _ in ranked
    ]
