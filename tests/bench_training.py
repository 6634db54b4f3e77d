# SPDX-License-Identifier: Apache-2.0
"""The ``training`` bench line: data-parallel SGD on a simulated fleet, beside one process.

The example kernel package (examples/parkpool-train) is installed with pip, approved by
a manifest pinned and signed with the CLI, and loaded by a simulated fleet; then
``python -m parkpool_train`` trains softmax regression on scikit-learn's digits, on the
fleet and with NumPy in its own process on the same batches. The line gives both test
accuracies and both median seconds per round; ``round_s_ratio`` is fleet over local,
measured in the same run. A round on the fleet is a whole job (publish, lease, run,
result, check), so it is dominated by the path's latency, not by the arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from parkpool.app.children import role, role_env
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.runtime.signing import generate
from tests.plugin_packages import EXAMPLE, pip_install

NAMESPACE = "training"


def training_line(run_dir: Path, rounds: int, cars: int, shards: int) -> dict[str, Any]:
    folder = run_dir / "training"
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    site = pip_install(EXAMPLE, folder / "site")
    manifest, public = _approve(site, folder)
    with EmbeddedBrokers(run_dir=folder / "brokers") as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        env = role_env(brokers, NAMESPACE) | {"PYTHONPATH": str(site)}
        sim = ["sim", "--vehicles", str(cars), "--backend", "numpy"]
        sim += ["--kernel-manifest", str(manifest), "--kernel-keys", str(public)]
        with (
            role("gateway", ["gateway", "--gateway-id", "train-gw"], env, folder),
            role("fleet", sim, env, folder),
        ):
            argv = [sys.executable, "-m", "parkpool_train", "--rounds", str(rounds)]
            done = subprocess.run(
                [*argv, "--shards", str(shards)],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
    report = json.loads(done.stdout.splitlines()[-1])
    return {
        "name": "training",
        "model": "softmax regression, 8x8 digits (scikit-learn load_digits)",
        "cars": cars,
        "shards": shards,
        **report,
        "round_s_ratio": round(report["fleet_round_s_median"] / report["local_round_s_median"], 1),
    }


def _approve(site: Path, folder: Path) -> tuple[Path, Path]:
    private, public = generate(folder, "manifest")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "parkpool", "kernels"]
    subprocess.run([*cli, "pin", str(folder / "pinned.json")], env=env, check=True)
    signed = folder / "signed.json"
    sign = ["sign", str(folder / "pinned.json"), "--key", str(private), "--output", str(signed)]
    subprocess.run([*cli, *sign], env=env, check=True, capture_output=True)
    return signed, public
