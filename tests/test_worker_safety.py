# SPDX-License-Identifier: Apache-2.0
"""The in-car agent is safe by default: it refuses to run unprotected, waits out a
missing network instead of exiting, and no message or result can stop or stall it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.jobs import JobFailed
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.boot import start_with_retries
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import VehicleWorker, WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import wait_for

GatewayFactory = Callable[..., RunningGateway]


def worker_process(port: int, *args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKPOOL_")}
    env |= {"PARKPOOL_MQTT_PORT": str(port), "PARKPOOL_LOG_JSON": "1"}
    argv = [sys.executable, "-m", "parkpool", "worker", "--vehicle-id", "car-1", *args]
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that accepts TCP connections and remembers whether anyone came."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def anyone_connected(server: socket.socket) -> bool:
    try:
        peer, _ = server.accept()
    except TimeoutError:
        return False
    peer.close()
    return True


class TestRefusesToRunUnprotected:
    """Without the car's signals and trusted gateway keys, the agent does not start."""

    def test_names_both_missing_settings_before_connecting(
        self, listener: socket.socket, tmp_path: Path
    ) -> None:
        # When the agent is started with neither a car feed nor trusted keys
        child = worker_process(listener.getsockname()[1], cwd=tmp_path)
        _out, err = child.communicate(timeout=60)
        # Then it exits non-zero, naming both settings and how to override, no traceback
        assert child.returncode == 2
        for name in ("--car-feed", "PARKPOOL_CAR_FEED", "--trusted-keys", "PARKPOOL_TRUSTED_KEYS"):
            assert name in err
        assert "--dev" in err and "Traceback" not in err
        # And it never opened a connection to the broker
        assert not anyone_connected(listener)

    def test_one_missing_setting_is_named_alone(
        self, listener: socket.socket, tmp_path: Path
    ) -> None:
        key = tmp_path / "gw.pub"
        key.write_text("00" * 32 + "\n")
        child = worker_process(listener.getsockname()[1], "--trusted-keys", str(key), cwd=tmp_path)
        _out, err = child.communicate(timeout=60)
        assert child.returncode == 2
        assert "--car-feed" in err and "--trusted-keys" not in err
        assert not anyone_connected(listener)


