# SPDX-License-Identifier: Apache-2.0
"""No Kafka record parkpool writes is larger than the configured limit (1 MiB by default,
Apache Kafka's max.message.bytes), and what would be larger is refused by name.

Tansu enforces no limit, so these tests measure every record themselves: they drive each
writer (SDK submit and cancel, gateway results and dead letters, dlq replay and purge)
with records as large as allowed, then read every record of every topic back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import Message

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import TopicLimitError, bootstrap
from parkpool.producer import dlq
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.kafka import Header, record_size
from parkpool.runtime.settings import DEFAULT_MAX_RECORD_BYTES, KafkaConnection
from parkpool.schemas import (
    DeadLetter,
    KafkaTopics,
    TaskChunk,
    ValidationError,
    decode,
    encode,
    peek_type,
)
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from tests.conftest import TEST_TOPIC_SPECS, RunningGateway
from tests.helpers import produce_raw_task, read_all, wait_for

pytestmark = pytest.mark.integration

LIMIT = DEFAULT_MAX_RECORD_BYTES


def floats_filling(budget: int) -> int:
    """How many float64 elements make a one-chunk record of about ``budget`` bytes."""
    return (budget - 1024) // 8


def elements_for_a_record_of(size: int) -> int:
    """How many float64 elements make a raw one-chunk task record of ``size`` bytes."""
    probe = 10_000  # large enough for msgpack's widest length headers, like the answer
    task = TaskChunk("j" * 32, 0, 1, "no_such_kernel", {}, {"x": np.zeros(probe)}, "r", 1.0, 1.0)
    return probe + (size - record_size(encode(task), "j" * 32 + ":0")) // 8


class TestSubmitRefusesLargeChunks:
    """A chunk that would not fit one record is refused at submit, naming the way out."""

    def test_full_depth_gemm_tiles(
        self, client: ParkpoolClient, kafka_conn: KafkaConnection
    ) -> None:
        # Given operands 4096 deep, whose full-depth tiles of 512 make 16 MiB chunks
        a = np.zeros((512, 4096), np.float32)
        b = np.zeros((4096, 512), np.float32)
        # When the product is submitted in such tiles
        with pytest.raises(ValidationError) as refused:
            client.submit("gemm", {"a": a, "b": b}, tile=512)
        # Then the refusal names the limit, its setting and the way out
        message = str(refused.value)
        assert refused.value.reason == "record_too_large"
        assert "1,048,576" in message and "PARKPOOL_KAFKA_MAX_RECORD_BYTES" in message
        assert "smaller tile" in message and "k_tile" in message
        # And it was counted, and nothing was sent
        assert (
            client.metrics.value("parkpool_sdk_jobs_refused_total", reason="record_too_large") == 1
        )
        assert read_all(kafka_conn, client.topics.tasks, idle=0.5) == []
        assert "17x finer" in message  # 16 MiB and the framing
        # And the same product split along its depth too is accepted: 512 KiB chunks
        assert client.submit("gemm", {"a": a, "b": b}, tile=256, k_tile=256).n_chunks == 64

    def test_a_lower_limit_is_honoured(self, namespace: str, brokers: EmbeddedBrokers) -> None:
        # Given a client told that its Kafka takes records of 128 KiB at most
        conn = KafkaConnection(brokers.kafka_bootstrap, max_record_bytes=128 << 10)
        with ParkpoolClient(
            ProducerSettings(conn, namespace, verification=Level.UNCHECKED)
        ) as small:
            x = np.zeros(floats_filling(256 << 10))
            # When a job with one 256 KiB chunk is submitted, it is refused
            with pytest.raises(ValidationError, match="131,072"):
                small.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=x.size)
            # And with chunks of 64 KiB it is accepted
            handle = small.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=8192)
            assert handle.n_chunks == 4


class TestEveryRecordFits:
    """Every record parkpool writes, of every kind, fits the limit."""

    def test_records_of_every_writer(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        topics = KafkaTopics(namespace)
        # (no grace for cars to announce kernels: the raw tasks below name one no car
        # runs, and the test is about their letters' sizes, not about when they go)
        gateway_factory(kernel_grace_s=0)
        fleet_factory(2)
        # When a job whose chunks and results come close to the limit completes
        x = np.random.default_rng(1).random(2 * floats_filling(LIMIT - 2048))
        handle = client.submit("poly", {"x": x, "coeffs": [1.0, 0.0]}, chunk_elems=x.size // 2)
        assert handle.n_chunks == 2
        np.testing.assert_allclose(handle.wait(timeout=120), x)
        # And a job is cancelled
        client.submit("reduce", {"x": np.ones(8), "op": "sum"}).cancel()
        # And a task no car can run, a few bytes under the limit, is dead-lettered (its
        # letter would be over the limit with the task's bytes in it)
        big = np.zeros(elements_for_a_record_of(LIMIT - 32))
        produce_raw_task(kafka_conn, topics.tasks, "no_such_kernel", {}, {"x": big}, topics.results)
        # And a small one too, which is then replayed, and purged once it fails again
        small = produce_raw_task(
            kafka_conn, topics.tasks, "no_such_kernel", {}, {"x": np.ones(4)}, topics.results
        )
        wait_for(lambda: len(_letters(kafka_conn, topics)) == 2, 60, "two dead letters")
        entries = dlq.read_dead_letters(kafka_conn, namespace)
        kept = [e for e in entries if e.letter is not None and e.letter.job_id == small.job_id]
        assert dlq.replay(kafka_conn, namespace, kept).ok
        wait_for(lambda: len(_letters(kafka_conn, topics)) == 3, 60, "the replay's dead letter")
        pending = dlq.pending(dlq.read_dead_letters(kafka_conn, namespace))
        assert dlq.purge(kafka_conn, namespace, pending).ok
        # Then the large letter went without the task's bytes, the small ones with them
        kept_bytes = sorted(letter.original_kept for letter in _letters(kafka_conn, topics))
        assert kept_bytes == [False, True, True]
        # And every record of every topic fits the limit
        kinds: Counter[str] = Counter()
        for topic in topics.all():
            for record in read_all(kafka_conn, topic):
                value, key = record.value() or b"", record.key()
                headers = headers_of(record)
                size = record_size(value, key, headers)
                assert size <= LIMIT, f"{topic}: a {peek_type(value)} record of {size} bytes"
                kinds[f"{topic.rsplit('.', 1)[1]}:{peek_type(value)}"] += 1
        expected = {
            "tasks:task",
            "tasks:cancel",
            "results:result",
            "deadletter:dead_letter",
            "deadletter:dlq_action",
        }
        assert expected <= set(kinds), kinds
        # Task records: the poly job's 2, the cancelled job's 1, 2 raw tasks and 1 replay
        assert kinds["tasks:task"] == 6


def headers_of(record: Message) -> list[Header]:
    raw = record.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(str(name), data) for name, data in pairs]


def _letters(conn: KafkaConnection, topics: KafkaTopics) -> list[DeadLetter]:
    records = read_all(conn, topics.dead_letter, idle=0.3)
    return [
        decode(r.value() or b"", DeadLetter)
        for r in records
        if peek_type(r.value() or b"") == DeadLetter.TYPE
    ]


class TestBootstrapChecksTopicLimits:
    """`brokers bootstrap` says when existing topics take smaller records than we write."""

    def test_topics_that_allow_less_are_named(self, brokers: EmbeddedBrokers) -> None:
        # Given a namespace whose topics were made for records of 512 KiB
        small = tuple(
            dataclasses.replace(spec, config={**spec.config, "max.message.bytes": str(512 << 10)})
            for spec in TEST_TOPIC_SPECS
        )
        namespace = "limits" + uuid.uuid4().hex[:12]
        bootstrap(brokers.kafka_bootstrap, namespace, specs=small, max_record_bytes=512 << 10)
        # When bootstrap runs for clients that write 1 MiB records
        with pytest.raises(TopicLimitError) as refused:
            bootstrap(brokers.kafka_bootstrap, namespace, specs=TEST_TOPIC_SPECS)
        # Then every topic is named with what it allows, and the way out
        message = str(refused.value)
        for topic in KafkaTopics(namespace).all():
            assert f"topic {topic} accepts records of {512 << 10} bytes" in message
        assert "max.message.bytes" in message and "PARKPOOL_KAFKA_MAX_RECORD_BYTES" in message
