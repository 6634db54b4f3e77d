# SPDX-License-Identifier: Apache-2.0
"""Mutual TLS on the real Mosquitto: a car's certificate is its identity, and the same
ACL confines it; checked with the Debian mosquitto clients and with our own client."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from parkpool.broker_config.certs import make_certs
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import MqttConnection

pytestmark = pytest.mark.integration
NS = "tls"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), ["car-a", "car-b", "gw-tls"])


@pytest.fixture(scope="module")
def tls_brokers(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[EmbeddedBrokers]:
    run_dir = tmp_path_factory.mktemp("tls-brokers")
    with EmbeddedBrokers(run_dir=run_dir, auth=True, tls_dir=certs) as brokers:
        assert brokers.auth is not None
        brokers.auth.add_gateway("gw-tls")
        brokers.reload_mosquitto()
        time.sleep(0.5)
        yield brokers


def _tls(brokers: EmbeddedBrokers, certs: Path, who: str | None) -> list[str]:
    base = ["-h", "127.0.0.1", "-p", str(brokers.mqtt_tls_port), "--cafile", str(certs / "ca.pem")]
    base += ["-V", "mqttv5", "-i", f"{who or 'anon'}-{time.time_ns()}"]
    if who is None:
        return base
    return [*base, "--cert", str(certs / f"{who}.pem"), "--key", str(certs / f"{who}.key")]


def _pub(args: list[str]) -> int:
    return subprocess.run(
        ["mosquitto_pub", *args, "-q", "1"], check=False, capture_output=True, timeout=15
    ).returncode


class TestMutualTls:
    """Only certificates from our CA get in, and each is confined to its own topics."""

    def test_car_certificate_logs_in_as_the_car(
        self, tls_brokers: EmbeddedBrokers, certs: Path
    ) -> None:
        assert (
            _pub([*_tls(tls_brokers, certs, "car-a"), "-t", f"{NS}/v/car-a/status", "-m", "x"]) == 0
        )

    def test_no_certificate_no_entry(self, tls_brokers: EmbeddedBrokers, certs: Path) -> None:
        assert _pub([*_tls(tls_brokers, certs, None), "-t", f"{NS}/v/car-a/status", "-m", "x"]) != 0

    def test_certificate_identity_is_confined_by_the_acl(
        self, tls_brokers: EmbeddedBrokers, certs: Path
    ) -> None:
        topic = f"{NS}/v/car-b/task"
        spy = subprocess.Popen(
            ["mosquitto_sub", *_tls(tls_brokers, certs, "car-a"), "-t", topic, "-q", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        owner = subprocess.Popen(
            ["mosquitto_sub", *_tls(tls_brokers, certs, "car-b"), "-t", topic, "-q", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        assert _pub([*_tls(tls_brokers, certs, "gw-tls"), "-t", topic, "-m", "task-for-b"]) == 0
        time.sleep(1.0)
        for process in (spy, owner):
            process.terminate()
        spied = spy.communicate(timeout=10)[0].decode()
        received = owner.communicate(timeout=10)[0].decode()
        assert "task-for-b" in received and "task-for-b" not in spied

    def test_our_client_connects_with_its_certificate(
        self, tls_brokers: EmbeddedBrokers, certs: Path
    ) -> None:
        conn = MqttConnection(
            "127.0.0.1",
            tls_brokers.mqtt_tls_port,
            tls_ca=str(certs / "ca.pem"),
            tls_cert=str(certs / "car-a.pem"),
            tls_key=str(certs / "car-a.key"),
        )
        connected = threading.Event()
        client = new_client("car-a-paho", conn)
        client.on_connect = lambda *_a: connected.set()
        connect_and_wait(client, conn, connected=connected, timeout=10)
        info = client.publish(f"{NS}/v/car-a/status", b"over tls", qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        client.disconnect()
        client.loop_stop()
