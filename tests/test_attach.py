# SPDX-License-Identifier: Apache-2.0
"""Following a job by its id from another process: attach, `parkpool wait`, `status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.attach import high_watermarks, start_offsets
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobids import id_time, new_job_id
from parkpool.producer.jobs import JobState
from parkpool.producer.splitters import plan_reduce
from parkpool.runtime.kafka import reader_config
from parkpool.runtime.reputation import ReputationBook, ReputationWriter
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, JobSubmitted, KafkaTopics, Result, encode
from parkpool.schemas.reputation import Evidence, Level
from parkpool.worker.fleet import Fleet
from tests.conftest import TEST_TOPIC_SPECS, RunningGateway

X = np.arange(6000, dtype=np.float64)
CHUNK = 1000  # six chunks

# The submitting process: publishes one job, prints its id, and exits at once.
SUBMIT = """
import sys
import numpy as np
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.reputation import Level
settings = ProducerSettings(KafkaConnection(sys.argv[1]), sys.argv[2], verification=Level.UNCHECKED)
with ParkpoolClient(settings) as client:
    handle = client.submit("reduce", {"x": np.arange(6000, dtype=np.float64)}, chunk_elems=1000)
print(handle.job_id)
"""


def submit_elsewhere(kafka_conn: KafkaConnection, namespace: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT, kafka_conn.bootstrap, namespace],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def new_client(kafka_conn: KafkaConnection, namespace: str) -> ParkpoolClient:
    return ParkpoolClient(ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED))


class TestJobIds:
    """A job id carries its submit time, so a reader can start at the job."""

    def test_a_new_id_is_a_uuid7_with_its_time(self) -> None:
        # Given an id minted at a known time
        job_id = new_job_id(now=1_767_222_000.123)
        # Then it is 32 hex digits of a version-7 UUID, and gives its time back to the ms
        assert len(job_id) == 32 and job_id[12] == "7" and job_id[16] in "89ab"
        assert id_time(job_id) == pytest.approx(1_767_222_000.123, abs=1e-3)
        assert new_job_id() != new_job_id()

    @pytest.mark.parametrize(
        "job_id",
        [
            "4f1c2d3e4a5b4c6d8e9f0a1b2c3d4e5f",  # a random UUIDv4 (the old ids)
            "nightly-report-2026-12-06",  # the caller's own id
            "ffffffffffff7fff8fffffffffffffff",  # looks like a UUIDv7, from the far future
            "0000000000007fff8fffffffffffffff",  # and from 1970
        ],
    )
    def test_an_id_without_a_believable_time_has_none(self, job_id: str) -> None:
        assert id_time(job_id) is None


class TestStartOffsets:
    """Where reading starts: the first record at or after the time, never the start.

    On Tansu in memory, whose ListOffsets answers much like Kafka's; the durable Tansu's
    answers can lag far behind its log (docs/DECISIONS.md), so a job there may be read
    from further back: slower, never wrong, as the attach tests show.
    """

    def test_a_partition_with_nothing_that_recent_is_read_from_its_end(
        self, tmp_path: Path
    ) -> None:
        with EmbeddedBrokers(run_dir=tmp_path, durable=False) as brokers:
            conn = KafkaConnection(brokers.kafka_bootstrap)
            admin = AdminClient({"bootstrap.servers": conn.bootstrap})
            admin.create_topics([NewTopic("r", 2, 1)])["r"].result(10)
            # Given 20 records stamped before a moment, a batch each (Tansu's end is its
            # last batch's first offset + 1: the end of a one-record batch is exact)
            producer = Producer({"bootstrap.servers": conn.bootstrap})
            for i in range(20):
                producer.produce("r", b"old", key=f"k{i}", partition=0)
                producer.flush(10)
            time.sleep(0.2)
            since = time.time()
            time.sleep(0.2)
            consumer = Consumer(reader_config(conn))
            try:
                # When reading from that moment, before anything newer exists
                ends = high_watermarks(consumer, ["r"])
                before = {tp.partition: tp.offset for tp in start_offsets(consumer, ends, since)}
                # Then each partition starts at its end (Tansu answers 0 there, Kafka -1)
                assert before == {0: 20, 1: 0}
                # And once a newer record exists, reading starts at it
                producer.produce("r", b"new", key="k", partition=0)
                producer.flush(10)
                ends = high_watermarks(consumer, ["r"])
                after = {tp.partition: tp.offset for tp in start_offsets(consumer, ends, since)}
                assert after == {0: 20, 1: 0}
            finally:
                consumer.close()


class TestAttach:
    """A second process follows a job by its id after the first one exited."""

    def test_a_finished_job_is_read_back_whole(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a job submitted by a process that has exited, and finished by the fleet
        job_id = submit_elsewhere(kafka_conn, namespace)
        gateway_factory()
        fleet_factory(2)
        with new_client(kafka_conn, namespace) as watcher:
            watcher.attach(job_id).wait(timeout=120)
        # When another client attaches to it by id, with the same plan's assembler
        with new_client(kafka_conn, namespace) as client:
            handle = client.attach(job_id, plan_reduce(X, chunk_elems=CHUNK).make_assembler())
            # Then its answer is the job's, from the results already in Kafka
            assert handle.wait(timeout=60) == X.sum()
            assert sorted(c.chunk_id for c in handle.chunks(timeout=5)) == list(range(6))
            assert handle.progress.state is JobState.DONE

    def test_a_job_attached_before_any_car_ran_it_completes_live(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a job submitted elsewhere, and attached to while no gateway runs
        job_id = submit_elsewhere(kafka_conn, namespace)
        with new_client(kafka_conn, namespace) as client:
            handle = client.attach(job_id)
            assert (handle.progress.done, handle.progress.total) == (0, 6)
            # When the fleet comes
            gateway_factory()
            fleet_factory(2)
            # Then every chunk arrives once, through the live reader
            handle.wait(timeout=120)
            chunks = list(handle.chunks(timeout=5))
            assert sorted(c.chunk_id for c in chunks) == list(range(6))
            assert sum(float(c.outputs["value"]) for c in chunks) == X.sum()

    def test_an_unknown_job_is_a_clear_error_not_a_hang(
        self, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given an id nobody submitted
        with new_client(kafka_conn, namespace) as client:
            started = time.monotonic()
            # Then attaching names the job and fails within its timeout
            with pytest.raises(BrokerError, match="is not on"):
                client.attach(new_job_id(), timeout=20)
            assert time.monotonic() - started < 20

    def test_its_own_job_gives_its_own_handle(
        self, client: ParkpoolClient, kafka_conn: KafkaConnection
    ) -> None:
        handle = client.submit("reduce", {"x": X}, chunk_elems=CHUNK)
        assert client.attach(handle.job_id) is handle


class TestAttachedResultsOfAQuarantinedCar:
    """The submitter caught a car lying and had the chunk redone; an attached reader
    takes the redo, not the lie that is still in the results topic."""

    def test_the_redo_is_taken(self, kafka_conn: KafkaConnection, namespace: str) -> None:
        # Given a car quarantined by the submitter, and the job's records as gateways
        # wrote them: the liar's chunk 0 first, then the redo's, then chunk 1
        topics = KafkaTopics(namespace)
        writer = ReputationWriter(kafka_conn, topics.reputation, "sdk-9", ReputationBook())
        evidence = Evidence("j", 0, Level.ALGEBRAIC, "Freivalds residual over bound", 1.0)
        writer.quarantine("liar", (evidence,), "wrong_result")
        writer.close()
        job_id = new_job_id()
        producer = Producer({"bootstrap.servers": kafka_conn.bootstrap})
        header = JobSubmitted(job_id, "reduce", 2, topics.results, time.time())
        producer.produce(topics.jobs, encode(header), job_id)
        for car, chunk, value in (("liar", 0, 666.0), ("honest", 0, 1.0), ("honest", 1, 2.0)):
            result = Result(
                job_id, chunk, 2, car, "gw1", 1, 1, {"value": np.array(value)}, 0.1, 1.0, 1.0
            )
            producer.produce(topics.results, encode(result), job_id)
        producer.flush(10)
        # When a client attaches to the job
        with ParkpoolClient(ProducerSettings(kafka_conn, namespace)) as client:
            handle = client.attach(job_id)
            handle.wait(timeout=60)
            # Then each chunk came from the honest car, and the lie was counted, not taken
            chunks = {
                c.chunk_id: (c.vehicle_id, float(c.outputs["value"]))
                for c in handle.chunks(timeout=5)
            }
            assert chunks == {0: ("honest", 1.0), 1: ("honest", 2.0)}
            refused = client.metrics.results_refused.labels("quarantined_car")._value.get()
            assert refused == 1


class TestCommandLine:
    """`parkpool wait` and `parkpool status` take the same path as attach."""

    def test_wait_and_status_follow_a_job_by_id(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a job submitted by a process that exited, and a fleet to run it
        job_id = submit_elsewhere(kafka_conn, namespace)
        gateway_factory()
        fleet_factory(2)
        env = {
            **os.environ,
            "PARKPOOL_KAFKA_BOOTSTRAP": kafka_conn.bootstrap,
            "PARKPOOL_NAMESPACE": namespace,
        }
        # When `parkpool wait` follows it, Then it ends done with every chunk
        waited = _cli(["wait", job_id, "--timeout", "120"], env)
        assert waited.returncode == 0, waited.stderr
        summary = json.loads(waited.stdout.strip().splitlines()[-1])
        assert (summary["state"], summary["done"], summary["total"]) == ("done", 6, 6)
        # And `status` reports the same from the topics
        status = _cli(["status", job_id], env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout) == {
            "job_id": job_id,
            "kernel": "reduce",
            "state": "done",
            "done": 6,
            "total": 6,
            "dead_lettered": 0,
        }

    def test_status_of_an_unknown_job_fails_with_its_reason(
        self, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        env = {
            **os.environ,
            "PARKPOOL_KAFKA_BOOTSTRAP": kafka_conn.bootstrap,
            "PARKPOOL_NAMESPACE": namespace,
        }
        status = _cli(["status", new_job_id(), "--timeout", "20"], env)
        assert status.returncode == 1
        assert "is not on" in status.stderr


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(
        [sys.executable, "-m", "parkpool.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class TestNamespaceWithoutJobsTopic:
    """A namespace bootstrapped before the jobs topic existed keeps working."""

    def test_jobs_are_submitted_and_attach_says_why_it_cannot(
        self, brokers: EmbeddedBrokers
    ) -> None:
        # Given a namespace with every topic but the jobs topic
        namespace = "old" + new_job_id()[:12]
        old_specs = [s for s in TEST_TOPIC_SPECS if s.name != "jobs"]
        bootstrap(brokers.kafka_bootstrap, namespace, specs=old_specs)
        conn = KafkaConnection(brokers.kafka_bootstrap)
        with new_client(conn, namespace) as client:
            # When a job is submitted there, Then Kafka confirms its tasks as before
            handle = client.submit("reduce", {"x": X}, chunk_elems=CHUNK)
            assert handle.progress.total == 6
            # And attaching to it elsewhere fails, naming the missing topic
            other = new_client(conn, namespace)
            with other, pytest.raises(BrokerError, match=r"\.jobs does not exist"):
                other.attach(handle.job_id, timeout=10)
            client.cancel(handle.job_id)
