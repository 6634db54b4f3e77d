# SPDX-License-Identifier: Apache-2.0
"""Planners split jobs into chunks whose assembled results equal the whole-array answer."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from producer.splitters import (
    PLANNERS,
    JobPlan,
    chunk_seed,
    plan_gemm,
    plan_map,
    plan_monte_carlo_pi,
    plan_reduce,
)
from schemas.errors import ValidationError
from worker.backend import numpy_backend
from worker.kernels import REGISTRY, execute, get_kernel

NUMPY = numpy_backend()


def run_plan(plan: JobPlan, order: Sequence[int] | None = None) -> Any:
    """Run every chunk on the NumPy backend, add results in ``order``, assemble."""
    assembler = plan.make_assembler()
    ids = range(len(plan.chunks)) if order is None else order
    for chunk_id in ids:
        spec = plan.chunks[chunk_id]
        assembler.add(chunk_id, execute(plan.kernel, spec.params, spec.inputs, NUMPY))
    return assembler.result()


def _reversed(plan: JobPlan) -> list[int]:
    return list(reversed(range(len(plan.chunks))))


class TestPlanGemm:
    """Tiled gemm reassembles to a @ b, with edge tiles and with a split K."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize(
        "case",
        [
            (70, 45, 33, 16, None),
            (70, 45, 33, 16, 10),
            (1, 1, 1, 256, None),
            (300, 513, 257, 128, 100),
        ],
        ids=str,
    )
    def test_matches_whole_product(
        self, dtype: npt.DTypeLike, case: tuple[int, int, int, int, int | None]
    ) -> None:
        # Given operands whose sizes (m, k, n) are not multiples of the tiles
        m, k, n, tile, k_tile = case
        a = np.random.default_rng(1).standard_normal((m, k)).astype(dtype)
        b = np.random.default_rng(2).standard_normal((k, n)).astype(dtype)
        # When the job is planned, run, and assembled in reverse order
        plan = plan_gemm(a, b, tile=tile, k_tile=k_tile)
        c = run_plan(plan, _reversed(plan))
        # Then there is one chunk per (row, column, depth) tile and C equals a @ b
        tiles = math.ceil(m / tile) * math.ceil(n / tile) * math.ceil(k / (k_tile or k))
        assert plan.kernel == "gemm" and len(plan.chunks) == tiles
        assert (c.shape, c.dtype) == ((m, n), np.dtype(dtype))
        assert get_kernel("gemm").tolerance.allclose(c, a.astype(np.float64) @ b)

    def test_chunk_inputs_are_contiguous_snapshots(self) -> None:
        # Given a Fortran-ordered operand
        a = np.asfortranarray(np.ones((40, 30), np.float32))
        plan = plan_gemm(a, np.ones((30, 20), np.float32), tile=16, k_tile=7)
        # When the caller later changes it
        a[:] = 5
        # Then every chunk holds a C-contiguous, read-only copy of the original values
        for spec in plan.chunks:
            for array in spec.inputs.values():
                assert array.flags.c_contiguous and not array.flags.writeable
                assert np.all(array == 1)

    @pytest.mark.parametrize(
        ("a", "b", "reason"),
        [
            (np.ones(3, np.float32), np.ones((3, 2), np.float32), "bad_ndim"),
            (np.ones((2, 3), np.float32), np.ones((2, 2), np.float32), "shape_mismatch"),
            (np.ones((2, 3), np.float32), np.ones((3, 2), np.float64), "bad_dtype"),
            (np.ones((2, 3), np.int64), np.ones((3, 2), np.int64), "bad_dtype"),
            (np.ones((0, 3)), np.ones((3, 2)), "bad_shape"),
            (np.ones((1, 65537), np.float32), np.ones((65537, 1), np.float32), "too_large"),
        ],
    )
    def test_bad_operands_fail_at_plan_time(
        self, a: npt.NDArray[Any], b: npt.NDArray[Any], reason: str
    ) -> None:
        # Given operands no chunk could run / When planned / Then refused before sending
        with pytest.raises(ValidationError) as caught:
            plan_gemm(a, b)
        assert caught.value.reason == reason

    def test_long_k_fits_once_split(self) -> None:
        # Given K beyond a task's limit / When planned with k_tile / Then two chunks suffice
        a, b = np.ones((1, 65537), np.float32), np.ones((65537, 1), np.float32)
        plan = plan_gemm(a, b, k_tile=65536)
        assert len(plan.chunks) == 2 and run_plan(plan)[0, 0] == 65537

    def test_bad_tile_is_refused(self) -> None:
        # Given a zero tile / When planned / Then it is a parameter error
        with pytest.raises(ValidationError, match="tile"):
            plan_gemm(np.ones((2, 2)), np.ones((2, 2)), tile=0)


