# SPDX-License-Identifier: Apache-2.0
"""The new kernels match their references, and the hand-written CUDA matches its twins."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from parkpool.worker import kernels_cuda, kernels_linalg, kernels_signal, kernels_sim
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.backend import Backend, available_backends, numpy_backend
from parkpool.worker.kernels import execute, get_kernel, reference
from parkpool.worker.kernels_prefetch import Stager

NUMPY = numpy_backend()
RNG = np.random.default_rng(2024)
FLOATS = [np.float32, np.float64]
HEAT = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]
FIVE_POINT = [[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]
OPTION = {"s0": 100.0, "strike": 90.0, "rate": 0.04, "sigma": 0.3, "maturity": 0.75}


def _matches(name: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    out = execute(name, params, inputs, NUMPY)
    assert get_kernel(name).matches(out, reference(name, params, inputs))
    return out


def _tiny(monkeypatch: pytest.MonkeyPatch, **sizes: int) -> None:
    monkeypatch.setattr(slicing, "SLICES", replace(slicing.SLICES, **sizes))
    monkeypatch.setattr(slicing, "CPU_SLICES", replace(slicing.CPU_SLICES, **sizes))


class TestTiledGemm:
    """gemm over many output and K tiles equals the whole product."""

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_tiles_sum_to_the_product(
        self, monkeypatch: pytest.MonkeyPatch, dtype: npt.DTypeLike
    ) -> None:
        # Given operands that tile unevenly into 32x32 output tiles and K tiles of 24
        a = RNG.standard_normal((100, 75)).astype(dtype)
        b = RNG.standard_normal((75, 61)).astype(dtype)
        whole = execute("gemm", {}, {"a": a, "b": b}, NUMPY)["c"]
        _tiny(monkeypatch, gemm_tile=32, gemm_k_tile=24)
        # When tiled
        tiled = execute("gemm", {}, {"a": a, "b": b}, NUMPY)["c"]
        # Then it matches the untiled result and the float64 product
        assert tiled.dtype == dtype and get_kernel("gemm").tolerance.allclose(tiled, whole)
        assert get_kernel("gemm").tolerance.allclose(tiled, a.astype(np.float64) @ b)

    def test_one_tile_is_exactly_matmul(self) -> None:
        # Given a task within one tile / When run / Then it is np.matmul bit for bit
        a, b = RNG.standard_normal((33, 17)), RNG.standard_normal((17, 9))
        assert np.array_equal(execute("gemm", {}, {"a": a, "b": b}, NUMPY)["c"], a @ b)

    @pytest.mark.parametrize("rows, cols", [(70, 40), (30, 20)])
    def test_k_tiles_sum_in_the_same_order_as_before(
        self, monkeypatch: pytest.MonkeyPatch, rows: int, cols: int
    ) -> None:
        # Given K tiles of 24 summed into the output tile and one scratch tile: several
        # output tiles (views of C), or one (all of C, where the first product lands)
        _tiny(monkeypatch, gemm_tile=32, gemm_k_tile=24)
        a = RNG.standard_normal((rows, 75)).astype(np.float32)
        b = RNG.standard_normal((75, cols)).astype(np.float32)
        # When run / Then each output tile is its K tiles' products added left to right
        expected = np.empty((rows, cols), np.float32)
        for r in slicing.spans(rows, 32):
            for c in slicing.spans(cols, 32):
                parts = [a[r, k] @ b[k, c] for k in slicing.spans(75, 24)]
                expected[r, c] = functools.reduce(np.add, parts)
        assert np.array_equal(execute("gemm", {}, {"a": a, "b": b}, NUMPY)["c"], expected)

    def test_an_empty_inner_dimension_gives_zeros(self) -> None:
        # Given operands with no K, which the contract refuses before a kernel runs
        a, b = np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)
        # When the kernel itself is called / Then C is zeros, as np.matmul gives
        c = kernels_linalg.gemm(np, {}, {"a": a, "b": b}, lambda: None)["c"]
        assert np.array_equal(c, np.zeros((3, 4)))


def _mlp(sizes: list[int], rows: int, dtype: npt.DTypeLike) -> dict[str, Any]:
    inputs = {"x": RNG.standard_normal((rows, sizes[0])).astype(dtype)}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        inputs[f"w{i}"] = (RNG.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(dtype)
        inputs[f"b{i}"] = RNG.standard_normal(fan_out).astype(dtype)
    return inputs


class TestMlp:
    """mlp is x through affine layers with ReLU between them, in x's dtype."""

    @pytest.mark.parametrize("dtype", FLOATS)
    @pytest.mark.parametrize("sizes", [[5, 3], [12, 32, 32, 4], [8] * 9], ids=str)
    def test_matches_reference(self, dtype: npt.DTypeLike, sizes: list[int]) -> None:
        # Given a network of 1, 3 or 8 layers / When run / Then it matches the reference
        out = _matches("mlp", {}, _mlp(sizes, 40, dtype))
        assert (out["y"].shape, out["y"].dtype) == ((40, sizes[-1]), np.dtype(dtype))

    def test_relu_between_layers_not_after_the_last(self) -> None:
        # Given identity layers with a bias that makes every value negative
        inputs = {"x": -np.ones((2, 2)), "w0": np.eye(2), "b0": np.zeros(2)}
        inputs |= {"w1": np.eye(2), "b1": -np.ones(2)}
        # When run / Then the hidden ReLU zeroes -1 and the output layer stays linear
        assert execute("mlp", {}, inputs, NUMPY)["y"].tolist() == [[-1.0, -1.0]] * 2

    def test_row_batches_do_not_change_the_answer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a task run whole / When its rows are batched by 7 / Then the answer is equal
        inputs = _mlp([6, 10, 3], 50, np.float64)
        whole = execute("mlp", {}, inputs, NUMPY)["y"]
        _tiny(monkeypatch, mlp_flops=7 * 2 * (60 + 30))
        assert np.allclose(execute("mlp", {}, inputs, NUMPY)["y"], whole, rtol=1e-12)


