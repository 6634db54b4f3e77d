# SPDX-License-Identifier: Apache-2.0
"""Kernels through the real brokers: submit-time refusal, task cost, and the new kernels.

Every test runs against the session's real Tansu and Mosquitto, in its own namespace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.jobs import JobFailed, JobState
from parkpool.producer.splitters import ChunkSpec, KMeansStep, OptionPrice
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import TaskChunk, ValidationError, decode
from parkpool.schemas.kernels import cost_gflop
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import get_kernel, reference
from tests.conftest import RunningGateway
from tests.helpers import read_all, read_topic

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
F32 = np.ones((3, 3), np.float32)
GOOD = ChunkSpec({"op": "sum"}, {"x": F32})


class TestSubmitTimeValidation:
    """A job that breaks a kernel's contract raises in the SDK, and nothing reaches Kafka."""

    @pytest.mark.parametrize(
        ("kernel", "chunks", "reason"),
        [
            ("reduce", [GOOD, ChunkSpec({"op": "mean"}, {"x": F32})], "unknown_op"),
            ("gemm", [ChunkSpec({}, {"a": F32, "b": F32[:2]})], "shape_mismatch"),
            ("no_such_kernel", [GOOD], "unknown_kernel"),
            ("no_such_kernel", [], "unknown_kernel"),
            (
                "stencil2d",
                [ChunkSpec({"weights": [[1.0] * 3] * 3, "iterations": 1}, {"u": F32})],
                "bad_param",
            ),
        ],
        ids=["one-bad-chunk", "gemm-shapes", "unknown-kernel", "unknown-empty-job", "stencil"],
    )
    def test_bad_job_is_refused_before_kafka(
        self,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        kernel: str,
        chunks: list[ChunkSpec],
        reason: str,
    ) -> None:
        # Given a job with a chunk no car could run (or a kernel no car has)
        # When it is published through the SDK
        with pytest.raises(ValidationError) as caught:
            client.publish(kernel, chunks)
        # Then it is refused with the reason, and the tasks topic stays empty
        assert caught.value.reason == reason
        assert read_all(kafka_conn, client.topics.tasks) == []

    def test_planned_job_with_bad_input_is_refused(
        self, client: ParkpoolClient, kafka_conn: KafkaConnection
    ) -> None:
        # Given integer samples for a float kernel / When submitted / Then refused, nothing sent
        with pytest.raises(ValidationError) as caught:
            client.submit("fft", {"x": np.arange(12).reshape(3, 4)})
        assert caught.value.reason == "bad_dtype"
        assert read_all(kafka_conn, client.topics.tasks) == []


class TestTaskCost:
    """Each task on the wire carries the cost model's estimate of its work."""

    def test_cost_on_the_wire(self, client: ParkpoolClient, kafka_conn: KafkaConnection) -> None:
        # Given a tiled gemm job
        a = np.ones((64, 48), np.float32)
        b = np.ones((48, 40), np.float32)
        handle = client.submit("gemm", {"a": a, "b": b}, tile=32)
        # When its tasks are read back from Kafka
        records = read_topic(kafka_conn, client.topics.tasks, handle.n_chunks)
        tasks = sorted((decode(r.value() or b"", TaskChunk) for r in records), key=lambda t: t.key)
        # Then each carries 2*m*n*k of its own tile, summing to the whole product's
        costs = [t.cost_gflop for t in tasks]
        assert costs == [cost_gflop("gemm", t.params, t.inputs) for t in tasks]
        assert math.isclose(sum(costs), 2 * 64 * 40 * 48 / 1e9)


class TestNewKernelsEndToEnd:
    """fft, mlp, stencil2d, kmeans_step and option_mc jobs complete through the brokers."""

    def test_every_new_kernel(
        self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory, client: ParkpoolClient
    ) -> None:
        # Given a gateway, three vehicles, and one job per new kernel
        gateway_factory()
        fleet_factory(3)
        rng = np.random.default_rng(21)
        x = rng.standard_normal((12, 64)).astype(np.float32)
        weights = [rng.standard_normal((64, 8)), rng.standard_normal((8, 2))]
        biases = [np.zeros(8), np.ones(2)]
        heat = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]
        market = {"s0": 50.0, "strike": 55.0, "rate": 0.01, "sigma": 0.3, "maturity": 1.0}
        jobs = {
            "fft": client.submit("fft", {"x": x}, chunk_elems=256),
            "mlp": client.submit(
                "mlp",
                {"x": x.astype(np.float64), "weights": weights, "biases": biases},
                chunk_rows=5,
            ),
            "stencil2d": client.submit("stencil2d", {"u": x, "weights": heat}, iterations=9),
            "kmeans_step": client.submit(
                "kmeans_step", {"points": x[:, :4], "centroids": x[:3, :4]}, chunk_points=5
            ),
            "option_mc": client.submit(
                "option_mc", None, paths=60_000, chunk_paths=20_000, **market
            ),
        }
        # When every job completes
        answers: dict[str, Any] = {name: job.wait(timeout=60) for name, job in jobs.items()}
        # Then each assembled answer matches the single-task reference
        assert all(job.progress.state is JobState.DONE for job in jobs.values())
        assert get_kernel("fft").tolerance.allclose(
            answers["fft"], reference("fft", {}, {"x": x})["y"]
        )
        mlp_inputs = {"x": x.astype(np.float64), "w0": weights[0], "b0": biases[0]}
        mlp_inputs |= {"w1": weights[1], "b1": biases[1]}
        assert get_kernel("mlp").matches({"y": answers["mlp"]}, reference("mlp", {}, mlp_inputs))
        grid = reference("stencil2d", {"weights": heat, "iterations": 9}, {"u": x})["u"]
        assert get_kernel("stencil2d").tolerance.allclose(answers["stencil2d"], grid)
        step = answers["kmeans_step"]
        whole = reference("kmeans_step", {}, {"points": x[:, :4], "centroids": x[:3, :4]})
        assert isinstance(step, KMeansStep) and step.counts.tolist() == whole["counts"].tolist()
        price = answers["option_mc"]
        assert isinstance(price, OptionPrice) and price.paths == 60_000 and price.price > 0


class TestDeadLetteredJob:
    """A job the SDK sent that dies in the queue fails its handle, rather than hanging."""

    def test_expired_job_fails_the_handle(
        self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory, client: ParkpoolClient
    ) -> None:
        # Given a gateway and a vehicle, and a job whose deadline passes before dispatch
        gateway_factory()
        fleet_factory(1)
        handle = client.publish("reduce", [GOOD], deadline_s=1e-6)
        # When the gateway dead-letters it / Then the SDK's handle fails with the reason
        with pytest.raises(JobFailed, match="deadline_passed"):
            handle.wait(timeout=30)
        assert handle.state is JobState.FAILED and handle.progress.dead_lettered == 1
