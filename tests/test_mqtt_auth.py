# SPDX-License-Identifier: Apache-2.0
"""Per-vehicle identity and isolation on the real Mosquitto, checked from outside with
the Debian ``mosquitto_pub`` and ``mosquitto_sub`` clients, not our own code."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from parkpool.broker_config.auth import AuthStore, hash_password
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import MqttConnection
from parkpool.runtime.signing import ResultSigner, VehicleKeys
from parkpool.schemas import (
    MqttTopics,
    Result,
    encode,
)
from tests.conftest import RunningGateway
from tests.helpers import hold_lease, wait_for

pytestmark = pytest.mark.integration
NS = "sec"
GW = "gw-sec"  # the gateway identity; a car addresses its pulls and statuses to it
# The store keeps only hashes: the tests hold the passwords, as the cars would.
PASSWORDS: dict[str, str] = {}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBrokers]:
    with EmbeddedBrokers(run_dir=tmp_path_factory.mktemp("secured"), auth=True) as brokers:
        assert brokers.auth is not None
        for car in ("car-a", "car-b", "car-c"):
            PASSWORDS[car] = brokers.auth.enroll(car)
        PASSWORDS[GW] = brokers.auth.add_gateway(GW)
        brokers.reload_mosquitto()
        time.sleep(0.5)  # SIGHUP is handled on the broker's next loop
        yield brokers


def _login(brokers: EmbeddedBrokers, who: str | None) -> list[str]:
    base = ["-h", brokers.mqtt_host, "-p", str(brokers.mqtt_port), "-V", "mqttv5"]
    if who is None:
        return base
    assert brokers.auth is not None
    return [*base, "-u", who, "-P", PASSWORDS[who], "-i", f"{who}-{time.time_ns()}"]


def publish(brokers: EmbeddedBrokers, who: str | None, topic: str, message: str) -> int:
    cmd = ["mosquitto_pub", *_login(brokers, who), "-t", topic, "-m", message, "-q", "1"]
    return subprocess.run(cmd, check=False, capture_output=True, timeout=15).returncode


class Listener:
    """mosquitto_sub in the background, collecting what one identity receives."""

    def __init__(self, brokers: EmbeddedBrokers, who: str, *topics: str) -> None:
        subscriptions = [arg for topic in topics for arg in ("-t", topic)]
        cmd = ["mosquitto_sub", *_login(brokers, who), *subscriptions, "-q", "1", "-v"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)  # connected and subscribed

    def stop(self) -> tuple[str, str]:
        self.process.terminate()
        out, err = self.process.communicate(timeout=10)
        return out.decode(), err.decode()


class TestPasswordFile:
    """Our hashes are the ones mosquitto_passwd writes."""

    def test_same_scheme_as_mosquitto_passwd(self, tmp_path: Path) -> None:
        path = tmp_path / "pw"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "u", "secret"], check=True)
        theirs = path.read_text().strip().split(":", 1)[1]
        _, scheme, iterations, salt, _digest = theirs.split("$")
        ours = hash_password("secret", base64.b64decode(salt))
        # PBKDF2-HMAC-SHA512, 101 rounds: the same bytes for the same salt
        assert (scheme, iterations) == ("7", "101") and ours == theirs


class TestIsolation:
    """Anonymous clients are refused; each car reaches only its own topics."""

    def test_anonymous_is_refused(self, secured: EmbeddedBrokers) -> None:
        assert publish(secured, None, f"{NS}/v/car-a/pull/{GW}", "hi") != 0

    def test_wrong_password_is_refused(self, secured: EmbeddedBrokers) -> None:
        cmd = [
            "mosquitto_pub",
            *_login(secured, None),
            *("-u", "car-a", "-P", "guess", "-t", f"{NS}/v/car-a/pull/{GW}", "-m", "x"),
        ]
        assert subprocess.run(cmd, check=False, capture_output=True, timeout=15).returncode != 0

    def test_car_cannot_read_another_cars_tasks(self, secured: EmbeddedBrokers) -> None:
        # Given car A listening on car B's task topic, and B on its own
        spy = Listener(secured, "car-a", f"{NS}/v/car-b/task")
        owner = Listener(secured, "car-b", f"{NS}/v/car-b/task")
        # When the gateway sends B a task
        assert publish(secured, GW, f"{NS}/v/car-b/task", "task-for-b") == 0
        time.sleep(1.0)
        spied, _ = spy.stop()
        received, _ = owner.stop()
        # Then only B gets it
        assert "task-for-b" in received
        assert "task-for-b" not in spied

    def test_car_cannot_write_another_cars_results(self, secured: EmbeddedBrokers) -> None:
        gateway = Listener(secured, GW, f"{NS}/v/+/result/+")
        # When A publishes on B's result topic, and on its own
        publish(secured, "car-a", f"{NS}/v/car-b/result/{GW}", "forged")
        assert publish(secured, "car-a", f"{NS}/v/car-a/result/{GW}", "honest") == 0
        time.sleep(1.0)
        seen, _ = gateway.stop()
        # Then the gateway receives only A's own
        assert f"{NS}/v/car-a/result/{GW} honest" in seen
        assert "forged" not in seen

    def test_car_pulls_and_reports_only_as_itself(self, secured: EmbeddedBrokers) -> None:
        # Given the gateway listening to everything a car may send it, and to the roster
        gateway = Listener(
            secured,
            GW,
            f"{NS}/v/+/pull/+",
            f"{NS}/v/+/status/+",
            f"{NS}/v/+/status",
            f"{NS}/v/+/pull",
            f"{NS}/gw/+/status",
        )
        # When A pulls from and reports to a gateway, and leaves its will, on its own topics
        own = {
            f"{NS}/v/car-a/pull/{GW}": "own-pull",
            f"{NS}/v/car-a/status/{GW}": "own-status",
            f"{NS}/v/car-a/status": "own-will",
        }
        for topic, message in own.items():
            assert publish(secured, "car-a", topic, message) == 0
        # and tries the same on B's topics, the pull of the old layout that every gateway
        # heard, and a roster entry that would draw the cell's cars to a gateway of its own
        forged = {
            f"{NS}/v/car-b/pull/{GW}": "forged-pull",
            f"{NS}/v/car-b/status/{GW}": "forged-status",
            f"{NS}/v/car-b/status": "forged-will",
            f"{NS}/v/car-a/pull": "unaddressed-pull",
            f"{NS}/gw/gw-evil/status": "forged-roster",
        }
        for topic, message in forged.items():
            publish(secured, "car-a", topic, message)
        time.sleep(1.0)
        seen, _ = gateway.stop()
        # Then the gateway receives A's own, each on its topic, and nothing else.
        assert sorted(seen.splitlines()) == sorted(f"{t} {m}" for t, m in own.items())

    def test_revoked_car_cannot_connect_again(self, secured: EmbeddedBrokers) -> None:
        assert secured.auth is not None
        assert publish(secured, "car-c", f"{NS}/v/car-c/status/{GW}", "here") == 0
        password = PASSWORDS["car-c"]
        assert secured.auth.revoke("car-c")
        secured.reload_mosquitto()
        time.sleep(0.5)
        cmd = [
            "mosquitto_pub",
            *_login(secured, None),
            *("-u", "car-c", "-P", password, "-t", f"{NS}/v/car-c/status/{GW}", "-m", "back"),
        ]
        assert subprocess.run(cmd, check=False, capture_output=True, timeout=15).returncode != 0


class TestStore:
    """Identities are validated; the store keeps no secret, the car gets its own."""

    def test_bad_identity_refused(self, tmp_path: Path) -> None:
        store = AuthStore(tmp_path / "auth").init()
        with pytest.raises(Exception, match="identity must match"):
            store.enroll("car/../x")
        assert store.enrolled() == []

    def test_only_hashes_and_public_keys_stay(self, tmp_path: Path) -> None:
        # When a car is enrolled
        store = AuthStore(tmp_path / "auth").init()
        car = store.enroll_vehicle("car-1", tmp_path / "cars")
        password = car.password()
        # Then the store holds its hash and public key, and nowhere its password or key
        assert store.enrolled() == ["car-1"]
        assert (store.vehicle_keys / "car-1.pub").exists()
        private = car.result_key.read_bytes()
        for path in (tmp_path / "auth").rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
                assert private.strip() not in path.read_bytes(), path
        assert [p.name for p in store.vehicle_keys.iterdir()] == ["car-1.pub"]
        # And the car's own copy is for its eyes only
        assert car.directory.stat().st_mode & 0o077 == 0
        for secret in (car.password_file, car.result_key):
            assert secret.stat().st_mode & 0o077 == 0
        # And the gateways' copy of the public key is the half of the car's private key
        result = Result("job1", 0, 1, "car-1", "gw", 1, 1, {"y": np.ones(2)}, 0.1, 1.0, 0.0)
        signed = ResultSigner.load(car.result_key).sign(result)
        assert VehicleKeys(store.vehicle_keys).check(signed) is None


class TestFleetCommand:
    """``parkpool fleet enroll`` lets a car in; ``revoke`` shuts it out at its next connect."""

    def test_enroll_then_revoke(self, secured: EmbeddedBrokers) -> None:
        assert secured.auth is not None
        options = [
            *("--auth-dir", str(secured.auth.directory)),
            *("--broker-pid", str(secured.pids["mosquitto"])),
        ]
        cli = [sys.executable, "-m", "parkpool.app.cli", "fleet"]
        # Without a place for the car's secrets, enroll refuses, by name
        refused = subprocess.run(
            [*cli, "enroll", "car-d", *options], check=False, capture_output=True, text=True
        )
        assert refused.returncode == 2 and "--car-dir" in refused.stderr
        assert "Traceback" not in refused.stderr
        cars = secured.run_dir / "cars"
        enrolled = subprocess.run(
            [*cli, "enroll", "car-d", *options, "--car-dir", str(cars)],
            check=True,
            capture_output=True,
            text=True,
        )
        # It prints the password once, and the car's folder holds the same
        password = enrolled.stdout.strip()
        assert (cars / "car-d" / "mqtt-password").read_text().strip() == password
        time.sleep(0.5)
        login = [*_login(secured, None), "-u", "car-d", "-P", password]
        status = [*login, "-t", f"{NS}/v/car-d/status/{GW}", "-m", "here"]
        assert _pub(status) == 0
        subprocess.run([*cli, "revoke", "car-d", *options], check=True, capture_output=True)
        time.sleep(0.5)
        assert _pub(status) != 0


def _pub(args: list[str]) -> int:
    return subprocess.run(
        ["mosquitto_pub", *args], check=False, capture_output=True, timeout=15
    ).returncode


class TestForgedResultFromOutside:
    """A forged result injected with mosquitto_pub on the gateway's result topic is
    dropped and counted, and does not complete the task."""

    def test_forged_result_is_fenced(
        self,
        brokers: EmbeddedBrokers,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        tmp_path: Path,
    ) -> None:
        # Given a scripted car that holds the lease of the only chunk (it never ends, so
        # stopping the gateway need not wait for it)
        gateway = gateway_factory(lease_seconds=300, drain_seconds=0)
        topics = MqttTopics(namespace)
        handle = client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
        holder = hold_lease(mqtt_conn, topics)
        # When an outsider publishes a result for it, quoting a wrong epoch, from a file
        forged = holder.result({"value": np.array(42.0)}, epoch=holder.assignment.epoch + 1)
        payload = tmp_path / "forged.msgpack"
        payload.write_bytes(encode(forged))
        target = ["-h", brokers.mqtt_host, "-p", str(brokers.mqtt_port), "-V", "mqttv5"]
        sent = subprocess.run(
            [
                "mosquitto_pub",
                *target,
                "-t",
                topics.result("holder", "gw1"),
                "-f",
                str(payload),
                "-q",
                "1",
            ],
            check=False,
            capture_output=True,
            timeout=15,
        )
        assert sent.returncode == 0
        # Then the gateway drops it as fenced, and the chunk is still not done
        dropped = {"source": "mqtt_result", "reason": "stale_or_fenced"}
        wait_for(
            lambda: gateway.metric("parkpool_gateway_dropped_total", **dropped) == 1, 10, "drop"
        )
        assert handle.progress.done == 0
        assert gateway.metric("parkpool_gateway_tasks_total", status="completed") == 0
        holder.close()