class TestKMeansStep:
    """kmeans_step assigns each point to its nearest centroid and returns cluster sums."""

    @pytest.mark.parametrize("dtype", FLOATS)
    @pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "far-from-origin"])
    def test_matches_reference(self, dtype: npt.DTypeLike, offset: float) -> None:
        # Given three blobs (possibly far from the origin) and five centroids
        blobs = [c + RNG.standard_normal((150, 3)) for c in (0.0, 6.0, -6.0)]
        points = (np.concatenate(blobs) + offset).astype(dtype)
        centroids = (RNG.standard_normal((5, 3)) * 4 + offset).astype(dtype)
        # When one step runs / Then it matches the reference, counts covering every point
        out = _matches("kmeans_step", {}, {"points": points, "centroids": centroids})
        assert int(out["counts"].sum()) == 450 and out["centroids"].dtype == dtype

    def test_known_answer_and_empty_cluster(self) -> None:
        # Given four points around two centroids, and a third centroid nobody is near
        points = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [12.0, 0.0]])
        centroids = np.array([[0.0, 1.0], [11.0, 1.0], [100.0, 100.0]])
        # When one step runs
        out = _matches("kmeans_step", {}, {"points": points, "centroids": centroids})
        # Then each cluster's mean is its points' mean, and the empty one stays put
        assert out["counts"].tolist() == [2, 2, 0]
        assert out["centroids"].tolist() == [[0.0, 1.0], [11.0, 0.0], [100.0, 100.0]]
        assert out["inertia"] == pytest.approx(1 + 1 + 2 + 2)

    def test_batches_do_not_change_the_answer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a step run whole, then with batches of 3 points
        inputs = {"points": RNG.standard_normal((100, 4)), "centroids": RNG.standard_normal((4, 4))}
        whole = execute("kmeans_step", {}, inputs, NUMPY)
        _tiny(monkeypatch, kmeans_pairs=12)
        batched = execute("kmeans_step", {}, inputs, NUMPY)
        # Then the counts are identical and the sums agree to rounding
        assert batched["counts"].tolist() == whole["counts"].tolist()
        assert np.allclose(batched["sums"], whole["sums"], rtol=1e-12, atol=1e-12)


