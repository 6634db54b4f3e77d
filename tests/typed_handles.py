# SPDX-License-Identifier: Apache-2.0
"""What a type checker sees of the SDK: read by tests/test_typing.py with mypy, never run.

Each ``assert_type`` is a claim mypy checks: a handle is typed by its kernel's answer.
"""

from __future__ import annotations

from typing import Any, assert_type

import numpy as np
import numpy.typing as npt

import parkpool
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.jobs import JobHandle
from parkpool.producer.splitters import plan_reduce
from parkpool.producer.splitters_stats import KMeansStep, OptionPrice

Array = npt.NDArray[Any]


def typed(client: ParkpoolClient, a: Array) -> None:
    gemm = client.submit("gemm", {"a": a, "b": a}, tile=256)
    assert_type(gemm, JobHandle[Array])
    assert_type(gemm.wait(), Array | None)
    assert_type(gemm.future.result(), Array)
    assert_type(client.submit("reduce", {"x": a}).wait(), float | None)
    assert_type(client.submit("kmeans_step", {"points": a, "centroids": a}), JobHandle[KMeansStep])
    assert_type(client.submit("option_mc", {}), JobHandle[OptionPrice])
    assert_type(client.submit_plan(plan_reduce(a)), JobHandle[float])
    assert_type(client.attach("id", plan_reduce(a).make_assembler()), JobHandle[float])
    assert_type(client.publish("poly", ()), JobHandle[None])
    some_kernel: str = "poly"
    assert_type(client.submit(some_kernel), JobHandle[Any])
    # as_completed and wait keep the handles' types
    for done in parkpool.as_completed([gemm]):
        assert_type(done, JobHandle[Array])


async def awaited(client: ParkpoolClient, a: Array) -> None:
    answer = await client.submit("fft", {"x": a})
    assert_type(answer, Array | None)
    assert isinstance(np.asarray(answer), np.ndarray)
