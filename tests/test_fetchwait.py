# SPDX-License-Identifier: Apache-2.0
"""The result reader's fetch wait: raised when a partition stalls, and only then.

The ladder's rules are pure logic; the last tests show why it exists, on the real
durable embedded Kafka: with a short wait, a reader stops getting records from a
partition with a long history, and a job's tasks reach a car, or its results its
caller, only because the reader (the gateway's, the SDK's) waits longer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.fetchwait import MAX_FETCH_WAIT_MS, FetchWaitLadder
from parkpool.runtime.kafka import producer_config, reader_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import ConfigError, KafkaTopics
from parkpool.schemas.reputation import Level
from tests.conftest import _TEST_PARTITIONS, RunningGateway

P0, P1 = ("results", 0), ("results", 1)


def raised(ladder: FetchWaitLadder, behind: list[tuple[str, int]], now: float) -> int | None:
    """What a reader does with the ladder when the broker answers."""
    return ladder.raise_wait() if ladder.due(behind, now) else None


class TestLadder:
    def test_a_partition_behind_past_the_patience_doubles_the_wait(self) -> None:
        ladder = FetchWaitLadder(100)
        assert raised(ladder, [P0], now=10.0) is None  # first seen behind
        assert raised(ladder, [P0], now=10.9) is None
        assert raised(ladder, [P0], now=11.0) == 200
        assert ladder.wait_ms == 200

    def test_a_record_read_restarts_the_patience(self) -> None:
        ladder = FetchWaitLadder(100)
        raised(ladder, [P0], now=10.0)
        ladder.read()
        assert raised(ladder, [P0], now=10.9) is None
        assert raised(ladder, [P0], now=11.8) is None
        assert raised(ladder, [P0], now=11.9) == 200

    def test_records_from_other_partitions_are_no_stall(self) -> None:
        # Large records come one or two a fetch: a partition waits its turn while the
        # reader is busy with the others, on any Kafka.
        ladder = FetchWaitLadder(100)
        for second in range(10):
            assert raised(ladder, [P0], now=float(second)) is None
            ladder.read()  # from P1
        assert raised(ladder, [P0], now=10.0) is None
        assert raised(ladder, [P0], now=11.0) == 200

    def test_a_partition_caught_up_is_forgotten(self) -> None:
        ladder = FetchWaitLadder(100)
        raised(ladder, [P0], now=10.0)
        assert raised(ladder, [], now=10.5) is None
        assert raised(ladder, [P0], now=11.2) is None  # behind again from 11.2
        assert raised(ladder, [P0, P1], now=12.2) == 200

    def test_each_raise_gives_every_partition_the_new_patience(self) -> None:
        ladder = FetchWaitLadder(400, most_ms=1000)
        assert ladder.patience_s == pytest.approx(1.6)  # four waits, more than 1 s
        raised(ladder, [P0], now=0.0)
        assert raised(ladder, [P0], now=1.6) == 800
        assert ladder.patience_s == pytest.approx(3.2)
        assert raised(ladder, [P0], now=2.0) is None  # behind from here on
        assert raised(ladder, [P0], now=5.1) is None
        assert raised(ladder, [P0], now=5.2) == 1000  # capped
        assert raised(ladder, [P0], now=20.0) is None
        assert raised(ladder, [P0], now=30.0) is None
        assert ladder.wait_ms == 1000

    def test_a_wait_out_of_range_is_refused(self) -> None:
        with pytest.raises(ValueError):
            FetchWaitLadder(0)
        with pytest.raises(ValueError):
            FetchWaitLadder(200, most_ms=100)

    def test_the_client_refuses_a_wait_out_of_range(self, kafka_conn: KafkaConnection) -> None:
        for wait in (0, MAX_FETCH_WAIT_MS + 1):
            with pytest.raises(ConfigError, match="result_fetch_wait_ms"):
                ParkpoolClient(ProducerSettings(kafka_conn, "nowhere", result_fetch_wait_ms=wait))


def fill(kafka: KafkaConnection, topic: str, partitions: int, batches: int) -> None:
    """``batches`` one-record batches in each partition, keyed to no job: the history a
    results topic gathers over many jobs (a gateway writes most results one by one)."""
    producer = Producer(producer_config(kafka, **{"linger.ms": 0, "batch.num.messages": 1}))
    for i in range(batches):
        for partition in range(partitions):
            producer.produce(topic, b"old", key=f"old-job:{i}", partition=partition)
        producer.poll(0)
    assert producer.flush(60) == 0, "the history was not all written"


def test_a_long_history_stalls_a_short_wait_until_it_is_raised(
    namespace: str,
    kafka_conn: KafkaConnection,
    gateway_factory: Callable[..., RunningGateway],
    fleet_factory: Callable[..., object],
) -> None:
    # Listing ~600 batches takes Tansu longer than 5 ms: a reader that kept that wait
    # would never see this job's result (the embedded Kafka is durable in tests).
    fill(kafka_conn, KafkaTopics(namespace).results, _TEST_PARTITIONS["results"], 600)
    gateway_factory()
    fleet_factory(1)
    settings = ProducerSettings(
        kafka_conn, namespace, verification=Level.UNCHECKED, result_fetch_wait_ms=5
    )
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    with ParkpoolClient(settings) as sdk:
        answer = sdk.submit("gemm", {"a": a, "b": a}, tile=8).wait(timeout=60)
        raised = sdk.metrics.value("parkpool_sdk_result_fetch_wait_raised_total")
    np.testing.assert_allclose(answer, a @ a, rtol=1e-6)
    assert raised >= 1


def test_a_gateway_raises_its_task_wait_when_a_partition_stalls(
    namespace: str,
    kafka_conn: KafkaConnection,
    gateway_factory: Callable[..., RunningGateway],
    fleet_factory: Callable[..., object],
    client: ParkpoolClient,
) -> None:
    # A tasks topic with a long history, all of it done: the group's commit is at its end.
    topics = KafkaTopics(namespace)
    partitions = _TEST_PARTITIONS["tasks"]
    fill(kafka_conn, topics.tasks, partitions, 600)
    done = Consumer(reader_config(kafka_conn, **{"group.id": f"{namespace}.gateways"}))
    ends = [TopicPartition(topics.tasks, p, 600) for p in range(partitions)]
    done.commit(offsets=ends, asynchronous=False)
    done.close()
    # With a 5 ms wait, Tansu no longer lists such a partition within a fetch.
    gateway = gateway_factory(task_fetch_wait_ms=5)
    fleet_factory(1)
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    answer = client.submit("gemm", {"a": a, "b": a}, tile=8).wait(timeout=90)
    np.testing.assert_allclose(answer, a @ a, rtol=1e-6)
    assert gateway.metric("parkpool_gateway_task_fetch_wait_raised_total") >= 1
