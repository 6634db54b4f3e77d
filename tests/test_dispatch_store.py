# SPDX-License-Identifier: Apache-2.0
"""Dispatch of stored tasks on the real brokers and store: a failure to presign costs
neither the gateway nor the car nor the task anything, and a car is thought to hold
only the inputs it was really sent."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from parkpool.app.children import store_connection
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.gateway.settings import GatewaySettings
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import KafkaConnection, MqttConnection, Secret, StoreConnection
from parkpool.schemas import Assignment, Capabilities, MqttTopics, PullRequest, encode, peek_type
from parkpool.schemas.reputation import Level
from parkpool.worker.kernels import REGISTRY
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.helpers import RawMqtt, wait_for

pytestmark = pytest.mark.integration

SMALL = 4096  # inline threshold: the jobs' 16 KiB input goes to the store
SKIPPED = "parkpool_gateway_dispatch_skipped_total"
REFRESHES = "parkpool_gateway_store_credential_refreshes_total"
DEAD_LETTERED = "parkpool_gateway_dead_lettered_total"


@pytest.fixture(scope="module")
def store_conn(brokers: EmbeddedBrokers) -> StoreConnection:
    return dataclasses.replace(store_connection(brokers), inline_max_bytes=SMALL)


def stored_job(namespace: str, kafka: KafkaConnection, store: StoreConnection) -> ParkpoolClient:
    settings = ProducerSettings(kafka, namespace, store=store, verification=Level.UNCHECKED)
    sdk = ParkpoolClient(settings)
    sdk.submit("reduce", {"x": np.arange(2048, dtype=np.float64), "op": "sum"}, chunk_elems=2048)
    return sdk


def pull(conn: MqttConnection, topics: MqttTopics, vehicle_id: str) -> RawMqtt:
    """A scripted car that asks gw1 for one task, and keeps what it is sent."""
    car = RawMqtt(conn, f"{vehicle_id}-{topics.namespace}")
    car.subscribe(topics.task(vehicle_id))
    request = PullRequest(vehicle_id, 1, Capabilities("numpy", tuple(REGISTRY)), {}, {"gw1": 1})
    car.publish(topics.pull(vehicle_id, "gw1"), encode(request))
    return car


def assignments(car: RawMqtt) -> list[bytes]:
    payloads = [bytes(m.payload) for m in list(car.received)]
    return [p for p in payloads if peek_type(p) == Assignment.TYPE]


class CredentialSource(http.server.ThreadingHTTPServer):
    """A container credentials endpoint (ECS, EKS Pod Identity) handing out the store's
    keys, each set five minutes from expiry: inside botocore's mandatory window, so that
    botocore would refresh them at every signature. ``failing`` makes it answer 500, as
    a source that is down; ``hang`` holds its answers, as a dead host does."""

    def __init__(self, access_key: str, secret_key: str) -> None:
        super().__init__(("127.0.0.1", 0), _CredentialHandler)
        self.keys = (access_key, secret_key)
        self.failing = False
        self.hang = threading.Event()
        self.hung = threading.Event()  # an answer is being held
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/creds"


class _CredentialHandler(http.server.BaseHTTPRequestHandler):
    server: CredentialSource

    def do_GET(self) -> None:
        while self.server.hang.is_set():
            self.server.hung.set()
            time.sleep(0.05)
        if self.server.failing:
            self.send_error(500)
            return
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        access, secret = self.server.keys
        body = json.dumps(
            {"AccessKeyId": access, "SecretAccessKey": secret, "Token": "", "Expiration": expiry}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def credential_source(
    store_conn: StoreConnection, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[CredentialSource]:
    """boto3's chain finds the store's keys only at the container endpoint."""
    source = CredentialSource(store_conn.access_key, store_conn.secret_key.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", source.url)
    yield source
    source.hang.clear()
    source.shutdown()


class TestPresignFailure:
    """Credentials come from a source that can hang or fail: the gateway signs with the
    keys it holds, and its loop never waits on a refresh (runtime/presign.SigningKeys)."""

    @pytest.fixture
    def running(
        self,
        gateway_factory: Callable[..., RunningGateway],
        credential_source: CredentialSource,
        store_conn: StoreConnection,
    ) -> RunningGateway:
        keyless = dataclasses.replace(store_conn, access_key="", secret_key=Secret(""))
        # A short drain: the scripted car never answers the lease it is sent.
        return gateway_factory(store=keyless, drain_seconds=1.0)

    def test_a_hanging_source_does_not_stall_dispatch(
        self,
        running: RunningGateway,
        credential_source: CredentialSource,
        store_conn: StoreConnection,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway with a stored task, whose credentials source then hangs
        # while the gateway's refresh thread waits on it
        with stored_job(namespace, kafka_conn, store_conn):
            wait_for(lambda: len(running.gateway.ready) == 1, 30, "the task to be queued")
            credential_source.hang.set()
            assert credential_source.hung.wait(15), "the gateway never asked for new keys"
            # When a car asks for work
            asked = time.monotonic()
            car = pull(mqtt_conn, MqttTopics(namespace), "car-1")
            # Then it gets the task, URLs and all, signed with the keys the gateway
            # holds, well within one of botocore's refresh tries (2 s each, 3 tries)
            wait_for(lambda: assignments(car), 10, "the assignment")
            assert time.monotonic() - asked < 2.0
            assert running.metric(SKIPPED, reason="presign_failed") == 0
            healthy, details = running.gateway.health()
            assert healthy and details["loop_stalled_s"] < 1.0
            credential_source.hang.clear()
            car.close()

    def test_the_task_goes_back_uncounted_and_is_sent_once_they_recover(
        self,
        running: RunningGateway,
        credential_source: CredentialSource,
        store_conn: StoreConnection,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway with a stored task, whose credentials source fails, and whose
        # refresh thread found that out
        store = running.gateway.dispatcher.store
        assert store is not None
        with stored_job(namespace, kafka_conn, store_conn):
            wait_for(lambda: len(running.gateway.ready) == 1, 30, "the task to be queued")
            credential_source.failing = True
            wait_for(lambda: store.credentials_error, 30, "a failed refresh")
            assert running.metric(REFRESHES, outcome="failed") >= 1
            # When a car asks for work
            car = pull(mqtt_conn, MqttTopics(namespace), "car-1")
            # Then the presign is refused and counted, the gateway goes on, and the task
            # is back in the queue with no attempt counted and no car shunned
            wait_for(lambda: running.metric(SKIPPED, reason="presign_failed") >= 1, 30, "it")
            assert running.error is None and running.thread.is_alive()
            assert not assignments(car)
            # (read from the test's thread while the gateway's loop goes on: the metric
            # is counted just before the task is put back, so wait for it there)
            queued = wait_for(running.gateway.ready.tasks, 10, "the task back")
            [task] = queued
            assert (task.failures, task.shunned_by, task.dispatches) == (0, "", 0)
            assert len(running.gateway.leases) == 0
            # When the source answers again, Then the waiting car gets the task, URLs
            # and all, without asking twice
            credential_source.failing = False
            wait_for(lambda: assignments(car), 30, "the assignment")
            assert store.credentials_error == ""
            # The source hands the same keys out again (the store knows no other): a
            # refresh that worked, counted as kept, not as renewed
            assert running.metric(REFRESHES, outcome="kept") >= 1
            car.close()


class TestInputsRemembered:
    """A car is thought to hold a stored input only once it was sent the task naming it."""

    def test_an_assignment_too_large_for_mqtt_credits_no_input(
        self,
        store_conn: StoreConnection,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway behind an MQTT broker that carries 1 KiB at most: a stored
        # task's assignment, with its presigned URLs, does not fit
        mqtt = dataclasses.replace(mqtt_conn, max_message_bytes=1024)
        settings = GatewaySettings(
            "gw1",
            kafka_conn,
            mqtt,
            namespace,
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            store=store_conn,
        )
        running = RunningGateway(settings)
        topics = MqttTopics(namespace)
        try:
            with stored_job(namespace, kafka_conn, store_conn):
                # When a car asks for it
                car = pull(mqtt_conn, topics, "car-1")
                # Then it is dead-lettered unsent, and the car is not thought to hold its
                # input, so no cache-aware pick is steered by an input it never fetched
                reason = "too_large_for_mqtt"
                wait_for(lambda: running.metric(DEAD_LETTERED, reason=reason) == 1, 30, "letter")
                view = running.gateway.vehicles.get("car-1")
                assert view is not None and view.blobs == ()
                assert not running.gateway.vehicles.holds_any()
                assert not assignments(car)
                car.close()
        finally:
            running.stop()
