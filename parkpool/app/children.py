# SPDX-License-Identifier: Apache-2.0
"""Running parkpool roles as child processes, for the demo and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.settings import Secret, StoreConnection


def role_env(brokers: EmbeddedBrokers, namespace: str) -> dict[str, str]:
    """Environment that points every role at the embedded brokers."""
    return {
        **os.environ,
        "PARKPOOL_KAFKA_BOOTSTRAP": brokers.kafka_bootstrap,
        "PARKPOOL_MQTT_HOST": brokers.mqtt_host,
        "PARKPOOL_MQTT_PORT": str(brokers.mqtt_port),
        "PARKPOOL_NAMESPACE": namespace,
        "PARKPOOL_STORE_ENDPOINT": brokers.store_endpoint,
        "PARKPOOL_STORE_BUCKET": brokers.data_bucket,
        "PARKPOOL_STORE_ACCESS_KEY": brokers.store_access_key,
        "PARKPOOL_STORE_SECRET_KEY": brokers.store_secret_key,
        "PARKPOOL_LOG_JSON": "1",
        # Many simulated vehicles share few cores: one BLAS thread each, no oversubscription.
        "OPENBLAS_NUM_THREADS": "1",
    }


def store_connection(brokers: EmbeddedBrokers) -> StoreConnection:
    """The embedded object store, as the SDK and gateways reach it."""
    return StoreConnection(
        brokers.store_endpoint,
        brokers.data_bucket,
        brokers.store_access_key,
        Secret(brokers.store_secret_key),
    )


@contextmanager
def role(
    name: str, args: list[str], env: dict[str, str], log_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run one ``parkpool`` role as a child process; SIGTERM it (then SIGKILL) on exit."""
    log = (log_dir / f"{name}.log").open("wb")
    child = subprocess.Popen(
        [sys.executable, "-m", "parkpool.app.cli", *args], env=env, stdout=log, stderr=log
    )
    try:
        yield child
        if child.poll() is not None:
            raise RuntimeError(f"{name} exited early with {child.returncode}; see {log.name}")
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log.close()
