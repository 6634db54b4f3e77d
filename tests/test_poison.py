# SPDX-License-Identifier: Apache-2.0
"""No poison record or message can stop a gateway, on the real brokers.

A junk record just under the largest size the gateway's client reads is dead-lettered
without its bytes and its offset committed past; a message or record whose handler
raises is counted, acknowledged and never comes back. A normal job beside each completes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from parkpool.gateway.handlers import VehicleHandlers
from parkpool.gateway.mqtt_link import MqttEvent
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.jobs import JobFailed
from parkpool.runtime.kafka import MAX_FETCH_RECORD_BYTES, producer_config
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import DeadLetter, KafkaTopics, MqttTopics, decode
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, read_all, wait_committed_to_end, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
KINDS = ("pull", "status", "result", "nack", "heartbeat")
POISON_CAR = "poison-car"


def run_small_job(client: ParkpoolClient) -> None:
    """A normal job: must complete whatever else is in the topics."""
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    handle = client.submit("gemm", {"a": a, "b": a}, tile=4)
    np.testing.assert_allclose(handle.wait(timeout=60), a @ a, rtol=1e-5)


def letters(conn: KafkaConnection, namespace: str) -> list[DeadLetter]:
    records = read_all(conn, KafkaTopics(namespace).dead_letter)
    return [decode(r.value() or b"", DeadLetter) for r in records]


class TestHugeJunkRecord:
    """A foreign record too large to dead-letter whole goes without its bytes."""

    def test_dead_lettered_without_bytes_next_to_a_normal_job(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a gateway and cars, and a record of junk just under the largest the
        # gateway's Kafka client reads (far over what Kafka lets parkpool write)
        running = gateway_factory()
        fleet_factory(2)
        junk = np.random.default_rng(5).bytes(MAX_FETCH_RECORD_BYTES - (64 << 10))
        writer = Producer(
            producer_config(kafka_conn, **{"message.max.bytes": MAX_FETCH_RECORD_BYTES})
        )
        topics = KafkaTopics(namespace)
        writer.produce(topics.tasks, junk, key="junk", partition=0)
        assert writer.flush(30) == 0
        # When a normal job is submitted next to it
        run_small_job(client)
        # Then the junk is dead-lettered, saying what it was but without its bytes
        found = wait_for(lambda: letters(kafka_conn, namespace), 30, "the dead letter")
        (letter,) = found
        assert letter.reason.startswith("decode_")
        assert not letter.original_kept and letter.original == b""
        assert letter.original_size == len(junk)
        assert letter.original_sha256 == hashlib.sha256(junk).hexdigest()
        assert (letter.source_topic, letter.partition, letter.offset) == (topics.tasks, 0, 0)
        # And it was counted, and the gateway committed past it
        assert running.metric("parkpool_gateway_dead_letter_bytes_dropped_total") == 1
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", topics.tasks)
        assert running.error is None


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every gateway built from now on has handlers that raise for anything from one car:
    a bug met by a message. Injected at construction, before its session can redeliver."""
    build = VehicleHandlers.__init__

    def init(self: VehicleHandlers, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        for kind in KINDS:
            self._handlers[kind] = poison(self._handlers[kind])

    monkeypatch.setattr(VehicleHandlers, "__init__", init)


def poison(handler: Callable[[MqttEvent], bool]) -> Callable[[MqttEvent], bool]:
    def handle(event: MqttEvent) -> bool:
        if event.vehicle_id == POISON_CAR:
            raise RuntimeError(f"injected fault in the {event.kind} handler")
        return handler(event)

    return handle


class TestHandlerThatRaises:
    """A message whose handler raises is counted once, acknowledged, and not redelivered."""

    @pytest.mark.usefixtures("poisoned")
    def test_each_kind_is_counted_and_work_goes_on(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway with cars, and a car whose every message makes a handler raise
        poisoned_gateway = gateway_factory()
        fleet_factory(2)
        topics = MqttTopics(namespace)
        car = RawMqtt(mqtt_conn, f"veh-{namespace}-{POISON_CAR}")
        # When that car sends one message of each kind, with QoS 1
        for kind in KINDS:
            car.publish(poison_topic(topics, kind), b"\x00 any bytes")
        car.close()
        # Then each kind is counted once, and a normal job still completes
        errors = handler_errors(poisoned_gateway)
        wait_for(lambda: errors() == dict.fromkeys(KINDS, 1.0), 20, "each kind counted")
        run_small_job(client)
        assert poisoned_gateway.error is None and poisoned_gateway.thread.is_alive()
        # And when the gateway restarts on the same session, none of them comes back
        poisoned_gateway.stop()
        restarted = gateway_factory()
        run_small_job(client)
        assert handler_errors(restarted)() == dict.fromkeys(KINDS, 0.0)


def poison_topic(topics: MqttTopics, kind: str) -> str:
    return getattr(topics, kind)(POISON_CAR, "gw1")  # type: ignore[no-any-return]


def handler_errors(running: RunningGateway) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        name = "parkpool_gateway_handler_errors_total"
        return {kind: running.metric(name, source=f"mqtt_{kind}") for kind in KINDS}

    return read


class TestRecordHandlerThatRaises:
    """A task record whose handling raises is dead-lettered and counted, not retried."""

    def test_counted_dead_lettered_and_committed(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a gateway that meets a bug on the records of one job
        running = gateway_factory()
        log = running.gateway.log
        read = log._read

        def faulty(tp: tuple[str, int], offset: int, raw: bytes, claimed: object) -> object:
            if claimed == ("poisoned-job", 0):
                raise RuntimeError("injected fault while reading a record")
            return read(tp, offset, raw, claimed)  # type: ignore[arg-type]

        log._read = faulty  # type: ignore[method-assign, assignment]
        fleet_factory(2)
        # When that job is submitted, then another
        a = np.ones((4, 4), np.float32)
        poisoned = client.submit("gemm", {"a": a, "b": a}, tile=4, job_id="poisoned-job")
        run_small_job(client)
        # Then its record is counted and dead-lettered, bytes and all, and its caller hears
        # of it by name (the record's key names the chunk) instead of waiting for ever
        with pytest.raises(JobFailed, match="chunk 0: handler_error"):
            poisoned.wait(timeout=30)
        assert running.metric("parkpool_gateway_handler_errors_total", source="kafka_tasks") == 1
        (letter,) = letters(kafka_conn, namespace)
        assert letter.reason == "handler_error" and letter.original_kept
        assert (letter.job_id, letter.chunk_id) == ("poisoned-job", 0)
        # And the gateway committed past it
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", KafkaTopics(namespace).tasks)
