# SPDX-License-Identifier: Apache-2.0
"""A car's prefetched task, behind a kernel that runs longer than its lease: handed back
before the lease runs out, at no cost to the task, rather than left to expire as a
failed attempt and then run for a result nobody takes.

A real gateway, a real Mosquitto and Kafka, and one ``VehicleWorker`` as a car runs it
(its own thread pool, not a simulated fleet's shared one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.held import WorkerSettings
from parkpool.worker.worker import VehicleWorker
from tests.conftest import RunningGateway

pytestmark = pytest.mark.integration

FAILURES = "parkpool_gateway_task_failures_total"
REDELIVERED = "parkpool_gateway_redelivered_total"


@pytest.fixture
def slow_car(mqtt_conn: MqttConnection, namespace: str) -> Iterator[VehicleWorker]:
    """One kernel at a time, one task prefetched, each kernel taking 6 s."""
    settings = WorkerSettings(
        "slowcar",
        mqtt_conn,
        namespace,
        backend="numpy",
        concurrency=1,
        prefetch=1,
        heartbeat_s=1.0,
        simulated_delay_s=6.0,
    )
    car = VehicleWorker(settings)
    car.start()
    yield car
    car.stop("test_over")


def test_a_prefetched_task_is_handed_back_before_its_lease_runs_out(
    gateway_factory: Callable[..., RunningGateway],
    client: ParkpoolClient,
    slow_car: VehicleWorker,
) -> None:
    # Given a gateway whose leases last 3 s, and a car whose kernels take 6 s
    gateway = gateway_factory(lease_seconds=3)
    # When it is sent two chunks: one runs, the other waits for the kernel slot
    chunks = [ChunkSpec({"op": "sum"}, {"x": np.array([float(i)])}) for i in range(2)]
    handle = client.publish("reduce", chunks)
    handle.wait(timeout=60)
    # Then the job completes, and the waiting task's lease never expired as a failed
    # attempt: the car handed it back in time, as expired, which does not count
    assert handle.progress.done == 2
    assert gateway.metric(FAILURES, reason="lease_expired") == 0
    assert gateway.metric(REDELIVERED, cause="nack") >= 1