class TestWaitsForTheNetwork:
    """An unreachable broker at boot is retried with backoff, never a reason to exit."""

    def test_a_stop_ends_the_wait_for_a_broker_that_does_not_answer(
        self, listener: socket.socket, tmp_path: Path
    ) -> None:
        # Given a port that accepts connections but never answers MQTT
        child = worker_process(listener.getsockname()[1], "--dev", cwd=tmp_path)
        try:
            wait_for(lambda: anyone_connected(listener), 30, "the agent to connect")
        finally:
            # When the agent is stopped while it waits for the CONNACK
            child.send_signal(signal.SIGTERM)
            # Then it leaves cleanly, well before its 15 s connection timeout
            _out, err = child.communicate(timeout=10)
        assert child.returncode == 0, err
        assert "Traceback" not in err

    def test_dev_bench_warns_then_keeps_retrying_until_stopped(self, tmp_path: Path) -> None:
        # Given no broker at all on the port
        closed = socket.create_server(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        # When a development agent starts there
        child = worker_process(port, "--dev", cwd=tmp_path)
        try:
            time.sleep(4.0)
            # Then it is still running, after warning loudly that it is unprotected
            assert child.poll() is None
        finally:
            child.send_signal(signal.SIGTERM)
            _out, err = child.communicate(timeout=30)
        assert child.returncode == 0
        assert "unsafe_development_mode" in err and "never do this on a car" in err
        # And it retried, saying how long it would wait each time
        assert err.count("broker_unreachable") >= 2 and "retry_in_s" in err

    def test_starts_once_the_broker_appears(self, tmp_path: Path) -> None:
        # Given a broker that is down when the car boots
        with EmbeddedBrokers(run_dir=tmp_path / "late") as late:
            conn = MqttConnection(late.mqtt_host, late.mqtt_port)
            late.stop_mosquitto()
            settings = WorkerSettings("car-late", conn, "late", backend="numpy")
            stop = threading.Event()
            started: list[VehicleWorker | None] = []
            boot = threading.Thread(
                target=lambda: started.append(
                    start_with_retries(
                        lambda: VehicleWorker(settings), stop, Backoff(base=0.2, cap=0.5)
                    )
                )
            )
            with capture_logs() as logs:
                boot.start()
                wait_for(lambda: _failures(logs) >= 2, 20, "two failed attempts")
                # When the broker comes up
                late.start_mosquitto()
                boot.join(30)
            # Then the worker is running, connected
            (worker,) = started
            assert worker is not None and worker.eligible
            worker.stop("test_over")


class TestSimulatedFleetSaysItIsUnprotected:
    """parkpool sim is a development tool: it runs without a feed or keys, loudly."""

    def test_warns_at_start(self, mqtt_conn: MqttConnection, tmp_path: Path) -> None:
        # When a fleet with no trusted keys starts
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARKPOOL_")}
        env |= {"PARKPOOL_MQTT_PORT": str(mqtt_conn.port), "PARKPOOL_LOG_JSON": "1"}
        argv = [sys.executable, "-m", "parkpool", "sim", "--vehicles", "1", "--backend", "numpy"]
        child = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert child.stderr is not None
        lines = []
        try:
            for line in child.stderr:
                lines.append(line)
                if "fleet_started" in line:
                    break
        finally:
            child.send_signal(signal.SIGTERM)
            child.communicate(timeout=30)
        # Then it said, before its cars connected, that they run without both safeguards
        (warning,) = [line for line in lines if "unsafe_development_mode" in line]
        assert "--car-feed" in warning and "--trusted-keys" in warning
        assert "fleet_started" in lines[-1]


def _failures(logs: list[dict[str, Any]]) -> int:
    return sum(1 for entry in logs if entry["event"] == "broker_unreachable")


@pytest.mark.integration
class TestNothingStopsTheAgent:
    """A message whose handling raises, or a result too large for MQTT, costs one task."""

    def test_a_handler_that_raises_is_counted_and_work_goes_on(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
    ) -> None:
        # Given one car whose first assignment meets a bug
        gateway_factory(lease_seconds=2.0)
        fleet = fleet_factory(1)
        (car,) = fleet.vehicles.values()
        handle_assignment = car.inbox._on_assignment
        met: list[bytes] = []

        def faulty(payload: bytes) -> None:
            if not met:
                met.append(payload)
                raise RuntimeError("injected fault while handling an assignment")
            handle_assignment(payload)

        car.inbox._on_assignment = faulty  # type: ignore[method-assign]
        # When a job is sent to it
        x = np.arange(16.0)
        handle = client.submit("reduce", {"x": x, "op": "sum"})
        # Then the bug is counted, the lease runs out, and the same car does the work
        assert handle.wait(timeout=60) == x.sum()
        assert car.handler_errors == {"assignment": 1}

    def test_a_result_too_large_for_mqtt_is_nacked(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
    ) -> None:
        # Given a car whose broker takes messages of 16 KiB at most
        gateway_factory(max_attempts=3)
        small = MqttConnection(mqtt_conn.host, mqtt_conn.port, max_message_bytes=16 << 10)
        (car,) = fleet_factory(1, mqtt=small).vehicles.values()
        # When a job's result is 32 KiB
        handle = client.submit("poly", {"x": np.ones(4096), "coeffs": [2.0, 0.0]})
        # Then the car does not send it, and the job fails by name instead of hanging
        with pytest.raises(JobFailed, match="invalid_task"):
            handle.wait(timeout=60)
        # And the car counted each try: one car's invalid_task does not end a task at
        # once (a hostile car could end them all), so it took the attempt limit
        assert (car.results_too_large, car.completed) == (3, 0)
