# SPDX-License-Identifier: Apache-2.0
"""``parkpool worker`` (one vehicle) and ``parkpool sim`` (a simulated fleet)."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

import structlog

from parkpool import logs
from parkpool.settings import add_mqtt_options, add_namespace_option, add_option, mqtt_from_args
from parkpool.signals import stop_event
from worker.fleet import Fleet
from worker.worker import VehicleWorker, WorkerSettings

log = structlog.get_logger("parkpool.worker")


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
    worker.set_defaults(func=run_worker)
    sim = subparsers.add_parser("sim", help="run a simulated fleet of vehicles in one process")
    _common(sim)
    add_option(sim, "--vehicles", "PARKPOOL_SIM_VEHICLES", 16, "how many vehicles", int)
    add_option(sim, "--prefix", "PARKPOOL_SIM_PREFIX", "car", "vehicle id prefix")
    sim.set_defaults(func=run_sim)


def _common(p: argparse.ArgumentParser) -> None:
    add_mqtt_options(p)
    add_namespace_option(p)
    add_option(p, "--concurrency", "PARKPOOL_CONCURRENCY", 1, "kernels run at once", int)
    add_option(
        p, "--prefetch", "PARKPOOL_PREFETCH", 1, "extra tasks held so the next one is ready", int
    )
    add_option(p, "--backend", "PARKPOOL_BACKEND", "auto", "auto, cupy or numpy")
    add_option(p, "--heartbeat-s", "PARKPOOL_HEARTBEAT_S", 15.0, "status heartbeat period", float)
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
        simulated_delay_s=args.simulated_delay_s,
    )


def run_worker(args: argparse.Namespace) -> int:
    logs.configure()
    stop = stop_event()
    worker = VehicleWorker(_settings(args, args.vehicle_id))
    worker.start()
    log.info("worker_started", vehicle_id=args.vehicle_id, backend=worker.backend.name)
    stop.wait()
    worker.stop("owner_stop")
    return 0


def run_sim(args: argparse.Namespace) -> int:
    logs.configure()
    # Dozens of vehicles' threads share one GIL here; the default 5 ms switch interval
    # would make each MQTT hand-off wait for a whole slice of some other vehicle.
    sys.setswitchinterval(0.0005)
    stop = stop_event()
    fleet = Fleet(_settings(args, f"{args.prefix}-0"), prefix=args.prefix)
    fleet.add(args.vehicles)
    log.info("fleet_started", vehicles=len(fleet), backend=fleet.backend.name)
    stop.wait()
    fleet.stop_all()
    log.info("fleet_stopped", completed=fleet.completed())
    return 0
