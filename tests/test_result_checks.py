# SPDX-License-Identifier: Apache-2.0
"""The client's result checks never let a failure of their own stop a job's results."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from parkpool.producer.checking import ResultChecks
from parkpool.producer.jobs import JobHandle, JobState
from parkpool.producer.metrics import SdkMetrics
from parkpool.producer.splitters import plan_reduce
from parkpool.producer.verify import Redo
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, Result, TaskChunk
from parkpool.schemas.reputation import Level
from parkpool.schemas.topics import KafkaTopics


def refuse(task: TaskChunk) -> None:
    raise BrokerError(f"chunk {task.chunk_id}: Kafka is gone")


@pytest.fixture
def checks(kafka_conn: KafkaConnection, namespace: str) -> Iterator[ResultChecks]:
    metrics = SdkMetrics()
    topic = KafkaTopics(namespace).reputation
    made = ResultChecks(kafka_conn, topic, "sdk-test", metrics, refuse)
    yield made
    made.close()


def result(chunk: int, n: int, car: str) -> Result:
    outputs = {"value": np.array(1.0)}
    return Result("job-1", chunk, n, car, "gw1", 1, 1, outputs, 0.1, 1.0, 0.0)


class TestFailuresInsideTheChecks:
    """A check that raises, or a redo Kafka refuses, fails its chunk by name."""

    def test_a_check_that_raises_fails_only_its_chunk(
        self, checks: ResultChecks, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        plan = plan_reduce(np.ones(8), "sum", chunk_elems=4)
        handle = JobHandle("job-1", 2, plan.make_assembler(), observer=checks.metrics)
        checks.begin("job-1", "reduce", plan.chunks, [], Level.UNCHECKED)
        job = checks._job("job-1")
        assert job is not None

        def broken(_result: Result) -> list[object]:
            raise RuntimeError("a bug in a check")

        monkeypatch.setattr(job.verifier, "take", broken)
        # When a result meets the broken check
        checks.take(handle, result(0, 2, "car-1"))
        # Then that chunk fails with the reason, and is counted; nothing was raised
        monkeypatch.undo()
        checks.take(handle, result(1, 2, "car-1"))
        assert handle.state is JobState.FAILED
        assert "check_error: a bug in a check" in str(handle.future.exception())
        assert checks.metrics.value("parkpool_sdk_results_refused_total", reason="check_error") == 1

    def test_a_redo_kafka_refuses_fails_its_chunk(self, checks: ResultChecks) -> None:
        plan = plan_reduce(np.ones(8), "sum", chunk_elems=4)
        handle = JobHandle("job-1", 2, plan.make_assembler())
        tasks = [
            TaskChunk("job-1", i, 2, "reduce", c.params, c.inputs, "t", 9e9, 0.0)
            for i, c in enumerate(plan.chunks)
        ]
        checks.begin("job-1", "reduce", plan.chunks, tasks, Level.QUORUM)
        # When a first opinion needs a second car, and the redo cannot be sent
        checks.take(handle, result(0, 2, "car-1"))
        handle.deliver(result(1, 2, "car-1"), 1.0)
        # Then the chunk fails by name instead of waiting for ever
        assert handle.state is JobState.FAILED
        assert "redo_not_sent" in str(handle.future.exception())


class TestRingersAfterTheEnd:
    """A ringer is a check of a car, sent while its job still runs."""

    def test_no_ringer_goes_out_once_the_job_has_ended(
        self, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given a job whose last chunk was just accepted, and a ringer of its first chunk
        sent: list[TaskChunk] = []
        checks = ResultChecks(
            kafka_conn, KafkaTopics(namespace).reputation, "sdk-test", SdkMetrics(), sent.append
        )
        try:
            plan = plan_reduce(np.ones(8), "sum", chunk_elems=4)
            handle = JobHandle("job-1", 2, plan.make_assembler())
            tasks = [
                TaskChunk("job-1", i, 2, "reduce", c.params, c.inputs, "t", 9e9, 0.0)
                for i, c in enumerate(plan.chunks)
            ]
            checks.begin("job-1", "reduce", plan.chunks, tasks, Level.UNCHECKED)
            job = checks._job("job-1")
            assert job is not None
            for chunk in (0, 1):
                handle.deliver(result(chunk, 2, "car-1"), 1.0)
            assert handle.state is JobState.DONE
            # When the checks act on the ringer
            checks._act(handle, job, [Redo(0, ("car-1",))])
            # Then nothing is sent: no one would judge its answer, and its inputs go
            assert sent == []
            # While a running job's redo is sent
            running = JobHandle("job-2", 2, plan.make_assembler())
            checks._act(running, job, [Redo(0, ("car-1",))])
            assert [t.chunk_id for t in sent] == [0]
        finally:
            checks.close()
