# SPDX-License-Identifier: Apache-2.0
"""The gateway's view of the vehicles that talk to it: credits, capabilities, liveness.

Credits are what a vehicle said it can take *now* (absolute, from its latest pull),
minus the assignments this gateway sent after the last one the vehicle had seen. A
duplicated or reordered pull can therefore never make the gateway push unasked work.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from parkpool.schemas import Capabilities, PullRequest, VehicleState


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

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self._vehicles: dict[str, VehicleView] = {}
        self._hungry: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vehicles)

    def get(self, vehicle_id: str) -> VehicleView | None:
        return self._vehicles.get(vehicle_id)

    def heard(self, vehicle_id: str) -> VehicleView:
        view = self._vehicles.get(vehicle_id)
        if view is None:
            view = self._vehicles[vehicle_id] = VehicleView(vehicle_id)
        view.last_heard = time.monotonic()
        return view

    def on_pull(self, pull: PullRequest) -> VehicleView:
        view = self.heard(pull.vehicle_id)
        # Only what this gateway was granted: other gateways see the same pull.
        view.credits = pull.grants.get(self.gateway_id, 0)
        view.seen_epoch = pull.seen.get(self.gateway_id, 0)
        view.capabilities = pull.capabilities
        view.dwell_s, view.dwell_at = pull.dwell_s, view.last_heard
        view.state = VehicleState.ONLINE
        if view.credits > 0:
            if pull.vehicle_id not in self._hungry:
                view.asked_at = view.last_heard
            self._hungry[pull.vehicle_id] = None
        else:
            self._hungry.pop(pull.vehicle_id, None)
        return view

    def set_state(self, vehicle_id: str, state: VehicleState) -> VehicleView:
        view = self.heard(vehicle_id)
        view.state = state
        if state is not VehicleState.ONLINE:
            view.credits = 0
            self._hungry.pop(vehicle_id, None)
        return view

    def forget(self, vehicle_id: str) -> None:
        self._vehicles.pop(vehicle_id, None)
        self._hungry.pop(vehicle_id, None)

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
        return [v.vehicle_id for v in self._vehicles.values() if v.last_heard < cutoff]

    def by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for view in self._vehicles.values():
            counts[view.state.value] = counts.get(view.state.value, 0) + 1
        return counts
