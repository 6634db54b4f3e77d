# SPDX-License-Identifier: Apache-2.0
"""Signed work: a car runs only what a trusted gateway issued, once."""

from __future__ import annotations

import dataclasses
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from parkpool.broker_config.auth import AuthStore
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.credentials import CarCredentials
from parkpool.runtime.settings import MqttConnection
from parkpool.runtime.signing import ResultSigner, TaskSigner, TaskVerifier, generate
from parkpool.schemas import (
    Assignment,
    MqttTopics,
    decode,
    encode,
)
from parkpool.schemas.errors import ConfigError
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, first_assignment, hold_lease, wait_for


def assignment(**changes: object) -> Assignment:
    base = Assignment("gw1", "car-1", 7, 1, time.time() + 30, b"task bytes")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate(tmp_path / "keys")


class TestSignatures:
    """A signature covers every field of the lease and the task bytes."""

    def test_signed_assignment_verifies(self, keys: tuple[Path, Path]) -> None:
        signer, verifier = TaskSigner.load(keys[0]), TaskVerifier.load([keys[1]])
        signed = signer.sign(assignment())
        assert verifier.verify(signed) and len(signed.nonce) == 16
        # Two signings of the same lease differ (fresh nonce)
        assert signer.sign(assignment()).nonce != signed.nonce

    @pytest.mark.parametrize(
        "change",
        [
            {"epoch": 8},
            {"vehicle_id": "car-2"},
            {"gateway_id": "gw2"},
            {"attempt": 2},
            {"lease_deadline": time.time() + 3600},
            {"task": b"other task"},
            {"nonce": b"\x00" * 16},
        ],
    )
    def test_any_change_breaks_it(self, keys: tuple[Path, Path], change: dict[str, object]) -> None:
        signed = TaskSigner.load(keys[0]).sign(assignment())
        tampered = dataclasses.replace(signed, **change)  # type: ignore[arg-type]
        assert not TaskVerifier.load([keys[1]]).verify(tampered)

    def test_unsigned_or_foreign_key_refused(self, keys: tuple[Path, Path], tmp_path: Path) -> None:
        other = generate(tmp_path / "other")
        verifier = TaskVerifier.load([keys[1]])
        assert not verifier.verify(assignment())
        assert not verifier.verify(TaskSigner.load(other[0]).sign(assignment()))
        # Trusting both keys (a rotation) accepts either
        assert TaskVerifier.load([keys[1], other[1]]).verify(
            TaskSigner.load(other[0]).sign(assignment())
        )

    def test_a_key_written_over_a_readable_file_is_private(self, tmp_path: Path) -> None:
        # Given a key file others may read (copied in with cp, say)
        loose = tmp_path / "gateway.key"
        loose.write_text("old\n")
        loose.chmod(0o644)
        # When a new key is generated over it, Then only its owner may read it
        private, _public = generate(tmp_path, "gateway")
        assert private == loose and stat.S_IMODE(private.stat().st_mode) == 0o600

    def test_key_files(self, keys: tuple[Path, Path], tmp_path: Path) -> None:
        assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
        assert "secret" in repr(TaskSigner.load(keys[0]))
        bad = tmp_path / "bad.pub"
        bad.write_text("abcd\n")
        with pytest.raises(ConfigError, match="32 bytes"):
            TaskVerifier.load([bad])
        bad.write_text("not hex\n")
        with pytest.raises(ConfigError, match="cannot read"):
            TaskVerifier.load([bad])
        with pytest.raises(ConfigError, match="no trusted"):
            TaskVerifier.load([])


