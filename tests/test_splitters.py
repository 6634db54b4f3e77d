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

from parkpool.producer import plans
from parkpool.producer.plans import row_bands, wire_copies
from parkpool.producer.splitters import (
    PLANNERS,
    JobPlan,
    KMeansStep,
    OptionPrice,
    chunk_seed,
    plan_fft,
    plan_gemm,
    plan_kmeans_step,
    plan_map,
    plan_mlp,
    plan_monte_carlo_pi,
    plan_option_mc,
    plan_reduce,
    plan_stencil2d,
)
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import BUILTIN
from parkpool.worker.backend import numpy_backend
from parkpool.worker.kernels import REGISTRY, execute, get_kernel, reference

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

    def test_each_block_is_copied_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a 4x4-tile gemm: 16 tiles read 4 row panels of A and 4 column panels of B
        copies: list[tuple[int, ...]] = []
        real = plans.wire_copy

        def count(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
            copies.append(array.shape)
            return real(array)

        monkeypatch.setattr(plans, "wire_copy", count)
        # When planned
        a, b = np.ones((8, 8), np.float32), np.ones((8, 8), np.float32)
        plan = plan_gemm(a, b, tile=2)
        # Then each panel was snapshotted once (not once per tile), and tiles share it
        assert len(plan.chunks) == 16 and len(copies) == 8
        assert len({id(c.inputs["a"]) for c in plan.chunks}) == 4
        assert len({id(c.inputs["b"]) for c in plan.chunks}) == 4
        # And every snapshot is a C-contiguous, read-only copy
        for chunk in plan.chunks:
            for block in chunk.inputs.values():
                assert block.flags.c_contiguous and not block.flags.writeable
                assert not np.shares_memory(block, a) and not np.shares_memory(block, b)

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


_RNG = np.random.default_rng(12)
_OPTION = {"s0": 100.0, "strike": 95.0, "rate": 0.02, "sigma": 0.3, "maturity": 0.5}
_HEAT = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]


def _small_plans() -> list[JobPlan]:
    weights = [_RNG.standard_normal((4, 6)), _RNG.standard_normal((6, 2))]
    biases = [np.zeros(6), np.ones(2)]
    return [
        plan_gemm(np.ones((4, 4)), np.ones((4, 4)), tile=2),
        plan_monte_carlo_pi(30, chunk_samples=10),
        plan_map(np.ones(10), [1.0, 2.0], chunk_elems=3),
        plan_reduce(np.ones(10), "max", chunk_elems=3),
        plan_fft(_RNG.standard_normal((5, 8)), chunk_elems=16),
        plan_mlp(_RNG.standard_normal((7, 4)), weights, biases, chunk_rows=3),
        plan_stencil2d(_RNG.standard_normal((6, 5)), _HEAT, iterations=2),
        plan_kmeans_step(_RNG.standard_normal((9, 2)), np.eye(2), chunk_points=4),
        plan_option_mc(25, **_OPTION, chunk_paths=10),
    ]


