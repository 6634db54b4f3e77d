# SPDX-License-Identifier: Apache-2.0
"""Jobs the gateway has been told to cancel, remembered for a bounded time and count."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import NamedTuple

from parkpool.schemas import CancelJob, TaskChunk


class _Cancel(NamedTuple):
    expires: float  # monotonic
    submissions: frozenset[float]  # the created_at of each submission cancelled
    # An older writer's cancel names no submission: it covers the tasks created up to its
    # wall clock, as the SDK stamped it (-inf while no such cancel came).
    up_to: float


class CancelledJobs:
    """A bounded, expiring record of cancelled jobs: checked at dispatch time, not only
    when running.

    A cancel covers the tasks of the submission it names: every task of one submission
    carries its created_at. The SDK lets a caller submit a job again under the id of
    one that was cancelled, or withdrawn after a failed submit (an idempotent retry):
    that job's tasks are another submission's, and are not skipped for the old one's
    cancel, which would leave its caller waiting for ever. Matching the mark, rather
    than comparing it with the cancel's own time, keeps the canceller's clock (another
    host's, for a job cancelled through ``attach``) out of it.
    """

    def __init__(self, ttl_s: float = 24 * 3600.0, capacity: int = 100_000) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._jobs: OrderedDict[str, _Cancel] = OrderedDict()

    def covers(self, task: TaskChunk) -> bool:
        """Whether a cancel of the task's submission stands."""
        cancel = self._jobs.get(task.job_id)
        if cancel is None:
            return False
        if cancel.expires < time.monotonic():
            del self._jobs[task.job_id]
            return False
        return task.created_at in cancel.submissions or task.created_at <= cancel.up_to

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, cancel: CancelJob) -> None:
        """Remember a cancel: the same cancel on another partition, or another
        submission's, adds to what the job's earlier ones cover."""
        earlier = self._jobs.get(cancel.job_id)
        submissions = earlier.submissions if earlier else frozenset()
        up_to = earlier.up_to if earlier else -math.inf
        if cancel.created_at:
            submissions |= {cancel.created_at}
        else:
            up_to = max(up_to, cancel.requested_at)
        self._jobs[cancel.job_id] = _Cancel(time.monotonic() + self._ttl, submissions, up_to)
        self._jobs.move_to_end(cancel.job_id)
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)
