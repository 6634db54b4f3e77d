# SPDX-License-Identifier: Apache-2.0
"""``make demo``: the whole path on embedded brokers, checked against NumPy.

Starts Tansu and Mosquitto on free ports, a gateway and a simulated fleet as separate
processes, submits a tiled matrix product, verifies the answer, prints a summary and
shuts everything down. Exits non-zero when anything fails or the answer is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from parkpool.app.children import role, role_env, store_connection
from parkpool.broker_config.certs import make_certs
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.cli import follow
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime import logs
from parkpool.runtime.sealing import generate_box_key
from parkpool.runtime.settings import (
    KafkaConnection,
    StoreConnection,
    positive_int,
    positive_seconds,
)
from parkpool.runtime.signals import exit_on_sigterm
from parkpool.runtime.signing import generate

NAMESPACE = "demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=positive_int, default=2048, help="side of the square matrices")
    p.add_argument("--tile", type=positive_int, default=256, help="side of an output tile")
    # Each chunk carries a tile x k_tile block of both operands: 2 x 256 x 256 float32 is
    # 512 KiB, inside Apache Kafka's default 1 MiB record (docs/ARCHITECTURE.md).
    p.add_argument("--k-tile", type=positive_int, default=256, help="depth of one chunk's product")
    p.add_argument("--vehicles", type=positive_int, default=16, help="simulated vehicles")
    p.add_argument(
        "--timeout", type=positive_seconds, default=600.0, help="seconds to wait for the job"
    )
    p.add_argument("--plain", action="store_true", help="submit the job unsealed, to compare")
    p.add_argument("--run-dir", type=Path, default=Path(".run/demo"), help="logs and keys")


def add_parser(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="the whole path on embedded brokers, checked against NumPy"
    )
    add_arguments(demo)
    demo.set_defaults(func=run)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parkpool-demo", description=__doc__)
    add_arguments(p)
    return p.parse_args(argv)


def scrape(port: int, name: str) -> float:
    """Sum a counter's samples from the gateway's /metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse(argv))


def run(args: argparse.Namespace) -> int:
    logs.configure("warning")
    exit_on_sigterm()
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"starting embedded Tansu and Mosquitto (logs in {run_dir}/)")
    # TLS as in production: the broker proves itself with a certificate from a local CA,
    # and every client logs in with its own password over the encrypted connection.
    tls_dir = make_certs(run_dir / "tls", [])
    brokers_tls = EmbeddedBrokers(
        run_dir=run_dir, auth=True, tls_dir=tls_dir, client_certs=False, fresh=True
    )
    with brokers_tls as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        metrics_port = free_port()
        env = {
            **role_env(brokers, NAMESPACE),
            "PARKPOOL_MQTT_PORT": str(brokers.mqtt_tls_port),
            "PARKPOOL_MQTT_TLS_CA": str(tls_dir / "ca.pem"),
        }
        cars = run_dir / "cars"  # each car's own credentials, as it would store them
        gateway_env = {**env, **_enroll(brokers, args.vehicles, cars)}
        # Signed work, as in production: the cars run only what this gateway issued; and
        # the box key that lets gateways hand a confidential job's key to one car.
        private, public = generate(run_dir / "keys")
        box_private, box_public = generate_box_key(run_dir / "keys", "gateway-box")
        gateway_args = [
            *("gateway", "--gateway-id", "demo-gw", "--metrics-port", str(metrics_port)),
            *("--signing-key", str(private), "--box-key", str(box_private)),
            *("--vehicle-keys", str(run_dir / "auth" / "keys")),
        ]
        sim_args = [
            *("sim", "--vehicles", str(args.vehicles), "--trusted-keys", str(public)),
            *("--credentials-dir", str(cars)),
        ]
        with (
            role("gateway", gateway_args, gateway_env, run_dir),
            role("fleet", sim_args, env, run_dir),
        ):
            print(
                f"gateway and {args.vehicles} simulated vehicles started (MQTT over TLS, "
                "each car with its own login and ACL; work and results signed)"
            )
            print(f"watch it: parkpool top --url http://127.0.0.1:{metrics_port}")
            store = store_connection(brokers)
            ok = run_job(args, brokers.kafka_bootstrap, metrics_port, box_public, store)
    print("all processes stopped")
    return 0 if ok else 1


def _enroll(brokers: EmbeddedBrokers, vehicles: int, cars: Path) -> dict[str, str]:
    """Every car and the gateway get their own MQTT identity; returns the gateway's login.

    The broker keeps only hashes; each car's password and result key go to ``cars``,
    which stands for the cars' own secure storage."""
    assert brokers.auth is not None
    for n in range(1, vehicles + 1):
        brokers.auth.enroll_vehicle(f"car-{n:05d}", cars)
    password = brokers.auth.add_gateway("demo-gw")
    brokers.reload_mosquitto()
    return {"PARKPOOL_MQTT_USERNAME": "demo-gw", "PARKPOOL_MQTT_PASSWORD": password}


def run_job(
    args: argparse.Namespace,
    bootstrap_servers: str,
    metrics_port: int,
    box_public: Path,
    store: StoreConnection,
) -> bool:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((args.size, args.size), dtype=np.float32)
    b = rng.standard_normal((args.size, args.size), dtype=np.float32)
    kafka = KafkaConnection(bootstrap_servers)
    # Bulk bytes go to the object store; Kafka and MQTT carry references (claim check).
    settings = ProducerSettings(kafka, NAMESPACE, gateway_box_key=box_public, store=store)
    with ParkpoolClient(settings) as client:
        started = time.monotonic()
        sealed = not args.plain
        handle = client.submit(
            "gemm", {"a": a, "b": b}, tile=args.tile, k_tile=args.k_tile, confidential=sealed
        )
        print(
            f"submitted {'confidential ' if sealed else ''}job {handle.job_id}: "
            f"{args.size}x{args.size} matmul in {handle.n_chunks} chunks of "
            f"{args.tile}x{args.k_tile} @ {args.k_tile}x{args.tile}"
            + (" (inputs and results sealed)" if sealed else "")
        )
        stored = client.metrics.registry.get_sample_value("parkpool_sdk_blobs_uploaded_total")
        print(f"inputs in the object store: {stored:.0f} objects; records carry references")
        answer = follow(handle, args.timeout)
        wall = time.monotonic() - started
        checked = client.metrics.registry.get_sample_value(
            "parkpool_sdk_chunks_verified_total", {"level": "algebraic"}
        )
        print(f"results checked against the inputs (Freivalds): {checked or 0:.0f} chunks")
    expected = a.astype(np.float64) @ b.astype(np.float64)
    # float32 accumulation over K terms: the error grows like sqrt(K) * eps * |a||b|.
    ok = bool(np.allclose(answer, expected, rtol=1e-3, atol=1e-3 * np.sqrt(args.size)))
    worst = float(np.max(np.abs(answer - expected)))
    print(f"CHECK {'PASSED' if ok else 'FAILED'}: answer matches NumPy (max abs error {worst:.2e})")
    redelivered = scrape(metrics_port, "parkpool_gateway_redelivered_total")
    p = handle.progress
    print(
        f"summary: tasks={p.total} completed={p.done} duplicates_dropped={p.duplicates} "
        f"redeliveries={redelivered:.0f} wall={wall:.2f}s throughput={p.total / wall:.1f} tasks/s"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