def _multi_chunk_plans() -> list[JobPlan]:
    return [plan for plan in _small_plans() if len(plan.chunks) > 1]


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

    @pytest.mark.parametrize("plan", _multi_chunk_plans(), ids=lambda p: p.kernel)
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
        # Given / When / Then every built-in kernel has a planner keyed by its name
        assert set(PLANNERS) == set(BUILTIN) and set(PLANNERS) <= set(REGISTRY)
        assert [p.kernel for p in _small_plans()] == list(PLANNERS)

    def test_producer_does_not_import_worker(self) -> None:
        # Given a fresh interpreter / When the splitters are imported
        code = (
            "import sys, parkpool.producer.splitters\n"
            "print(any(m.startswith('parkpool.worker') for m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        # Then no worker module was loaded
        assert out.stdout.strip() == "False"


class TestPlanFft:
    """Row chunks of a batched FFT reassemble to np.fft over the whole array."""

    @pytest.mark.parametrize(
        ("dtype", "inverse"), [(np.float32, False), (np.complex128, True), (np.float64, False)]
    )
    def test_matches_numpy(self, dtype: npt.DTypeLike, inverse: bool) -> None:
        # Given a 3-D batch of length-33 signals
        x = _RNG.standard_normal((5, 7, 33)) + 0.5j * _RNG.standard_normal((5, 7, 33))
        x = x.astype(dtype) if np.dtype(dtype).kind == "c" else x.real.astype(dtype)
        # When planned in chunks of two rows and run in reverse
        plan = plan_fft(x, inverse=inverse, chunk_elems=66)
        y = run_plan(plan, _reversed(plan))
        # Then there is a chunk per two rows, and the result is np.fft in x's shape
        expected = np.fft.ifft(x, axis=-1) if inverse else np.fft.fft(x, axis=-1)
        single = np.dtype(dtype) == np.float32
        assert len(plan.chunks) == math.ceil(35 / 2) and y.shape == x.shape
        assert y.dtype == (np.complex64 if single else np.complex128)
        assert get_kernel("fft").tolerance.allclose(y, expected)

    def test_bad_input_is_refused(self) -> None:
        # Given integers or an empty axis / When planned / Then refused with the reason
        for x, reason in [(np.ones((2, 4), np.int32), "bad_dtype"), (np.ones((3, 0)), "bad_shape")]:
            with pytest.raises(ValidationError) as caught:
                plan_fft(x)
            assert caught.value.reason == reason


class TestPlanMlp:
    """Row chunks of a batched MLP reassemble to the whole forward pass."""

    def test_matches_forward_pass(self) -> None:
        # Given a three-layer float32 network and 50 rows
        sizes = [(6, 16), (16, 8), (8, 3)]
        weights = [_RNG.standard_normal(s).astype(np.float32) for s in sizes]
        biases = [_RNG.standard_normal(s[1]).astype(np.float32) for s in sizes]
        x = _RNG.standard_normal((50, 6)).astype(np.float32)
        # When planned in chunks of 16 rows and run in reverse
        plan = plan_mlp(x, weights, biases, chunk_rows=16)
        y = run_plan(plan, _reversed(plan))
        # Then the answer equals a float64 forward pass with ReLU between layers
        h = x.astype(np.float64)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = h @ w + b
            h = np.maximum(h, 0) if i < 2 else h
        assert len(plan.chunks) == 4 and (y.shape, y.dtype) == ((50, 3), np.float32)
        assert get_kernel("mlp").tolerance.allclose(y, h)

    def test_mismatched_layers_are_refused(self) -> None:
        # Given a weight whose input width does not follow from the layer before
        x, w, b = np.ones((2, 3)), [np.ones((3, 4)), np.ones((5, 1))], [np.ones(4), np.ones(1)]
        # When planned / Then the contract refuses it, as it does a missing bias
        with pytest.raises(ValidationError) as caught:
            plan_mlp(x, w, b)
        assert caught.value.reason == "shape_mismatch"
        with pytest.raises(ValidationError, match="biases"):
            plan_mlp(x, w, b[:1])


class TestPlanKMeansStep:
    """Partial sums from chunks of points merge into the whole step's answer."""

    def test_matches_one_chunk(self) -> None:
        # Given 3 blobs of float32 points and 4 centroids, one of them far from every point
        centers = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 8.0]])
        points = np.concatenate([c + _RNG.standard_normal((300, 2)) for c in centers])
        points = points.astype(np.float32)
        centroids = np.array([[0.5, 0.5], [4.0, 4.0], [1.0, 7.0], [99.0, 99.0]], np.float32)
        # When planned in chunks of 128 points and assembled in reverse
        plan = plan_kmeans_step(points, centroids, chunk_points=128)
        step = run_plan(plan, _reversed(plan))
        # Then counts are exact and centroids and inertia match the single-task reference
        whole = reference("kmeans_step", {}, {"points": points, "centroids": centroids})
        assert isinstance(step, KMeansStep) and len(plan.chunks) == 8
        assert step.counts.tolist() == whole["counts"].tolist() and step.counts[3] == 0
        assert get_kernel("kmeans_step").tolerance.allclose(step.centroids, whole["centroids"])
        assert step.centroids[3].tolist() == [99.0, 99.0]  # an empty cluster stays put
        assert step.inertia == pytest.approx(float(whole["inertia"]), rel=1e-9)

    def test_counts_that_do_not_add_up_are_refused(self) -> None:
        # Given a chunk result that lost a point
        plan = plan_kmeans_step(np.ones((5, 2)), np.ones((2, 2)))
        outputs = _outputs(plan, 0)
        outputs["counts"] = outputs["counts"] - np.array([1, 0])
        # When added / Then refused as a wrong result
        with pytest.raises(ValidationError) as caught:
            plan.make_assembler().add(0, outputs)
        assert caught.value.reason == "bad_output"