@pytest.mark.integration
class TestSignedFleet:
    """Signed work completes; forged and replayed assignments are refused and counted."""

    def test_forged_and_replayed_assignments_are_not_run(
        self,
        keys: tuple[Path, Path],
        tmp_path: Path,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a signing gateway and a car that trusts only its key
        gateway_factory(signing_key=keys[0])
        fleet = fleet_factory(1, trusted_keys=(keys[1],), prefetch=0)
        car = next(iter(fleet.vehicles.values()))
        spy = RawMqtt(mqtt_conn, f"spy-{namespace}")
        topic = MqttTopics(namespace).task(car.vehicle_id)
        spy.subscribe(topic)
        # When a job runs, it completes on signed work
        chunk = [ChunkSpec({"op": "sum"}, {"x": np.arange(4.0)})]
        assert client.publish("reduce", chunk).wait(timeout=60) is None
        genuine = wait_for(lambda: first_assignment(spy), 10, "the assignment")
        done = car.completed
        # When an attacker replays the genuine assignment, and sends a forged one
        spy.publish(topic, bytes(genuine.payload))
        lease = decode(bytes(genuine.payload), Assignment)
        attacker = TaskSigner.load(generate(tmp_path / "attacker")[0])
        forged = attacker.sign(dataclasses.replace(lease, epoch=lease.epoch + 1000))
        spy.publish(topic, encode(forged))
        spy.publish(topic, encode(dataclasses.replace(forged, signature=b"", nonce=b"")))
        # Then the car refuses all three, counts why, and runs nothing more
        wait_for(lambda: car.rejected["bad_signature"] == 2, 10, "two forgeries refused")
        wait_for(lambda: car.rejected["replayed"] == 1, 10, "the replay refused")
        assert car.completed == done and car.held == 0
        spy.close()


@pytest.mark.integration
class TestSignedResults:
    """With enrolled keys, a result counts only if its own car signed it."""

    def test_only_the_cars_own_signature_completes_a_task(
        self,
        tmp_path: Path,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        store = AuthStore(tmp_path / "auth").init()
        car = store.enroll_vehicle("holder", tmp_path / "cars")
        gateway = gateway_factory(lease_seconds=300, vehicle_keys=store.vehicle_keys)
        # Given a scripted, enrolled car holding the only chunk's lease
        topics = MqttTopics(namespace)
        handle = client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
        holder = hold_lease(mqtt_conn, topics)
        result = holder.result({"value": np.array(4.0)})
        # When results for that lease come unsigned, then signed by a stranger's key
        stranger = ResultSigner.load(generate(tmp_path / "stranger")[0])
        for forged in (result, stranger.sign(result)):
            holder.car.publish(topics.result("holder", "gw1"), encode(forged))
        dropped = "parkpool_gateway_dropped_total"
        wait_for(
            lambda: gateway.metric(dropped, source="mqtt_result", reason="bad_signature") == 2,
            10,
            "refusals",
        )
        # Then nothing completed, and the lease is still the car's
        assert handle.progress.done == 0
        # And the car's own signature completes it
        own = ResultSigner.load(car.result_key)
        holder.car.publish(topics.result("holder", "gw1"), encode(own.sign(result)))
        handle.wait(timeout=30)
        # And replaying that genuine result later is refused as stale and counted
        holder.car.publish(topics.result("holder", "gw1"), encode(own.sign(result)))
        stale = {"source": "mqtt_result", "reason": "stale_or_fenced"}
        wait_for(lambda: gateway.metric(dropped, **stale) == 1, 10, "the replay refused")
        assert handle.progress.done == 1 and handle.progress.duplicates == 0
        holder.close()

    def test_signed_fleet_completes(
        self,
        tmp_path: Path,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        store = AuthStore(tmp_path / "auth").init()
        store.enroll_vehicle("keyed-00001", tmp_path / "cars")
        gateway_factory(vehicle_keys=store.vehicle_keys)
        template = WorkerSettings("t", mqtt_conn, namespace, backend="numpy")
        fleet = Fleet(
            template,
            prefix="keyed",
            result_key=lambda vid: CarCredentials.of(tmp_path / "cars", vid).result_key,
        )
        try:
            fleet.add(1)
            chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(4, float(i))}) for i in range(5)]
            handle = client.publish("reduce", chunks)
            handle.wait(timeout=60)
            assert handle.progress.done == 5
        finally:
            fleet.stop_all()