class TestFft:
    """fft transforms every row along the last axis, like np.fft, in single or double."""

    @pytest.mark.parametrize(
        ("dtype", "out"),
        [
            (np.float32, np.complex64),
            (np.float64, np.complex128),
            (np.complex64, np.complex64),
            (np.complex128, np.complex128),
        ],
    )
    @pytest.mark.parametrize("shape", [(1,), (7, 100), (2, 3, 1500)], ids=str)
    def test_matches_numpy(self, dtype: Any, out: Any, shape: tuple[int, ...]) -> None:
        # Given x of each accepted dtype, with the last axis below and above the DFT limit
        x = RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)
        x = x.astype(dtype) if np.dtype(dtype).kind == "c" else x.real.astype(dtype)
        # When transformed / Then it matches the reference and np.fft, in the right dtype
        y = _matches("fft", {}, {"x": x})["y"]
        assert (y.shape, y.dtype) == (shape, np.dtype(out))
        assert get_kernel("fft").tolerance.allclose(y, np.fft.fft(x.astype(np.complex128)))

    def test_inverse_undoes_forward(self) -> None:
        # Given a signal / When transformed forward, then inverse / Then it comes back
        x = RNG.standard_normal((3, 64)).astype(np.complex128)
        y = execute("fft", {}, {"x": x}, NUMPY)["y"]
        back = _matches("fft", {"inverse": True}, {"x": y})["y"]
        assert np.allclose(back, x, atol=1e-12)

    def test_direct_reference_agrees_with_pocketfft(self) -> None:
        # Given the reference's own direct DFT / Then it agrees with np.fft in float64
        x = RNG.standard_normal((4, kernels_signal.DFT_MAX_LENGTH))
        direct = kernels_signal.fft_reference({}, {"x": x})["y"]
        assert np.max(np.abs(direct - np.fft.fft(x))) < 1e-10 * np.max(np.abs(direct))


def _scalar_stencil(u: list[list[float]], w: list[list[float]], steps: int) -> list[list[float]]:
    """The stencil one cell at a time in Python floats: an oracle for float64 grids."""
    for _ in range(steps):
        nxt = [row[:] for row in u]
        for i in range(1, len(u) - 1):
            for j in range(1, len(u[0]) - 1):
                total = w[0][0] * u[i - 1][j - 1]
                for k in range(1, 9):
                    di, dj = divmod(k, 3)
                    total = total + w[di][dj] * u[i - 1 + di][j - 1 + dj]
                nxt[i][j] = total
        u = nxt
    return u


