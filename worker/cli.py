# SPDX-License-Identifier: Apache-2.0
"""``parkpool worker`` (one vehicle) and ``parkpool sim`` (a simulated fleet)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from parkpool.runtime import logs
from parkpool.runtime.credentials import CarCredentials
from parkpool.runtime.http import StatusServer
from parkpool.runtime.settings import (
    MqttConnection,
    add_flag,
    add_mqtt_options,
    add_namespace_option,
    add_option,
    mqtt_from_args,
)
from parkpool.runtime.signals import stop_event
from parkpool.schemas.errors import ConfigError
from parkpool.worker.backend import select_backend
from parkpool.worker.boot import check_safeguards, missing_safeguards, start_with_retries
from parkpool.worker.carstate import FileFeed
from parkpool.worker.exporter import serve_metrics
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernel_loading import KernelLoad, load_from_files
from parkpool.worker.policy import OwnerPolicy, PolicyConfig
from parkpool.worker.realistic import RealisticFleet, RealisticPlan
from parkpool.worker.worker import VehicleWorker, WorkerSettings

log = logs.get_logger("parkpool.worker")


def add_parser(subparsers: Any) -> None:
    worker = subparsers.add_parser("worker", help="run one vehicle worker")
    _common(worker)
    add_option(
        worker,
        "--vehicle-id",
        "PARKPOOL_VEHICLE_ID",
        socket.gethostname().split(".")[0],
        "this vehicle's id",
    )
    add_option(
        worker,
        "--car-feed",
        "PARKPOOL_CAR_FEED",
        "",
        "JSON file an in-car integration keeps current (docs/OWNER_POLICY.md); required "
        "unless --dev",
    )
    add_flag(
        worker,
        "--dev",
        "PARKPOOL_DEV",
        "a development bench, not a car: allow running without --car-feed and "
        "--trusted-keys (warned at every start)",
    )
    add_option(
        worker,
        "--result-key",
        "PARKPOOL_RESULT_KEY",
        "",
        "this car's own Ed25519 key (from parkpool fleet enroll); signs every result",
    )
    add_option(
        worker,
        "--owner-policy",
        "PARKPOOL_OWNER_POLICY",
        "",
        "TOML file of owner-policy settings to change; empty: the documented defaults",
    )
    worker.set_defaults(func=run_worker)
    sim = subparsers.add_parser("sim", help="run a simulated fleet of vehicles in one process")
    _common(sim)
    add_option(sim, "--vehicles", "PARKPOOL_SIM_VEHICLES", 16, "how many vehicles", int)
    add_option(sim, "--prefix", "PARKPOOL_SIM_PREFIX", "car", "vehicle id prefix")
    add_option(
        sim,
        "--cells",
        "PARKPOOL_SIM_CELLS",
        "",
        "cells as name=host:port,...: each car joins the cell its id hashes to (rendezvous); "
        "empty: every car on --mqtt-host",
    )
    sim.add_argument(
        "--realistic",
        action="store_true",
        help="cars with parking stays, charging, owners and heat, under the owner policy, "
        "on a sped-up clock; prints a JSON report at the end (docs/OWNER_POLICY.md)",
    )
    add_option(
        sim, "--time-scale", "PARKPOOL_SIM_TIME_SCALE", 360.0, "simulated s per real s", float
    )
    add_option(
        sim, "--sim-hours", "PARKPOOL_SIM_HOURS", 24.0, "simulated hours; 0: until stopped", float
    )
    add_option(sim, "--owner-policy", "PARKPOOL_OWNER_POLICY", "", "TOML of policy changes")
    add_option(
        sim,
        "--credentials-dir",
        "PARKPOOL_CREDENTIALS_DIR",
        "",
        "each simulated car's credentials, <dir>/<vehicle id>/, as parkpool fleet enroll "
        "--car-dir writes them; empty: anonymous, unsigned results",
    )
    sim.set_defaults(func=run_sim)


def _common(p: argparse.ArgumentParser) -> None:
    add_mqtt_options(p)
    add_namespace_option(p)
    add_option(p, "--concurrency", "PARKPOOL_CONCURRENCY", 1, "kernels run at once", int)
    add_option(
        p, "--prefetch", "PARKPOOL_PREFETCH", 1, "extra tasks held so the next one is ready", int
    )
    add_option(p, "--backend", "PARKPOOL_BACKEND", "auto", "auto, cupy or numpy")
    add_option(
        p,
        "--trusted-keys",
        "PARKPOOL_TRUSTED_KEYS",
        "",
        "comma-separated public key files of the gateways allowed to issue work; required "
        "by parkpool worker unless --dev",
    )
    add_option(
        p,
        "--gflops-per-s",
        "PARKPOOL_GFLOPS_PER_S",
        0.0,
        "rate to announce before any task is measured (dwell-aware dispatch); 0: unknown",
        float,
    )
    add_option(p, "--heartbeat-s", "PARKPOOL_HEARTBEAT_S", 15.0, "status heartbeat period", float)
    add_option(
        p,
        "--cache-mb",
        "PARKPOOL_CACHE_MB",
        256,
        "memory for fetched inputs kept by content hash, so one block is fetched once",
        int,
    )
    add_option(
        p,
        "--gateways-per-vehicle",
        "PARKPOOL_GATEWAYS_PER_VEHICLE",
        2,
        "K: the gateways of its cell a car talks to, by rendezvous hash (0: all of them)",
        int,
    )
    add_option(
        p,
        "--metrics-port",
        "PARKPOOL_WORKER_METRICS_PORT",
        -1,
        "serve the agent's process_* and parkpool_build_info on 127.0.0.1 at this port "
        "(0: any free port; -1: not at all)",
        int,
    )
    add_option(
        p,
        "--kernel-manifest",
        "PARKPOOL_KERNEL_MANIFEST",
        "",
        "the fleet's signed manifest of approved kernel packages (parkpool kernels sign); "
        "empty: only the built-in kernels run",
    )
    add_option(
        p,
        "--kernel-keys",
        "PARKPOOL_KERNEL_KEYS",
        "",
        "comma-separated public key files the kernel manifest must be signed with",
    )
    add_option(
        p,
        "--simulated-delay-s",
        "PARKPOOL_SIMULATED_DELAY_S",
        0.0,
        "extra seconds per task, to simulate a slower car",
        float,
    )


def _settings(args: argparse.Namespace, vehicle_id: str) -> WorkerSettings:
    return WorkerSettings(
        vehicle_id=vehicle_id,
        mqtt=mqtt_from_args(args),
        namespace=args.namespace,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        backend=args.backend,
        heartbeat_s=args.heartbeat_s,
        gateways_per_vehicle=args.gateways_per_vehicle,
        simulated_delay_s=args.simulated_delay_s,
        gflops_per_s=args.gflops_per_s,
        trusted_keys=tuple(Path(p) for p in args.trusted_keys.split(",") if p.strip()),
        cache_bytes=max(0, args.cache_mb) << 20,
    )


def run_worker(args: argparse.Namespace) -> int:
    logs.configure()
    # Checked before anything connects: a car must never run a moment without them.
    check_safeguards(
        missing_safeguards(args.car_feed, args.trusted_keys), dev=args.dev, command="worker"
    )
    stop = stop_event()
    policy = PolicyConfig.load(Path(args.owner_policy) if args.owner_policy else None)
    car = FileFeed(Path(args.car_feed)) if args.car_feed else None
    settings = _settings(args, args.vehicle_id)
    if args.result_key:
        settings = replace(settings, result_key=Path(args.result_key))
    backend = select_backend(settings.backend)  # once: a GPU is not set up again per try
    kernels = _kernels(args)

    def make() -> VehicleWorker:
        guard = OwnerPolicy(policy) if car else None
        return VehicleWorker(settings, backend, car=car, policy=guard)

    exporter = _exporter(args, backend.name, "worker", kernels)
    worker = start_with_retries(make, stop)
    if worker is not None:
        log.info("worker_started", vehicle_id=args.vehicle_id, backend=worker.backend.name)
        stop.wait()
        worker.stop("owner_stop")
    if car is not None:
        car.close()
    if exporter is not None:
        exporter.close()
    return 0


def _kernels(args: argparse.Namespace) -> KernelLoad:
    """Load the plugin kernels the manifest approves, before anything connects: a car
    announces its kernels in its first pull."""
    manifest = Path(args.kernel_manifest) if args.kernel_manifest else None
    keys = [Path(p) for p in args.kernel_keys.split(",") if p.strip()]
    return load_from_files(manifest, keys)


def _exporter(
    args: argparse.Namespace, backend: str, role: str, kernels: KernelLoad
) -> StatusServer | None:
    if args.metrics_port < 0:
        return None
    server = serve_metrics(args.metrics_port, backend, role, kernels)
    log.info("metrics_served", url=f"http://127.0.0.1:{server.port}/metrics")
    return server


def run_sim(args: argparse.Namespace) -> int:
    logs.configure()
    # Dozens of vehicles' threads share one GIL here; the default 5 ms switch interval
    # would make each MQTT hand-off wait for a whole slice of some other vehicle.
    sys.setswitchinterval(0.0005)
    stop = stop_event()
    # A simulated fleet is a development tool: its cars have no real signals (the
    # realistic one simulates them) and it may trust no gateway key. Allowed, since
    # nothing here drives away, but said at every start.
    feed = "simulated" if args.realistic else ""
    check_safeguards(missing_safeguards(feed, args.trusted_keys), dev=True, command="sim")
    kernels = _kernels(args)
    if args.realistic:
        return _run_realistic(args, stop)
    cars = Path(args.credentials_dir) if args.credentials_dir else None
    template = _settings(args, f"{args.prefix}-0")
    fleet = Fleet(
        template,
        prefix=args.prefix,
        cells=parse_cells(args.cells, template.mqtt),
        login=(lambda vid: CarCredentials.of(cars, vid).password()) if cars else None,
        result_key=(lambda vid: CarCredentials.of(cars, vid).result_key) if cars else None,
    )
    fleet.add(args.vehicles)
    log.info("fleet_started", vehicles=len(fleet), backend=fleet.backend.name)
    exporter = _exporter(args, fleet.backend.name, "sim", kernels)
    stop.wait()
    fleet.stop_all()
    if exporter is not None:
        exporter.close()
    log.info("fleet_stopped", completed=fleet.completed())
    return 0


def parse_cells(text: str, base: MqttConnection) -> dict[str, MqttConnection]:
    """``name=host:port,...`` as each cell's broker (the other settings as ``base``)."""
    cells: dict[str, MqttConnection] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if not (name and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"--cells: {item!r} is not name=host:port")
        if name in cells:
            raise ConfigError(f"--cells: cell {name!r} is named twice")
        cells[name] = replace(base, host=host, port=int(port))
    return cells


def _run_realistic(args: argparse.Namespace, stop: threading.Event) -> int:
    policy = PolicyConfig.load(Path(args.owner_policy) if args.owner_policy else None)
    plan = RealisticPlan(args.vehicles, args.time_scale, args.sim_hours)
    sim = RealisticFleet(_settings(args, f"{args.prefix}-0"), plan, policy)
    log.info("realistic_sim_started", vehicles=plan.vehicles, time_scale=plan.scale)
    print(json.dumps(sim.run(stop)), flush=True)
    return 0
