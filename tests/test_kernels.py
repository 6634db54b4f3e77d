# SPDX-License-Identifier: Apache-2.0
"""Kernels match their NumPy references, validate tasks, and fail with clear errors."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from parkpool.schemas.errors import ConfigError, KernelError, Retry, ValidationError
from parkpool.worker import kernels
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.backend import Backend, available_backends, numpy_backend, select_backend
from parkpool.worker.kernels import (
    BUILTIN,
    REGISTRY,
    Kernel,
    Tolerance,
    execute,
    get_kernel,
    reference,
)

NUMPY = numpy_backend()
MASK64 = 2**64 - 1


def _scalar_splitmix64(seed: int, index: int) -> int:
    """Vigna's splitmix64, one Python int at a time, as an independent oracle."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _hits(seed: int, samples: int) -> int:
    out = execute("monte_carlo_pi", {"seed": seed, "samples": samples}, {}, NUMPY)
    return int(out["hits"])


def _fake_cupy(device_count: Callable[[], int]) -> types.ModuleType:
    """A stand-in for the cupy module; ``freed`` records which memory pools were emptied."""
    freed: list[str] = []

    def pool(label: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(free_all_blocks=lambda: freed.append(label))

    module = types.ModuleType("cupy")
    vars(module).update(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count)),
        get_default_memory_pool=lambda: pool("device"),
        get_default_pinned_memory_pool=lambda: pool("pinned"),
        freed=freed,
    )
    return module


