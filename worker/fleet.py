# SPDX-License-Identifier: Apache-2.0
"""A simulated fleet: many virtual vehicles in one process, each a real MQTT client
running the real worker code against the real broker.

The vehicles share one network loop, one kernel pool and one ticker, so a fleet costs
a few threads however many cars it has.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from parkpool.runtime.backoff import Backoff
from parkpool.runtime.rendezvous import top
from parkpool.runtime.settings import MqttConnection, Secret
from parkpool.schemas import ParkpoolError
from parkpool.worker.backend import Backend, select_backend
from parkpool.worker.blas_threads import one_blas_thread, restore_blas_threads
from parkpool.worker.carstate import CarSignals
from parkpool.worker.guard import REAL_TIME, TimeBase
from parkpool.worker.netloop import NetworkLoop, jittered_reconnects
from parkpool.worker.policy import OwnerPolicy, PolicyConfig
from parkpool.worker.worker import VehicleWorker, WorkerSettings

TICK_S = 0.5


class Fleet:
    """Start, stop, kill and replace vehicles; ids are ``<prefix>-<n>``."""

    def __init__(
        self,
        template: WorkerSettings,
        prefix: str = "car",
        backend: Backend | None = None,
        kernel_threads: int = 1024,  # threads start only as tasks run concurrently
        *,
        car: Callable[[str], CarSignals] | None = None,
        policy: PolicyConfig | None = None,
        timebase: TimeBase = REAL_TIME,
        login: Callable[[str], str] | None = None,
        result_key: Callable[[str], Path] | None = None,
        reconnect: Callable[[], Backoff] = jittered_reconnects,
        cells: Mapping[str, MqttConnection] | None = None,
    ) -> None:
        """``car(vehicle_id)``, when given, makes each vehicle's signals, and each vehicle
        gets its own owner policy (``policy`` settings) reading them on ``timebase``.
        ``reconnect`` makes each car's reconnect backoff (the bench turns jitter off).
        ``cells`` (cell name -> its broker): each car joins the cell its id hashes to,
        by rendezvous, so adding a cell moves only the cars that now belong to it."""
        self.template = template
        self.cells = dict(cells or {})
        self.prefix = prefix
        self.car = car
        self.policy = policy or PolicyConfig()
        self.timebase = timebase
        self.login = login  # vehicle id -> its MQTT password (username = vehicle id)
        self.result_key = result_key  # vehicle id -> its own result-signing key
        self.backend = backend or select_backend(template.backend)
        self.vehicles: dict[str, VehicleWorker] = {}
        self._serial = 0
        self._network = NetworkLoop(reconnect).start()
        self._pool = ThreadPoolExecutor(kernel_threads, thread_name_prefix=f"{prefix}-kernels")
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker = threading.Thread(
            target=self._tick_loop, name=f"{prefix}-ticker", daemon=True
        )
        self._ticker.start()
        # Last, so that a failed start cannot leave the process on one BLAS thread.
        self._holds_blas = True
        one_blas_thread()  # its cars share these cores: no BLAS pool shared among them

    def __len__(self) -> int:
        return len(self.vehicles)

    def add(self, count: int, parallel: int = 16) -> list[VehicleWorker]:
        """Start ``count`` new vehicles, connecting up to ``parallel`` at a time.

        Vehicles that did start stay in the fleet even when others fail, so that
        ``stop_all`` still stops them; the first failure is then raised.
        """
        new = [self._make() for _ in range(count)]
        with ThreadPoolExecutor(max(1, min(parallel, count))) as starter:
            errors = list(starter.map(self._start, new))
        started = [v for v, error in zip(new, errors, strict=True) if error is None]
        with self._lock:
            for vehicle in started:
                self.vehicles[vehicle.vehicle_id] = vehicle
        failures = [error for error in errors if error is not None]
        if failures:
            raise failures[0]
        return started

    @staticmethod
    def _start(vehicle: VehicleWorker) -> Exception | None:
        try:
            vehicle.start()
        except (TimeoutError, OSError, ParkpoolError) as exc:
            vehicle.kill()  # drop its half-open connection; it must not retry on its own
            return exc
        return None

    def _make(self) -> VehicleWorker:
        self._serial += 1
        settings = replace(self.template, vehicle_id=f"{self.prefix}-{self._serial:05d}")
        if self.cells:
            settings = replace(settings, mqtt=self.cells[self.cell_of(settings.vehicle_id)])
        if self.login is not None:
            password = Secret(self.login(settings.vehicle_id))
            mqtt = replace(settings.mqtt, username=settings.vehicle_id, password=password)
            settings = replace(settings, mqtt=mqtt)
        if self.result_key is not None:
            settings = replace(settings, result_key=self.result_key(settings.vehicle_id))
        car = self.car(settings.vehicle_id) if self.car else None
        return VehicleWorker(
            settings,
            self.backend,
            network=self._network,
            pool=self._pool,
            car=car,
            policy=OwnerPolicy(self.policy) if car else None,
            timebase=self.timebase,
        )

    def cell_of(self, vehicle_id: str) -> str:
        """The cell a car belongs to ("" without cells)."""
        return top(vehicle_id, self.cells, 1)[0] if self.cells else ""

    def _take(self, vehicle_id: str) -> VehicleWorker:
        with self._lock:
            return self.vehicles.pop(vehicle_id)

    def stop(self, vehicle_id: str, reason: str = "stopped") -> None:
        self._take(vehicle_id).stop(reason)

    def kill(self, vehicle_id: str) -> None:
        self._take(vehicle_id).kill()

    def kill_random(self, fraction: float, rng: random.Random | None = None) -> list[str]:
        rng = rng or random.Random()
        chosen = rng.sample(sorted(self.vehicles), int(len(self.vehicles) * fraction))
        for vehicle_id in chosen:
            self.kill(vehicle_id)
        return chosen

    def busy(self) -> Iterable[str]:
        return [v.vehicle_id for v in list(self.vehicles.values()) if v.held]

    def completed(self) -> int:
        return sum(v.completed for v in list(self.vehicles.values()))

    def stop_all(self) -> None:
        with self._lock:
            vehicles = list(self.vehicles.values())
            self.vehicles.clear()
        if vehicles:
            with ThreadPoolExecutor(min(16, len(vehicles))) as stopper:
                list(stopper.map(lambda v: v.stop("fleet_shutdown"), vehicles))
        with self._lock:
            release, self._holds_blas = self._holds_blas, False
        if release:  # once per fleet, however many callers stop it
            restore_blas_threads()
        self._closed.set()
        self._ticker.join(5)
        self._network.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _tick_loop(self) -> None:
        while not self._closed.wait(TICK_S):
            with self._lock:
                vehicles = list(self.vehicles.values())
            for vehicle in vehicles:
                vehicle.tick()
