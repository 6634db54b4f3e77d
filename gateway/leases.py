# SPDX-License-Identifier: Apache-2.0
"""Leases: which vehicle holds which task, until when, under which epoch.

An epoch is unique per lease. Epochs start from the wall clock in microseconds, so a
restarted gateway does not reissue the epochs an old result could still quote. A clock
stepped back before the restart would undo that, so epochs also stay above every epoch
a car's pull quotes as the highest it received from this gateway (``quoted``).
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from parkpool.gateway.tasks import PendingTask

# The furthest past the wall clock a quoted epoch may move the next one: a clock stepped
# back by up to a day is made up for, and a car that quotes an absurd epoch (it is only
# a car's word) cannot push this gateway's epochs towards the end of their range.
MAX_QUOTED_AHEAD_US = 24 * 3600 * 1_000_000
# A lift goes this far past the quote: the gateway's previous run may have granted
# epochs above it to other cars (the quoting car saw only its own), and reissuing one
# would reopen a lease's write-once output key. No run grants 2^30 leases between one
# car's last one and its restart.
LIFT_GAP = 1 << 30


@dataclass(slots=True)
class Lease:
    epoch: int
    vehicle_id: str
    task: PendingTask
    deadline: float  # monotonic clock
    dispatched_at: float = field(default_factory=time.monotonic)


class LeaseTable:
    """Active leases by epoch and by vehicle, with a deadline heap for expiry."""

    def __init__(self, wall_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self._wall_us = wall_us  # the wall clock in microseconds; tests step it
        self._next_epoch = wall_us()
        self._by_epoch: dict[int, Lease] = {}
        self._by_vehicle: defaultdict[str, set[int]] = defaultdict(set)
        self._deadlines: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._by_epoch)

    def grant(self, vehicle_id: str, task: PendingTask, duration: float) -> Lease:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        lease = Lease(epoch, vehicle_id, task, time.monotonic() + duration)
        self._by_epoch[lease.epoch] = lease
        self._by_vehicle[vehicle_id].add(lease.epoch)
        heapq.heappush(self._deadlines, (lease.deadline, lease.epoch))
        return lease

    def quoted(self, epoch: int) -> None:
        """A car's pull quoted ``epoch`` as the highest it has received from this gateway.
        Leases granted from now on are above it, as the pull's accounting needs (a car
        counts only leases after its quote as in flight); after a restart on a clock
        stepped back, new epochs would otherwise all be below it, none counted, and the
        car flooded with work it must refuse."""
        if epoch < self._next_epoch:  # every pull but those after such a restart
            return
        ceiling = self._wall_us() + MAX_QUOTED_AHEAD_US
        if epoch <= ceiling:
            # Never past the ceiling: a lift from a car quoting at it must leave honest
            # cars' later quotes (a few leases above) acceptable after a restart.
            self._next_epoch = min(epoch + 1 + LIFT_GAP, ceiling + 1)

    def get(self, epoch: int) -> Lease | None:
        return self._by_epoch.get(epoch)

    def end(self, epoch: int) -> Lease | None:
        """Remove a lease; its heap entry is skipped lazily when it surfaces."""
        lease = self._by_epoch.pop(epoch, None)
        if lease is not None:
            held = self._by_vehicle[lease.vehicle_id]
            held.discard(epoch)
            if not held:
                del self._by_vehicle[lease.vehicle_id]
        return lease

    def extend(self, epoch: int, duration: float, limit: float | None = None) -> Lease | None:
        """Move a lease's deadline to ``duration`` from now (a vehicle's heartbeat), but
        never past ``limit`` seconds after it was granted, nor back.

        Only the lease changes: its heap entry is pushed again when it surfaces early,
        so a car's heartbeats cost no memory however many it sends.
        """
        lease = self._by_epoch.get(epoch)
        if lease is not None:
            deadline = time.monotonic() + duration
            if limit is not None:
                deadline = min(deadline, lease.dispatched_at + limit)
            lease.deadline = max(lease.deadline, deadline)
        return lease

    def holds(self, vehicle_id: str) -> bool:
        """Whether any lease is on this vehicle (a single lookup: safe to poll)."""
        return vehicle_id in self._by_vehicle

    def of_vehicle(self, vehicle_id: str) -> list[Lease]:
        return [self._by_epoch[e] for e in sorted(self._by_vehicle.get(vehicle_id, ()))]

    def count_after(self, vehicle_id: str, epoch: int) -> int:
        """Leases of a vehicle newer than ``epoch``: sent, but not yet seen by it."""
        return sum(1 for e in self._by_vehicle.get(vehicle_id, ()) if e > epoch)

    def pop_expired(self, now: float | None = None) -> Iterator[Lease]:
        now = time.monotonic() if now is None else now
        while self._deadlines and self._deadlines[0][0] <= now:
            _, epoch = heapq.heappop(self._deadlines)
            lease = self._by_epoch.get(epoch)
            if lease is None:
                continue  # ended meanwhile
            if lease.deadline <= now:
                self.end(epoch)
                yield lease
            else:  # extended since its entry was pushed: wait for its new deadline
                heapq.heappush(self._deadlines, (lease.deadline, epoch))

    def all(self) -> list[Lease]:
        return list(self._by_epoch.values())

    def where(self, predicate: Callable[[Lease], bool]) -> list[Lease]:
        return [lease for lease in self._by_epoch.values() if predicate(lease)]
