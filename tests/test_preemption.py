# SPDX-License-Identifier: Apache-2.0
"""Owner-first preemption, pre-drain and dwell-aware dispatch, end to end on real brokers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    MqttTopics,
    Result,
    TaskChunk,
    VehicleState,
    VehicleStatus,
    decode,
    encode,
)
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, read_topic, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
REDELIVERED = "parkpool_gateway_redelivered_total"
# Short dwell times so the tests do not wait for the production defaults.
FAST_POLICY = PolicyConfig(owner_away_s=0.5, resume_after_stop_s=0.5)


class OwnedFleet:
    """A fleet whose every car has a simulated bus that the test drives."""

    def __init__(self, namespace: str, mqtt: MqttConnection, **settings: Any) -> None:
        self.buses: dict[str, SimulatedBus] = {}
        template = WorkerSettings("template", mqtt, namespace, backend="numpy", **settings)
        self.fleet = Fleet(template, prefix="owned", car=self._bus, policy=FAST_POLICY)

    def _bus(self, vehicle_id: str) -> SimulatedBus:
        self.buses[vehicle_id] = SimulatedBus()
        return self.buses[vehicle_id]


@pytest.fixture
def owned(namespace: str, mqtt_conn: MqttConnection) -> Iterator[Callable[..., OwnedFleet]]:
    made: list[OwnedFleet] = []

    def make(count: int, **settings: Any) -> OwnedFleet:
        settings.setdefault("heartbeat_s", 1.0)
        owned_fleet = OwnedFleet(namespace, mqtt_conn, **settings)
        owned_fleet.fleet.add(count)
        made.append(owned_fleet)
        return owned_fleet

    yield make
    for owned_fleet in made:
        owned_fleet.fleet.stop_all()


def chunks(count: int) -> list[ChunkSpec]:
    return [ChunkSpec({"op": "sum"}, {"x": np.full(4, float(i))}) for i in range(count)]


class TestOwnerEvent:
    """An owner event stops the kernels, hands every task back and frees the car."""

    def test_unlock_preempts_and_work_moves_on(
        self,
        gateway_factory: GatewayFactory,
        owned: Callable[..., OwnedFleet],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given long leases (so only the nacks can explain a fast redo) and one owned car
        # running a long task with a second one prefetched
        gateway = gateway_factory(lease_seconds=300)
        car = owned(1, simulated_delay_s=30.0)
        vehicle = next(iter(car.fleet.vehicles.values()))
        statuses = RawMqtt(mqtt_conn, f"watch-{namespace}")
        statuses.subscribe(MqttTopics(namespace).status(vehicle.vehicle_id, "gw1"))
        handle = client.publish("reduce", chunks(2))
        wait_for(
            lambda: vehicle.held == 2 and vehicle.guard.running == 1, 30, "one running, one held"
        )
        # When the owner unlocks the car
        unlocked = car.buses[vehicle.vehicle_id].set(locked=False)
        # Then no kernel runs any more, nothing is held, and the owner's event is recorded
        wait_for(lambda: vehicle.guard.running == 0 and vehicle.held == 0, 5, "the stop")
        record = vehicle.guard.preemptions[-1]
        assert record.reason == "owner_present" and record.event_at == unlocked.at
        assert record.stop_ms is not None and record.stop_ms < 5000
        assert vehicle.released == 2
        # And the gateway got both tasks back at once (through the nacks, or the status
        # that says the car stopped), not a lease expiry
        causes = ("nack", "vehicle_offline")
        back = lambda: sum(gateway.metric(REDELIVERED, cause=c) for c in causes)  # noqa: E731
        wait_for(lambda: back() == 2, 10, "both tasks back")
        assert gateway.metric(REDELIVERED, cause="lease_expired") == 0
        assert not gateway.gateway.leases.of_vehicle(vehicle.vehicle_id)
        # And the car says why it stopped
        wait_for(lambda: _last_status(statuses).state is VehicleState.SUSPENDED, 10, "status")
        assert _last_status(statuses).reason == "owner_present"
        # And another car finishes the job; the owned car got nothing new meanwhile
        spare = fleet_factory(1, prefix="spare")
        handle.wait(timeout=60)
        assert {c.vehicle_id for c in handle.chunks(timeout=1)} == set(spare.vehicles)
        # When the owner locks it again and walks away, it asks for work again
        car.buses[vehicle.vehicle_id].set(locked=True)
        wait_for(lambda: vehicle.guard.reconsider().runs, 10, "eligible again")
        wait_for(lambda: _last_status(statuses).state is VehicleState.ONLINE, 10, "online")
        statuses.close()

    def test_predrain_finishes_running_work_but_takes_none(
        self,
        gateway_factory: GatewayFactory,
        owned: Callable[..., OwnedFleet],
        client: ParkpoolClient,
    ) -> None:
        gateway_factory(lease_seconds=300)
        car = owned(1, simulated_delay_s=1.0, prefetch=0)
        vehicle = next(iter(car.fleet.vehicles.values()))
        handle = client.publish("reduce", chunks(3))
        wait_for(lambda: vehicle.guard.running == 1, 30, "the first task to run")
        # When a departure is scheduled inside the pre-drain window (but not imminent)
        car.buses[vehicle.vehicle_id].set(next_departure=time.time() + 600)
        # Then the running task completes, and no further task is taken
        wait_for(lambda: handle.progress.done == 1, 30, "the running task to finish")
        time.sleep(2.0)
        assert handle.progress.done == 1
        assert vehicle.decision.reason == "predrain"
        assert vehicle.held == 0


class TestDwellAwareDispatch:
    """A car about to leave gets only the tasks it should finish in time."""

    def test_long_task_goes_to_the_car_that_stays(
        self,
        gateway_factory: GatewayFactory,
        owned: Callable[..., OwnedFleet],
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
    ) -> None:
        gateway = gateway_factory()
        # Given a car that leaves in 20 minutes (15 of them usable) and claims 1 GFLOP/s
        leaving = owned(1, gflops_per_s=1.0)
        vehicle = next(iter(leaving.fleet.vehicles.values()))
        leaving.buses[vehicle.vehicle_id].set(next_departure=time.time() + 1200 + 300)
        # When a task of 10^4 GFLOP (about 3 hours at that rate) is ready
        job_id = _produce_costly_task(kafka_conn, client)
        # Then the leaving car is skipped
        wait_for(
            lambda: gateway.metric("parkpool_gateway_dispatch_skipped_total", reason="dwell") > 0,
            30,
            "a skipped turn",
        )
        assert vehicle.held == 0
        # And a car without a departure takes it
        stays = owned(1)
        (record,) = read_topic(kafka_conn, client.reply_topic, expect=1, timeout=60)
        result = decode(record.value() or b"", Result)
        assert (result.job_id, result.vehicle_id) == (job_id, *stays.fleet.vehicles)


def _last_status(raw: RawMqtt) -> VehicleStatus:
    return decode(raw.received[-1].payload, VehicleStatus)


def _produce_costly_task(kafka_conn: KafkaConnection, client: ParkpoolClient) -> str:
    """One task whose cost says hours of work (the SDK would compute its real, tiny cost)."""
    job_id = "costly" + uuid.uuid4().hex[:8]
    task = TaskChunk(
        job_id,
        0,
        1,
        "reduce",
        {"op": "sum"},
        {"x": np.ones(4)},
        client.reply_topic,
        time.time() + 600,
        time.time(),
        cost_gflop=1e4,
    )
    producer = Producer(producer_config(kafka_conn))
    producer.produce(client.topics.tasks, encode(task), key=f"{job_id}:0")
    assert producer.flush(10) == 0
    return job_id
