# SPDX-License-Identifier: Apache-2.0
"""A fleet with one lying car, on the real brokers: the answer is right, the liar is out.

The liar is a normal ``parkpool worker`` process, enrolled like every car and signing
its results with its own valid key; only its gemm kernel is patched to add noise
(tests/lying_worker.py). Signatures prove who sent a result, not that it is right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from parkpool.app.children import role_env, store_connection
from parkpool.broker_config.auth import AuthStore, CarCredentials
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import wait_for

LIAR = "liar-1"


@pytest.fixture
def enrolled(tmp_path: Path) -> AuthStore:
    store = AuthStore(tmp_path / "auth").init()
    for car in (LIAR, "honest-00001", "honest-00002"):
        store.enroll_vehicle(car, tmp_path / "cars")
    return store


@pytest.fixture
def liar_process(
    brokers: EmbeddedBrokers, namespace: str, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        key = CarCredentials.of(tmp_path / "cars", LIAR).result_key
        env = {
            **role_env(brokers, namespace),
            "PARKPOOL_VEHICLE_ID": LIAR,
            "PARKPOOL_RESULT_KEY": str(key),
            "PARKPOOL_DEV": "1",
            "PARKPOOL_BACKEND": "numpy",
            "PARKPOOL_HEARTBEAT_S": "1",
        }
        log = (tmp_path / "liar.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.lying_worker"], env=env, stdout=log, stderr=log
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.terminate()
        child.wait(30)


def quarantine_show(brokers: EmbeddedBrokers, namespace: str, car: str) -> dict[str, object]:
    shown = subprocess.run(
        [sys.executable, "-m", "parkpool.app.cli", "fleet", "quarantine", "show", car, "--json"],
        env=role_env(brokers, namespace),
        capture_output=True,
        timeout=120,
        check=True,
    )
    row: dict[str, object] = json.loads(shown.stdout.splitlines()[-1])
    return row


class TestLyingCar:
    """One enrolled car returns wrong gemm tiles: each is caught, redone, and the car
    is quarantined with its evidence, while the caller gets the right answer."""

    # Inline, the check makes its products as tiles arrive; on the claim-check path,
    # while the SDK hashes the stored blocks (producer.freivalds.HashTap).
    @pytest.mark.parametrize("stored", [False, True], ids=["inline", "claim_check"])
    def test_the_answer_is_right_and_the_liar_quarantined(
        self,
        stored: bool,
        brokers: EmbeddedBrokers,
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        enrolled: AuthStore,
        tmp_path: Path,
        gateway_factory: Callable[..., RunningGateway],
        liar_process: Callable[[], subprocess.Popen[bytes]],
    ) -> None:
        # Given a gateway that accepts only results signed by enrolled cars
        store = store_connection(brokers) if stored else StoreConnection()
        gateway = gateway_factory(vehicle_keys=enrolled.vehicle_keys, store=store)
        # And the liar, plus two slower honest cars, all signing with their own keys
        liar_process()
        template = WorkerSettings(
            "template", mqtt_conn, namespace, backend="numpy", simulated_delay_s=0.3
        )
        honest = Fleet(
            template,
            prefix="honest",
            result_key=lambda car: CarCredentials.of(tmp_path / "cars", car).result_key,
        )
        try:
            honest.add(2)
            wait_for(lambda: gateway.gateway.vehicles.get(LIAR) is not None, 60, "the liar")
            # When a gemm job runs with the default verification
            rng = np.random.default_rng(7)
            a = rng.standard_normal((512, 256)).astype(np.float32)
            b = rng.standard_normal((256, 512)).astype(np.float32)
            with ParkpoolClient(ProducerSettings(kafka_conn, namespace, store=store)) as sdk:
                handle = sdk.submit("gemm", {"a": a, "b": b}, tile=128)
                answer = handle.wait(timeout=120)
                chunks = list(handle.chunks(timeout=1))
                redone = sum(
                    sdk.metrics.value("parkpool_sdk_chunks_redone_total", why=why)
                    for why in ("quarantined_car", "second_opinion")
                )
                # Then the caller's answer is right, every chunk checked against the inputs
                np.testing.assert_allclose(answer, a @ b, rtol=1e-4, atol=1e-3)
                assert {chunk.verification for chunk in chunks} == {Level.ALGEBRAIC}
                assert LIAR not in {chunk.vehicle_id for chunk in chunks}
                assert redone >= 1, "the liar's tiles were redone on other cars"
                uploaded = sdk.metrics.value("parkpool_sdk_blobs_uploaded_total")
                assert uploaded == (8 if stored else 0)  # 4 row and 4 column blocks
                # And the liar is quarantined, with the wrong tile as evidence
                row = quarantine_show(brokers, namespace, LIAR)
                assert row["state"] == "quarantined"
                evidence = row["evidence"]
                assert isinstance(evidence, list) and evidence
                assert evidence[0]["job_id"] == handle.job_id
                assert evidence[0]["check"] == "algebraic"
                assert "Freivalds residual" in evidence[0]["detail"]
                # And every gateway keeps it from work from then on
                wait_for(
                    lambda: gateway.metric("parkpool_gateway_quarantined_vehicles") == 1,
                    30,
                    "the gateway to see the quarantine",
                )
                second = sdk.submit("gemm", {"a": a, "b": b}, tile=128)
                np.testing.assert_allclose(second.wait(timeout=120), a @ b, rtol=1e-4, atol=1e-3)
                assert LIAR not in {chunk.vehicle_id for chunk in second.chunks(timeout=1)}
                skipped = gateway.metric(
                    "parkpool_gateway_dispatch_skipped_total", reason="quarantined"
                )
                assert skipped > 0
        finally:
            honest.stop_all()
