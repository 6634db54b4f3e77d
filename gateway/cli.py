# SPDX-License-Identifier: Apache-2.0
"""``parkpool gateway``: run one edge gateway until SIGTERM."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from parkpool.gateway.gateway import Gateway, GatewaySettings
from parkpool.runtime import logs
from parkpool.runtime.http import StatusServer, request_counter
from parkpool.runtime.kafka import TASK_FETCH_WAIT_MS
from parkpool.runtime.settings import (
    add_kafka_options,
    add_mqtt_options,
    add_namespace_option,
    add_option,
    add_store_options,
    kafka_from_args,
    mqtt_from_args,
    store_from_args,
)
from parkpool.runtime.signals import stop_event


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("gateway", help="run an edge gateway (Kafka <-> MQTT)")
    add_kafka_options(p)
    add_mqtt_options(p)
    add_store_options(p)
    add_namespace_option(p)
    add_option(
        p,
        "--gateway-id",
        "PARKPOOL_GATEWAY_ID",
        socket.gethostname().split(".")[0],
        "this gateway's id; also its MQTT client id and session",
    )
    add_option(
        p,
        "--group-id",
        "PARKPOOL_GROUP_ID",
        "",
        "Kafka consumer group (default <namespace>.gateways)",
    )
    add_option(
        p,
        "--lease-seconds",
        "PARKPOOL_LEASE_SECONDS",
        30.0,
        "how long a vehicle may hold a task before it goes to another",
        float,
    )
    add_option(
        p,
        "--max-lease-seconds",
        "PARKPOOL_MAX_LEASE_SECONDS",
        900.0,
        "how long a vehicle's heartbeats may keep one lease alive in all",
        float,
    )
    add_option(
        p,
        "--task-fetch-wait-ms",
        "PARKPOOL_TASK_FETCH_WAIT_MS",
        TASK_FETCH_WAIT_MS,
        "how long a task fetch waits at first; doubled, up to 5000, while a partition stalls",
        int,
    )
    add_option(
        p,
        "--max-attempts",
        "PARKPOOL_MAX_ATTEMPTS",
        5,
        "failed attempts before a task is dead-lettered",
        int,
    )
    add_option(
        p,
        "--window",
        "PARKPOOL_WINDOW",
        1024,
        "in-flight tasks per partition before it is paused (a count, not an offset span)",
        int,
    )
    add_option(
        p,
        "--window-span",
        "PARKPOOL_WINDOW_SPAN",
        0,
        "how many offsets past the lowest unfinished one a partition may read (0: 64 x window)",
        int,
    )
    add_option(
        p,
        "--max-in-flight",
        "PARKPOOL_MAX_IN_FLIGHT",
        4096,
        "tasks read and not finished, over all partitions, before reading pauses",
        int,
    )
    add_option(
        p,
        "--cell",
        "PARKPOOL_CELL",
        "",
        "the MQTT cell (one broker or broker cluster) this gateway serves; a label only",
    )
    add_option(
        p,
        "--max-vehicles",
        "PARKPOOL_MAX_VEHICLES",
        200_000,
        "cars this gateway keeps state for at most (about K x cell cars / cell gateways)",
        int,
    )
    add_option(
        p,
        "--max-batch",
        "PARKPOOL_MAX_BATCH",
        8,
        "tasks sent in one message to a car with several credits",
        int,
    )
    add_option(
        p,
        "--standby-after-s",
        "PARKPOOL_STANDBY_AFTER_S",
        30.0,
        "with no car heard for this long, leave the task group so other cells take the work",
        float,
    )
    add_option(
        p,
        "--session-timeout-ms",
        "PARKPOOL_SESSION_TIMEOUT_MS",
        6000,
        "Kafka group session timeout; also bounds how fast a restart rejoins",
        int,
    )
    add_option(
        p,
        "--metrics-port",
        "PARKPOOL_METRICS_PORT",
        0,
        "serve /metrics, /healthz, /readyz and /status on this port (0: off)",
        int,
    )
    add_option(
        p,
        "--drain-seconds",
        "PARKPOOL_DRAIN_SECONDS",
        20.0,
        "on SIGTERM, how long running leases may finish before they are revoked",
        float,
    )
    add_option(
        p,
        "--kernel-grace-s",
        "PARKPOOL_KERNEL_GRACE_S",
        30.0,
        "after a start, seconds to wait for cars to announce a plugin kernel before its "
        "tasks are dead-lettered as unknown_kernel",
        float,
    )
    add_option(
        p,
        "--pull-rate",
        "PARKPOOL_PULL_RATE",
        50.0,
        "pulls per second one vehicle may send; the excess is dropped and counted",
        float,
    )
    add_option(
        p,
        "--result-rate",
        "PARKPOOL_RESULT_RATE",
        50.0,
        "results per second one vehicle may send; the excess is dropped and counted",
        float,
    )
    add_option(
        p,
        "--signing-key",
        "PARKPOOL_SIGNING_KEY",
        "",
        "Ed25519 private key file (parkpool keys generate) that signs every assignment; "
        "empty: unsigned (vehicles that trust a key will refuse the work)",
    )
    add_option(
        p,
        "--vehicle-keys",
        "PARKPOOL_VEHICLE_KEYS",
        "",
        "directory of enrolled cars' public keys (<id>.pub); results must carry a valid "
        "signature by their car; empty: results are not signed",
    )
    add_option(
        p,
        "--box-key",
        "PARKPOOL_BOX_KEY",
        "",
        "X25519 private key file(s), comma-separated, newest first (parkpool keys generate "
        "--box): they open confidential jobs' data keys; empty: such jobs are dead-lettered",
    )
    add_option(
        p,
        "--metrics-addr",
        "PARKPOOL_METRICS_ADDR",
        "127.0.0.1",
        "address the metrics port binds to",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        gateway_id=args.gateway_id,
        kafka=kafka_from_args(args),
        mqtt=mqtt_from_args(args),
        namespace=args.namespace,
        group_id=args.group_id,
        lease_seconds=args.lease_seconds,
        max_lease_seconds=args.max_lease_seconds,
        task_fetch_wait_ms=args.task_fetch_wait_ms,
        max_attempts=args.max_attempts,
        window=args.window,
        window_span=args.window_span,
        max_in_flight=args.max_in_flight,
        cell=args.cell,
        max_vehicles=args.max_vehicles,
        standby_after_s=args.standby_after_s,
        max_batch=args.max_batch,
        session_timeout_ms=args.session_timeout_ms,
        drain_seconds=args.drain_seconds,
        pull_rate=args.pull_rate,
        kernel_grace_s=args.kernel_grace_s,
        result_rate=args.result_rate,
        signing_key=Path(args.signing_key) if args.signing_key else None,
        vehicle_keys=Path(args.vehicle_keys) if args.vehicle_keys else None,
        box_keys=tuple(Path(p) for p in args.box_key.split(",") if p),
        store=store_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    logs.configure()
    gateway = Gateway(settings_from_args(args))
    status: StatusServer | None = None
    if args.metrics_port:
        registry = gateway.metrics.registry
        probes = (gateway.health, gateway.readiness)
        counter = request_counter(registry)
        server = StatusServer(
            args.metrics_addr,
            args.metrics_port,
            registry,
            *probes,
            requests=counter,
            status=gateway.status_snapshot,
        )
        status = server.start()
    gateway.stopping = stop_event()
    try:
        gateway.start()
        gateway.run()
    finally:
        if status is not None:
            status.close()
    return 0
