# SPDX-License-Identifier: Apache-2.0
"""Key log events carry the context an SRE greps by, checked with structlog's capture."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import logs
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import MqttTopics
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import hold_lease, wait_for

TASK_KEYS = {"job_id", "task_id", "attempt"}


def _event(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    wait_for(lambda: any(e["event"] == name for e in entries), 30, f"a {name} event")
    return next(e for e in entries if e["event"] == name)


@pytest.mark.integration
class TestGatewayEvents:
    """A lease that runs out is logged with the task's job, partition, offset and epoch."""

    def test_lease_expiry_and_requeue_carry_task_context(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        with capture_logs() as entries:
            # Given a scripted vehicle that takes a task and never answers
            gateway_factory(lease_seconds=1)
            client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
            silent = hold_lease(mqtt_conn, MqttTopics(namespace), "silent")
            assignment = silent.assignment
            # When its lease runs out
            expired = _event(entries, "lease_expired")
            requeued = _event(entries, "task_requeued")
            silent.close()
        # Then both events say which task, where it is in Kafka, and whose lease it was
        for event in (expired, requeued):
            assert TASK_KEYS | {"partition", "offset", "vehicle_id", "gateway_id"} <= set(event)
            assert event["vehicle_id"] == "silent" and event["gateway_id"] == "gw1"
            assert event["attempt"] == 1
        assert expired["epoch"] == assignment.epoch and expired["log_level"] == "info"
        assert requeued["reason"] == "lease_expired"


@pytest.mark.integration
class TestWorkerEvents:
    """A task handed back to its owner's policy is logged with its lease and the reason."""

    def test_release_carries_lease_context(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        gateway_factory(lease_seconds=300)
        bus = SimulatedBus()
        template = WorkerSettings("t", mqtt_conn, namespace, backend="numpy", simulated_delay_s=30)
        fleet = Fleet(template, prefix="owned", car=lambda _id: bus, policy=PolicyConfig())
        try:
            with capture_logs() as entries:
                fleet.add(1)
                car = next(iter(fleet.vehicles.values()))
                client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
                wait_for(lambda: car.held == 1, 30, "the task on the car")
                bus.set(locked=False)
                released = _event(entries, "task_released")
        finally:
            fleet.stop_all()
        assert TASK_KEYS | {"vehicle_id", "gateway_id", "epoch"} <= set(released)
        assert (released["vehicle_id"], released["reason"]) == (car.vehicle_id, "owner_present")


class TestRendering:
    """JSON off a terminal, a console renderer on one, the level from the environment."""

    def test_json_and_level_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PARKPOOL_LOG_LEVEL", "warning")
        monkeypatch.setenv("PARKPOOL_LOG_JSON", "1")
        try:
            logs.configure()
            log = structlog.get_logger("parkpool.test")
            log.info("quiet_event")
            log.warning("loud_event", job_id="j1", at=time.time())
            err = capsys.readouterr().err
        finally:
            structlog.reset_defaults()
        assert "quiet_event" not in err
        assert '"event": "loud_event"' in err and '"job_id": "j1"' in err


@pytest.mark.integration
class TestNoPayloadsInLogs:
    """Nothing a job carries, and no secret, ends up in a log event."""

    def test_job_leaves_no_inputs_results_or_secrets_in_logs(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
    ) -> None:
        marker = 98765.4321  # appears in every input, and in every result as a sum
        with capture_logs() as entries:
            gateway_factory()
            fleet_factory(2)
            chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(3, marker)}) for _ in range(6)]
            client.publish("reduce", chunks).wait(timeout=60)
        assert entries  # the run did log: the check below is not vacuous
        for entry in entries:
            for value in entry.values():
                assert not isinstance(value, bytes | bytearray | np.ndarray), entry
                assert "98765" not in str(value) and "296296" not in str(value), entry
