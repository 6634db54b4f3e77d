# SPDX-License-Identifier: Apache-2.0
"""A gateway with no work says so to each car that asks, so that cars move their credits
to a gateway that has some (gateway.dispatch, worker.grants)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from parkpool.gateway.gateway import Gateway
from parkpool.gateway.settings import GatewaySettings
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobHandle
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    Assignment,
    Capabilities,
    GatewayStatus,
    MqttTopics,
    PullRequest,
    TaskChunk,
    decode,
    encode,
)
from parkpool.schemas.codec import peek_type
from parkpool.schemas.reputation import Level
from parkpool.worker.kernels import REGISTRY
from tests.conftest import RunningGateway
from tests.helpers import LeaseHolder, RawMqtt, first_assignment, hold_lease, wait_for

pytestmark = pytest.mark.integration


def no_work_notices(car: RawMqtt) -> int:
    payloads = [bytes(m.payload) for m in list(car.received)]
    notices = [decode(p, GatewayStatus) for p in payloads if peek_type(p) == GatewayStatus.TYPE]
    return sum(1 for n in notices if n.queued == 0)


X = np.arange(8.0)  # a job's only chunk


@pytest.fixture
def holding(
    gateway_factory: Callable[..., RunningGateway],
    mqtt_conn: MqttConnection,
    kafka_conn: KafkaConnection,
    namespace: str,
) -> Iterator[tuple[JobHandle, LeaseHolder, int]]:
    """A scripted car holding the lease of a job's only task at gw1, once the gateway's
    queue has been empty past its 2 s of quiet; with the notices it had heard by then
    (one, when its pull came before the task did)."""
    gateway_factory("gw1")
    topics = MqttTopics(namespace)
    settings = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)
    with ParkpoolClient(settings) as client:
        handle = client.submit("reduce", {"x": X, "op": "sum"}, chunk_elems=X.size)
        holder = hold_lease(mqtt_conn, topics)
        try:
            time.sleep(3.0)
            before = no_work_notices(holder.car)
            time.sleep(1.0)
            assert no_work_notices(holder.car) == before  # no room: nothing said
            yield handle, holder, before
        finally:
            holder.close()


class TestNoWorkNotice:
    def test_a_car_that_asks_again_is_answered_again(
        self,
        gateway_factory: Callable[..., RunningGateway],
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway with no work, and a car that asks it for a task
        gateway_factory("gw1")
        topics = MqttTopics(namespace)
        car = RawMqtt(mqtt_conn, f"asker-{namespace}")
        try:
            car.subscribe(topics.task("asker"))
            pull = encode(
                PullRequest("asker", 1, Capabilities("numpy", tuple(REGISTRY)), {}, {"gw1": 1})
            )
            car.publish(topics.pull("asker", "gw1"), pull)
            wait_for(lambda: no_work_notices(car) == 1, 30, "the first 'no work here'")
            # When the car asks again, as one does after a reconnect has made it forget,
            # or once it stops believing an old "no work"
            car.publish(topics.pull("asker", "gw1"), pull)
            # Then it is told again, rather than left with its credit parked here
            wait_for(lambda: no_work_notices(car) == 2, 10, "a second 'no work here'")
            # And only once per asking: a car that says nothing more hears nothing more
            time.sleep(3.0)
            assert no_work_notices(car) == 2
        finally:
            car.close()

    def test_a_car_whose_lease_ends_after_the_queue_emptied_is_told(
        self, holding: tuple[JobHandle, LeaseHolder, int], namespace: str
    ) -> None:
        # Given a car holding a task while the gateway's queue emptied and it said so
        handle, holder, before = holding
        # When its task ends, which frees the slot its grant keeps at this gateway
        result = holder.result({"value": np.array(X.sum())})
        holder.car.publish(MqttTopics(namespace).result("holder", "gw1"), encode(result))
        handle.wait(timeout=30)
        # Then it hears "no work here", so that the slot can go to its other gateway:
        # a car that never pulls again would otherwise keep it here
        wait_for(lambda: no_work_notices(holder.car) == before + 1, 10, "'no work here'")


class TestASlotFreedWithoutAResult:
    """A lease that ended at the gateway without the car's result still frees the car's
    slot once the car has let the task go; the gateway must then count it as room."""

    def test_a_cancelled_task_frees_its_cars_slot(
        self, holding: tuple[JobHandle, LeaseHolder, int]
    ) -> None:
        # Given a car holding a task while the gateway's queue emptied and it said so
        handle, holder, before = holding
        # When the job is cancelled, which revokes the lease (the car drops it)
        handle.cancel()
        # Then the car, its slot free and nothing to do here, hears so
        wait_for(lambda: no_work_notices(holder.car) == before + 1, 10, "'no work'")

    def test_a_late_result_frees_its_cars_slot(
        self,
        mqtt_conn: MqttConnection,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a gateway stepped by this test, and a car holding a job's only task
        topics = MqttTopics(namespace)
        settings = GatewaySettings("gw1", kafka_conn, mqtt_conn, namespace)
        gateway = Gateway(settings)
        gateway.start()
        try:
            producer = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)
            with ParkpoolClient(producer) as client:
                client.submit("reduce", {"x": X, "op": "sum"}, chunk_elems=X.size)
                holder = stepped_lease(gateway, mqtt_conn, topics)
                try:
                    # When its partition goes to another gateway (the lease ends here, and
                    # the car, told nothing, keeps working), past the gateway's quiet
                    lease = gateway.leases.get(holder.assignment.epoch)
                    assert lease is not None
                    gateway._drop_partitions({lease.task.tp})
                    step_for(gateway, 3.0)
                    before = no_work_notices(holder.car)
                    # And the car's result comes, late
                    late = holder.result({"value": np.array(X.sum())})
                    holder.car.publish(topics.result("holder", "gw1"), encode(late))
                    # Then its slot counts as free from then on: it hears "no work here"
                    step_for(gateway, 5.0, until=lambda: no_work_notices(holder.car) > before)
                    step_for(gateway, 1.0)  # and only once
                    assert no_work_notices(holder.car) == before + 1
                finally:
                    holder.close()
        finally:
            gateway.drain()
            gateway.shutdown()


def step_for(gateway: Gateway, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
    """Run the gateway's loop on this thread for ``seconds``, or until ``until()``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        gateway.step()


def stepped_lease(gateway: Gateway, conn: MqttConnection, topics: MqttTopics) -> LeaseHolder:
    """``hold_lease`` for a gateway whose loop this thread runs."""
    car = RawMqtt(conn, f"holder-{topics.namespace}")
    car.subscribe(topics.task("holder"))
    pull = PullRequest("holder", 1, Capabilities("numpy", tuple(REGISTRY)), {}, {"gw1": 1})
    car.publish(topics.pull("holder", "gw1"), encode(pull))
    step_for(gateway, 30.0, until=lambda: first_assignment(car) is not None)
    message = first_assignment(car)
    assert message is not None, "no lease within 30 s"
    assignment = decode(message.payload, Assignment)
    return LeaseHolder(car, assignment, decode(assignment.task, TaskChunk))
