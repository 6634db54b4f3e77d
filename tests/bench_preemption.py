# SPDX-License-Identifier: Apache-2.0
"""The ``preemption`` line of ``make bench``: from an owner event to the car being free.

A gateway (on a thread of this process, so its lease table can be watched) and a small
fleet of owned cars (each with a simulated bus) run a stream of CPU-heavy Monte Carlo
tasks, each of which runs in bounded sample batches. Again and again, a car that is
running a kernel is unlocked by its "owner". Two latencies are measured from the
timestamp of that signal:
- ``p50_ms``/``p99_ms``: until no kernel runs on that car (the guard's record);
- ``p99_release_ms``: until the gateway holds no lease for that car any more.
Then the car is locked again and, after the (shortened) owner-away dwell, works again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.gateway.gateway import Gateway, GatewaySettings
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import plan_monte_carlo_pi
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import VehicleWorker, WorkerSettings

NAMESPACE = "benchpreempt"
# The owner-away dwell is 120 s by default; the bench only needs the car back quickly.
BENCH_POLICY = PolicyConfig(owner_away_s=0.2)


@contextmanager
def running_gateway(brokers: EmbeddedBrokers) -> Iterator[Gateway]:
    settings = GatewaySettings(
        "preempt-gw",
        KafkaConnection(brokers.kafka_bootstrap),
        MqttConnection(brokers.mqtt_host, brokers.mqtt_port),
        NAMESPACE,
        lease_seconds=120,  # long: only the worker's nacks can explain a fast release
        session_timeout_ms=3000,
    )
    gateway = Gateway(settings)
    gateway.start()
    thread = threading.Thread(target=gateway.run, name="preempt-gw", daemon=True)
    thread.start()
    try:
        yield gateway
    finally:
        gateway.stopping.set()
        thread.join(30)


def preemption(brokers: EmbeddedBrokers, events: int, vehicles: int = 4) -> dict[str, Any]:
    bootstrap(brokers.kafka_bootstrap, NAMESPACE)
    mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
    buses: dict[str, SimulatedBus] = {}

    def bus_for(vehicle_id: str) -> SimulatedBus:
        buses[vehicle_id] = SimulatedBus()
        return buses[vehicle_id]

    template = WorkerSettings("template", mqtt, NAMESPACE, backend="numpy", prefetch=1)
    settings = ProducerSettings(
        KafkaConnection(brokers.kafka_bootstrap), NAMESPACE, verification=Level.UNCHECKED
    )
    with running_gateway(brokers) as gateway, ParkpoolClient(settings) as client:
        fleet = Fleet(template, prefix="owned", car=bus_for, policy=BENCH_POLICY)
        try:
            fleet.add(vehicles)
            # Enough work for the whole run: 2^24 samples per task, 16 batches each.
            plan = plan_monte_carlo_pi(2**24 * 4 * events, chunk_samples=2**24, seed=7)
            handle = client.submit_plan(plan)
            stops, releases = _owner_events(gateway, fleet, buses, events)
            handle.cancel()
        finally:
            fleet.stop_all()
    stop_p50, stop_p99 = np.percentile(stops, [50, 99])
    release_p50, release_p99 = np.percentile(releases, [50, 99])
    return {
        "name": "preemption",
        "events": len(stops),
        "vehicles": vehicles,
        "p50_ms": round(float(stop_p50), 2),
        "p99_ms": round(float(stop_p99), 2),
        "p50_release_ms": round(float(release_p50), 2),
        "p99_release_ms": round(float(release_p99), 2),
        "max_ms": round(max(stops), 2),
        "max_release_ms": round(max(releases), 2),
    }


def _owner_events(
    gateway: Gateway, fleet: Fleet, buses: dict[str, SimulatedBus], events: int
) -> tuple[list[float], list[float]]:
    stops: list[float] = []
    releases: list[float] = []
    deadline = time.monotonic() + 60 + 10 * events
    while len(stops) < events and time.monotonic() < deadline:
        vehicle = _busy_vehicle(fleet)
        if vehicle is None:
            time.sleep(0.01)
            continue
        unlocked = buses[vehicle.vehicle_id].set(locked=False)
        released_at = _wait(lambda v=vehicle: not gateway.leases.holds(v.vehicle_id))
        _wait(lambda v=vehicle: v.guard is not None and v.guard.running == 0)
        assert vehicle.guard is not None
        record = vehicle.guard.preemptions[-1]
        if record.stop_ms is not None and released_at is not None:
            stops.append(record.stop_ms)
            releases.append((released_at - unlocked.at) * 1000.0)
        buses[vehicle.vehicle_id].set(locked=True)
    return stops, releases


def _busy_vehicle(fleet: Fleet) -> VehicleWorker | None:
    """A car that is running a kernel right now and still holds its lease."""
    for vehicle in list(fleet.vehicles.values()):
        if vehicle.guard is not None and vehicle.guard.running and vehicle.eligible:
            return vehicle
    return None


def _wait(condition: Any, timeout: float = 10.0) -> float | None:
    """Poll every 0.5 ms; the wall-clock time the condition first held, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.time()
        time.sleep(0.0005)
    return None
