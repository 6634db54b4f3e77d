# SPDX-License-Identifier: Apache-2.0
"""The gateway's view of the vehicles that talk to it: credits, capabilities, liveness.

Credits are what a vehicle said it can take *now* (absolute, from its latest pull),
minus the assignments this gateway sent after the last one the vehicle had seen. A
duplicated or reordered pull can therefore never make the gateway push unasked work.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from parkpool.gateway.kernel_routes import BUILT_IN, GRACE_S, KernelRoutes
from parkpool.schemas import Capabilities, PullRequest, VehicleState

# After the store failed a car's fetch, its next task waits this long, doubled with each
# failure in a row up to the most: a blip costs 5 s, an outage a message a minute a car.
FETCH_PAUSE_S = 5.0
FETCH_PAUSE_MAX_S = 60.0


@dataclass(slots=True)
class VehicleView:
    vehicle_id: str
    credits: int = 0
    seen_epoch: int = 0
    capabilities: Capabilities | None = None
    state: VehicleState = VehicleState.ONLINE
    last_heard: float = field(default_factory=time.monotonic)
    asked_at: float = 0.0  # monotonic; when it last went from no credit to some
    dwell_s: float = 0.0  # predicted seconds it stays available, as of dwell_at; 0 = unknown
    dwell_at: float = 0.0
    reason: str = ""  # why it is draining or suspended, from its last status
    busy_s: float = 0.0  # the cumulative figures of its last status, for fleet counters
    energy_j: float = 0.0
    told: int = -1  # the backlog this gateway last told the car (-1: nothing said yet)
    primary: bool = False  # this gateway is the car's first: it counts it in fleet series
    held: int = 0  # tasks the car said it holds, in its last status
    # The plugin kernels its last pull listed (built-ins: every car runs them).
    plugin_kernels: frozenset[str] = frozenset()
    # Content hashes (their first 64 bits) of the stored inputs last sent to it, newest
    # last: what its cache likely holds, so dispatch can send it tasks that reuse them.
    blobs: tuple[int, ...] = ()
    # (ReadyQueue.arrivals, monotonic time) when a look through the queue last found no
    # task it may take; None since it was sent one or pulled again.
    found_none: tuple[int, float] | None = None
    fetch_failures: int = 0  # fetches the store failed for it in a row, since a result

    def fits(self, cost_gflop: float, now: float) -> bool:
        """Whether a task of this cost should finish before the car is expected to leave.

        Unknown cost, rate or dwell means no prediction, and no prediction never blocks.
        """
        rate = self.capabilities.gflops_per_s if self.capabilities else 0.0
        if cost_gflop <= 0 or rate <= 0 or self.dwell_s <= 0:
            return True
        return cost_gflop / rate <= self.dwell_s - (now - self.dwell_at)


class VehicleBook:
    """Vehicles by id, and the round-robin order in which hungry ones get work."""

    def __init__(
        self,
        gateway_id: str,
        kernel_grace_s: float = GRACE_S,
        quarantined: Callable[[str], bool] = lambda _vehicle_id: False,
    ) -> None:
        self.gateway_id = gateway_id
        self._quarantined = quarantined
        self.kernels = KernelRoutes(self._announcers, kernel_grace_s)
        self._vehicles: dict[str, VehicleView] = {}
        self._hungry: OrderedDict[str, None] = OrderedDict()
        # Cars told "no work here", to be told again when work comes: only those.
        self._waiting: dict[str, None] = {}
        self._fresh: dict[str, None] = {}  # asked (a pull) or woke since the last turn
        self._naps: list[tuple[float, str]] = []  # (when, vehicle): wakes put off
        # (last heard, vehicle): checked from the oldest, so finding the silent ones costs
        # what they are, not a pass over the fleet. Stale entries are skipped when met.
        self._silence: list[tuple[float, str]] = []
        # How many cars here were lately sent each stored input (by hash prefix): a car
        # starting afresh is steered to blocks fewer others hold, so cars spread over a
        # job's rows and columns instead of all fetching the same ones.
        self._holders: Counter[int] = Counter()
        # Online cars that grant this gateway work (busy or hungry), quarantined ones left
        # out, as they get none: whether a car that failed a task is alone here, asked at
        # each pull, without a pass over the fleet.
        self._granting: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._vehicles)

    def get(self, vehicle_id: str) -> VehicleView | None:
        return self._vehicles.get(vehicle_id)

    def heard(self, vehicle_id: str, now: float | None = None) -> VehicleView:
        """Note a message from the car (at ``now``, monotonic; only ever forwards)."""
        now = time.monotonic() if now is None else now
        view = self._vehicles.get(vehicle_id)
        if view is None:
            view = self._vehicles[vehicle_id] = VehicleView(vehicle_id)
            heapq.heappush(self._silence, (now, vehicle_id))
        view.last_heard = now
        return view

    def on_pull(self, pull: PullRequest) -> VehicleView:
        view = self.heard(pull.vehicle_id)
        # Only what this gateway was granted: other gateways see the same pull.
        view.credits = pull.grants.get(self.gateway_id, 0)
        view.seen_epoch = pull.seen.get(self.gateway_id, 0)
        view.capabilities = pull.capabilities
        view.plugin_kernels = frozenset(k for k in pull.capabilities.kernels if k not in BUILT_IN)
        self.kernels.heard(view.plugin_kernels)
        view.dwell_s, view.dwell_at = pull.dwell_s, view.last_heard
        view.state = VehicleState.ONLINE
        view.found_none = None  # what it may take may have changed (kernels, box key)
        if view.credits > 0 and not self._quarantined(pull.vehicle_id):
            self._granting[pull.vehicle_id] = None
        else:
            self._granting.pop(pull.vehicle_id, None)
        if view.credits > 0:
            if pull.vehicle_id not in self._hungry:
                view.asked_at = view.last_heard
            self._hungry[pull.vehicle_id] = None
            self._fresh[pull.vehicle_id] = None
        else:
            self._hungry.pop(pull.vehicle_id, None)
        return view

    def _announcers(self, kernel: str) -> float | None:
        """When a car still known here last spoke, of those whose last pull listed the
        kernel; None if none did. A pass over the cars, made once per kernel name."""
        heard = [v.last_heard for v in self._vehicles.values() if kernel in v.plugin_kernels]
        return max(heard, default=None)

    def set_state(self, vehicle_id: str, state: VehicleState) -> VehicleView:
        view = self.heard(vehicle_id)
        view.state = state
        if state is not VehicleState.ONLINE:
            view.credits = 0
            self._granting.pop(vehicle_id, None)
            self._hungry.pop(vehicle_id, None)
        return view

    def remember_blobs(self, view: VehicleView, hashes: Sequence[int], keep: int) -> None:
        """Note stored inputs just sent to the car; it is thought to hold the ``keep`` it
        was sent last. One sent again moves to the newest end, as in the car's LRU cache:
        a row block sent with every tile of its row must not age out of the record."""
        sent = tuple(dict.fromkeys(hashes))
        kept = (*(h for h in view.blobs if h not in sent), *sent)[-keep:]
        before, after = set(view.blobs), set(kept)
        self._holders.update(after - before)
        self._drop(before - after)
        view.blobs = kept

    def _drop(self, blobs: Iterable[int]) -> None:
        for blob in blobs:
            left = self._holders[blob] - 1
            if left > 0:
                self._holders[blob] = left
            else:  # gone, so the counter stays as small as what the cars hold
                del self._holders[blob]

    def refused(self, vehicle_id: str) -> None:
        """The car gets no work here (quarantined since its last pull): no other car is
        to wait on its account."""
        self._granting.pop(vehicle_id, None)

    def others_granting(self, vehicle_id: str) -> bool:
        """Whether an online car other than this one grants this gateway work."""
        return len(self._granting) > (vehicle_id in self._granting)

    def holds_any(self) -> bool:
        """Whether any car here is thought to hold a stored input."""
        return bool(self._holders)

    def holders(self, blob: int) -> int:
        """How many cars here are thought to hold a stored input."""
        return self._holders.get(blob, 0)

    def forget(self, vehicle_id: str) -> None:
        view = self._vehicles.pop(vehicle_id, None)
        if view is not None:
            self._drop(view.blobs)
        self._granting.pop(vehicle_id, None)
        self._hungry.pop(vehicle_id, None)
        self._waiting.pop(vehicle_id, None)
        self._fresh.pop(vehicle_id, None)

    def wake(self, vehicle_id: str) -> None:
        """One of the car's leases ended with its slot free again (a result, a failed
        run, a cancel's revoke, a late result for a lease that ended here): it is hungry
        once more, without a pull, if its grant allows."""
        view = self._vehicles.get(vehicle_id)
        if view is not None and view.credits > 0 and view.state is VehicleState.ONLINE:
            self._hungry.setdefault(vehicle_id, None)
            # As good as a pull: with no work here the car must hear so, or its slot
            # stays granted to this gateway while another of its gateways has work.
            self._fresh[vehicle_id] = None

    def fetch_failed(self, vehicle_id: str, now: float) -> None:
        """The store failed the car's fetch: its slot is free, but at once it would fail
        the next task too. It is woken after a pause that doubles with each failure in a
        row, so that while the store is out a gateway's cars cost a few messages a
        minute each, not a task every 5 s (240 assignments and nacks a second for a
        gateway's 1,191 cars)."""
        view = self._vehicles.get(vehicle_id)
        if view is None:
            return
        view.fetch_failures += 1
        pause = min(FETCH_PAUSE_MAX_S, FETCH_PAUSE_S * 2 ** min(view.fetch_failures - 1, 8))
        heapq.heappush(self._naps, (now + pause, vehicle_id))

    def wake_due(self, now: float) -> None:
        while self._naps and self._naps[0][0] <= now:
            self.wake(heapq.heappop(self._naps)[1])

    def told(self, view: VehicleView, queued: int) -> None:
        """Note the backlog the car was just told; "none" puts it on the waiting list."""
        view.told = queued
        if queued == 0:
            self._waiting[view.vehicle_id] = None
        else:
            self._waiting.pop(view.vehicle_id, None)

    def waiting(self, limit: int) -> list[VehicleView]:
        """Up to ``limit`` cars told there was no work here, oldest first."""
        # Called every turn while work waits: walk only as far as the limit, never copy
        # the whole waiting list.
        out: list[VehicleView] = []
        gone: list[str] = []
        for vehicle_id in self._waiting:
            view = self._vehicles.get(vehicle_id)
            if view is None:
                gone.append(vehicle_id)
            elif len(out) < limit:
                out.append(view)
            else:
                break
        for vehicle_id in gone:
            del self._waiting[vehicle_id]
        return out

    def take_fresh(self) -> list[VehicleView]:
        """Cars that granted credit or woke since the last call: those to tell if there
        is no work."""
        fresh = [v for vid in self._fresh if (v := self._vehicles.get(vid)) is not None]
        self._fresh.clear()
        return fresh

    def any_waiting(self) -> bool:
        return bool(self._waiting)

    def any_hungry(self) -> bool:
        return bool(self._hungry)

    def hungry(self) -> list[str]:
        """Vehicles that asked for work, longest-waiting first."""
        return list(self._hungry)

    def hungry_count(self) -> int:
        return len(self._hungry)

    def first_hungry(self) -> VehicleView:
        """The vehicle that has waited longest for work; only while ``any_hungry()``."""
        return self._vehicles[next(iter(self._hungry))]

    def served(self, vehicle_id: str, still_hungry: bool) -> None:
        """Rotate a vehicle to the back after it got a task, or drop it when it is full."""
        self._hungry.pop(vehicle_id, None)
        if still_hungry:
            self._hungry[vehicle_id] = None

    def views(self) -> list[VehicleView]:
        return list(self._vehicles.values())

    def silent_since(self, cutoff: float) -> list[str]:
        """Cars not heard from since ``cutoff``, each reported once (the caller forgets
        them); costs the heap entries older than the cutoff, not a pass over the fleet."""
        silent: list[str] = []
        heap = self._silence
        while heap and heap[0][0] < cutoff:
            _, vehicle_id = heapq.heappop(heap)
            view = self._vehicles.get(vehicle_id)
            if view is None:
                continue
            if view.last_heard < cutoff:
                silent.append(vehicle_id)
            else:  # heard since: check it again when it may have gone silent
                heapq.heappush(heap, (view.last_heard, vehicle_id))
        return silent
