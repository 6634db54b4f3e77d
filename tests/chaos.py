# SPDX-License-Identifier: Apache-2.0
"""``make chaos``: a sustained workload while gateways, vehicles and the brokers fail.

Runs on its own embedded brokers: gateways as real child processes (SIGKILLed and
restarted), a simulated fleet in this process (vehicles killed without a clean
disconnect and replaced), Mosquitto restarted with persistence on, Tansu (the durable
Kafka) SIGKILLed and restarted on its port, the object store under it SIGKILLed and
restarted, and an extra gateway joining and leaving to force rebalances. The cell
scenario runs two cells (a Mosquitto each, with its own gateways and cars, one Kafka task
group): it kills gateways, restarts one cell's broker, kills cars, changes a cell's
gateway roster (a gateway leaves and comes back, so its cars re-pick their gateways by
rendezvous), and kills Kafka and the store too. Prints one JSON line per run and exits
non-zero unless, in every run, ``lost == 0`` and ``duplicates_to_caller == 0`` and every
fault was injected.

``run_chaos`` is also what the reduced scenario in ``tests/test_chaos.py`` calls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message

from parkpool.app.children import role_env
from parkpool.broker_config.launcher import STORE_BUCKET, EmbeddedBrokers, free_port
from parkpool.broker_config.tansu_groups import GROUPS_PREFIX
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobHandle, JobState
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import logs
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.runtime.signals import exit_on_sigterm
from parkpool.schemas import KafkaTopics, Result, decode
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.helpers import read_all

NAMESPACE = "chaos"


@dataclass(frozen=True)
class ChaosPlan:
    tasks: int = 2000
    vehicles: int = 50
    gateways: int = 2  # per cell
    cells: int = 1
    roster_changes: int = 0  # a gateway of the last cell leaves (SIGTERM) and comes back
    gateway_kills: int = 3
    vehicle_waves: int = 3  # each wave kills vehicle_kill_fraction / waves of the fleet
    vehicle_kill_fraction: float = 0.3
    broker_restarts: int = 1
    kafka_restarts: int = 1  # Tansu SIGKILLed, down for down_s, started on its port
    store_restarts: int = 1  # the object store under Tansu, the same way
    down_s: float = 1.0
    rebalances: int = 1
    task_seconds: float = 1.0  # simulated compute per task
    # Faults are spread over this span of the job's progress, so they all land while work
    # flows however fast the system runs; min_fault_gap_s lets each one take hold first.
    fault_span: tuple[float, float] = (0.05, 0.7)
    min_fault_gap_s: float = 2.0
    lease_seconds: float = 5.0
    session_timeout_ms: int = 3000
    timeout_s: float = 900.0
    seed: int = 1


@dataclass
class ChaosReport:
    tasks: int = 0
    completed: int = 0
    lost: int = 0
    duplicates_to_caller: int = 0
    duplicates_on_results_topic: int = 0
    wrong_values: int = 0
    gateway_kills: int = 0
    vehicle_kills: int = 0
    broker_restarts: int = 0
    kafka_restarts: int = 0
    store_restarts: int = 0
    rebalances: int = 0
    roster_changes: int = 0
    # Tansu 0.6 groups left waiting for a departed leader, and unstuck (tansu_groups).
    tansu_leaders_cleared: int = 0
    wall_s: float = 0.0

    def ok(self, plan: ChaosPlan) -> bool:
        injected = (
            self.gateway_kills >= plan.gateway_kills
            and self.vehicle_kills >= int(plan.vehicles * plan.vehicle_kill_fraction)
            and self.broker_restarts >= plan.broker_restarts
            and self.kafka_restarts >= plan.kafka_restarts
            and self.store_restarts >= plan.store_restarts
            and self.rebalances >= plan.rebalances
            and self.roster_changes >= plan.roster_changes
        )
        return (
            injected and self.lost == 0 and self.duplicates_to_caller == 0 and not self.wrong_values
        )


class Gateways:
    """Gateway child processes, killable and restartable by id."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, cells: dict[str, dict[str, str]] | None = None
    ) -> None:
        self.env = env
        self.cells = cells or {}  # gateway id -> its cell's environment (broker port)
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self._starts = Counter[str]()

    def start(self, gateway_id: str) -> None:
        self._starts[gateway_id] += 1
        log = (self.log_dir / f"{gateway_id}-{self._starts[gateway_id]}.log").open("wb")
        self.ports[gateway_id] = free_port()
        env = {
            **self.env,
            **self.cells.get(gateway_id, {}),
            "PARKPOOL_GATEWAY_ID": gateway_id,
            "PARKPOOL_METRICS_PORT": str(self.ports[gateway_id]),
        }
        self.children[gateway_id] = subprocess.Popen(
            [sys.executable, "-m", "parkpool.app.cli", "gateway"], env=env, stdout=log, stderr=log
        )
        log.close()

    def kill(self, gateway_id: str) -> None:
        child = self.children.pop(gateway_id)
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    def stop(self, gateway_id: str) -> None:
        child = self.children.pop(gateway_id)
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def stop_all(self) -> None:
        for gateway_id in list(self.children):
            self.stop(gateway_id)

    def snapshot(self) -> str:
        """Key gauges and counters of every live gateway, to explain a stall."""
        wanted = (
            "parkpool_gateway_leases ",
            "parkpool_gateway_queued_tasks ",
            "parkpool_gateway_paused_partitions ",
            "parkpool_gateway_tasks_total",
        )
        parts = []
        for gateway_id in self.children:
            url = f"http://127.0.0.1:{self.ports[gateway_id]}/metrics"
            try:
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except (OSError, http.client.HTTPException) as exc:  # it may be dying
                parts.append(f"{gateway_id}: unreachable ({exc!r})")
                continue
            lines = [line for line in text.splitlines() if line.startswith(wanted)]
            parts.append(f"{gateway_id}: " + "; ".join([*lines, _owned(text)]))
        return "\n".join([*parts, _group_summary(self.log_dir)])


