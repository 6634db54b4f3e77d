# SPDX-License-Identifier: Apache-2.0
"""Cells, reduced from ``make bench``'s ``cells`` line: real Mosquittos, one per cell,
gateway processes and simulated cars, one Kafka task group."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path

import pytest

from parkpool.app.children import role, role_env
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.bench_cells import CellsPlan, run_cells
from tests.bench_scale import small_chunks
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


class TestTwoCells:
    """A job spans cells; each gateway hears only its own cell's cars; a task costs the
    brokers a handful of deliveries, periodic traffic included."""

    def test_a_job_across_two_cells(self, tmp_path: Path) -> None:
        # Given two cells of two gateways and 40 cars each, When a 600-chunk job runs
        plan = CellsPlan(2, cars_per_cell=40, tasks=600, heartbeat_s=5.0)
        report = run_cells(plan, tmp_path)
        # Then every chunk came back, and gateways of both cells did work
        assert report["job_chunks_done"] == 600
        completed = report["gateway_tasks_completed"]
        assert all(n > 0 for n in completed), completed
        # And each car is counted by one gateway of its own cell, so the fleet series
        # add up: a cell's gateways count exactly the cell's cars
        known = report["gateway_vehicles_known"]
        g = plan.gateways_per_cell
        per_cell = [sum(known[c * g : (c + 1) * g]) for c in range(plan.cells)]
        assert per_cell == report["cell_vehicles"]
        # And the brokers sent at most 6 messages per task, to gateways and cars together,
        # over a window that holds the whole job
        assert report["tasks_completed"] >= 600
        assert 0 < report["deliveries_per_task"] <= 6


class TestCellWithoutCars:
    """A cell with gateways but no cars never holds work hostage."""

    def test_its_gateways_stand_by_and_the_job_completes(self, tmp_path: Path) -> None:
        # Given two cells with a gateway each, and cars in cell 0 only
        with EmbeddedBrokers(run_dir=tmp_path, cells=2) as brokers:
            namespace = "standby"
            bootstrap(brokers.kafka_bootstrap, namespace)
            ports = {name: free_port() for name in ("busy", "empty")}
            with contextlib.ExitStack() as stack:
                for cell, name in enumerate(ports):
                    env = {
                        **role_env(brokers, namespace),
                        "PARKPOOL_MQTT_PORT": str(brokers.mqtt_ports[cell]),
                        "PARKPOOL_GATEWAY_ID": name,
                        "PARKPOOL_METRICS_PORT": str(ports[name]),
                        "PARKPOOL_STANDBY_AFTER_S": "3",
                    }
                    stack.enter_context(role(name, ["gateway"], env, tmp_path))
                cell0 = MqttConnection(brokers.mqtt_host, brokers.mqtt_ports[0])
                template = WorkerSettings("t", namespace=namespace, backend="numpy")
                fleet = Fleet(template, prefix="car", cells={"cell-0": cell0})
                stack.callback(fleet.stop_all)
                fleet.add(4)
                # When the empty cell's gateway has had no car for its standby time
                wait_for(lambda: _standing_by(ports["empty"]), 60, "the empty cell to stand by")
                # Then a job whose chunks span every partition completes in cell 0 alone
                settings = ProducerSettings(
                    KafkaConnection(brokers.kafka_bootstrap),
                    namespace,
                    verification=Level.UNCHECKED,
                )
                with ParkpoolClient(settings) as client:
                    handle = client.publish("reduce", small_chunks(96))
                    handle.wait(timeout=120)
                assert handle.progress.done == 96
                assert not _standing_by(ports["busy"])


def _standing_by(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as answer:
            status = json.loads(answer.read())
    except OSError:
        return False
    return bool(status.get("standby"))
