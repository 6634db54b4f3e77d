# SPDX-License-Identifier: Apache-2.0
"""What a car lets in: only work a trusted gateway issued, each lease once, and the
inputs of a confidential task opened with this run's own box key.

A refused assignment is counted by reason in ``rejected`` (the car's own figure; cars
cannot be scraped) and logged, never run.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

from parkpool.runtime import logs
from parkpool.runtime.sealing import BoxKey, open_task
from parkpool.runtime.signing import TaskVerifier
from parkpool.schemas import Assignment, TaskChunk

RECENT_LEASES = 4096  # remembered (gateway, epoch) pairs: far more than a car holds at once


class Admission:
    def __init__(self, trusted_keys: tuple[Path, ...] = (), vehicle_id: str = "") -> None:
        self._verifier = TaskVerifier.load(trusted_keys) if trusted_keys else None
        # Made afresh by every worker, never stored: confidential inputs sent to this run
        # of the car cannot be opened by anyone who later takes the car's disk.
        self._box = BoxKey.generate()
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._lock = threading.Lock()
        self.rejected: Counter[str] = Counter()  # bad_signature, replayed
        self._log = logs.get_logger("parkpool.worker").bind(vehicle_id=vehicle_id)

    @property
    def box_key(self) -> bytes:
        """The public half of this run's box key, announced in every pull."""
        return self._box.public

    def authentic(self, assignment: Assignment) -> bool:
        """Issued by a trusted gateway, and not seen before: a car runs nothing else.

        A bad signature is not nacked (the sender is not a gateway we trust, so it has no
        lease to release); a replay is ignored (the lease it quotes was handled once).
        """
        if self._verifier is not None and not self._verifier.verify(assignment):
            return self._reject("bad_signature")
        key = (assignment.gateway_id, assignment.epoch)
        with self._lock:
            replayed = key in self._recent
            self._recent[key] = None
            if len(self._recent) > RECENT_LEASES:
                self._recent.popitem(last=False)
        if replayed:
            return self._reject("replayed", epoch=assignment.epoch)
        return True

    def open(self, assignment: Assignment, task: TaskChunk) -> TaskChunk:
        """The task with its inputs in clear; raises DecodeError when they do not open."""
        return open_task(task, assignment.inputs_key, self._box)

    def _reject(self, reason: str, **context: object) -> bool:
        with self._lock:
            self.rejected[reason] += 1
        self._log.warning("assignment_rejected", reason=reason, **context)
        return False
