# SPDX-License-Identifier: Apache-2.0
"""The embedded Kafka with durable storage (Tansu on localbucket) survives a SIGKILL: its
records and its topics' partition counts are there after a restart on the same port."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import KafkaTopics

pytestmark = pytest.mark.integration

RECORDS = 300


def partition_counts(kafka: KafkaConnection, names: tuple[str, ...]) -> dict[str, int]:
    metadata = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10)
    return {name: len(metadata.topics[name].partitions) for name in names}


def read_everything(kafka: KafkaConnection, topic: str) -> list[bytes]:
    """Every record of the topic, read by a fresh consumer group from the beginning."""
    group = kafka.client_config(**{"group.id": "durable-check", "auto.offset.reset": "earliest"})
    consumer = Consumer(group | {"session.timeout.ms": 6000, "enable.auto.commit": False})
    consumer.subscribe([topic])
    values: list[bytes] = []
    try:
        for _ in range(300):
            for record in consumer.consume(500, timeout=0.2):
                if record.error() is None:
                    values.append(record.value() or b"")
            if len(values) >= RECORDS:
                break
    finally:
        consumer.close()
    return values


class TestDurableEmbeddedKafka:
    """Records written before a crash are read after it, from the same topics."""

    def test_sigkill_and_restart_lose_nothing(self, tmp_path: Path) -> None:
        # Given the durable embedded Kafka with the namespace's topics, and 300 records
        with EmbeddedBrokers(run_dir=tmp_path, durable=True) as brokers:
            kafka = KafkaConnection(brokers.kafka_bootstrap)
            topics = KafkaTopics("durable")
            bootstrap(brokers.kafka_bootstrap, "durable")
            counts = partition_counts(kafka, topics.all())
            producer = Producer(producer_config(kafka))
            for i in range(RECORDS):
                producer.produce(topics.tasks, f"record-{i}".encode(), key=str(i).encode())
            assert producer.flush(30) == 0
            # When Tansu is SIGKILLed and started again on the same port
            brokers.kill_kafka()
            brokers.start_kafka()
            # Then every topic has the partitions it had, and every record is there
            assert partition_counts(kafka, topics.all()) == counts
            values = read_everything(kafka, topics.tasks)
            assert sorted(values) == sorted(f"record-{i}".encode() for i in range(RECORDS))