class TestStencil2d:
    """stencil2d iterates a 3x3 stencil over the interior; boundary cells keep their values."""

    @pytest.mark.parametrize("dtype", FLOATS)
    @pytest.mark.parametrize(("weights", "steps"), [(HEAT, 1), (HEAT, 60), (FIVE_POINT, 9)])
    def test_matches_reference(
        self, dtype: npt.DTypeLike, weights: list[list[float]], steps: int
    ) -> None:
        # Given a grid / When iterated / Then it matches the reference with the boundary kept
        u = RNG.uniform(-1, 1, (23, 31)).astype(dtype)
        params = {"weights": weights, "iterations": steps}
        out = _matches("stencil2d", params, {"u": u})["u"]
        edge = np.ones(u.shape, bool)
        edge[1:-1, 1:-1] = False
        assert out.dtype == dtype and np.array_equal(out[edge], u[edge])

    def test_twin_equals_scalar_oracle_bit_for_bit(self) -> None:
        # Given a float64 grid / When the NumPy twin iterates 3 times
        u = RNG.standard_normal((6, 7))
        out = execute("stencil2d", {"weights": HEAT, "iterations": 3}, {"u": u}, NUMPY)["u"]
        # Then every cell equals the one-cell-at-a-time oracle in the same order exactly
        assert out.tolist() == _scalar_stencil(u.tolist(), HEAT, 3)

    def test_batched_iterations_do_not_change_the_answer(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a run whole / When one slice holds a single row of one iteration (the CPU
        # splits sweeps by rows; the GPU batches whole iterations) / Then it is identical
        u = RNG.standard_normal((9, 9)).astype(np.float32)
        whole = execute("stencil2d", {"weights": HEAT, "iterations": 5}, {"u": u}, NUMPY)["u"]
        _tiny(monkeypatch, stencil_cells=1)
        sliced = execute("stencil2d", {"weights": HEAT, "iterations": 5}, {"u": u}, NUMPY)["u"]
        assert np.array_equal(sliced, whole)


def _scalar_payoff(seed: int, path: int, terms: tuple[float, ...]) -> float:
    """One path's discounted payoff with Python's math module: an oracle for the twin."""
    s0, strike, drift, vol, discount, put = terms
    draw = kernels_sim.splitmix64(np, seed, np.array([2 * path, 2 * path + 1], np.uint64))
    u1, u2 = ((int(draw[0]) >> 11) + 1) * 2.0**-53, (int(draw[1]) >> 11) * 2.0**-53
    price = s0 * math.exp(drift + vol * math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return discount * max(strike - price if put else price - strike, 0.0)


class TestOptionMc:
    """option_mc sums discounted GBM payoffs drawn from the counter-based generator."""

    @pytest.mark.parametrize("kind", ["call", "put"])
    def test_twin_matches_scalar_oracle(self, kind: str) -> None:
        # Given paths far into the stream
        terms = kernels_sim.option_terms({**OPTION, "kind": kind})
        first = 2**40 + 17
        # When the twin prices 50 of them / Then each matches the scalar oracle
        got = kernels_sim.option_payoffs_twin(np, 99, first, 50, terms)
        expected = [_scalar_payoff(99, first + i, terms) for i in range(50)]
        assert np.allclose(got, expected, rtol=1e-13, atol=1e-13)

    def test_put_call_parity(self) -> None:
        # Given a call and a put on the same paths
        params = {**OPTION, "seed": 5, "paths": 200_000}
        call = execute("option_mc", {**params, "kind": "call"}, {}, NUMPY)
        put = execute("option_mc", {**params, "kind": "put"}, {}, NUMPY)
        # Then C - P = mean(e^-rT S_T) - K e^-rT, which is S0 - K e^-rT within sampling error
        r, t = OPTION["rate"], OPTION["maturity"]
        forward = OPTION["s0"] - OPTION["strike"] * math.exp(-r * t)
        spread = (float(call["sum"]) - float(put["sum"])) / 200_000
        stderr = OPTION["s0"] * OPTION["sigma"] * math.sqrt(t) / math.sqrt(200_000)
        assert abs(spread - forward) < 4 * stderr and int(call["paths"]) == 200_000

    def test_batches_do_not_change_the_paths(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a run in one batch / When batches of 333 paths are used
        params = {**OPTION, "seed": 1, "paths": 5000, "kind": "call"}
        whole = execute("option_mc", params, {}, NUMPY)
        _tiny(monkeypatch, option_batch=333)
        batched = execute("option_mc", params, {}, NUMPY)
        # Then the same paths were drawn: the sums agree to rounding
        assert float(batched["sum"]) == pytest.approx(float(whole["sum"]), rel=1e-12)
        assert float(batched["sumsq"]) == pytest.approx(float(whole["sumsq"]), rel=1e-12)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of a hand-written CUDA launcher, still running it."""
    calls: list[int] = []
    original: Callable[..., None] = getattr(kernels_cuda, name)

    def counted(*args: Any) -> None:
        calls.append(1)
        original(*args)

    monkeypatch.setattr(kernels_cuda, name, counted)
    return calls


@pytest.mark.parametrize("backend", available_backends(), ids=lambda b: b.name)
class TestHandWrittenCuda:
    """CuPy runs the hand-written kernels, within tolerance of the twins; NumPy runs the twins."""

    def test_stencil(self, monkeypatch: pytest.MonkeyPatch, backend: Backend) -> None:
        # Given a float32 grid, and the CUDA launcher watched
        calls = _counting(monkeypatch, "stencil_step")
        u = RNG.uniform(-1, 1, (130, 67)).astype(np.float32)
        params = {"weights": HEAT, "iterations": 12}
        # When run on this backend
        out = execute("stencil2d", params, {"u": u}, backend)["u"]
        # Then the CUDA kernel ran exactly on CuPy, and the result matches the twin on NumPy
        twin = execute("stencil2d", params, {"u": u}, NUMPY)["u"]
        assert len(calls) == (12 if backend.is_gpu else 0)
        assert get_kernel("stencil2d").tolerance.allclose(out, twin)

    def test_option(self, monkeypatch: pytest.MonkeyPatch, backend: Backend) -> None:
        # Given an option task over two batches, and the CUDA launcher watched
        calls = _counting(monkeypatch, "option_payoffs")
        _tiny(monkeypatch, option_batch=40_000)
        params = {**OPTION, "seed": 77, "paths": 70_000, "kind": "put"}
        # When run on this backend
        out = execute("option_mc", params, {}, backend)
        # Then the fused kernel ran exactly on CuPy, and the sums match the NumPy twin's
        assert len(calls) == (2 if backend.is_gpu else 0)
        assert get_kernel("option_mc").matches(out, execute("option_mc", params, {}, NUMPY))


@pytest.mark.parametrize("backend", available_backends(), ids=lambda b: b.name)
class TestStager:
    """Staged inputs arrive on the device equal to the host arrays."""

    def test_staged_inputs_equal_host(self, backend: Backend) -> None:
        # Given host inputs / When staged and handed to the current stream
        host = {"a": RNG.standard_normal((4, 5)), "b": np.arange(3, dtype=np.int32)}
        staged = Stager(backend).stage(host)
        stream = backend.xp.cuda.get_current_stream() if backend.is_gpu else None
        device = staged.inputs_on(stream)
        # Then each array is on the backend, equal to its host original
        assert (staged.ready is not None) == backend.is_gpu
        for key, value in host.items():
            assert np.array_equal(backend.to_host(device[key]), value)