class TestPlanOptionMc:
    """Chunks of paths pool into a price within its standard error of Black-Scholes."""

    @staticmethod
    def black_scholes(kind: str) -> float:
        s0, k, r, sigma, t = (_OPTION[key] for key in ("s0", "strike", "rate", "sigma", "maturity"))
        d1 = (math.log(s0 / k) + (r + sigma * sigma / 2) * t) / (sigma * math.sqrt(t))
        d2 = d1 - sigma * math.sqrt(t)

        def cdf(v: float) -> float:
            return 0.5 * (1 + math.erf(v / math.sqrt(2)))

        call = s0 * cdf(d1) - k * math.exp(-r * t) * cdf(d2)
        return call if kind == "call" else call - s0 + k * math.exp(-r * t)

    @pytest.mark.parametrize("kind", ["call", "put"])
    def test_price_is_close_to_black_scholes(self, kind: str) -> None:
        # Given 400,000 paths in 4 chunks
        plan = plan_option_mc(400_000, **_OPTION, kind=kind, seed=3, chunk_paths=100_000)
        # When run / Then the estimate is within 4 standard errors of the closed form
        price = run_plan(plan, _reversed(plan))
        assert isinstance(price, OptionPrice) and price.paths == 400_000
        assert 0 < price.stderr < 0.05
        assert abs(price.price - self.black_scholes(kind)) < 4 * price.stderr

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            ({"sigma": 0.0}, "bad_param"),
            ({"kind": "straddle"}, "bad_param"),
            ({"s0": "100"}, "bad_param"),
            ({"rate": 3.0}, "bad_param"),
        ],
    )
    def test_bad_market_is_refused(self, change: dict[str, Any], reason: str) -> None:
        # Given / When / Then an impossible option fails at plan time with the reason
        with pytest.raises(ValidationError) as caught:
            plan_option_mc(10, **{**_OPTION, **change})
        assert caught.value.reason == reason


class TestPlanStencil2d:
    """A stencil job is one chunk whose result is the reference grid."""

    def test_single_chunk_matches_reference(self) -> None:
        # Given a float64 grid / When planned and run
        u = _RNG.standard_normal((20, 30))
        plan = plan_stencil2d(u, _HEAT, iterations=7)
        grid = run_plan(plan)
        # Then it is one chunk and the grid matches the reference
        expected = reference("stencil2d", {"weights": _HEAT, "iterations": 7}, {"u": u})["u"]
        assert len(plan.chunks) == 1
        assert get_kernel("stencil2d").tolerance.allclose(grid, expected)

    @pytest.mark.parametrize(
        "weights", [[[1.0, 1.0], [1.0, 1.0]], [["a"] * 3] * 3, [[0.5] * 3] * 3], ids=str
    )
    def test_bad_weights_are_refused(self, weights: Any) -> None:
        # Given weights that are not 3x3 numbers, or that would amplify / Then refused
        with pytest.raises(ValidationError) as caught:
            plan_stencil2d(np.ones((4, 4)), weights)
        assert caught.value.reason == "bad_param"


@pytest.mark.parametrize(
    ("shape", "band_bytes", "expected_rows"),
    [
        ((10, 4), 64, [4, 4, 2]),  # 16-byte float32 rows, four to a band
        ((3, 2, 8), 64, [1, 1, 1]),  # a row of an n-D array is all of its trailing axes
        ((5, 100), 64, [1, 1, 1, 1, 1]),  # a row larger than a band is a band alone
        ((0, 4), 64, []),  # nothing to cover
    ],
)
def test_row_bands_cover_the_rows_in_order(
    shape: tuple[int, ...], band_bytes: int, expected_rows: list[int]
) -> None:
    array = np.zeros(shape, np.float32)
    bands = list(row_bands(array, band_bytes))
    assert [band.stop - band.start for band in bands] == expected_rows
    assert [band.start for band in bands] == [sum(expected_rows[:i]) for i in range(len(bands))]


@pytest.mark.parametrize("threads", [1, 2], ids=["one thread", "a pool"])
def test_wire_copies_are_frozen_snapshots_in_order(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given strided views of one array, enough bytes in all to copy on a pool
    monkeypatch.setattr(plans, "COPY_THREADS", threads)
    monkeypatch.setattr(plans, "PARALLEL_COPY_BYTES", 1 << 10)
    source = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    views = [source[:, j : j + 32] for j in range(0, 96, 32)]
    # When copied for the wire
    copies = wire_copies(views)
    source[:] = -1  # the caller reuses its array after planning
    # Then each copy holds the view's values as they were, contiguous and read-only
    expected = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    assert len(copies) == 3
    for j, copy in enumerate(copies):
        np.testing.assert_array_equal(copy, expected[:, 32 * j : 32 * (j + 1)])
        assert copy.flags.c_contiguous and not copy.flags.writeable
