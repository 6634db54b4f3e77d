# SPDX-License-Identifier: Apache-2.0
"""Jobs the gateway has been told to cancel, remembered for a bounded time and count."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

from parkpool.schemas import TaskChunk


class _Cancel(NamedTuple):
    expires: float  # monotonic
    requested_at: float  # the cancel's wall clock, as the SDK stamped it


class CancelledJobs:
    """A bounded, expiring record of cancelled jobs: checked at dispatch time, not only
    when running.

    A cancel covers the job's tasks created up to its request. The SDK lets a caller
    submit a job again under the id of one that was cancelled, or withdrawn after a
    failed submit (an idempotent retry): that job's tasks are created later, and are
    not skipped for the old job's cancel, which would leave its caller waiting for ever.
    """

    def __init__(self, ttl_s: float = 24 * 3600.0, capacity: int = 100_000) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._jobs: OrderedDict[str, _Cancel] = OrderedDict()

    def covers(self, task: TaskChunk) -> bool:
        """Whether a cancel of the task's job, made after the task was, stands."""
        cancel = self._jobs.get(task.job_id)
        if cancel is None:
            return False
        if cancel.expires < time.monotonic():
            del self._jobs[task.job_id]
            return False
        return task.created_at <= cancel.requested_at

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job_id: str, requested_at: float) -> None:
        earlier = self._jobs.get(job_id)
        if earlier is not None:  # the same cancel on another partition, or a later one
            requested_at = max(requested_at, earlier.requested_at)
        self._jobs[job_id] = _Cancel(time.monotonic() + self._ttl, requested_at)
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)
