# SPDX-License-Identifier: Apache-2.0
"""The whole path on real brokers: SDK -> Kafka -> gateway -> MQTT -> vehicles -> back.

Every test runs against the session's real Tansu and Mosquitto, in its own namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import (
    Assignment,
    Capabilities,
    DeadLetter,
    MqttTopics,
    Nack,
    NackReason,
    PullRequest,
    TaskChunk,
    decode,
    encode,
)
from parkpool.schemas.codec import peek_type
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY, reference
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, produce_raw_task, read_topic, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
REDELIVERED = "parkpool_gateway_redelivered_total"
SKIPPED = "parkpool_gateway_dispatch_skipped_total"


def _jobs(rng: np.random.Generator) -> dict[str, tuple[dict[str, Any], dict[str, Any], Any]]:
    """kernel -> (inputs, split options, expected answer)."""
    a = rng.standard_normal((300, 200), dtype=np.float32)
    b = rng.standard_normal((200, 260), dtype=np.float32)
    x = rng.standard_normal(100_000)
    mc_samples, mc_chunk = 2_000_000, 250_000
    return {
        "gemm": ({"a": a, "b": b}, {"tile": 128}, a.astype(np.float64) @ b),
        "monte_carlo_pi": ({}, {"samples": mc_samples, "chunk_samples": mc_chunk, "seed": 3}, None),
        "poly": (
            {"x": x, "coeffs": [0.5, -2.0, 1.0]},
            {"chunk_elems": 16_384},
            np.polyval([0.5, -2.0, 1.0], x),
        ),
        "reduce": ({"x": x, "op": "sumsq"}, {"chunk_elems": 16_384}, float(np.sum(x * x))),
    }


class TestEveryChunkOnce:
    """Each chunk of a job reaches the caller exactly once, and the answer is right."""

    @pytest.mark.parametrize("kernel", ["gemm", "monte_carlo_pi", "poly", "reduce"])
    def test_job_round_trip(
        self,
        kernel: str,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway and four vehicles
        gateway_factory()
        fleet_factory(4)
        inputs, options, expected = _jobs(np.random.default_rng(11))[kernel]
        # When a job is submitted through the SDK
        handle = client.submit(kernel, inputs, **options)
        answer = handle.wait(timeout=60)
        # Then every chunk id came back once, and the assembled answer is right
        ids = sorted(chunk.chunk_id for chunk in handle.chunks(timeout=1))
        assert ids == list(range(handle.n_chunks))
        assert handle.n_chunks > 1
        assert handle.progress.done == handle.n_chunks
        if kernel == "monte_carlo_pi":
            expected = _pi_by_reference(options)
            assert answer == expected
        else:
            np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-4)


class TestLatencyHistograms:
    """Each dispatch is timed once: waiting in the queue, and the gateway's own hand-off."""

    def test_every_dispatch_is_observed(
        self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory, client: ParkpoolClient
    ) -> None:
        gateway = gateway_factory()
        fleet_factory(3)
        x = np.arange(4000, dtype=np.float64)
        handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=500)
        assert handle.wait(timeout=60) == float(x.sum())
        n = handle.n_chunks
        wait_for(lambda: gateway.metric("parkpool_gateway_tasks_total", status="completed") == n)
        assert gateway.metric("parkpool_gateway_tasks_total", status="dispatched") == n
        assert gateway.metric("parkpool_gateway_queue_wait_seconds_count") == n
        assert gateway.metric("parkpool_gateway_dispatch_seconds_count") == n
        assert gateway.metric("parkpool_gateway_task_dispatch_to_result_seconds_count") == n
        # The hand-off starts no earlier than the task was queued, so it is never longer
        queue_wait = gateway.metric("parkpool_gateway_queue_wait_seconds_sum")
        assert 0 <= gateway.metric("parkpool_gateway_dispatch_seconds_sum") <= queue_wait


def _pi_by_reference(options: dict[str, Any]) -> float:
    from parkpool.producer.splitters import plan_monte_carlo_pi

    plan = plan_monte_carlo_pi(**options)
    hits = sum(int(reference(plan.kernel, c.params, c.inputs)["hits"]) for c in plan.chunks)
    return 4.0 * hits / options["samples"]


