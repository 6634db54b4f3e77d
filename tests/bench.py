# SPDX-License-Identifier: Apache-2.0
"""``make bench``: throughput and latency of the whole path, as JSON lines.

Each line is one JSON object with a ``"name"``. Figures depend on the machine; record
them with the machine in docs/BENCHMARKS.md. This is a benchmark, not a test: it
asserts nothing about speed.

Lines:
- ``mqtt_baseline``: bare paho QoS 1 publisher -> subscriber on the same Mosquitto.
- ``e2e_small_tasks``: small tasks through SDK -> Kafka -> gateway -> MQTT -> vehicles
  -> MQTT -> gateway -> Kafka -> SDK, with the gateway and the fleet in their own
  processes. ``tasks_per_s`` comes from one large job; ``p50_ms``/``p99_ms`` are per
  chunk from submission to delivery to the caller, for single-chunk jobs sent one at a
  time (no queueing), and ``batch_p50_ms``/``batch_p99_ms`` for the large job (queueing
  included).
- ``codec``: encode and decode rate of a 1 MiB task.
- ``fleet_scale`` and ``backlog_memory``: see ``tests/bench_scale.py``.
- ``preemption``: owner event to no kernel running, and to the gateway releasing the
  car's leases; see ``tests/bench_preemption.py``.
- ``reconnect_spread``: how a simulated fleet comes back after its broker restarts, with
  jittered backoff and without (the baseline, in the same run); see
  ``tests/bench_reconnect.py``.
- ``cells``: per-gateway and per-broker message rates, deliveries per task and gateway
  memory with 1, 2 and 3 cells, beside the single-broker fan-in baseline; see
  ``tests/bench_cells.py``.
- ``bulk_data``: a 4096² gemm through the object store (claim check) and inline, bytes
  per plane, cache hit rate, input rate to cars against the store's bare GET rate, and
  the durable Kafka's produce rate beside the in-memory one; see ``tests/bench_bulk.py``.
- ``attach``: following a job by id on a results topic of 1M records, beside reading
  every partition from offset 0 (the baseline, in the same run); see
  ``tests/bench_attach.py``.
- ``training``: data-parallel SGD with a kernel package (examples/parkpool-train) on a
  simulated fleet, beside the same training in one process; see
  ``tests/bench_training.py``.
- ``verification``: the Freivalds check's cost against a 4096² gemm, and a fleet of 16
  simulated cars through the SDK's verifier: replication overhead, how soon a liar is
  quarantined, wrong chunks that reached the caller, false quarantines; see
  ``tests/bench_verification.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from parkpool.app.children import role, role_env
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import logs
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.sealing import (
    BoxKey,
    GatewayBox,
    open_result,
    open_task,
    seal_outputs,
    seal_task,
)
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.runtime.signals import exit_on_sigterm
from parkpool.schemas import Result, TaskChunk, decode, encode
from parkpool.schemas.reputation import Level
from tests.bench_attach import attach_line
from tests.bench_bulk import bulk_data_line, machine
from tests.bench_cells import cells_line
from tests.bench_preemption import preemption
from tests.bench_reconnect import reconnect_spread
from tests.bench_scale import backlog_memory, fleet_scale, raise_fd_limit
from tests.bench_training import training_line
from tests.bench_verification import verification_line

NAMESPACE = "bench"


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def mqtt_baseline(conn: MqttConnection, count: int, size: int = 512) -> float:
    """Messages per second for one QoS 1 publisher and one subscriber in this process."""
    got = threading.Event()
    received = 0

    def on_message(*_args: Any) -> None:
        nonlocal received
        received += 1
        if received == count:
            got.set()

    sub_ready, pub_ready, subscribed = threading.Event(), threading.Event(), threading.Event()
    sub, pub = new_client("bench-sub", conn), new_client("bench-pub", conn)
    sub.on_connect = lambda *_a: sub_ready.set()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_message = on_message
    pub.on_connect = lambda *_a: pub_ready.set()
    pub.max_inflight_messages_set(100)
    connect_and_wait(sub, conn, connected=sub_ready)
    sub.subscribe("bench/baseline", qos=1)
    subscribed.wait(10)
    connect_and_wait(pub, conn, connected=pub_ready)
    payload = os.urandom(size)
    started = time.perf_counter()
    for _ in range(count):
        pub.publish("bench/baseline", payload, qos=1)
    got.wait(120)
    rate = received / (time.perf_counter() - started)
    for client in (sub, pub):
        client.disconnect()
        client.loop_stop()
    return rate


def percentiles(values: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 99])
    return round(float(p50), 2), round(float(p99), 2)


def small_task_chunks(count: int) -> list[ChunkSpec]:
    x = np.arange(16, dtype=np.float64)
    return [ChunkSpec({"op": "sum"}, {"x": x}) for _ in range(count)]


def e2e(client: ParkpoolClient, tasks: int, probes: int) -> dict[str, Any]:
    # Warm-up: the gateway's group join and every vehicle's first pull happen here.
    client.publish("reduce", small_task_chunks(50)).wait(timeout=120)
    latencies: list[float] = []
    for _ in range(probes):
        probe = client.publish("reduce", small_task_chunks(1))
        probe.wait(timeout=30)
        latencies += probe.latencies
    started = time.perf_counter()
    handle = client.publish("reduce", small_task_chunks(tasks))
    handle.wait(timeout=600)
    elapsed = time.perf_counter() - started
    p50, p99 = percentiles(latencies)
    b50, b99 = percentiles(handle.latencies)
    return {
        "tasks": tasks,
        "tasks_per_s": round(tasks / elapsed, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        "batch_p50_ms": b50,
        "batch_p99_ms": b99,
        "duplicates": handle.progress.duplicates,
    }


def codec(repeat: int = 50) -> dict[str, Any]:
    chunk = TaskChunk(
        "bench",
        0,
        1,
        "gemm",
        {},
        {"a": np.ones((512, 512), np.float32)},
        "bench.results",
        time.time() + 60,
        time.time(),
    )
    started = time.perf_counter()
    for _ in range(repeat):
        data = encode(chunk)
    encoded = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeat):
        decode(data, TaskChunk)
    decoded = time.perf_counter() - started
    mib = len(data) / 2**20 * repeat
    return {
        "name": "codec",
        "message_mib": round(len(data) / 2**20, 3),
        "encode_mib_per_s": round(mib / encoded, 1),
        "decode_mib_per_s": round(mib / decoded, 1),
    }


def sealing(repeat: int = 50) -> dict[str, Any]:
    """What a confidential job costs each party, per 1 MiB chunk, with no broker involved."""
    gateway, car, reply = BoxKey.generate(), BoxKey.generate(), BoxKey.generate()
    box = GatewayBox((gateway,))
    now = time.time()
    inputs = {"a": np.ones((512, 512), np.float32)}
    task = TaskChunk("bench", 0, 1, "gemm", {}, inputs, "bench.results", now + 60, now)
    result = Result("bench", 0, 1, "car", "gw", 1, 1, inputs, 0.0, now, now)

    def per_call(step: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(repeat):
            step()
        return (time.perf_counter() - started) / repeat

    sealed = seal_task(task, gateway.public, reply.public)
    key = box.rewrap(sealed, car.public)
    outputs = seal_outputs(result, reply.public)
    mib = inputs["a"].nbytes / 2**20
    return {
        "name": "sealing",
        "chunk_mib": mib,
        "sdk_seal_mib_per_s": round(
            mib / per_call(lambda: seal_task(task, gateway.public, reply.public)), 1
        ),
        "gateway_rewrap_us": round(per_call(lambda: box.rewrap(sealed, car.public)) * 1e6, 1),
        "car_open_mib_per_s": round(mib / per_call(lambda: open_task(sealed, key, car)), 1),
        "car_seal_mib_per_s": round(mib / per_call(lambda: seal_outputs(result, reply.public)), 1),
        "sdk_open_mib_per_s": round(mib / per_call(lambda: open_result(outputs, reply)), 1),
        "machine": machine(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vehicles", type=int, default=32)
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--baseline-messages", type=int, default=20_000)
    p.add_argument(
        "--fleet-targets",
        default="2000,10000",
        help="comma-separated fleet sizes for fleet_scale; empty skips it",
    )
    p.add_argument("--fleet-tasks", type=int, default=2000)
    p.add_argument("--backlog-records", type=int, default=1_000_000, help="0 skips backlog_memory")
    p.add_argument("--preemption-events", type=int, default=50, help="0 skips preemption")
    p.add_argument("--reconnect-cars", type=int, default=1000, help="0 skips reconnect_spread")
    p.add_argument("--broker-down-s", type=float, default=3.0)
    p.add_argument("--cells-cars", type=int, default=1500, help="cars per cell; 0 skips cells")
    p.add_argument("--cells-window-s", type=float, default=20.0)
    p.add_argument("--bulk-size", type=int, default=4096, help="gemm side; 0 skips bulk_data")
    p.add_argument("--bulk-cars", type=int, default=8)
    p.add_argument(
        "--verification-chunks", type=int, default=5000, help="per kernel; 0 skips verification"
    )
    p.add_argument(
        "--attach-records", type=int, default=1_000_000, help="results topic size; 0 skips attach"
    )
    p.add_argument("--training-rounds", type=int, default=30, help="0 skips training")
    p.add_argument("--training-cars", type=int, default=4)
    args = p.parse_args()
    logs.configure("error")
    exit_on_sigterm()
    raise_fd_limit()
    run_dir = Path(".run/bench")
    run_dir.mkdir(parents=True, exist_ok=True)
    emit(codec())
    emit(sealing())
    if args.verification_chunks:  # first, while nothing else runs: it times a gemm
        emit({**verification_line(args.verification_chunks), "machine": machine()})
    with EmbeddedBrokers(run_dir=run_dir) as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
        baseline = mqtt_baseline(mqtt, args.baseline_messages)
        emit(
            {
                "name": "mqtt_baseline",
                "qos": 1,
                "payload_bytes": 512,
                "msgs_per_s": round(baseline, 1),
            }
        )
        env = role_env(brokers, NAMESPACE)
        sim = ["sim", "--vehicles", str(args.vehicles), "--backend", "numpy"]
        with (
            role("gateway", ["gateway", "--gateway-id", "bench-gw"], env, run_dir),
            role("fleet", sim, env, run_dir),
        ):
            settings = ProducerSettings(
                KafkaConnection(brokers.kafka_bootstrap), NAMESPACE, verification=Level.UNCHECKED
            )
            with ParkpoolClient(settings) as client:
                result = e2e(client, args.tasks, args.probes)
        emit(
            {
                "name": "e2e_small_tasks",
                "vehicles": args.vehicles,
                **result,
                "baseline_mqtt_msgs_per_s": round(baseline, 1),
                "ratio": round(result["tasks_per_s"] / baseline, 4),
                "machine": machine(),
            }
        )
        targets = [int(t) for t in args.fleet_targets.split(",") if t.strip()]
        if targets:
            for line in fleet_scale(brokers, run_dir, targets, args.fleet_tasks):
                emit({**line, "machine": machine()})
        if args.preemption_events:
            emit({**preemption(brokers, args.preemption_events), "machine": machine()})
        if args.reconnect_cars:
            spread = reconnect_spread(brokers, args.reconnect_cars, args.broker_down_s)
            emit({**spread, "machine": machine()})
        if args.backlog_records:
            for line in backlog_memory(brokers, run_dir, args.backlog_records):
                emit({**line, "machine": machine()})
    if args.cells_cars:  # its own brokers: one Mosquitto per cell
        emit({**cells_line(run_dir, args.cells_cars, args.cells_window_s), "machine": machine()})
    if args.attach_records:  # its own brokers, in memory (see tests/bench_attach.py)
        emit({**attach_line(run_dir, args.attach_records), "machine": machine()})
    if args.training_rounds:  # its own brokers, and the example package installed by pip
        line = training_line(run_dir, args.training_rounds, args.training_cars, shards=4)
        emit({**line, "machine": machine()})
    if args.bulk_size:  # its own brokers: durable for the claim check, in memory inline
        line = bulk_data_line(run_dir, args.bulk_size, 512, args.bulk_cars)
        emit({**line, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
