# SPDX-License-Identifier: Apache-2.0
"""The ``cells`` bench line: per-gateway and per-broker load as cells are added.

Each cell is a real Mosquitto on loopback with its own gateways (child processes) and
its own simulated cars; all gateways share one Kafka task group. The fleet grows with
the cells, so a design whose per-gateway load follows the fleet shows it at once. The
baseline keeps the pre-cell design's fan-in for comparison, in the same run: one broker,
six gateways, and every car talking to every gateway (K = all) while the fleet grows.

Rates come from Mosquitto's ``$SYS`` counters (per broker) and each gateway's own
``parkpool_gateway_mqtt_messages_total`` (per gateway, by kind), over a window of
steady work. ``deliveries_per_task`` is every PUBLISH the brokers sent (to gateways and
cars alike) per task completed in the window, periodic traffic included.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.app.children import role, role_env
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.bench_scale import _wait_ready, grow, rss_mb, scrape, small_chunks

SYS = {
    "sent": "$SYS/broker/publish/messages/sent",
    "received": "$SYS/broker/publish/messages/received",
}
MESSAGES = "parkpool_gateway_mqtt_messages_total"
COMPLETED = ("parkpool_gateway_tasks_total", (("status", "completed"),))


@dataclass(frozen=True)
class CellsPlan:
    cells: int
    gateways_per_cell: int = 2
    cars_per_cell: int = 1500
    gateways_per_vehicle: int = 2  # 0: every gateway of the cell (the old fan-in)
    heartbeat_s: float = 10.0  # production: 15 s; shorter amplifies periodic traffic
    pull_refresh_s: float = 5.0  # production: 10 s
    task_seconds: float = 0.5
    warmup_s: float = 8.0  # steady windows only: a whole job (tasks > 0) is measured whole
    window_s: float = 20.0
    tasks: int = 0  # 0: more than the window can finish (the job is cancelled after it)


class BrokerCounters:
    """The latest ``$SYS`` publish counters of each broker, from one monitor each."""

    def __init__(self, ports: list[int]) -> None:
        self.values: list[dict[str, float]] = [{} for _ in ports]
        self.monitor_received = [0] * len(ports)  # $SYS messages to us, not to the system
        self._clients: list[mqtt.Client] = []
        for index, port in enumerate(ports):
            self._clients.append(self._watch(index, MqttConnection("127.0.0.1", port)))

    def _watch(self, index: int, conn: MqttConnection) -> mqtt.Client:
        connected = threading.Event()
        client = new_client(f"bench-sys-{index}-{free_port()}", conn)
        client.on_connect = lambda *_a: connected.set()

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.monitor_received[index] += 1
            for key, topic in SYS.items():
                if msg.topic == topic:
                    self.values[index][key] = float(msg.payload)

        client.on_message = on_message
        connect_and_wait(client, conn, connected=connected)
        for topic in SYS.values():
            client.subscribe(topic, qos=0)
        return client

    def snapshot(self) -> list[dict[str, float]]:
        time.sleep(1.2)  # one sys_interval: the values are this second's
        return [
            dict(v, monitor=float(n))
            for v, n in zip(self.values, self.monitor_received, strict=True)
        ]

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def run_cells(plan: CellsPlan, run_dir: Path) -> dict[str, Any]:
    """One measurement: start the cells, grow the fleet, run work, read the counters."""
    namespace = f"cells{plan.cells}k{plan.gateways_per_vehicle}c{plan.cars_per_cell}"
    cell_dir = run_dir / namespace
    cell_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBrokers(run_dir=cell_dir, cells=plan.cells) as brokers:
        bootstrap(brokers.kafka_bootstrap, namespace)
        with _gateways(brokers, namespace, plan, cell_dir) as gateways:
            return _measure(brokers, namespace, plan, gateways)


@contextlib.contextmanager
def _gateways(
    brokers: EmbeddedBrokers, namespace: str, plan: CellsPlan, run_dir: Path
) -> Iterator[list[tuple[str, int, int]]]:
    """(gateway id, metrics port, pid) of every gateway, each in its cell."""
    started: list[tuple[str, int, int]] = []
    with contextlib.ExitStack() as stack:
        for cell, port in enumerate(brokers.mqtt_ports):
            for g in range(plan.gateways_per_cell):
                gateway_id, metrics = f"c{cell}-gw{g}", free_port()
                env = {
                    **role_env(brokers, namespace),
                    "PARKPOOL_MQTT_PORT": str(port),
                    "PARKPOOL_GATEWAY_ID": gateway_id,
                    "PARKPOOL_CELL": f"cell-{cell}",
                    "PARKPOOL_METRICS_PORT": str(metrics),
                    "PARKPOOL_LOG_LEVEL": "warning",
                }
                child = stack.enter_context(role(gateway_id, ["gateway"], env, run_dir))
                started.append((gateway_id, metrics, child.pid))
        for _, metrics, _ in started:
            _wait_ready(metrics, timeout=120)
        yield started


def _measure(
    brokers: EmbeddedBrokers,
    namespace: str,
    plan: CellsPlan,
    gateways: list[tuple[str, int, int]],
) -> dict[str, Any]:
    cells = {
        f"cell-{i}": MqttConnection(brokers.mqtt_host, port)
        for i, port in enumerate(brokers.mqtt_ports)
    }
    template = WorkerSettings(
        "template",
        namespace=namespace,
        backend="numpy",
        heartbeat_s=plan.heartbeat_s,
        pull_refresh_s=plan.pull_refresh_s,
        simulated_delay_s=plan.task_seconds,
        gateways_per_vehicle=plan.gateways_per_vehicle,
    )
    fleet = Fleet(template, prefix="car", cells=cells)
    counters = BrokerCounters(brokers.mqtt_ports)
    settings = ProducerSettings(
        KafkaConnection(brokers.kafka_bootstrap), namespace, verification=Level.UNCHECKED
    )
    try:
        short = grow(fleet, plan.cells * plan.cars_per_cell)
        vehicles, fleet_ids = len(fleet), list(fleet.vehicles)
        with ParkpoolClient(settings) as client:
            tasks = plan.tasks or int(
                3 * len(fleet) * (plan.warmup_s + plan.window_s) / plan.task_seconds
            )
            tasks = min(tasks, 60_000)
            if plan.tasks:
                # A whole job is measured from before it is published to after its last
                # chunk: the $SYS counters tick once a second, so a window cut inside a
                # job of a few seconds would count one edge's traffic and not its tasks.
                before = _sample(gateways, counters)
                started = time.monotonic()
                handle = client.publish("reduce", small_chunks(tasks))
                handle.wait(timeout=600)
            else:
                handle = client.publish("reduce", small_chunks(tasks))
                time.sleep(plan.warmup_s)
                before = _sample(gateways, counters)
                started = time.monotonic()
                time.sleep(plan.window_s)
            elapsed = time.monotonic() - started
            after = _sample(gateways, counters)
            if not plan.tasks:
                client.cancel(handle.job_id)
            done = handle.progress.done
    finally:
        counters.close()
        fleet.stop_all()
    cars_per_cell = Counter(fleet.cell_of(v) for v in fleet_ids)
    return {
        **_rates(before, after, elapsed, gateways),
        "cell_vehicles": [cars_per_cell[f"cell-{c}"] for c in range(plan.cells)],
        "cells": plan.cells,
        "gateways": len(gateways),
        "vehicles": vehicles,
        "stopped_short": short,
        "job_chunks_done": done,
        "plan": asdict(plan),
    }


def _sample(gateways: list[tuple[str, int, int]], counters: BrokerCounters) -> dict[str, Any]:
    return {"brokers": counters.snapshot(), "gateways": [scrape(port) for _, port, _ in gateways]}


def _rates(
    before: dict[str, Any],
    after: dict[str, Any],
    elapsed: float,
    gateways: list[tuple[str, int, int]],
) -> dict[str, Any]:
    def gateway_delta(index: int, direction: str) -> float:
        total = 0.0
        for (name, labels), value in after["gateways"][index].items():
            if name == MESSAGES and dict(labels).get("direction") == direction:
                total += value - before["gateways"][index].get((name, labels), 0.0)
        return total

    def by_kind(direction: str) -> dict[str, float]:
        """Mean per gateway, msgs/s, by topic kind: which part is periodic, which work."""
        kinds: dict[str, float] = {}
        for index in range(len(gateways)):
            for (name, labels), value in after["gateways"][index].items():
                found = dict(labels)
                if name == MESSAGES and found.get("direction") == direction:
                    was = before["gateways"][index].get((name, labels), 0.0)
                    kinds[found["kind"]] = kinds.get(found["kind"], 0.0) + value - was
        return {k: round(v / elapsed / len(gateways), 1) for k, v in sorted(kinds.items()) if v}

    completed = sum(
        a.get(COMPLETED, 0.0) - b.get(COMPLETED, 0.0)
        for a, b in zip(after["gateways"], before["gateways"], strict=True)
    )
    inbound = [gateway_delta(i, "in") / elapsed for i in range(len(gateways))]
    outbound = [gateway_delta(i, "out") / elapsed for i in range(len(gateways))]
    broker_in, broker_out = [], []
    for b, a in zip(before["brokers"], after["brokers"], strict=True):
        monitor = a["monitor"] - b["monitor"]
        broker_in.append((a.get("received", 0) - b.get("received", 0)) / elapsed)
        broker_out.append((a.get("sent", 0) - b.get("sent", 0) - monitor) / elapsed)
    rss = [rss_mb(pid)[0] for _, _, pid in gateways]
    known = [a.get(("parkpool_fleet_vehicles_known", ()), 0.0) for a in after["gateways"]]
    per_gateway = [
        a.get(COMPLETED, 0.0) - b.get(COMPLETED, 0.0)
        for a, b in zip(after["gateways"], before["gateways"], strict=True)
    ]
    return {
        "window_s": round(elapsed, 1),
        "tasks_completed": int(completed),
        "tasks_per_s": round(completed / elapsed, 1),
        "gateway_in_per_s": round(sum(inbound) / len(inbound), 1),
        "gateway_in_per_s_max": round(max(inbound), 1),
        "gateway_out_per_s": round(sum(outbound) / len(outbound), 1),
        "gateway_in_by_kind": by_kind("in"),
        "gateway_out_by_kind": by_kind("out"),
        "broker_in_per_s": round(sum(broker_in) / len(broker_in), 1),
        "broker_out_per_s": round(sum(broker_out) / len(broker_out), 1),
        "deliveries_per_task": round(sum(broker_out) * elapsed / max(completed, 1), 2),
        "gateway_rss_mb": max(rss),
        "gateway_vehicles_known": [int(k) for k in known],
        "gateway_tasks_completed": [int(n) for n in per_gateway],
    }


def cells_line(run_dir: Path, cars_per_cell: int, window_s: float) -> dict[str, Any]:
    """The bench line: 1, 2 and 3 cells, then the single-broker baseline."""
    runs = [
        run_cells(CellsPlan(n, cars_per_cell=cars_per_cell, window_s=window_s), run_dir)
        for n in (1, 2, 3)
    ]
    baseline = [
        run_cells(
            CellsPlan(
                1,
                gateways_per_cell=6,
                cars_per_cell=cars,
                gateways_per_vehicle=0,
                window_s=window_s,
            ),
            run_dir,
        )
        for cars in (cars_per_cell, 3 * cars_per_cell)
    ]
    first, last = runs[0], runs[-1]
    return {
        "name": "cells",
        "per_gateway_inbound_ratio_3_to_1": round(
            last["gateway_in_per_s"] / max(first["gateway_in_per_s"], 1e-9), 3
        ),
        "deliveries_per_task": last["deliveries_per_task"],
        "tasks_per_s": last["tasks_per_s"],
        "gateway_rss_mb": last["gateway_rss_mb"],
        "runs": runs,
        "baseline": {
            "design": "one broker, 6 gateways, every car talks to every gateway",
            "per_gateway_inbound_ratio_3x_fleet": round(
                baseline[1]["gateway_in_per_s"] / max(baseline[0]["gateway_in_per_s"], 1e-9), 3
            ),
            "runs": baseline,
        },
    }


def main() -> int:
    """``python -m tests.bench_cells``: the ``cells`` line alone."""
    import argparse
    import json

    from parkpool.runtime import logs
    from tests.bench import machine
    from tests.bench_scale import raise_fd_limit

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cars-per-cell", type=int, default=1500)
    p.add_argument("--window-s", type=float, default=20.0)
    args = p.parse_args()
    logs.configure("error")
    raise_fd_limit()
    run_dir = Path(".run/bench")
    run_dir.mkdir(parents=True, exist_ok=True)
    line = cells_line(run_dir, args.cars_per_cell, args.window_s)
    print(json.dumps({**line, "machine": machine()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
