# SPDX-License-Identifier: Apache-2.0
"""Failures on the path: poison tasks, a gateway killed mid-job, malformed bytes.

Each test checks that nothing is lost, that bad input is refused with a reason and
counted, and that the rest of the work still completes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from parkpool.app.children import role_env
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import Assignment, DeadLetter, MqttTopics, Result, decode, encode
from parkpool.schemas.codec import peek_type
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY, Kernel, Tolerance, register
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.helpers import (
    RawMqtt,
    end_offsets,
    hold_lease,
    produce_raw_task,
    read_topic,
    wait_committed_to_end,
    wait_for,
)

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
DROPPED = "parkpool_gateway_dropped_total"
POISON = "test_always_fails"


def _explode(_xp: Any, _params: Any, _inputs: Any) -> dict[str, Any]:
    raise RuntimeError("this task fails on every vehicle")


@pytest.fixture(scope="module")
def poison_kernel() -> str:
    """A kernel that passes validation and then fails at run time, every time."""
    if POISON not in REGISTRY:
        register(
            Kernel(POISON, _explode, Tolerance(0, 0), (), lambda _p, _i: None, lambda _p, _i: {})
        )
    return POISON


class TestPoisonTask:
    """A task that fails everywhere is dead-lettered after N attempts; its partition moves on."""

    def test_poison_goes_to_dead_letter_and_partition_completes(
        self,
        poison_kernel: str,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a gateway that allows 3 attempts, and a fleet
        gateway = gateway_factory(max_attempts=3)
        fleet_factory(3)
        # When a poison job and a healthy job spread over every partition are submitted
        # (the poison is written raw: the SDK sends only built-in kernels)
        poison = produce_raw_task(
            kafka_conn, client.topics.tasks, poison_kernel, {}, {}, client.reply_topic
        )
        x = np.arange(12_000, dtype=np.float64)
        healthy = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=1000)
        # Then the healthy job completes
        assert healthy.wait(timeout=60) == float(x.sum())
        # And the poison is dead-lettered with the kernel's reason and all three attempts
        [record] = read_topic(kafka_conn, client.topics.dead_letter, 1, timeout=60)
        letter = decode(record.value() or b"", DeadLetter)
        assert (letter.job_id, letter.chunk_id, letter.reason) == (poison.job_id, 0, "kernel_error")
        assert [a.reason for a in letter.attempts] == ["kernel_error"] * 3
        assert all("fails on every vehicle" in a.detail for a in letter.attempts)
        assert gateway.metric("parkpool_gateway_dead_lettered_total", reason="kernel_error") == 1
        # And every task partition is committed to its end: nothing stalls behind the poison
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", client.topics.tasks)


class TestMalformedInput:
    """Malformed bytes are refused with a reason and counted; nothing crashes or stalls."""

    def test_garbage_on_tasks_topic_is_dead_lettered(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
    ) -> None:
        # Given a running gateway and fleet
        gateway = gateway_factory()
        fleet_factory(2)
        # When garbage lands on every partition of the tasks topic, among real work
        garbage = b"\x93\x01\x02definitely not a task"
        producer = Producer(producer_config(kafka_conn))
        for partition in end_offsets(kafka_conn, client.topics.tasks):
            producer.produce(client.topics.tasks, garbage, partition=partition)
        assert producer.flush(10) == 0
        x = np.ones(3000)
        handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=500)
        # Then the real job completes
        assert handle.wait(timeout=60) == 3000.0
        # And each garbage record is dead-lettered with its bytes and a readable reason
        partitions = len(end_offsets(kafka_conn, client.topics.tasks))
        records = read_topic(kafka_conn, client.topics.dead_letter, partitions)
        letters = [decode(r.value(), DeadLetter) for r in records]
        assert all(letter.original == garbage for letter in letters)
        assert all(letter.reason == "decode_malformed" for letter in letters)
        assert all(letter.detail for letter in letters)
        assert gateway.metric(DROPPED, source="kafka_tasks", reason="malformed") == partitions

    def test_garbage_and_forged_results_on_mqtt_are_dropped_and_counted(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a running gateway and fleet
        gateway = gateway_factory()
        fleet_factory(2)
        topics = MqttTopics(namespace)
        hostile = RawMqtt(mqtt_conn, f"hostile-{namespace}")
        # When a peer publishes garbage, and a well-formed result for a lease it never held
        hostile.publish(topics.result("evil", "gw1"), b"\xc1\xc1\xc1")
        hostile.publish(topics.pull("evil", "gw1"), b"")
        forged = Result(
            "job1", 0, 1, "evil", "gw1", 12345, 1, {"value": np.zeros(())}, 0.1, 1.0, 1.0
        )
        hostile.publish(topics.result("evil", "gw1"), encode(forged))
        hostile.close()
        # Then each is dropped and counted by reason
        wait_for(
            lambda: gateway.metric(DROPPED, source="mqtt_result", reason="stale_or_fenced"),
            10,
            "the forged result to be fenced",
        )
        assert gateway.metric(DROPPED, source="mqtt_result", reason="malformed") == 1
        assert gateway.metric(DROPPED, source="mqtt_pull", reason="malformed") == 1
        # And the gateway still completes real work
        handle = client.submit("reduce", {"x": np.ones(100), "op": "max"}, chunk_elems=50)
        assert handle.wait(timeout=60) == 1.0


class TestSilentLease:
    def test_a_car_whose_lease_expired_gets_work_again_without_a_pull(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a car that granted one credit, took a task, and never answers (its
        # result refused, say, or lost), under a short lease
        gateway_factory(lease_seconds=1.5)
        handle = client.submit("reduce", {"x": np.ones(100), "op": "sum"}, chunk_elems=50)
        holder = hold_lease(mqtt_conn, mqtt_topics, "mute")
        first = holder.assignment
        # When the lease expires, Then its slot is filled again though it sent no new pull
        again = wait_for(
            lambda: [
                a
                for m in holder.car.received
                if peek_type(m.payload) == Assignment.TYPE
                and (a := decode(m.payload, Assignment)).epoch != first.epoch
            ],
            15,
            "a second assignment to the same car",
        )
        assert again[0].vehicle_id == "mute"
        holder.close()
        handle.cancel()


@pytest.fixture
def gateway_process(
    brokers: EmbeddedBrokers, namespace: str, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``parkpool gateway`` as a real child process, the way production runs it."""
    children: list[subprocess.Popen[bytes]] = []
    env = {
        **role_env(brokers, namespace),
        "PARKPOOL_GATEWAY_ID": "gwproc",
        "PARKPOOL_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
    }

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"gateway-{len(children)}.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, "-m", "parkpool.app.cli", "gateway"], env=env, stdout=log, stderr=log
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait(30)


class TestGatewayCrash:
    """A gateway SIGKILLed mid-job and restarted: the job completes with no chunk missing."""

    def test_sigkill_and_restart_mid_job(
        self,
        gateway_process: Callable[[], subprocess.Popen[bytes]],
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway process and vehicles slow enough that the job takes a while
        first = gateway_process()
        fleet_factory(4, simulated_delay_s=0.2)
        x = np.linspace(-1, 1, 60_000)
        handle = client.submit("poly", {"x": x, "coeffs": [3.0, 0.0, -1.0]}, chunk_elems=1000)
        wait_for(lambda: handle.progress.done >= 10, 60, "the first results")
        assert handle.progress.done < handle.n_chunks
        # When the gateway is SIGKILLed mid-job and a new one starts
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        gateway_process()
        # Then the job completes with every chunk, each handed over once
        answer = handle.wait(timeout=120)
        np.testing.assert_allclose(answer, np.polyval([3.0, 0.0, -1.0], x))
        ids = [chunk.chunk_id for chunk in handle.chunks(timeout=1)]
        assert sorted(ids) == list(range(handle.n_chunks))