def _owned(metrics_text: str) -> str:
    """The partitions a gateway exports lag for (those it owns), as ``partition:lag``."""
    owned = re.findall(
        r'^parkpool_gateway_kafka_lag\{partition="(\d+)"\} (\S+)', metrics_text, re.M
    )
    return "owns " + ",".join(
        f"{p}:{float(lag):g}" for p, lag in sorted(owned, key=lambda o: int(o[0]))
    )


def _group_summary(run_dir: Path) -> str:
    """The gateways' consumer group as the durable Tansu last wrote it: its state, leader
    and members (the store keeps it as a plain file under the run directory)."""
    path = run_dir / "store" / STORE_BUCKET / GROUPS_PREFIX / f"{NAMESPACE}.gateways.json"
    try:
        group = json.loads(path.read_bytes())
        ((state, detail),) = group["state"].items()
        leader = detail.get("leader") if isinstance(detail, dict) else None
        members = sorted(str(m)[-8:] for m in group["members"])
        generation = group["generation_id"]
        return f"group {state} gen {generation} leader {str(leader)[-8:]} members {members}"
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        return f"group unreadable ({exc!r})"


def _fleet_summary(fleet: Fleet) -> str:
    """Cars and the tasks they hold, per cell, and how many cars talk to each gateway:
    a stall with idle cars and queued tasks is the cars', one with neither the group's."""
    cars, held, picks = Counter[str](), Counter[str](), Counter[str]()
    for vehicle in list(fleet.vehicles.values()):
        cell = fleet.cell_of(vehicle.vehicle_id)
        cars[cell] += 1
        held[cell] += vehicle.held
        picks.update(vehicle.gateways.mine())
    per_cell = ", ".join(f"{c or 'one'} {cars[c]} holding {held[c]}" for c in sorted(cars))
    return f"cars {per_cell}; cars per gateway {dict(sorted(picks.items()))}"


def chunks(count: int) -> list[ChunkSpec]:
    """Chunk i sums [i], so every result says which chunk it belongs to."""
    return [ChunkSpec({"op": "sum"}, {"x": np.array([float(i)])}) for i in range(count)]


def fault_thresholds(plan: ChaosPlan, faults: int) -> list[int]:
    """How many chunks must be done before each fault: evenly over ``fault_span``."""
    low, high = plan.fault_span
    step = (high - low) / max(1, faults - 1)
    return [int(plan.tasks * (low + step * i)) for i in range(faults)]


def fault_schedule(plan: ChaosPlan) -> list[str]:
    """Faults taken round-robin by kind, so that each kind hits several phases of the run."""
    queues = [
        ["gateway"] * plan.gateway_kills,
        ["vehicles"] * plan.vehicle_waves,
        ["rebalance"] * plan.rebalances,
        ["broker"] * plan.broker_restarts,
        ["kafka"] * plan.kafka_restarts,
        ["store"] * plan.store_restarts,
        ["roster"] * plan.roster_changes,
    ]
    order: list[str] = []
    while any(queues):
        order += [queue.pop() for queue in queues if queue]
    return order


def gateway_ids(plan: ChaosPlan) -> list[str]:
    """Every gateway's id: ``gw<i>`` with one cell, ``c<cell>-gw<i>`` with several."""
    if plan.cells == 1:
        return [f"gw{i}" for i in range(plan.gateways)]
    return [f"c{c}-gw{i}" for c in range(plan.cells) for i in range(plan.gateways)]