class TestSelectBackend:
    """select_backend uses CuPy only when it imports and sees a GPU."""

    @pytest.mark.parametrize(
        "cupy",
        [None, _fake_cupy(lambda: 0), _fake_cupy(lambda: 1 // 0)],
        ids=["not-installed", "no-gpu", "no-driver"],
    )
    def test_no_usable_gpu_means_numpy(
        self, monkeypatch: pytest.MonkeyPatch, cupy: types.ModuleType | None
    ) -> None:
        # Given cupy cannot be imported, reports no GPU, or its runtime call fails
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        # When / Then "auto" quietly picks NumPy, while "cupy" is a configuration error
        assert select_backend("auto").name == "numpy"
        assert [b.name for b in available_backends()] == ["numpy"]
        with pytest.raises(ConfigError, match="cupy"):
            select_backend("cupy")

    def test_auto_prefers_a_usable_gpu(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given cupy imports and sees one GPU
        fake = _fake_cupy(lambda: 1)
        monkeypatch.setitem(sys.modules, "cupy", fake)
        # When a backend is selected
        backend = select_backend("auto")
        backend.free_memory()
        # Then it is CuPy, and freeing memory empties both pools; "numpy" still forces NumPy
        assert (backend.name, backend.xp, backend.is_gpu) == ("cupy", fake, True)
        assert vars(fake)["freed"] == ["device", "pinned"]
        assert select_backend("numpy").name == "numpy"
        # And a typo in the setting fails loudly
        with pytest.raises(ConfigError, match="backend must be one of"):
            select_backend("gpu")

    def test_auto_follows_this_machine(self) -> None:
        # Given the real environment: When auto picks, Then it is CuPy exactly when a GPU is
        # usable, and on a machine without one CuPy is refused
        if len(available_backends()) > 1:
            assert select_backend("auto").name == "cupy"
            return
        assert select_backend("auto") == NUMPY
        with pytest.raises(ConfigError):
            select_backend("cupy")

    def test_numpy_round_trip(self) -> None:
        # Given a host array / When it goes to the NumPy "device" and back (no-op hooks)
        host = np.arange(6, dtype=np.float32).reshape(2, 3)
        NUMPY.synchronize()
        NUMPY.free_memory()
        # Then it is an equal NumPy array, and 0-d values stay arrays
        np.testing.assert_array_equal(NUMPY.to_host(NUMPY.to_device(host)), host)
        assert isinstance(NUMPY.to_host(np.float64(2.0)), np.ndarray)


class TestTolerance:
    """Tolerance compares relative to the largest reference magnitude."""

    def test_norm_relative_and_exact(self) -> None:
        # Given a reference with one element that nearly cancels
        expected = np.array([1000.0, 1e-9])
        # When / Then an error small against the norm passes, a large one does not
        assert Tolerance(1e-6, 0.0).allclose(expected + 1e-4, expected)
        assert not Tolerance(1e-6, 0.0).allclose(expected + 1e-2, expected)
        # And exact tolerance demands equal dtype, shape and values
        assert Tolerance(0.0, 0.0).allclose(np.int64(3), np.asarray(3, dtype=np.int64))
        assert not Tolerance(0.0, 0.0).allclose(np.asarray(3, np.int32), np.asarray(3))
        assert not Tolerance(1.0, 1.0).allclose(np.zeros(2), np.zeros(3))


class TestGemm:
    """gemm matches np.matmul within its tolerance, even against a float64 product."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (64, 300, 33)])
    def test_matches_reference(self, dtype: npt.DTypeLike, shape: tuple[int, int, int]) -> None:
        # Given random operands
        m, k, n = shape
        a = np.random.default_rng(1).standard_normal((m, k)).astype(dtype)
        b = np.random.default_rng(2).standard_normal((k, n)).astype(dtype)
        # When gemm runs on NumPy
        out = execute("gemm", {}, {"a": a, "b": b}, NUMPY)
        # Then it matches the reference and the exact float64 product, in the input dtype
        kernel = get_kernel("gemm")
        assert out["c"].dtype == dtype
        assert kernel.matches(out, reference("gemm", {}, {"a": a, "b": b}))
        assert kernel.tolerance.allclose(out["c"], a.astype(np.float64) @ b.astype(np.float64))


class TestMonteCarloPi:
    """monte_carlo_pi is a deterministic, counter-based estimate of pi."""

    def test_generator_matches_splitmix64(self) -> None:
        # Given the published splitmix64 outputs for seed 1234567
        known = [6457827717110365317, 3203168211198807973, 9817491932198370423]
        # When the vectorised generator runs, also across the 2**64 wraparound
        seed = 2**63 - 1
        counters = np.array([0, 1, 2, 2**40, 2**62], dtype=np.uint64)
        got = kernels.splitmix64(np, seed, counters)
        # Then it agrees with the reference values and the scalar oracle
        assert kernels.splitmix64(np, 1234567, np.arange(3, dtype=np.uint64)).tolist() == known
        assert got.tolist() == [_scalar_splitmix64(seed, int(c)) for c in counters]

    def test_hits_match_scalar_oracle(self) -> None:
        # Given the same points computed one by one in Python floats
        seed, samples = 42, 2000
        u = [(_scalar_splitmix64(seed, i) >> 11) * 2.0**-53 for i in range(2 * samples)]
        expected = sum(u[2 * i] ** 2 + u[2 * i + 1] ** 2 <= 1.0 for i in range(samples))
        # When the kernel runs
        out = execute("monte_carlo_pi", {"seed": seed, "samples": samples}, {}, NUMPY)
        # Then the counts agree exactly, as 0-d int64 arrays
        assert out["hits"].shape == () and out["hits"].dtype == np.int64
        assert int(out["hits"]) == expected and int(out["samples"]) == samples

    def test_batching_does_not_change_the_answer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a run in one batch
        whole = _hits(7, 1001)
        # When the batch size is shrunk to an awkward value
        monkeypatch.setattr(slicing, "SLICES", replace(slicing.SLICES, mc_batch=7))
        monkeypatch.setattr(slicing, "CPU_SLICES", replace(slicing.CPU_SLICES, mc_batch=7))
        # Then the hit count is identical
        assert _hits(7, 1001) == whole

    def test_deterministic_per_seed(self) -> None:
        # Given / When two runs with seed 3 and one with seed 4
        # Then the same seed repeats exactly and another seed differs
        assert _hits(3, 100_000) == _hits(3, 100_000) != _hits(4, 100_000)

    def test_estimate_is_close_to_pi(self) -> None:
        # Given 1e6 samples, whose estimate has a standard error of 4*sqrt(p(1-p)/n)
        n, p = 1_000_000, math.pi / 4
        stderr = 4 * math.sqrt(p * (1 - p) / n)
        # When the kernel runs / Then the estimate is within four standard errors of pi
        assert abs(4 * _hits(2024, n) / n - math.pi) < 4 * stderr


class TestPoly:
    """poly evaluates like np.polyval, in the dtype and shape of x."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("shape", [(), (17,), (3, 4, 5)])
    @pytest.mark.parametrize("degree", [0, 3, 15])
    def test_matches_reference(
        self, dtype: npt.DTypeLike, shape: tuple[int, ...], degree: int
    ) -> None:
        # Given x in [-1.5, 1.5] and random coefficients
        x = np.random.default_rng(3).uniform(-1.5, 1.5, shape).astype(dtype)
        params = {"coeffs": np.random.default_rng(4).standard_normal(degree + 1).tolist()}
        # When poly runs
        out = execute("poly", params, {"x": x}, NUMPY)
        # Then it matches the float64 reference within tolerance, keeping dtype and shape
        assert (out["y"].dtype, out["y"].shape) == (np.dtype(dtype), shape)
        assert get_kernel("poly").matches(out, reference("poly", params, {"x": x}))


class TestReduce:
    """reduce returns a float64 0-d value accumulated in float64."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
    @pytest.mark.parametrize("op", ["sum", "sumsq", "min", "max"])
    def test_matches_reference(self, dtype: npt.DTypeLike, op: str) -> None:
        # Given values of each accepted dtype
        x = (np.random.default_rng(5).standard_normal(10_001) * 1000).astype(dtype)
        # When reduce runs
        out = execute("reduce", {"op": op}, {"x": x}, NUMPY)
        # Then it is a 0-d float64 matching the reference
        assert (out["value"].dtype, out["value"].shape) == (np.dtype(np.float64), ())
        assert get_kernel("reduce").matches(out, reference("reduce", {"op": op}, {"x": x}))

    def test_empty_sum_is_zero(self) -> None:
        # Given / When an empty array is summed / Then the answer is 0
        out = execute("reduce", {"op": "sum"}, {"x": np.zeros(0, np.float32)}, NUMPY)
        assert out["value"] == 0.0


F32 = np.zeros((2, 3), np.float32)
BAD_TASKS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("nope", {}, {}, "unknown_kernel"),
    ("gemm", {}, {"a": np.zeros(3, np.float32), "b": F32}, "bad_ndim"),
    ("gemm", {}, {"a": F32.astype(np.int32), "b": F32.T.astype(np.int32)}, "bad_dtype"),
    ("gemm", {}, {"a": F32, "b": F32.T.astype(np.float64)}, "dtype_mismatch"),
    ("gemm", {}, {"a": F32, "b": F32}, "shape_mismatch"),
    ("gemm", {}, {"a": np.zeros((1, 65537), np.float32), "b": F32}, "too_large"),
    ("gemm", {}, {"a": np.zeros((0, 3), np.float32), "b": F32.T}, "bad_shape"),
    ("gemm", {}, {"a": F32}, "missing_input"),
    ("gemm", {}, {"a": F32, "b": F32.T, "c": F32}, "unexpected_input"),
    ("gemm", {}, {"a": F32.tolist(), "b": F32.T}, "bad_input_type"),
    ("gemm", {"alpha": 2.0}, {"a": F32, "b": F32.T}, "unexpected_param"),
    ("monte_carlo_pi", {"seed": -1, "samples": 10}, {}, "bad_param"),
    ("monte_carlo_pi", {"seed": 2**63, "samples": 10}, {}, "bad_param"),
    ("monte_carlo_pi", {"seed": 1, "samples": 0}, {}, "bad_param"),
    ("monte_carlo_pi", {"seed": 1, "samples": 2**31 + 1}, {}, "bad_param"),
    ("monte_carlo_pi", {"seed": 1, "samples": True}, {}, "bad_param"),
    ("monte_carlo_pi", {"seed": 1.5, "samples": 10}, {}, "bad_param"),
    ("monte_carlo_pi", {"samples": 10}, {}, "missing_param"),
    ("monte_carlo_pi", {"seed": 1, "samples": 10}, {"x": F32}, "unexpected_input"),
    ("poly", {"coeffs": [1.0] * 17}, {"x": F32}, "bad_param"),
    ("poly", {"coeffs": []}, {"x": F32}, "bad_param"),
    ("poly", {"coeffs": [1.0, float("nan")]}, {"x": F32}, "bad_param"),
    ("poly", {"coeffs": ["1"]}, {"x": F32}, "bad_param"),
    ("poly", {"coeffs": [1.0]}, {"x": F32.astype(np.int64)}, "bad_dtype"),
    ("reduce", {"op": "mean"}, {"x": F32}, "unknown_op"),
    ("reduce", {}, {"x": F32}, "missing_param"),
    ("reduce", {"op": "sum"}, {"x": F32.astype(np.complex64)}, "bad_dtype"),
    ("reduce", {"op": "min"}, {"x": np.zeros(0, np.float64)}, "empty_input"),
]


class TestValidation:
    """A task that breaks a kernel's contract is refused with a stable reason."""

    @pytest.mark.parametrize(("name", "params", "inputs", "reason"), BAD_TASKS)
    def test_rejected_with_reason(
        self, name: str, params: dict[str, Any], inputs: dict[str, Any], reason: str
    ) -> None:
        # Given a bad task / When it is executed, or checked against the reference
        with pytest.raises(ValidationError) as by_execute:
            execute(name, params, inputs, NUMPY)
        with pytest.raises(ValidationError) as by_reference:
            reference(name, params, inputs)
        # Then both refuse it, and the reason names what is wrong
        assert by_execute.value.reason == by_reference.value.reason == reason


def _raise(error: Exception, *_: Any) -> dict[str, Any]:
    raise error


def _install(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., dict[str, Any]]) -> None:
    """Make get_kernel("boom") return a kernel running ``fn``."""
    boom = Kernel("boom", fn, Tolerance(0.0, 0.0), (), lambda p, i: None, lambda p, i: {})
    monkeypatch.setattr(kernels, "get_kernel", lambda name: boom)


class TestKernelFailures:
    """A failure inside a kernel becomes a KernelError; decisions pass through."""

    def test_exception_becomes_kernel_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a kernel with a bug
        _install(monkeypatch, lambda xp, params, inputs: {"r": 1 / 0})
        # When it runs / Then the error names the kernel, backend and cause
        with pytest.raises(KernelError, match=r"'boom' failed on numpy: ZeroDivisionError") as e:
            execute("boom", {}, {}, NUMPY)
        assert isinstance(e.value.__cause__, ZeroDivisionError)

    @pytest.mark.parametrize("error", [ValidationError("bad_param", "x"), Retry("busy")])
    def test_decisions_pass(self, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
        # Given a kernel that itself decides the task is invalid or should be retried
        _install(monkeypatch, partial(_raise, error))
        # When / Then the very same exception reaches the caller
        with pytest.raises(type(error)) as caught:
            execute("boom", {}, {}, NUMPY)
        assert caught.value is error

    def test_device_copy_failure_is_a_kernel_error(self) -> None:
        # Given a backend that cannot allocate
        class FullBackend(Backend):
            def to_device(self, array: Any) -> Any:
                raise MemoryError("out of device memory")

        # When / Then it surfaces as a KernelError, not a crash
        with pytest.raises(KernelError, match="MemoryError"):
            execute("reduce", {"op": "sum"}, {"x": F32}, FullBackend("numpy", np))


_A = np.random.default_rng(6).standard_normal((192, 320)).astype(np.float32)
_B = np.random.default_rng(7).standard_normal((320, 129)).astype(np.float32)
_A64, _B64 = _A.astype(np.float64), _B.astype(np.float64)
_X = np.random.default_rng(8).uniform(-2, 2, 100_003)
_MLP = {
    "x": _A[:, :64],
    **{f"w{i}": _B[:64, 64 * i : 64 * i + 64] / 4 for i in range(2)},
    **{f"b{i}": _B[64 + i, :64] for i in range(2)},
    "w2": _B[:64, 100:110] / 4,
    "b2": _B[100, :10],
}
_HEAT = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]
_SKEW = [[0.1, -0.2, 0.1], [0.1, 0.3, -0.1], [0.05, 0.05, 0.0]]
_OPTION = {
    "seed": 11,
    "s0": 100.0,
    "strike": 105.0,
    "rate": 0.03,
    "sigma": 0.25,
    "maturity": 2.0,
    "kind": "call",
}
PARITY_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("gemm", {}, {"a": _A, "b": _B}),
    ("gemm", {}, {"a": _A64, "b": _B64}),
    ("monte_carlo_pi", {"seed": 2**63 - 1, "samples": 3 * kernels.MC_BATCH + 5}, {}),
    ("poly", {"coeffs": [0.5, -1.0, 0.25, 2.0, -3.0]}, {"x": _X.astype(np.float32)}),
    ("poly", {"coeffs": [1e-3] * 16}, {"x": _X}),
    *[("reduce", {"op": op}, {"x": _X.astype(np.float32)}) for op in kernels.REDUCE_OPS],
    ("reduce", {"op": "sum"}, {"x": (_X * 1e6).astype(np.int64)}),
    ("mlp", {}, _MLP),
    ("mlp", {}, {key: value.astype(np.float64) for key, value in _MLP.items()}),
    ("kmeans_step", {}, {"points": _A[:, :16], "centroids": _B[:7, :16]}),
    ("kmeans_step", {}, {"points": _A64[:, :3] * 1e3 + 5e4, "centroids": _B64[:4, :3] * 1e3 + 5e4}),
    ("fft", {}, {"x": _A}),
    ("fft", {"inverse": True}, {"x": (_A + 1j * _A[::-1]).reshape(4, 48, 320)}),
    ("fft", {}, {"x": _X[:65536]}),
    ("stencil2d", {"weights": _HEAT, "iterations": 40}, {"u": _A}),
    ("stencil2d", {"weights": _SKEW, "iterations": 3}, {"u": _B64}),
    ("option_mc", {**_OPTION, "paths": 2 * slicing.SLICES.option_batch + 3}, {}),
    ("option_mc", {**_OPTION, "kind": "put", "seed": 2**63 - 1, "paths": 1000}, {}),
]
PARITY_IDS = [f"{case[0]}-{i}" for i, case in enumerate(PARITY_CASES)]


class TestBackendParity:
    """Every available backend matches the NumPy reference within each kernel's tolerance."""

    def test_every_kernel_has_a_parity_case(self) -> None:
        # Given / When / Then a newly built-in kernel cannot skip the parity check
        assert {name for name, _, _ in PARITY_CASES} == set(BUILTIN)
        assert set(BUILTIN) <= set(REGISTRY)

    @pytest.mark.parametrize("backend", available_backends(), ids=lambda b: b.name)
    @pytest.mark.parametrize(("name", "params", "inputs"), PARITY_CASES, ids=PARITY_IDS)
    def test_matches_reference(
        self, backend: Backend, name: str, params: dict[str, Any], inputs: dict[str, Any]
    ) -> None:
        # Given a task / When it runs on this backend
        out = execute(name, params, inputs, backend)
        # Then every output is a host array within tolerance of the reference
        assert all(isinstance(v, np.ndarray) for v in out.values())
        assert get_kernel(name).matches(out, reference(name, params, inputs))
