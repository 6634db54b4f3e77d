# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: one pair of real brokers per session, one namespace per test.

The brokers are real (the object store, Tansu and Mosquitto on free loopback ports), and
the session's Kafka keeps its log in that store, as `make demo` and `parkpool brokers up`
do. PARKPOOL_DURABLE=0 keeps it in memory instead (a quicker local loop). The durable
session became possible once the store listed a prefix's folder instead of the whole
bucket (docs/DECISIONS.md). Kafka and store restarts have their own tests, which start
their own brokers: test_durable_kafka, test_kafka_restart and the chaos runs.
If the brokers cannot start, every test that needs them fails: a missing broker must
never pass as a skip.
Each test gets its own namespace, so its Kafka topics and MQTT topics are its own.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from parkpool.app.children import store_connection
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import TopicSpec, bootstrap, load_specs
from parkpool.gateway.gateway import Gateway, GatewaySettings
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas.reputation import Level
from parkpool.schemas.topics import KafkaTopics, MqttTopics
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings

# Fewer partitions than production: creating them is cheap either way, but tests
# that read a whole topic finish sooner with fewer partitions to drain.
_TEST_PARTITIONS = {"tasks": 3, "results": 3, "dead_letter": 1, "reputation": 1, "jobs": 1}
TEST_TOPIC_SPECS: tuple[TopicSpec, ...] = tuple(
    spec.with_partitions(_TEST_PARTITIONS[spec.name]) for spec in load_specs()
)


# --- brokers -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBrokers]:
    """The store, Tansu and Mosquitto for the whole session; logs stay in pytest's tmp dir."""
    durable = os.environ.get("PARKPOOL_DURABLE", "1") != "0"
    with EmbeddedBrokers(run_dir=tmp_path_factory.mktemp("brokers"), durable=durable) as running:
        yield running


# --- namespaces and topics -----------------------------------------------------------


@pytest.fixture
def namespace(brokers: EmbeddedBrokers) -> str:
    """A namespace no other test uses, with its Kafka topics already created."""
    name = "t" + uuid.uuid4().hex[:12]
    bootstrap(brokers.kafka_bootstrap, name, specs=TEST_TOPIC_SPECS)
    return name


@pytest.fixture
def kafka_topics(namespace: str) -> KafkaTopics:
    return KafkaTopics(namespace)


@pytest.fixture
def mqtt_topics(namespace: str) -> MqttTopics:
    return MqttTopics(namespace)


# --- connections ---------------------------------------------------------------------


@pytest.fixture
def kafka_conn(brokers: EmbeddedBrokers) -> KafkaConnection:
    return KafkaConnection(brokers.kafka_bootstrap)


@pytest.fixture
def mqtt_conn(brokers: EmbeddedBrokers) -> MqttConnection:
    return MqttConnection(brokers.mqtt_host, brokers.mqtt_port)


@pytest.fixture
def store_conn(brokers: EmbeddedBrokers) -> StoreConnection:
    """The session's embedded store (SigV4 checked), the one Tansu also writes to."""
    return store_connection(brokers)


@pytest.fixture
def store(store_conn: StoreConnection) -> BlobStore:
    return BlobStore(store_conn)


# --- roles -----------------------------------------------------------------------------

# A short session timeout: a new group member waits about half of it to join on Tansu
# (see FIELD_NOTES), and tests start and kill gateways often.
TEST_SESSION_TIMEOUT_MS = 3000
TEST_DRAIN_S = 3.0  # see gateway_factory


class RunningGateway:
    """A gateway on a thread of the test process; any crash of its loop fails the test."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.gateway = Gateway(settings)
        self.error: BaseException | None = None
        self.gateway.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.gateway.run()
        except BaseException as exc:
            self.error = exc
            raise

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metrics.value(name, **labels)

    def stop(self) -> None:
        self.gateway.stopping.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "gateway did not stop within 30 s"
        assert self.error is None, f"gateway loop crashed: {self.error!r}"


@pytest.fixture
def gateway_factory(
    namespace: str, kafka_conn: KafkaConnection, mqtt_conn: MqttConnection
) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []

    def make(gateway_id: str = "gw1", **overrides: Any) -> RunningGateway:
        overrides.setdefault("session_timeout_ms", TEST_SESSION_TIMEOUT_MS)
        # A scripted car's lease never ends, and a real car's test chunk takes well under
        # a second: at the default 20 s, each test that leaves a scripted lease would
        # spend its teardown waiting on it. Tests of the drain set their own.
        overrides.setdefault("drain_seconds", TEST_DRAIN_S)
        settings = GatewaySettings(gateway_id, kafka_conn, mqtt_conn, namespace, **overrides)
        gateway = RunningGateway(settings)
        running.append(gateway)
        return gateway

    yield make
    for gateway in running:
        gateway.stop()


@pytest.fixture
def fleet_factory(namespace: str, mqtt_conn: MqttConnection) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(count: int, prefix: str = "car", **overrides: Any) -> Fleet:
        overrides.setdefault("heartbeat_s", 1.0)
        mqtt = overrides.pop("mqtt", mqtt_conn)
        template = WorkerSettings("template", mqtt, namespace, backend="numpy", **overrides)
        fleet = Fleet(template, prefix=prefix)
        fleet.add(count)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop_all()


@pytest.fixture
def client(namespace: str, kafka_conn: KafkaConnection) -> Iterator[ParkpoolClient]:
    # Jobs here accept results on a car's word (gemm tiles are still checked): a fleet of
    # new cars would otherwise run every other kernel's chunks twice for a quorum, which
    # tests of delivery, leases and failures do not expect. tests/test_verification.py
    # uses the default level.
    settings = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)
    with ParkpoolClient(settings) as sdk:
        yield sdk