class TestPlanMonteCarloPi:
    """The pi estimate is exactly 4 * (sum of chunk hits) / samples."""

    def test_equals_sum_over_chunks(self) -> None:
        # Given 2.5 chunks' worth of samples
        plan = plan_monte_carlo_pi(250_000, chunk_samples=100_000, seed=9)
        # When each chunk runs
        outs = [execute(plan.kernel, c.params, c.inputs, NUMPY) for c in plan.chunks]
        # Then chunk sizes cover the job, and the result is the pooled estimate
        assert [int(o["samples"]) for o in outs] == [100_000, 100_000, 50_000]
        hits = sum(int(o["hits"]) for o in outs)
        assert run_plan(plan, _reversed(plan)) == 4 * hits / 250_000

    def test_seeds_are_distinct_and_deterministic(self) -> None:
        # Given the same job planned twice, and once with another seed
        def seeds(seed: int) -> list[int]:
            plan = plan_monte_carlo_pi(10**7, chunk_samples=10**5, seed=seed)
            return [spec.params["seed"] for spec in plan.chunks]

        first, again, other = seeds(1), seeds(1), seeds(2)
        # Then seeds repeat exactly, differ between chunks and jobs, and fit the kernel
        assert first == again and first[0] == chunk_seed(1, 0)
        assert len(set(first)) == 100 and not set(first) & set(other)
        assert all(0 <= s < 2**63 for s in first)

    def test_estimate_is_close_to_pi(self) -> None:
        # Given 1e6 samples in 10 chunks (standard error about 0.0016)
        plan = plan_monte_carlo_pi(1_000_000, chunk_samples=100_000, seed=5)
        # When run / Then the estimate is within four standard errors of pi
        assert abs(run_plan(plan) - math.pi) < 4 * 4 * math.sqrt(0.1686 / 1e6)

    @pytest.mark.parametrize(
        "kwargs",
        [{"samples": 0}, {"samples": 10, "seed": -1}, {"samples": 10, "chunk_samples": 2**31 + 1}],
    )
    def test_bad_arguments_are_refused(self, kwargs: dict[str, int]) -> None:
        # Given / When / Then impossible jobs are refused at plan time
        with pytest.raises(ValidationError):
            plan_monte_carlo_pi(**kwargs)


class TestPlanMap:
    """poly over flat chunks reassembles to np.polyval in x's shape and dtype."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("shape", [(1000,), (3, 5, 7), (), (0, 4)])
    def test_matches_polyval(self, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> None:
        # Given x of any shape and a cubic
        x = np.random.default_rng(3).uniform(-2, 2, shape).astype(dtype)
        coeffs = [0.5, -1.0, 2.0, 3.0]
        # When planned in 16-element chunks and run in reverse
        plan = plan_map(x, coeffs, chunk_elems=16)
        y = run_plan(plan, _reversed(plan))
        # Then the result equals np.polyval over the whole array
        assert plan.kernel == "poly" and len(plan.chunks) == max(1, math.ceil(x.size / 16))
        assert (y.shape, y.dtype) == (x.shape, np.dtype(dtype))
        assert get_kernel("poly").tolerance.allclose(y, np.polyval(coeffs, x.astype(np.float64)))

    def test_bad_arguments_are_refused(self) -> None:
        # Given integers / When planned / Then refused before any chunk is sent
        with pytest.raises(ValidationError, match="float32 or float64"):
            plan_map(np.arange(4), [1.0])
        # And so are too many (or no) coefficients
        for coeffs in ([], [1.0] * 17):
            with pytest.raises(ValidationError, match="coeffs"):
                plan_map(np.ones(4), coeffs)


class TestPlanReduce:
    """Partial reductions combine into the whole-array answer for every op."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
    @pytest.mark.parametrize("op", ["sum", "sumsq", "min", "max"])
    def test_matches_whole_array(self, dtype: npt.DTypeLike, op: str) -> None:
        # Given values in chunks of a size that does not divide the length
        x = (np.random.default_rng(4).standard_normal((101, 99)) * 100).astype(dtype)
        x64 = x.astype(np.float64)
        expected = {
            "sum": x64.sum(),
            "sumsq": (x64 * x64).sum(),
            "min": x64.min(),
            "max": x64.max(),
        }
        # When planned, run and assembled in reverse
        plan = plan_reduce(x, op, chunk_elems=1000)
        value = run_plan(plan, _reversed(plan))
        # Then it is a float equal to the whole-array reduction
        assert len(plan.chunks) == 10 and isinstance(value, float)
        assert value == pytest.approx(float(expected[op]), rel=1e-12)

    def test_empty_sum_and_min(self) -> None:
        # Given an empty array / When summed / Then 0; min is refused at plan time
        assert run_plan(plan_reduce(np.zeros(0), "sum")) == 0.0
        with pytest.raises(ValidationError) as caught:
            plan_reduce(np.zeros(0), "min")
        assert caught.value.reason == "empty_input"

    def test_unknown_op_is_refused(self) -> None:
        # Given / When / Then
        with pytest.raises(ValidationError) as caught:
            plan_reduce(np.ones(3), "mean")
        assert caught.value.reason == "unknown_op"


