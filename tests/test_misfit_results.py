# SPDX-License-Identifier: Apache-2.0
"""A result whose outputs do not fit its job (a missing output, a wrong shape) never
leaves the job waiting: the gateway has passed it on and will not redo the chunk, so the
client redoes it on another car (checks on) or fails it by name (checks off).

Results are written straight to the client's reply topic on the real Kafka, as a car
whose kernel returned the wrong thing would have them written by its gateway.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobFailed, JobHandle
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import Result, encode
from parkpool.schemas.reputation import Level
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

REFUSED = "parkpool_sdk_results_refused_total"
REDONE = "parkpool_sdk_chunks_redone_total"


def reduce_job(client: ParkpoolClient) -> JobHandle[Any]:
    """A sum of two chunks, with no gateway to run it: only the results sent here come."""
    return client.submit("reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256)


def send_result(
    client: ParkpoolClient, kafka: KafkaConnection, job_id: str, car: str, copies: int, **out: Any
) -> None:
    """Chunk 0's result from ``car``, ``copies`` times (at-least-once), stamped with the
    submission's created_at, as a car's result is."""
    handle = client.handle(job_id)
    assert handle is not None
    created = handle.created_at
    result = Result(job_id, 0, 2, car, "gw1", 1, 1, out, 0.1, created, created)
    producer = Producer(producer_config(kafka))
    for _ in range(copies):
        producer.produce(client.reply_topic, encode(result), key=job_id)
    assert producer.flush(10) == 0


class TestMisfitResults:
    def test_with_checks_the_chunk_is_redone_once_and_a_fitting_result_taken(
        self, client: ParkpoolClient, kafka_conn: KafkaConnection
    ) -> None:
        # Given a client with checks, taking a car's result on its word (level unchecked)
        handle = reduce_job(client)
        # When a result whose value is an array, not the scalar a sum gives, comes twice
        send_result(client, kafka_conn, handle.job_id, "car1", 2, value=np.zeros(4))
        # Then both copies are refused as misfits, and the chunk is redone once
        wait_for(lambda: client.metrics.value(REFUSED, reason="misfit") == 2, 30, "2 refusals")
        wait_for(lambda: client.metrics.value(REDONE, why="misfit_outputs") == 1, 10, "a redo")
        progress = handle.progress
        assert (progress.done, progress.dead_lettered, progress.rejected) == (0, 0, 2)
        # And the redo's fitting result is taken
        send_result(client, kafka_conn, handle.job_id, "car2", 1, value=np.array(256.0))
        wait_for(lambda: handle.progress.done == 1, 30, "chunk 0 done")
        assert client.metrics.value(REDONE, why="misfit_outputs") == 1

    def test_without_checks_the_chunk_fails_by_name(
        self, namespace: str, kafka_conn: KafkaConnection
    ) -> None:
        settings = ProducerSettings(
            kafka_conn, namespace, verification=Level.UNCHECKED, verify=False
        )
        with ParkpoolClient(settings) as unchecked:
            handle = reduce_job(unchecked)
            # When a result missing the output its kernel names comes
            send_result(unchecked, kafka_conn, handle.job_id, "car1", 1, total=np.array(256.0))
            # Then chunk 0 fails at once, by name
            wait_for(lambda: handle.progress.dead_lettered == 1, 30, "chunk 0 to fail")
            assert unchecked.metrics.value(REFUSED, reason="misfit") == 1
            # And once the other chunk fails too, the job ends with the reason
            handle.refused(1, "test: no car")
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=10)
            assert "outputs_misfit: missing_output" in failed.value.reasons[0]
