# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the Kafka task path: hostile records on the tasks topic.

Random and mutated bytes, and broken CancelJob records, are written to the tasks topic as
any Kafka client could. Each must be dead-lettered once with ``decode_<reason>`` and its
original bytes, counted once, and must not hold its partition back: a normal job after
them completes, and the gateway's commits reach the end of every partition.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator

import msgpack
import numpy as np
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.kafka import MAX_FETCH_RECORD_BYTES, producer_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import CancelJob, DeadLetter, DecodeError, TaskChunk, decode, encode
from parkpool.schemas.codec import peek_type
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.fuzz_hostile import hostile_payloads
from tests.fuzz_messages import body_pairs, decode_outcome, pack_pairs
from tests.helpers import TopicTail, wait_committed_to_end

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]


def expected_reason(raw: bytes) -> str | None:
    """The decode reason the gateway must dead-letter a record with; None: it is valid."""
    kind = CancelJob if peek_type(raw) == CancelJob.TYPE else TaskChunk
    outcome = decode_outcome(raw, kind)
    return outcome.reason if isinstance(outcome, DecodeError) else None


def _cancel(**fields: object) -> bytes:
    """A CancelJob's bytes with fields set to values its constructor would refuse."""
    pairs = body_pairs(CancelJob("job-1", time.time()))
    present = {k for k, _ in pairs}
    pairs = [(k, fields.get(k, v)) for k, v in pairs if fields.get(k, v) is not _GONE]
    return pack_pairs(pairs + [(k, v) for k, v in fields.items() if k not in present])


_GONE = object()
BROKEN_CANCELS = [
    _cancel(job_id=5),
    _cancel(job_id="a/b"),
    _cancel(job_id=_GONE),
    _cancel(requested_at=math.nan),
    _cancel(requested_at=-1.0),
    _cancel(reason="no spaces allowed"),
    _cancel(v=2),
    encode(CancelJob("job-1", 1.0))[:-3],
]
HOSTILE_RECORDS = st.one_of(
    hostile_payloads(TaskChunk), hostile_payloads(CancelJob), st.sampled_from(BROKEN_CANCELS)
)


@pytest.fixture
def dead_letters(kafka_conn: KafkaConnection, client: ParkpoolClient) -> Iterator[TopicTail]:
    tail = TopicTail(kafka_conn, client.topics.dead_letter)
    yield tail
    tail.close()


def kafka_drops(running: RunningGateway) -> Counter[str]:
    counts: Counter[str] = Counter()
    for metric in running.gateway.metrics.registry.collect():
        if metric.name == "parkpool_gateway_dropped":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["source"] == "kafka_tasks":
                    counts[sample.labels["reason"]] = int(sample.value)
    return counts


class TestHostileTaskRecords:
    """Each undecodable record is dead-lettered once with its reason and bytes; work goes on."""

    def test_hostile_records_then_a_job(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
        dead_letters: TopicTail,
    ) -> None:
        # Given a gateway and two vehicles
        running = gateway_factory()
        fleet_factory(2)
        # Any Kafka client may write here, with records larger than parkpool writes
        producer = Producer(
            producer_config(kafka_conn, **{"message.max.bytes": MAX_FETCH_RECORD_BYTES})
        )
        tasks = client.topics.tasks

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(HOSTILE_RECORDS, min_size=1, max_size=5))
        @example(BROKEN_CANCELS)
        @example([b"", b"\xc1", b"\x91" * 100_000, encode(CancelJob("j", 1.0)) + b"\x00"])
        @example([b"\xc1" * ((1 << 20) + 1), b"\xc1"])  # over the limit: a letter without bytes
        @example(
            [_task_bytes("t", reply_topic=".")[1], _task_bytes("t", reply_topic="..")[1]]
        )  # crashed the gateway once
        def batch(records: list[bytes]) -> None:
            # When records that do not decode land on the tasks topic (ones that do decode
            # are left out: a valid task is work, a valid cancel a cancel)
            records = [r for r in records if expected_reason(r) is not None]
            before = kafka_drops(running)
            for raw in records:
                producer.produce(tasks, raw)
            assert producer.flush(10) == 0
            letters = [
                decode(r.value() or b"", DeadLetter) for r in dead_letters.take(len(records))
            ]
            # Then each is dead-lettered once, with its reason and where it was, and its
            # bytes (or, for one too large for a letter, their SHA-256)
            by_digest = {hashlib.sha256(r).hexdigest(): r for r in records}
            got = Counter(
                (
                    letter.original if letter.original_kept else by_digest[letter.original_sha256],
                    letter.reason,
                )
                for letter in letters
            )
            assert got == Counter((r, f"decode_{expected_reason(r)}") for r in records)
            assert all(letter.detail and letter.source_topic == tasks for letter in letters)
            assert all((letter.job_id, letter.chunk_id) == ("", -1) for letter in letters)
            # And counted once by reason
            added = kafka_drops(running) - before
            assert added == Counter(expected_reason(r) for r in records)

        batch()
        # And a normal job after them completes, every chunk once
        x = np.arange(3000, dtype=np.float64)
        handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=250)
        assert handle.wait(timeout=60) == float(x.sum())
        assert sorted(c.chunk_id for c in handle.chunks(timeout=1)) == list(range(handle.n_chunks))
        # And no partition is held back: commits reach the end of every one
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", tasks)
        assert dead_letters.nothing_more()
        assert running.error is None and running.gateway.health()[0]


