# SPDX-License-Identifier: Apache-2.0
"""A car agent serves its process series and build info on loopback, when asked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from parkpool.app.cli import build_parser
from parkpool.broker_config.launcher import free_port
from parkpool.runtime.build_info import version
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.exporter import serve_metrics
from parkpool.worker.kernel_loading import REFUSAL_REASONS, KernelLoad, Refusal
from tests.helpers import wait_for


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


def _served(port: int) -> bool:
    try:
        _scrape(port)
    except OSError:
        return False
    return True


class TestAgentMetrics:
    def test_a_simulated_fleet_serves_process_and_build_info(
        self, mqtt_conn: MqttConnection, tmp_path: Path
    ) -> None:
        # Given a fleet agent started with a metrics port
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARKPOOL_")}
        env |= {"PARKPOOL_MQTT_PORT": str(mqtt_conn.port), "PARKPOOL_LOG_JSON": "1"}
        argv = [sys.executable, "-m", "parkpool", "sim", "--vehicles", "1", "--backend", "numpy"]
        child = subprocess.Popen(
            [*argv, "--metrics-port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # When it runs, Then its loopback endpoint has the process series and build info
            wait_for(lambda: _served(port), 60, "the agent's metrics endpoint")
            families = {f.name: f for f in text_string_to_metric_families(_scrape(port))}
            assert families["process_resident_memory_bytes"].samples[0].value > 0
            (info,) = families["parkpool_build_info"].samples
            assert info.labels["role"] == "sim" and info.labels["backend"] == "numpy"
            assert info.labels["version"] == version() and info.value == 1
        finally:
            child.send_signal(signal.SIGTERM)
            _, stderr = child.communicate(timeout=30)
        served = [json.loads(line) for line in stderr.splitlines() if "metrics_served" in line]
        assert served[0]["url"] == f"http://127.0.0.1:{port}/metrics"

    def test_it_serves_nothing_unless_asked(self) -> None:
        # The default (-1) opens no port: a car listens on nothing it was not told to
        args = build_parser().parse_args(["sim"])
        assert args.metrics_port == -1


class TestKernelRefusals:
    def test_refused_packages_are_counted_by_reason_from_zero(self) -> None:
        # Given a start that refused one altered and one unlisted kernel package
        load = KernelLoad(
            ("ok",),
            (
                Refusal("a", "pkg-a", "1.0", "hash_mismatch", "files changed"),
                Refusal("b", "pkg-b", "1.0", "not_allowlisted", "the manifest omits it"),
            ),
        )
        # When the agent serves its metrics
        server = serve_metrics(0, "numpy", "worker", load)
        try:
            families = {f.name: f for f in text_string_to_metric_families(_scrape(server.port))}
        finally:
            server.close()
        # Then each refusal is counted under its reason, and every other reason shows 0
        counts = {
            s.labels["reason"]: s.value
            for s in families["parkpool_worker_kernels_refused"].samples
            if s.name.endswith("_total")
        }
        assert counts == {reason: 0.0 for reason in REFUSAL_REASONS} | {
            "hash_mismatch": 1.0,
            "not_allowlisted": 1.0,
        }
