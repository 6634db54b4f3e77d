# SPDX-License-Identifier: Apache-2.0
"""Broker deliveries per completed task, for whichever parkpool is imported: one broker,
two gateway processes, N simulated cars, the cells bench's one-cell workload.

It uses only APIs that also exist before cells (commit 73170c9), so the design before
and after can be measured the same way on the same machine. To measure an older
checkout, run it from that checkout's root (``-m`` puts the working directory first on
the path, for the gateway children too)::

    git worktree add /tmp/before 73170c9 && cd /tmp/before
    PYTHONPATH=/tmp/before /path/to/.venv/bin/python /path/to/tests/bench_deliveries.py 1500 20

Mosquitto published ``$SYS`` every 10 s before cells, so the window runs from one
``$SYS`` update to another, whatever the interval.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from parkpool.app.children import role, role_env
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import logs
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.bench_scale import _wait_ready, scrape  # as old as the code it compares

SENT = "$SYS/broker/publish/messages/sent"
COMPLETED = ("parkpool_gateway_tasks_total", (("status", "completed"),))
NAMESPACE = "deliveries"


class SysCounter:
    """The broker's PUBLISH-sent counter, read at its own updates."""

    def __init__(self, conn: MqttConnection) -> None:
        self.value = 0.0
        self.ours = 0  # $SYS messages the broker sent to this monitor
        self._fresh = threading.Event()
        connected = threading.Event()
        self.client = new_client(f"sys-{free_port()}", conn)
        self.client.on_connect = lambda *_a: connected.set()
        self.client.on_message = self._on_message
        connect_and_wait(self.client, conn, connected=connected)
        self.client.subscribe(SENT, qos=0)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.ours += 1
        self.value = float(msg.payload)
        self._fresh.set()

    def next_update(self) -> tuple[float, int]:
        self._fresh.clear()
        self._fresh.wait(15)
        return self.value, self.ours


def completed(port: int) -> float:
    return float(scrape(port).get(COMPLETED, 0.0))


def measure(cars: int, window_s: float, run_dir: Path) -> dict[str, Any]:
    with EmbeddedBrokers(run_dir=run_dir) as brokers, contextlib.ExitStack() as stack:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
        counter = SysCounter(conn)
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            env = {
                **role_env(brokers, NAMESPACE),
                "PARKPOOL_GATEWAY_ID": f"gw{i}",
                "PARKPOOL_METRICS_PORT": str(port),
                "PARKPOOL_LOG_LEVEL": "warning",
            }
            stack.enter_context(role(f"gw{i}", ["gateway"], env, run_dir))
        for port in ports:
            _wait_ready(port, timeout=120)
        # The cells bench's car: 10 s heartbeats, 5 s refreshes, 0.5 s of compute a task.
        template = WorkerSettings(
            "t",
            conn,
            NAMESPACE,
            backend="numpy",
            heartbeat_s=10.0,
            pull_refresh_s=5.0,
            simulated_delay_s=0.5,
        )
        fleet = Fleet(template, prefix="car")
        stack.callback(fleet.stop_all)
        while len(fleet) < cars:
            fleet.add(min(500, cars - len(fleet)), parallel=32)
        x = np.arange(16, dtype=np.float64)
        settings = ProducerSettings(
            KafkaConnection(brokers.kafka_bootstrap), NAMESPACE, verification=Level.UNCHECKED
        )
        with ParkpoolClient(settings) as client:
            handle = client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": x})] * 20_000)
            time.sleep(5)  # warm-up: every car's first pull, the gateways' first reads
            sent0, ours0 = counter.next_update()
            done0, started = sum(map(completed, ports)), time.monotonic()
            time.sleep(window_s)
            sent1, ours1 = counter.next_update()
            done1, elapsed = sum(map(completed, ports)), time.monotonic() - started
            client.cancel(handle.job_id)
    done, sent = done1 - done0, sent1 - sent0 - (ours1 - ours0)
    return {
        "name": "deliveries",
        "cars": cars,
        "window_s": round(elapsed, 1),
        "tasks_completed": int(done),
        "tasks_per_s": round(done / elapsed, 1),
        "broker_sent_per_s": round(sent / elapsed, 1),
        "deliveries_per_task": round(sent / max(done, 1), 2),
    }


def main() -> int:
    cars, window_s = int(sys.argv[1]), float(sys.argv[2])
    logs.configure("error")
    with tempfile.TemporaryDirectory(prefix="parkpool-deliveries-") as run_dir:
        print(json.dumps(measure(cars, window_s, Path(run_dir))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
