# SPDX-License-Identifier: Apache-2.0
"""A simulated fleet: many virtual vehicles in one process, each a real MQTT client
running the real worker code against the real broker."""

from __future__ import annotations

import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from worker.backend import Backend, select_backend
from worker.worker import VehicleWorker, WorkerSettings


class Fleet:
    """Start, stop, kill and replace vehicles; ids are ``<prefix>-<n>``."""

    def __init__(
        self, template: WorkerSettings, prefix: str = "car", backend: Backend | None = None
    ) -> None:
        self.template = template
        self.prefix = prefix
        self.backend = backend or select_backend(template.backend)
        self.vehicles: dict[str, VehicleWorker] = {}
        self._serial = 0

    def __len__(self) -> int:
        return len(self.vehicles)

    def add(self, count: int) -> list[VehicleWorker]:
        """Start ``count`` new vehicles, connecting them in parallel."""
        new = [self._make() for _ in range(count)]
        with ThreadPoolExecutor(max(1, min(16, count))) as pool:
            list(pool.map(lambda v: v.start(), new))
        for vehicle in new:
            self.vehicles[vehicle.vehicle_id] = vehicle
        return new

    def _make(self) -> VehicleWorker:
        self._serial += 1
        settings = replace(self.template, vehicle_id=f"{self.prefix}-{self._serial:04d}")
        return VehicleWorker(settings, backend=self.backend)

    def stop(self, vehicle_id: str, reason: str = "stopped") -> None:
        self.vehicles.pop(vehicle_id).stop(reason)

    def kill(self, vehicle_id: str) -> None:
        self.vehicles.pop(vehicle_id).kill()

    def kill_random(self, fraction: float, rng: random.Random | None = None) -> list[str]:
        rng = rng or random.Random()
        chosen = rng.sample(sorted(self.vehicles), int(len(self.vehicles) * fraction))
        for vehicle_id in chosen:
            self.kill(vehicle_id)
        return chosen

    def busy(self) -> Iterable[str]:
        return [v.vehicle_id for v in self.vehicles.values() if v.held]

    def completed(self) -> int:
        return sum(v.completed for v in self.vehicles.values())

    def stop_all(self) -> None:
        vehicles = list(self.vehicles.values())
        self.vehicles.clear()
        if vehicles:
            with ThreadPoolExecutor(min(16, len(vehicles))) as pool:
                list(pool.map(lambda v: v.stop("fleet_shutdown"), vehicles))
