# SPDX-License-Identifier: Apache-2.0
"""A job in flight survives its Kafka going away: every chunk's result reaches the caller
exactly once and nothing is dead-lettered, whether Tansu is SIGKILLed and restarted, the
broker has lost the gateway's producer id when it comes back (so that producer is fenced
for good and must be replaced), or the object store under Tansu is restarted.

Each test runs on brokers of its own (durable, the default), since it kills them.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from parkpool.broker_config.launcher import STORE_BUCKET, EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap, load_specs, with_task_partitions
from parkpool.gateway import tasklog as tasklog_module
from parkpool.gateway.gateway import GatewaySettings
from parkpool.gateway.kafkawriter import KafkaWriter
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.tasklog import TaskLog
from parkpool.gateway.tasks import PendingTask
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobHandle
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import BrokerError, KafkaTopics
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "restart"
CHUNKS = 60


@dataclass
class System:
    brokers: EmbeddedBrokers
    gateway: RunningGateway
    client: ParkpoolClient

    def submit(self) -> JobHandle:
        """Chunk i sums [i], so each result says which chunk it answers."""
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.array([float(i)])}) for i in range(CHUNKS)]
        return self.client.publish("reduce", chunks)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with EmbeddedBrokers(run_dir=tmp_path) as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE, specs=with_task_partitions(load_specs(), 3))
        kafka = KafkaConnection(brokers.kafka_bootstrap)
        mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
        settings = GatewaySettings(
            "gw1", kafka, mqtt, NAMESPACE, session_timeout_ms=TEST_SESSION_TIMEOUT_MS
        )
        gateway = RunningGateway(settings)
        template = WorkerSettings(
            "template", mqtt, NAMESPACE, backend="numpy", heartbeat_s=1.0, simulated_delay_s=0.1
        )
        fleet = Fleet(template, prefix="car")
        fleet.add(4)
        try:
            with ParkpoolClient(
                ProducerSettings(
                    kafka, NAMESPACE, verification=Level.UNCHECKED, publish_timeout_s=15.0
                )
            ) as client:
                yield System(brokers, gateway, client)
        finally:
            fleet.stop_all()
            gateway.stop()


@pytest.fixture
def short_producer_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways made from here on replace a producer that delivers nothing after 3 s, not
    the production 15 s (test_kafkawriter checks that timing on a fake clock)."""
    monkeypatch.setattr(tasklog_module, "KafkaWriter", functools.partial(KafkaWriter, stall_s=3.0))


def every_chunk_once(system: System, handle: JobHandle) -> None:
    handle.wait(timeout=120)
    chunks = list(handle.chunks(timeout=1))
    assert sorted(c.chunk_id for c in chunks) == list(range(CHUNKS))
    assert all(float(c.outputs["value"]) == float(c.chunk_id) for c in chunks)
    assert handle.progress.dead_lettered == 0
    assert system.gateway.metric("parkpool_gateway_tasks_total", status="dead_lettered") == 0


def mid_job(system: System, fault: Callable[[], None]) -> JobHandle:
    """Submit the job, and inject ``fault`` once some but not all chunks are done."""
    handle = system.submit()
    wait_for(lambda: handle.progress.done >= 10, 60, "the first results")
    assert handle.progress.done < CHUNKS
    fault()
    return handle


def forget_producers(store: Path) -> None:
    """Make Tansu forget every idempotent producer, as a broker that lost their state does."""
    for meta in (store / STORE_BUCKET).glob("clusters/*/meta.json"):
        state = json.loads(meta.read_text())
        state["producers"] = {}
        meta.write_text(json.dumps(state))


class TestKafkaRestart:
    """Tansu SIGKILLed mid-job and started again on the same port."""

    def test_job_survives_a_kafka_sigkill(self, system: System) -> None:
        # Given a job in flight, When Tansu is SIGKILLed, down a while, then restarted
        def restart() -> None:
            system.brokers.kill_kafka()
            time.sleep(1.0)  # cars keep finishing chunks meanwhile
            system.brokers.start_kafka()

        handle = mid_job(system, restart)
        # Then every chunk reaches the caller exactly once, and none is dead-lettered
        every_chunk_once(system, handle)

    @pytest.mark.usefixtures("short_producer_stall")  # set up before the system's gateway
    def test_a_producer_the_broker_forgot_is_replaced(self, system: System) -> None:
        # Given a job in flight, When Tansu comes back without the producers' state
        def restart_forgetting() -> None:
            system.brokers.kill_kafka()
            forget_producers(system.brokers.run_dir / "store")
            system.brokers.start_kafka()

        handle = mid_job(system, restart_forgetting)
        # Then the gateway's fenced producer was replaced
        every_chunk_once(system, handle)
        assert system.gateway.metric("parkpool_gateway_kafka_producer_recreated_total") >= 1


class TestSdkProducer:
    """The SDK's own producer, when a restarted Tansu forgot the producers' ids."""

    def test_a_producer_the_broker_forgot_is_replaced_for_the_next_submit(
        self, system: System
    ) -> None:
        # Given a client that has published (so Kafka gave its producer an id)
        every_chunk_once(system, system.submit())
        # When Tansu comes back without the producers' state
        system.brokers.kill_kafka()
        forget_producers(system.brokers.run_dir / "store")
        system.brokers.start_kafka()
        # Then a submit that the old producer cannot get confirmed fails by name, and
        # the next goes out on a new producer and completes
        failed: list[BrokerError] = []
        handle = None
        for _ in range(3):
            try:
                handle = system.submit()
                break
            except BrokerError as exc:
                failed.append(exc)
        assert handle is not None, f"every submit failed: {failed}"
        every_chunk_once(system, handle)
        assert system.client.metrics.value("parkpool_sdk_kafka_producer_recreated_total") >= 1


class TestStoreRestart:
    """The object store under a running Tansu SIGKILLed mid-job and started again."""

    def test_job_survives_a_store_restart(self, system: System) -> None:
        def restart_store() -> None:
            system.brokers.kill_store()
            time.sleep(1.0)
            system.brokers.start_store()

        handle = mid_job(system, restart_store)
        every_chunk_once(system, handle)


class TestPartitionsComeBackRunning:
    """A partition that was paused when it went (lost in a session timeout after a
    Kafka restart, or revoked) is read again when it comes back to the same gateway."""

    def test_paused_then_reassigned_partitions_are_read(
        self, namespace: str, kafka_conn: KafkaConnection, client: ParkpoolClient
    ) -> None:
        # Given a gateway's task log that owns every partition, all paused (no car asks)
        log = TaskLog(
            kafka_conn,
            KafkaTopics(namespace),
            f"{namespace}.gateways",
            gateway_id="gw1",
            window=64,
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            metrics=GatewayMetrics(),
            on_revoked=lambda _gone: None,
        )
        log.open()
        try:
            wait_for(lambda: log.poll(8) == [] and bool(log.windows), 30, "an assignment")
            log.flow(starving=True)
            # When its partitions go and come back to it
            log.leave()
            wait_for(lambda: log.poll(8) == [] and not log.windows, 30, "the revocation")
            log.join()
            wait_for(lambda: log.poll(8) == [] and bool(log.windows), 30, "the reassignment")
            # Then, once cars ask for work again, a job's tasks are read
            log.flow(starving=False)
            client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.array([1.0])})])
            read: list[PendingTask] = []

            def some_read() -> bool:
                read.extend(t for t in log.poll(8) if isinstance(t, PendingTask))
                return bool(read)

            wait_for(some_read, 30, "the task")
        finally:
            log.close(5)
