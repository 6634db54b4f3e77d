# SPDX-License-Identifier: Apache-2.0
"""Jobs the gateway has been told to cancel, remembered for a bounded time and count."""

from __future__ import annotations

import time
from collections import OrderedDict


class CancelledJobs:
    """A bounded, expiring set of job ids: checked at dispatch time, not only when running."""

    def __init__(self, ttl_s: float = 24 * 3600.0, capacity: int = 100_000) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._jobs: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, job_id: object) -> bool:
        expires = self._jobs.get(job_id)  # type: ignore[call-overload]
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._jobs[job_id]  # type: ignore[arg-type]
            return False
        return True

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job_id: str) -> None:
        self._jobs[job_id] = time.monotonic() + self._ttl
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)