class TestVehicleLoss:
    """A vehicle that vanishes or gives work back does not lose the work."""

    def test_killed_vehicle_task_is_redone_elsewhere(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway with long leases, so only the last will can explain a fast redo
        gateway = gateway_factory(lease_seconds=300)
        slow = fleet_factory(1, prefix="slow", simulated_delay_s=30.0)
        x = np.arange(1000, dtype=np.float64)
        handle = client.submit("poly", {"x": x, "coeffs": [2.0, 1.0]}, chunk_elems=1000)
        wait_for(lambda: list(slow.busy()), 30, "the slow vehicle to hold the task")
        # When that vehicle dies without a clean disconnect, and another one is there
        slow.kill(next(iter(slow.vehicles)))
        fleet_factory(1, prefix="spare")
        # Then the job completes on the spare vehicle
        np.testing.assert_allclose(handle.wait(timeout=60), 2 * x + 1)
        chunk = next(handle.chunks(timeout=1))
        assert chunk.vehicle_id.startswith("spare")
        assert gateway.metric(REDELIVERED, cause="vehicle_offline") == 1

    def test_nacked_task_is_redispatched_at_once(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: Any,
        namespace: str,
    ) -> None:
        # Given a scripted vehicle that asks for one task and holds it
        gateway = gateway_factory(lease_seconds=300)
        topics = MqttTopics(namespace)
        scripted = RawMqtt(mqtt_conn, f"scripted-{namespace}")
        scripted.subscribe(topics.task("scripted"))
        caps = Capabilities("numpy", tuple(REGISTRY))
        handle = client.submit("reduce", {"x": np.ones(10), "op": "sum"}, chunk_elems=10)
        assignment = _pull_until_assigned(scripted, topics, caps, handle.job_id)
        # When it nacks the task while a real vehicle is waiting for work
        fleet_factory(1)
        _nack(scripted, topics, assignment, NackReason.RELEASED, "owner is back")
        # Then another vehicle finishes it long before the 300 s lease could expire
        assert handle.wait(timeout=30) == 10.0
        assert gateway.metric(REDELIVERED, cause="nack") == 1
        scripted.close()

    def test_a_car_that_fails_a_task_is_not_handed_it_again_while_others_are_here(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: Any,
        namespace: str,
    ) -> None:
        # Given a gateway that dead-letters a task at its second counted failure, and a
        # two-chunk job whose chunks went to two scripted cars that hold them
        gateway = gateway_factory(lease_seconds=300, max_attempts=2)
        topics = MqttTopics(namespace)
        caps = Capabilities("numpy", tuple(REGISTRY))
        hostile = RawMqtt(mqtt_conn, f"scripted-{namespace}")
        hostile.subscribe(topics.task("scripted"))
        bystander = RawMqtt(mqtt_conn, f"bystander-{namespace}")
        bystander.subscribe(topics.task("bystander"))
        handle = client.submit("reduce", {"x": np.ones(20), "op": "sum"}, chunk_elems=10)
        failed = _pull_until_assigned(hostile, topics, caps, handle.job_id)
        held = _pull_until_assigned(bystander, topics, caps, handle.job_id, "bystander")
        # When the hostile one calls its chunk invalid (and the gateway, as after any
        # such nack, takes it to be hungry again at once)
        _nack(hostile, topics, failed, NackReason.INVALID_TASK)
        # Then the gateway keeps the chunk for another car rather than hand it back
        wait_for(lambda: gateway.metric(SKIPPED, reason="failed_here") >= 1, 10, "a skipped pull")
        assert len(_assignments(hostile, handle.job_id)) == 1
        # And once the hostile car asks for nothing more, and the bystander gives its chunk
        # back, a car that comes later finishes the job: one counted failure, no letter
        hostile.publish(topics.pull("scripted", "gw1"), encode(PullRequest("scripted", 0, caps)))
        scripted = gateway.gateway.vehicles.get("scripted")
        wait_for(lambda: scripted is not None and scripted.credits == 0, 10, "the grant back")
        fleet_factory(1)
        _nack(bystander, topics, held, NackReason.RELEASED, vehicle="bystander")
        assert handle.wait(timeout=30) == 20.0
        assert len(_assignments(hostile, handle.job_id)) == 1
        assert gateway.metric("parkpool_gateway_dead_lettered_total", reason="invalid_task") == 0
        hostile.close()
        bystander.close()


def _nack(
    raw: RawMqtt,
    topics: MqttTopics,
    assignment: Assignment,
    reason: NackReason,
    detail: str = "",
    vehicle: str = "scripted",
) -> None:
    task = decode(assignment.task, TaskChunk)
    nack = Nack(
        task.job_id, task.chunk_id, vehicle, assignment.gateway_id, assignment.epoch, reason, detail
    )
    raw.publish(topics.nack(vehicle, assignment.gateway_id), encode(nack))


def _assignments(raw: RawMqtt, job_id: str) -> list[Assignment]:
    found = []
    for msg in list(raw.received):
        if peek_type(msg.payload) == Assignment.TYPE:
            assignment = decode(msg.payload, Assignment)
            if decode(assignment.task, TaskChunk).job_id == job_id:
                found.append(assignment)
    return found


def _pull_until_assigned(
    raw: RawMqtt,
    topics: MqttTopics,
    caps: Any,
    job_id: str,
    vehicle: str = "scripted",
    timeout: float = 30.0,
) -> Assignment:
    deadline = time.monotonic() + timeout
    pull = PullRequest(vehicle, 1, caps, {}, {"gw1": 1})
    raw.publish(topics.pull(vehicle, "gw1"), encode(pull))
    while time.monotonic() < deadline:
        for msg in list(raw.received):
            if peek_type(msg.payload) != Assignment.TYPE:
                continue  # the gateway's "no work here yet" notice
            assignment = decode(msg.payload, Assignment)
            if decode(assignment.task, TaskChunk).job_id == job_id:
                return assignment
        time.sleep(0.2)
    pytest.fail("the scripted vehicle never got the task")


def test_job_state_after_poison_is_failed_not_hung(
    gateway_factory: GatewayFactory,
    fleet_factory: FleetFactory,
    client: ParkpoolClient,
    kafka_conn: KafkaConnection,
) -> None:
    """A job whose kernel no vehicle announces is dead-lettered at once (terminal), once
    the cars have had their grace period to announce it (none here)."""
    # Given a running fleet, whose gateway gives cars no grace to announce kernels
    gateway_factory(kernel_grace_s=0)
    fleet_factory(2)
    # When a chunk names a kernel no vehicle has (written raw: the SDK refuses to send it)
    task = produce_raw_task(
        kafka_conn, client.topics.tasks, "no_such_kernel", {}, {}, client.reply_topic
    )
    # Then it is dead-lettered with the reason, instead of hanging
    [record] = read_topic(kafka_conn, client.topics.dead_letter, 1, timeout=30)
    letter = decode(record.value() or b"", DeadLetter)
    assert (letter.job_id, letter.chunk_id, letter.reason) == (task.job_id, 0, "unknown_kernel")


class TestCommandLine:
    """`parkpool submit` and `parkpool status` work against the running system."""

    def test_submit_then_status(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        brokers: Any,
        namespace: str,
    ) -> None:
        # Given a gateway and vehicles
        gateway_factory()
        fleet_factory(2)
        env = {
            **os.environ,
            "PARKPOOL_KAFKA_BOOTSTRAP": brokers.kafka_bootstrap,
            "PARKPOOL_NAMESPACE": namespace,
        }
        cli = [sys.executable, "-m", "parkpool.app.cli"]
        # When a job is submitted from the command line with verification
        submit = subprocess.run(
            [*cli, "submit", "poly", "--size", "5000", "--chunk", "1000", "--verify"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # Then it completes and checks out against NumPy
        assert submit.returncode == 0, submit.stderr
        summary = json.loads(submit.stdout.strip().splitlines()[-1])
        assert (summary["chunks"], summary["verified"]) == (5, True)
        # And `status` finds all its chunks in the results topic
        status = subprocess.run(
            [*cli, "status", summary["job_id"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout) == {
            "job_id": summary["job_id"],
            "kernel": "poly",
            "state": "done",
            "done": 5,
            "total": 5,
            "dead_lettered": 0,
        }