@contextmanager
def chaos_system(plan: ChaosPlan, run_dir: Path) -> Iterator[tuple[Any, Gateways, Fleet]]:
    # fresh: a run dir kept from an earlier run must not bring its Kafka records along.
    with EmbeddedBrokers(run_dir=run_dir, cells=plan.cells, fresh=True) as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        env = {
            **role_env(brokers, NAMESPACE),
            "PARKPOOL_SESSION_TIMEOUT_MS": str(plan.session_timeout_ms),
            "PARKPOOL_LEASE_SECONDS": str(plan.lease_seconds),
            "PARKPOOL_MAX_ATTEMPTS": "1000",  # chaos kills many cars; no task is poison here
            "PARKPOOL_DRAIN_SECONDS": "5",
        }
        ids = gateway_ids(plan)
        ports = brokers.mqtt_ports
        cell_env = {
            gateway_id: {"PARKPOOL_MQTT_PORT": str(ports[n // plan.gateways])}
            for n, gateway_id in enumerate(ids)
        }
        gateways = Gateways(env, run_dir, cell_env)
        cells = {f"cell-{c}": MqttConnection(brokers.mqtt_host, p) for c, p in enumerate(ports)}
        template = WorkerSettings(
            "template",
            namespace=NAMESPACE,
            backend="numpy",
            heartbeat_s=1.0,
            simulated_delay_s=plan.task_seconds,
        )
        fleet = Fleet(template, prefix="car", cells=cells)
        try:
            for gateway_id in ids:
                gateways.start(gateway_id)
            fleet.add(plan.vehicles)
            yield brokers, gateways, fleet
        finally:
            fleet.stop_all()
            gateways.stop_all()


def run_chaos(
    plan: ChaosPlan, run_dir: Path, say: Callable[[str], None] = lambda _line: None
) -> ChaosReport:
    """Run the plan on fresh embedded brokers in ``run_dir``; ``say`` gets progress lines."""
    rng = random.Random(plan.seed)
    report = ChaosReport(tasks=plan.tasks)
    started = time.monotonic()
    with chaos_system(plan, run_dir) as (brokers, gateways, fleet):
        kafka = KafkaConnection(brokers.kafka_bootstrap)
        with ParkpoolClient(
            ProducerSettings(kafka, NAMESPACE, verification=Level.UNCHECKED)
        ) as client:
            handle = client.publish("reduce", chunks(plan.tasks))
            faults = fault_schedule(plan)
            inject = _injector(plan, rng, report, brokers, gateways, fleet)
            snapshot = lambda: f"{gateways.snapshot()}\n{_fleet_summary(fleet)}"  # noqa: E731
            _drive(handle, faults, inject, plan, say, snapshot)
            _account(handle, report)
        report.tansu_leaders_cleared = brokers.group_leaders_cleared
        report.duplicates_on_results_topic = _results_topic_duplicates(kafka, report.completed)
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _injector(
    plan: ChaosPlan,
    rng: random.Random,
    report: ChaosReport,
    brokers: Any,
    gateways: Gateways,
    fleet: Fleet,
) -> Callable[[str], None]:
    per_wave = max(1, round(plan.vehicles * plan.vehicle_kill_fraction / plan.vehicle_waves))
    ids = gateway_ids(plan)

    def inject(kind: str) -> None:
        if kind == "gateway":
            victim = ids[report.gateway_kills % len(ids)]
            gateways.kill(victim)
            gateways.start(victim)
            report.gateway_kills += 1
        elif kind == "vehicles":
            victims = rng.sample(sorted(fleet.vehicles), min(per_wave, len(fleet.vehicles)))
            for vehicle_id in victims:
                fleet.kill(vehicle_id)
            fleet.add(len(victims))
            report.vehicle_kills += len(victims)
        elif kind == "broker":
            brokers.restart_mosquitto(report.broker_restarts % plan.cells)
            report.broker_restarts += 1
        elif kind == "kafka":
            brokers.kill_kafka()
            time.sleep(plan.down_s)
            brokers.start_kafka()
            report.kafka_restarts += 1
        elif kind == "store":
            brokers.kill_store()
            time.sleep(plan.down_s)
            brokers.start_store()
            report.store_restarts += 1
        elif kind == "roster":
            # The last cell's roster loses a gateway (its retained status says offline),
            # so its cars re-pick their K gateways, then regains it.
            victim = ids[-1]
            gateways.stop(victim)
            time.sleep(plan.session_timeout_ms / 1000)
            gateways.start(victim)
            report.roster_changes += 1
        else:
            # Rebalance: one gateway leaves the group cleanly (SIGTERM) with leases in
            # flight, the other takes its partitions, then it rejoins and takes some back.
            # (A brand-new member joining while both stay stalls Tansu 0.6.0's cooperative
            # rebalance; see docs/DECISIONS.md.)
            victim = ids[(report.rebalances + 1) % len(ids)]
            gateways.stop(victim)
            time.sleep(plan.session_timeout_ms / 1000)
            gateways.start(victim)
            report.rebalances += 1

    return inject


def _drive(
    handle: JobHandle,
    faults: list[str],
    inject: Callable[[str], None],
    plan: ChaosPlan,
    say: Callable[[str], None],
    snapshot: Callable[[], str],
) -> None:
    started = time.monotonic()
    thresholds = fault_thresholds(plan, len(faults))
    last_done = -1
    deadline = started + plan.timeout_s
    last_fault = started
    next_report = started + 5.0
    while True:
        with suppress(TimeoutError):
            handle.wait(timeout=0.2)
            return  # done; ChaosReport.ok() fails the run if faults were left un-injected
        now = time.monotonic()
        if now > deadline:
            say(f"t={now - started:.0f}s timed out at {handle.progress.done}:\n{snapshot()}")
            return
        done = handle.progress.done
        if now >= next_report:
            say(f"t={now - started:.0f}s done={done}/{handle.n_chunks}")
            if done == last_done:
                say(f"no progress for 5 s:\n{snapshot()}")
            last_done, next_report = done, now + 5.0
        if faults and done >= thresholds[0] and now - last_fault >= plan.min_fault_gap_s:
            say(f"t={now - started:.0f}s done={done} inject {faults[0]}")
            thresholds.pop(0)
            inject(faults.pop(0))
            last_fault = time.monotonic()


def _account(handle: JobHandle, report: ChaosReport) -> None:
    seen = Counter[int]()
    # A run that timed out: count what came, for a few seconds at most, as chunks may
    # still trickle in.
    until = time.monotonic() + 10.0
    with suppress(TimeoutError):
        for chunk in handle.chunks(timeout=1):
            seen[chunk.chunk_id] += 1
            if float(chunk.outputs["value"]) != float(chunk.chunk_id):
                report.wrong_values += 1
            if time.monotonic() > until and handle.state is JobState.RUNNING:
                break
    report.completed = len(seen)
    report.lost = report.tasks - len(seen)
    report.duplicates_to_caller = sum(n - 1 for n in seen.values())


def _results_topic_duplicates(kafka: KafkaConnection, completed: int) -> int:
    """Records on the results topic beyond one per chunk (allowed; the SDK drops them)."""
    topic = KafkaTopics(NAMESPACE).results
    records = _read_topic(kafka, topic)
    assert len(records) >= completed, f"{topic} holds {len(records)} results for {completed}"
    keys = Counter(
        (r.job_id, r.chunk_id) for r in (decode(m.value() or b"", Result) for m in records)
    )
    return sum(n - 1 for n in keys.values())


def _read_topic(kafka: KafkaConnection, topic: str, idle_s: float = 2.0) -> list[Message]:
    """Every record of a topic, read by ``tests.helpers.read_all``, but with fetches that
    may wait 500 ms: all of a job's results share one partition, and Tansu on its store
    lists that partition's batches within the wait (docs/DECISIONS.md)."""
    return read_all(kafka, topic, idle=idle_s, **{"fetch.wait.max.ms": 500})


# The cell scenario of `make chaos`: two cells, their gateways and cars, every fault.
CELL_PLAN = ChaosPlan(
    tasks=2000,
    vehicles=60,
    gateways=2,
    cells=2,
    gateway_kills=2,
    vehicle_waves=2,
    broker_restarts=1,
    rebalances=0,
    roster_changes=1,
)
SCENARIOS = {"single": ChaosPlan(), "cells": CELL_PLAN}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=0, help="override each scenario's task count")
    p.add_argument("--vehicles", type=int, default=0, help="override each scenario's fleet")
    p.add_argument("--seeds", default="1", help="comma-separated seeds; each runs every scenario")
    p.add_argument(
        "--scenario", choices=[*SCENARIOS, "all"], default="all", help="which scenarios to run"
    )
    p.add_argument(
        "--run-dir", type=Path, default=Path(".run/chaos"), help="brokers' and gateways' logs"
    )
    args = p.parse_args()
    logs.configure("error")
    exit_on_sigterm()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    ok = True
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        for name in names:
            plan = replace(
                SCENARIOS[name],
                seed=seed,
                tasks=args.tasks or SCENARIOS[name].tasks,
                vehicles=args.vehicles or SCENARIOS[name].vehicles,
            )
            run_dir = args.run_dir / f"{name}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
            report = run_chaos(plan, run_dir, say=say)
            line = {"name": "chaos", "scenario": name, **asdict(report), "plan": asdict(plan)}
            print(json.dumps(line), flush=True)
            ok &= report.ok(plan)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
