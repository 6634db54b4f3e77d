# SPDX-License-Identifier: Apache-2.0
"""The realistic car model: days of stays, charging, draining, heat and early returns."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable

import numpy as np
import pytest

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.carsim import HOUR, CarModel, Driver, Stay, plan_day
from parkpool.worker.carstate import Charging, Gear, SimulatedBus
from parkpool.worker.policy import OwnerPolicy, PolicyConfig
from parkpool.worker.realistic import RealisticFleet, RealisticPlan
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import wait_for


class TestPlanDay:
    """A day is a sequence of stays that never overlap, long ones at home and work."""

    @pytest.mark.parametrize("seed", range(20))
    def test_stays_are_ordered_and_plausible(self, seed: int) -> None:
        stays = plan_day(random.Random(seed), 0.0)
        for earlier, later in itertools.pairwise(stays):
            assert earlier.end <= later.start  # a trip separates every two stays
        assert stays[0].place == "home" and stays[-1].place == "home"
        assert any(s.place == "work" for s in stays)
        assert all(s.end > s.start for s in stays)
        # Errands are short and never announced; home and work last hours unless cut short
        for stay in stays:
            if stay.place == "errand":
                assert stay.end - stay.start <= HOUR and not stay.announced

    def test_some_owners_come_back_early(self) -> None:
        rng = random.Random(3)
        stays = [s for _ in range(200) for s in plan_day(rng, 0.0) if s.place != "errand"]
        early = sum(not s.announced for s in stays) / len(stays)
        assert 0.05 < early < 0.3


class TestCarModel:
    """The model's signals are those the owner policy reads."""

    def _car(self, stays: list[Stay], soc: float = 50.0) -> CarModel:
        return CarModel("car-1", SimulatedBus(), random.Random(1), soc_pct=soc, stays=stays)

    def test_parked_at_home_charges_and_runs(self) -> None:
        car = self._car([Stay("home", 0.0, 10 * HOUR, True, True)])
        car.step(HOUR, 60.0, computing=False)
        state = car.bus.current()
        assert (state.gear, state.locked, state.charging) == (Gear.PARK, True, Charging.AC)
        assert state.next_departure == 10 * HOUR
        assert OwnerPolicy().evaluate(state, HOUR).runs
        # An hour of 11 kW AC into a 75 kWh pack: about 14.7 points
        car.step(2 * HOUR, HOUR, computing=False)
        assert car.soc_pct == pytest.approx(50.0 + (1 / 60 + 1) * 11 / 75 * 100)

    def test_driving_between_stays_drains_and_stops_work(self) -> None:
        car = self._car([Stay("work", 2 * HOUR, 3 * HOUR, False, True)])
        car.step(HOUR, 600.0, computing=False)  # before the stay: on the road
        state = car.bus.current()
        assert (state.gear, state.charging) == (Gear.DRIVE, Charging.UNPLUGGED)
        assert car.soc_pct == pytest.approx(50.0 - 2.5)
        assert OwnerPolicy().evaluate(state, HOUR).reason == "driving"

    def test_compute_module_trips_the_gate_only_on_a_hot_afternoon(self) -> None:
        car = self._car([Stay("home", 0.0, 24 * HOUR, True, True)])
        for minute in range(60):  # an hour of full load in the morning: warm, not hot
            car.step(9 * HOUR + minute * 60.0, 60.0, computing=True)
        assert 75.0 < car.compute_temp_c < 85.0
        car.hot_day = True
        for minute in range(60):  # the same on a hot afternoon
            car.step(14 * HOUR + minute * 60.0, 60.0, computing=True)
        assert car.compute_temp_c > 85.0
        assert OwnerPolicy().evaluate(car.bus.current(), 15 * HOUR).reason == "battery_hot"

    def test_driver_clock_runs_scaled(self) -> None:
        driver = Driver(scale=3600.0, start=0.0)
        bus = driver.bus_for("car-1")
        assert bus.current().soc_pct >= 40.0
        assert driver.timebase.scale == 3600.0
        assert driver.now() >= 0.0


@pytest.mark.integration
class TestRealisticFleet:
    """A simulated day on the real brokers: cars work, get taken back, and work is redone."""

    def test_a_day_of_cars_reports_work_redone_and_energy(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        gateway_factory()
        # Given 6 modelled cars, a simulated day in 12 s, and slow tasks to hand back
        template = WorkerSettings(
            "template", mqtt_conn, namespace, backend="numpy", simulated_delay_s=0.5
        )
        plan = RealisticPlan(vehicles=6, scale=7200.0, sim_hours=24.0, seed=4)
        sim = RealisticFleet(template, plan, PolicyConfig())
        x = np.ones(8)
        handle = client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": x})] * 400)
        # When the day runs
        report = sim.run(threading.Event())
        # Then the report adds up, cars spent time in more than one state, and every car
        # did some work, stopped for its owner at least once, and used energy
        assert report["vehicles"] == 6 and report["sim_hours"] >= 23.9
        assert report["completed"] == sum(v["completed"] for v in report["per_vehicle"])
        assert len(report["state_share"]) > 1
        assert report["completed"] > 0 and report["energy_kwh"] > 0
        assert sum(v["trips"] for v in report["per_vehicle"]) >= 6
        # Tasks last a simulated hour here, so morning departures catch cars mid-task
        assert sum(v["preemptions"] for v in report["per_vehicle"]) >= 1
        assert report["redone_after_preemption"] >= 1
        wait_for(lambda: handle.progress.done > 0, 30, "results to reach the caller")
