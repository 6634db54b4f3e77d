# SPDX-License-Identifier: Apache-2.0
"""``parkpool sim --realistic``: a fleet of modelled cars under the owner policy, on a
sped-up clock, and what it did: work completed, work redone because an owner took a car
back, energy used, and why the cars stopped."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from parkpool.worker.carsim import HOUR, Driver
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import VehicleWorker, WorkerSettings

START_HOUR = 17.0  # a simulated day starts late afternoon, as owners come home


@dataclass(frozen=True)
class RealisticPlan:
    vehicles: int = 16
    scale: float = 360.0  # a simulated day in four minutes
    sim_hours: float = 24.0  # 0: until stopped
    seed: int = 1


class RealisticFleet:
    def __init__(self, template: WorkerSettings, plan: RealisticPlan, policy: PolicyConfig):
        day = time.time() - time.time() % (24 * HOUR)
        self.plan = plan
        self.driver = Driver(plan.scale, start=day + START_HOUR * HOUR, seed=plan.seed)
        self.fleet = Fleet(
            template,
            prefix="car",
            car=self.driver.bus_for,
            policy=policy,
            timebase=self.driver.timebase,
        )
        self.driver.computing = self._computing
        self.reasons: Counter[str] = Counter()
        self._stops = 0

    def _computing(self, vehicle_id: str) -> bool:
        vehicle = self.fleet.vehicles.get(vehicle_id)
        return vehicle is not None and vehicle.guard is not None and vehicle.guard.running > 0

    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Run until ``sim_hours`` of simulated time have passed or ``stop`` is set."""
        self.driver.start()
        started = self.driver.now()
        try:
            self.fleet.add(self.plan.vehicles)
            real_s = self.plan.sim_hours * HOUR / self.plan.scale if self.plan.sim_hours else None
            deadline = time.monotonic() + real_s if real_s is not None else None
            while not stop.wait(0.5):
                self._count_reasons()
                if deadline is not None and time.monotonic() >= deadline:
                    break
            return self.report(self.driver.now() - started)
        finally:
            self.fleet.stop_all()
            self.driver.close()

    def _count_reasons(self) -> None:
        """Sample, twice a second, why each car is not computing (a share of car-time)."""
        for vehicle in list(self.fleet.vehicles.values()):
            self.reasons[vehicle.decision.reason] += 1

    def report(self, sim_s: float) -> dict[str, Any]:
        vehicles = [_vehicle_line(v, self.driver) for v in list(self.fleet.vehicles.values())]
        total = sum(self.reasons.values()) or 1
        return {
            "name": "realistic_sim",
            "vehicles": len(vehicles),
            "sim_hours": round(sim_s / HOUR, 2),
            "time_scale": self.plan.scale,
            "completed": sum(v["completed"] for v in vehicles),
            "redone_after_preemption": sum(v["released"] for v in vehicles),
            "energy_kwh": round(sum(v["energy_kwh"] for v in vehicles), 3),
            "state_share": {r: round(n / total, 3) for r, n in self.reasons.most_common()},
            "per_vehicle": vehicles,
        }


def _vehicle_line(vehicle: VehicleWorker, driver: Driver) -> dict[str, Any]:
    car = driver.cars[vehicle.vehicle_id]
    energy = vehicle.guard.energy.total_kwh if vehicle.guard else 0.0
    preemptions = len(vehicle.guard.preemptions) if vehicle.guard else 0
    return {
        "vehicle_id": vehicle.vehicle_id,
        "completed": vehicle.completed,
        "released": vehicle.released,
        "preemptions": preemptions,
        "energy_kwh": round(energy, 3),
        "trips": car.trips,
        "early_returns": car.early_returns,
        "soc_pct": round(car.soc_pct, 1),
    }
