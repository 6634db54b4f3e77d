# SPDX-License-Identifier: Apache-2.0
"""A job id submitted again: each submission's records carry its tasks' created_at, and
nothing of one submission (results, dead letters, cancels) is taken for another's."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import Producer

from parkpool.gateway.cancels import CancelledJobs
from parkpool.producer.cli import _collect
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobState
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    CancelJob,
    DeadLetter,
    JobSubmitted,
    MqttTopics,
    Result,
    TaskChunk,
    ValidationError,
    VehicleState,
    VehicleStatus,
    encode,
    same_submission,
)
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import hold_lease, read_all, wait_for

DROPPED = "parkpool_gateway_dropped_total"
TASKS = "parkpool_gateway_tasks_total"
REFUSED = "parkpool_sdk_results_refused_total"


def task(created_at: float, job_id: str = "job") -> TaskChunk:
    return TaskChunk(job_id, 0, 1, "reduce", {"op": "sum"}, {}, "ns.results", 2e9, created_at)


def test_a_stamp_of_0_says_nothing_about_the_submission() -> None:
    assert same_submission(900.0, 900.0) and not same_submission(900.0, 950.0)
    # An older writer's job (no mark), or a letter for a record that did not decode
    assert same_submission(0.0, 950.0) and same_submission(900.0, 0.0)


class TestCancelledJobs:
    """Which tasks a cancel covers: pure logic."""

    def test_a_cancel_covers_its_own_submission_and_not_another(self) -> None:
        cancelled = CancelledJobs()
        cancelled.add(CancelJob("job", requested_at=1000.0, created_at=900.0))
        assert cancelled.covers(task(900.0))
        # Another submission, earlier or later, and whatever the canceller's clock said
        assert not cancelled.covers(task(500.0))
        assert not cancelled.covers(task(950.0))
        assert not cancelled.covers(task(900.0, job_id="other"))

    def test_a_cancel_that_names_no_submission_covers_the_tasks_made_before_it(self) -> None:
        cancelled = CancelledJobs()
        cancelled.add(CancelJob("job", requested_at=1000.0))
        assert cancelled.covers(task(1000.0)) and cancelled.covers(task(10.0))
        assert not cancelled.covers(task(1000.5))

    def test_cancels_of_two_submissions_add_up(self) -> None:
        cancelled = CancelledJobs()
        cancelled.add(CancelJob("job", requested_at=1000.0, created_at=900.0))
        cancelled.add(CancelJob("job", requested_at=3000.0, created_at=2900.0))
        cancelled.add(CancelJob("job", requested_at=100.0))  # an older writer's
        assert all(cancelled.covers(task(t)) for t in (900.0, 2900.0, 50.0))
        assert not any(cancelled.covers(task(t)) for t in (950.0, 2000.0, 3000.0))

    def test_a_cancel_expires(self) -> None:
        cancelled = CancelledJobs(ttl_s=-1.0)
        cancelled.add(CancelJob("job", requested_at=1000.0, created_at=900.0))
        assert not cancelled.covers(task(900.0)) and len(cancelled) == 0


class Record:
    """A Kafka record as ``parkpool status`` reads one (pure logic: no broker needed)."""

    def __init__(self, topic: str, job_id: str, value: bytes) -> None:
        self._topic, self._key, self._value = topic, job_id.encode(), value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class TestStatus:
    def test_status_counts_the_latest_submissions_records_only(self) -> None:
        # Given a job id's second submission of two chunks, one done, and late records
        # of its first submission, of three chunks: two results and a dead letter
        job = JobSubmitted("again", "reduce", 2, "ns.results", 2000.0, created_at=2000.0)

        def result(chunk_id: int, created_at: float) -> Record:
            r = Result(
                "again",
                chunk_id,
                3 if created_at != 2000.0 else 2,
                "car",
                "gw",
                1,
                1,
                {"value": np.array(1.0)},
                0.1,
                created_at + 5,
                created_at,
            )
            return Record("ns.results", "again", encode(r))

        letter = DeadLetter(
            "poison", "", "ns.tasks", 0, 7, b"", 1990.0, "gw", "again", 0, task_created_at=1000.0
        )
        records = [
            result(0, 2000.0),
            result(1, 1000.0),
            result(2, 1000.0),
            Record("ns.deadletter", "again", encode(letter)),
        ]
        # When its status is read, Then only the second submission's chunk counts
        done, dead = _collect(records, job)  # type: ignore[arg-type]
        assert (done, dead) == ({0}, {})


@pytest.mark.integration
class TestSubmittedAgain:
    def test_a_lost_submissions_late_result_is_not_taken_for_the_new_ones(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a job whose one chunk a slow car holds, and whose client is lost (no
        # cancel: a crashed service)
        gateway_factory(lease_seconds=300)
        settings = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)
        with ParkpoolClient(settings) as lost:
            lost.submit("reduce", {"x": np.full(4, 1.0), "op": "sum"}, job_id="again")
            holder = hold_lease(mqtt_conn, mqtt_topics)
        # When the service submits the job again under its id, with other inputs, and the
        # slow car then answers the first submission
        with ParkpoolClient(settings) as sdk:
            handle = sdk.submit("reduce", {"x": np.full(4, 2.0), "op": "sum"}, job_id="again")
            old = holder.result({"value": np.array(4.0)})
            holder.car.publish(mqtt_topics.result("holder", "gw1"), encode(old))
            wait_for(
                lambda: sdk.metrics.value(REFUSED, reason="other_submission") == 1,
                30,
                "the old submission's result to be skipped",
            )
            # Then the new submission's answer is its own (the slow car, which its answer
            # made free for the new chunk, goes away for another car to run it)
            assert handle.state is JobState.RUNNING
            away = VehicleStatus("holder", VehicleState.SUSPENDED, time.time(), "owner")
            holder.car.publish(mqtt_topics.status("holder", "gw1"), encode(away))
            fleet_factory(1)
            assert handle.wait(timeout=60) == 8.0
            assert handle.progress.duplicates == 0
        # And a reader that follows the id later follows the new submission, skipping
        # the old one's result too
        with ParkpoolClient(settings) as follower:
            followed = follower.attach("again", timeout=30)
            assert followed.created_at == handle.created_at
            followed.wait(timeout=30)
            assert (followed.state, followed.progress.done) == (JobState.DONE, 1)
            assert follower.metrics.value(REFUSED, reason="other_submission") == 1
        holder.close()

    def test_a_job_of_no_chunks_is_refused_by_name(self, client: ParkpoolClient) -> None:
        with pytest.raises(ValidationError) as refused:
            client.publish("reduce", [])
        assert refused.value.reason == "no_chunks" and "at least one chunk" in str(refused.value)
        assert client.metrics.value("parkpool_sdk_jobs_refused_total", reason="no_chunks") == 1

    def test_a_result_that_misnames_its_submission_is_dropped_and_the_lease_kept(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a car holding the lease of a one-chunk job
        gateway = gateway_factory(lease_seconds=300)
        handle = client.submit("reduce", {"x": np.full(4, 1.0), "op": "sum"})
        holder = hold_lease(mqtt_conn, mqtt_topics)
        topic = mqtt_topics.result("holder", "gw1")
        answer = {"value": np.array(4.0)}
        # When it answers naming another submission, or another chunk count (either
        # would make the SDK skip the result, and the chunk vanish)
        created = holder.task.created_at
        holder.car.publish(topic, encode(holder.result(answer, task_created_at=created + 1)))
        holder.car.publish(topic, encode(holder.result(answer, n_chunks=2)))
        reason = {"source": "mqtt_result", "reason": "misnamed_submission"}
        wait_for(lambda: gateway.metric(DROPPED, **reason) == 2, 10, "both to be refused")
        # Then neither reached Kafka, and its true answer still completes the job
        assert read_all(kafka_conn, client.topics.results) == []
        holder.car.publish(topic, encode(holder.result(answer)))
        assert handle.wait(timeout=30) == 4.0
        holder.close()

    def test_a_cancel_stops_its_own_submission_only(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
    ) -> None:
        # Given two submissions of one job id queued at a gateway: a lost client's, then
        # another client's
        gateway = gateway_factory()
        settings = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)
        inputs = {"x": np.full(8, 1.0), "op": "sum"}
        with ParkpoolClient(settings) as lost:
            lost.submit("reduce", inputs, chunk_elems=4, job_id="again")
        with ParkpoolClient(settings) as sdk:
            handle = sdk.submit("reduce", inputs, chunk_elems=4, job_id="again")
            wait_for(lambda: gateway.metric(TASKS, status="consumed") == 4, 30, "both queued")
            # When the second is cancelled by a host whose clock is an hour fast
            ahead = time.time() + 3600.0
            cancel = encode(CancelJob("again", ahead, "cancelled_by_caller", handle.created_at))
            producer = Producer(producer_config(kafka_conn))
            for partition in range(partitions(kafka_conn, sdk.topics.tasks)):
                producer.produce(sdk.topics.tasks, cancel, key="again", partition=partition)
            assert producer.flush(10) == 0
            # Then only its chunks are skipped: the first submission's still run (a
            # cancel by time, from that clock, would have covered them too)
            wait_for(lambda: gateway.metric(TASKS, status="cancelled") == 2, 30, "the skips")
            fleet_factory(1)
            wait_for(lambda: gateway.metric(TASKS, status="completed") == 2, 30, "the first's")
            assert gateway.metric(TASKS, status="cancelled") == 2


def partitions(conn: KafkaConnection, topic: str) -> int:
    producer = Producer(producer_config(conn))
    return len(producer.list_topics(topic, timeout=10).topics[topic].partitions)
