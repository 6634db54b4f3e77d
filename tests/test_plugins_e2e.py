# SPDX-License-Identifier: Apache-2.0
"""A kernel package end to end: installed with pip, approved by a signed manifest, run by
the cars that approve it and by no other, training a real model on the fleet.

The example (examples/parkpool-train) trains softmax regression on scikit-learn's
digits with data-parallel SGD: every round is one job whose chunks are shards of the
round's mini-batch. It trains the same model in one process with NumPy on the same
batches and prints both, so the fleet's answer is checked against a reference run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.runtime.signing import generate
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.plugin_packages import EXAMPLE, child_env, pip_install

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("train") / "site")


@pytest.fixture(scope="module")
def manifest(site: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(signed manifest, public key): pinned and signed with the CLI, as an operator would."""
    folder = tmp_path_factory.mktemp("operator")
    private, public = generate(folder, "manifest")
    env = child_env(site)
    for argv in (
        ["kernels", "pin", str(folder / "pinned.json")],
        ["kernels", "sign", str(folder / "pinned.json"), "--key", str(private)],
    ):
        extra = ["--output", str(folder / "signed.json")] if argv[1] == "sign" else []
        done = subprocess.run(
            [sys.executable, "-m", "parkpool", *argv, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    return folder / "signed.json", public


@pytest.fixture
def plugin_cars(
    site: Path, manifest: tuple[Path, Path], namespace: str, mqtt_conn: MqttConnection
) -> Iterator[subprocess.Popen[str]]:
    """Two simulated cars in their own process, with the package and the manifest."""
    env = child_env(site) | {
        "PARKPOOL_MQTT_PORT": str(mqtt_conn.port),
        "PARKPOOL_NAMESPACE": namespace,
        "PARKPOOL_LOG_JSON": "1",
    }
    argv = [sys.executable, "-m", "parkpool", "sim", "--vehicles", "2", "--prefix", "plug"]
    argv += ["--backend", "numpy", "--heartbeat-s", "1"]
    argv += ["--kernel-manifest", str(manifest[0]), "--kernel-keys", str(manifest[1])]
    child = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    yield child
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=30)
    loaded = [json.loads(line) for line in stderr.splitlines() if "kernels_loaded" in line]
    assert loaded and loaded[0]["kernels"] == ["softmax_grad"], stderr[-2000:]


def train_on_fleet(
    site: Path, namespace: str, kafka_conn: KafkaConnection, rounds: int
) -> dict[str, Any]:
    env = child_env(site) | {
        "PARKPOOL_KAFKA_BOOTSTRAP": kafka_conn.bootstrap,
        "PARKPOOL_NAMESPACE": namespace,
    }
    argv = [sys.executable, "-m", "parkpool_train", "--rounds", str(rounds), "--shards", "3"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


class TestTrainingOnTheFleet:
    def test_sgd_on_the_fleet_matches_one_process_and_only_approving_cars_run_it(
        self,
        site: Path,
        plugin_cars: subprocess.Popen[str],
        namespace: str,
        kafka_conn: KafkaConnection,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
    ) -> None:
        # Given a gateway, two cars running only the built-ins, and the two plugin cars
        gateway = gateway_factory()
        builtin_only = fleet_factory(2, prefix="plain")
        # When the example trains for 25 rounds on the fleet, and in one process
        report = train_on_fleet(site, namespace, kafka_conn, rounds=25)
        # Then the model learned (at least 90 % of the held-out digits), and the fleet's
        # run is the one-process run: the same loss every round (sums in another order)
        # and the test accuracy within a point
        assert report["fleet_accuracy"] >= 0.90
        assert abs(report["fleet_accuracy"] - report["local_accuracy"]) <= 0.01
        assert report["max_loss_gap"] < 1e-9
        assert report["fleet_final_loss"] < 0.5 * 2.302585  # from log(10) at the start
        assert report["fleet_round_s_median"] > 0
        # And no car without the package got one of its tasks: the gateway skipped them
        assert builtin_only.completed() == 0
        assert gateway.metric("parkpool_gateway_dispatch_skipped_total", reason="no_kernel") > 0
        assert gateway.metric("parkpool_gateway_task_failures_total", reason="invalid_task") == 0