def _job_after(client: ParkpoolClient) -> None:
    """A job of 40 chunks, so every partition gets records after whatever came before."""
    x = np.arange(4000, dtype=np.float64)
    handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=100)
    assert handle.wait(timeout=60) == float(x.sum())


class TestWellFormedButWrongRecords:
    """Records that decode but cannot be honoured are dead-lettered or skipped, never stuck."""

    def test_cancel_of_an_unknown_job_is_consumed(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
        dead_letters: TopicTail,
    ) -> None:
        # Given a gateway and a vehicle
        running = gateway_factory()
        fleet_factory(1)
        # When a well-formed cancel names a job nobody submitted (one on every partition)
        client.cancel("no-such-job")
        # Then a job after it completes, the cancel is not dead-lettered, and every
        # partition is committed past it
        _job_after(client)
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", client.topics.tasks)
        assert dead_letters.nothing_more()
        assert running.error is None

    def test_tasks_no_car_can_run_are_dead_lettered(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
        dead_letters: TopicTail,
    ) -> None:
        # Given a gateway (which gives cars no grace to announce kernels) and a vehicle
        running = gateway_factory(kernel_grace_s=0)
        fleet_factory(1)
        # When tasks no car can run (or run in time, or answer) are written raw
        cases = {
            _produce_task(kafka_conn, client, **fields): (raw_reason, fields)
            for raw_reason, fields in WRONG_TASKS
        }
        # Then each is dead-lettered once with its reason (the job is named when the
        # record decoded), the gateway lives, and a job after them completes with every
        # partition committed to its end
        letters = [decode(r.value() or b"", DeadLetter) for r in dead_letters.take(len(cases))]
        by_job = {_job_of(letter): letter.reason for letter in letters}
        assert by_job == {job_id: reason for job_id, (reason, _) in cases.items()}
        _job_after(client)
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", client.topics.tasks)
        assert dead_letters.nothing_more()
        assert running.error is None and running.gateway.health()[0]


WRONG_TASKS: list[tuple[str, dict[str, object]]] = [
    ("unknown_kernel", {"kernel": "no_such_kernel"}),
    ("invalid_task", {"params": {"op": "median"}}),
    ("invalid_task", {"inputs": {}}),
    ("deadline_passed", {"deadline": 1.0}),
    # Kafka refuses these topic names: the producer raised inside the gateway's loop
    ("decode_bad_value", {"reply_topic": "."}),
    ("decode_bad_value", {"reply_topic": ".."}),
    ("decode_out_of_range", {"n_chunks": 2, "chunk_id": 2}),
    # Results to be sealed to a key nothing can be sealed to: the car cannot answer
    ("invalid_task", {"reply_key": bytes(32)}),
    # Sealed, but to a key this gateway does not hold (it holds none here)
    (
        "unsealable",
        {"inputs": {}, "sealed_inputs": b"x" * 64, "inputs_key": bytes(80), "reply_key": bytes(32)},
    ),
]


def _job_of(letter: DeadLetter) -> str:
    """The job a dead letter is about, read from its original bytes when it did not decode."""
    if letter.job_id:
        return letter.job_id
    return str(dict(msgpack.unpackb(letter.original))["job_id"])


def _produce_task(conn: KafkaConnection, client: ParkpoolClient, **fields: object) -> str:
    """Write a one-chunk task, with ``fields`` changed, as any Kafka client could."""
    job_id, raw = _task_bytes(client.reply_topic, **fields)
    producer = Producer(producer_config(conn))
    producer.produce(client.topics.tasks, raw, key=f"{job_id}:0")
    assert producer.flush(10) == 0
    return job_id


def _task_bytes(reply_to: str, **fields: object) -> tuple[str, bytes]:
    """A one-chunk reduce task's job id and bytes, with ``fields`` set to any value."""
    now = time.time()
    task = TaskChunk(
        f"raw-{time.time_ns()}",
        0,
        1,
        "reduce",
        {"op": "sum"},
        {"x": np.ones(3)},
        reply_to,
        now + 3600,
        now,
    )
    return task.job_id, pack_pairs([(k, fields.get(k, v)) for k, v in body_pairs(task)])