def _small_plans() -> list[JobPlan]:
    return [
        plan_gemm(np.ones((4, 4)), np.ones((4, 4)), tile=2),
        plan_monte_carlo_pi(30, chunk_samples=10),
        plan_map(np.ones(10), [1.0, 2.0], chunk_elems=3),
        plan_reduce(np.ones(10), "max", chunk_elems=3),
    ]


def _outputs(plan: JobPlan, chunk_id: int) -> dict[str, npt.NDArray[Any]]:
    spec = plan.chunks[chunk_id]
    return execute(plan.kernel, spec.params, spec.inputs, NUMPY)


class TestAssemblerContract:
    """Assemblers reject bad chunks without losing state and refuse early results."""

    @pytest.mark.parametrize("plan", _small_plans(), ids=lambda p: p.kernel)
    def test_unknown_and_duplicate_ids(self, plan: JobPlan) -> None:
        # Given an assembler with chunk 0 added
        assembler = plan.make_assembler()
        assembler.add(0, _outputs(plan, 0))
        # When / Then ids outside the plan, and repeats, are refused
        unknown = [(bad_id, "unknown_chunk") for bad_id in (-1, len(plan.chunks), True)]
        for bad_id, reason in [*unknown, (0, "duplicate_chunk")]:
            with pytest.raises(ValidationError) as caught:
                assembler.add(bad_id, _outputs(plan, 0))
            assert caught.value.reason == reason

    @pytest.mark.parametrize("plan", _small_plans(), ids=lambda p: p.kernel)
    def test_wrong_shape_then_recovery(self, plan: JobPlan) -> None:
        # Given a chunk result with every output reshaped wrongly
        assembler = plan.make_assembler()
        good = _outputs(plan, 1)
        bad = {key: np.repeat(value, 2) for key, value in good.items()}
        # When it is added / Then it is refused
        with pytest.raises(ValidationError) as caught:
            assembler.add(1, bad)
        assert caught.value.reason == "bad_shape"
        # And the same chunk id is still accepted with the right result
        for chunk_id in range(len(plan.chunks)):
            assembler.add(chunk_id, _outputs(plan, chunk_id))
        assert assembler.result() is not None

    @pytest.mark.parametrize("plan", _small_plans(), ids=lambda p: p.kernel)
    def test_result_before_completion(self, plan: JobPlan) -> None:
        # Given all chunks but the last
        assembler = plan.make_assembler()
        for chunk_id in range(len(plan.chunks) - 1):
            assembler.add(chunk_id, _outputs(plan, chunk_id))
        # When the result is asked for / Then it is refused, naming what is missing
        with pytest.raises(ValidationError, match="1 of") as caught:
            assembler.result()
        assert caught.value.reason == "incomplete"

    def test_missing_output_and_wrong_sample_count(self) -> None:
        # Given a monte carlo job
        plan = plan_monte_carlo_pi(30, chunk_samples=10)
        assembler = plan.make_assembler()
        # When results lack a key or report the wrong number of samples / Then refused
        with pytest.raises(ValidationError, match="'hits'"):
            assembler.add(0, {"samples": np.asarray(10)})
        with pytest.raises(ValidationError) as caught:
            assembler.add(0, {"hits": np.asarray(3), "samples": np.asarray(11)})
        assert caught.value.reason == "bad_output"


class TestPlannerRegistry:
    """PLANNERS names real kernels, and the producer stays independent of the worker."""

    def test_planners_target_registered_kernels(self) -> None:
        # Given / When / Then every planner is keyed by the kernel its plans run
        assert set(PLANNERS) <= set(REGISTRY)
        assert [p.kernel for p in _small_plans()] == list(PLANNERS)

    def test_producer_does_not_import_worker(self) -> None:
        # Given a fresh interpreter / When the splitters are imported
        code = (
            "import sys, producer.splitters\n"
            "print(any(m.startswith('worker') for m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        # Then no worker module was loaded
        assert out.stdout.strip() == "False"
