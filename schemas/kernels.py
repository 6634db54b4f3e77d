# SPDX-License-Identifier: Apache-2.0
"""The built-in kernels' contract: what each accepts, how exact it must be, what it costs.

The producer checks every chunk against this contract before anything reaches Kafka, and
the worker runs the very same checks before it touches device memory, so a task the SDK
accepts is one every car can run. Limits bound each task's device memory (outputs and
temporaries, not just the wire size) so a hostile task cannot exhaust a car's GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.reputation import Level

Array = npt.NDArray[Any]
Params = Mapping[str, Any]  # plain msgpack-able values: int, float, str, list
Inputs = Mapping[str, Array]  # host (NumPy) arrays, as decoded from the wire
CheckFn = Callable[[Params, Inputs], None]
CostFn = Callable[[Params, Inputs], float]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FFT_DTYPES = (*FLOAT_DTYPES, np.dtype(np.complex64), np.dtype(np.complex128))
REDUCE_DTYPES = (*FLOAT_DTYPES, np.dtype(np.int32), np.dtype(np.int64))
REDUCE_OPS = ("sum", "sumsq", "min", "max")
OPTION_KINDS = ("call", "put")

MAX_ELEMS = 2**28  # any one input or output array: 1 GiB of float32
MAX_GEMM_DIM = 65536
MAX_POLY_COEFFS = 16
MAX_MC_SAMPLES = 2**31
MAX_FFT_LENGTH = 2**20
MAX_FFT_ELEMS = 2**26  # complex128 output of 1 GiB
MAX_STENCIL_CELLS = 2**26
MAX_STENCIL_ITERS = 1024
MAX_CLUSTERS = 1024
MAX_FEATURES = 1024
MAX_KMEANS_ELEMS = 2**26
MAX_LAYERS = 8
MAX_WIDTH = 16384
MAX_LAYER_ELEMS = 2**26
# Box-Muller (2 conversions, log, *-2, sqrt, *2pi, cos, *r = 8), the GBM step (vol*z,
# +drift, exp, *s0 = 4), the payoff (sub, max, *discount = 3) and two sums with a square
# (3): 18 operations per path, counting a transcendental function as one.
OPTION_FLOPS_PER_PATH = 18
# Two conversions, x*x + y*y (3) and the comparison: 6 operations per sample.
PI_FLOPS_PER_SAMPLE = 6
STENCIL_FLOPS_PER_CELL = 17  # 9 multiplies and 8 adds


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's output may be from the reference: |d|max <= atol + rtol*|ref|max.

    The comparison is relative to the largest reference magnitude (an infinity norm),
    not element-wise: an element that cancels to almost zero would otherwise demand
    an absurd relative accuracy from any summation order but the reference's own.
    ``Tolerance(0, 0)`` means bit-identical (same dtype, shape and values).
    """

    rtol: float
    atol: float

    def allclose(self, actual: npt.ArrayLike, expected: npt.ArrayLike) -> bool:
        """Whether ``actual`` matches ``expected`` within this tolerance."""
        a, e = np.asarray(actual), np.asarray(expected)
        if a.shape != e.shape:
            return False
        if self.rtol == 0 and self.atol == 0:
            return a.dtype == e.dtype and bool(np.array_equal(a, e))
        if a.size == 0:
            return True
        # complex128 keeps both parts; abs() of the difference is the modulus.
        a64, e64 = a.astype(np.complex128), e.astype(np.complex128)
        scale = float(np.max(np.abs(e64)))
        return bool(np.max(np.abs(a64 - e64)) <= self.atol + self.rtol * scale)


def check_inputs(
    name: str, required: tuple[str, ...], optional: tuple[str, ...], params: Params, inputs: Inputs
) -> None:
    """The checks every kernel shares: params is a mapping, the right arrays, bounded sizes."""
    if not isinstance(params, Mapping):
        raise ValidationError("bad_params", f"params must be a mapping, not {type(params)}")
    missing = [key for key in required if key not in inputs]
    if missing:
        raise ValidationError("missing_input", f"{name} needs inputs {missing}")
    unexpected = sorted(set(inputs) - set(required) - set(optional))
    if unexpected:
        raise ValidationError("unexpected_input", f"{name} takes no {unexpected}")
    for key, value in inputs.items():
        if not isinstance(value, np.ndarray):
            raise ValidationError("bad_input_type", f"input {key!r} is not an ndarray")
        if value.size > MAX_ELEMS:
            raise ValidationError("too_large", f"input {key!r} has more than {MAX_ELEMS} elements")


@dataclass(frozen=True)
class KernelSpec:
    """One built-in kernel's contract: inputs, validator, tolerance and cost model."""

    name: str
    required_inputs: tuple[str, ...]
    check: CheckFn  # kernel-specific checks, run after the shared ones
    tolerance: Tolerance  # for float32, the loosest dtype each kernel accepts
    cost: CostFn  # 10^9 floating-point operations of a valid task
    optional_inputs: tuple[str, ...] = ()
    # The strongest check of one chunk's result that needs no second car: ALGEBRAIC where
    # the inputs alone can check it cheaply (gemm: Freivalds; fft: a random linear
    # functional), else QUORUM, a second car's result within twice the tolerance
    # (docs/KERNELS.md).
    verification: Level = Level.QUORUM

    def validate(self, params: Params, inputs: Inputs) -> None:
        """Raise ValidationError(reason, detail) unless the task can run as given."""
        check_inputs(self.name, self.required_inputs, self.optional_inputs, params, inputs)
        self.check(params, inputs)


# --- validation helpers -------------------------------------------------------------


def _expect_params(params: Params, allowed: tuple[str, ...]) -> None:
    unexpected = sorted(set(params) - set(allowed))
    if unexpected:
        raise ValidationError("unexpected_param", f"unknown params {unexpected}")


def _require(params: Params, key: str) -> Any:
    if key not in params:
        raise ValidationError("missing_param", f"param {key!r} is required")
    return params[key]


def _int_param(params: Params, key: str, low: int, high: int) -> int:
    value = _require(params, key)
    # bool is an int subclass, but True samples is a bug upstream, not a request.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValidationError("bad_param", f"{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValidationError("bad_param", f"{key}={value} is outside [{low}, {high}]")
    return int(value)


def _real(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValidationError("bad_param", f"{key} {value!r} is not a real number")
    if not math.isfinite(float(value)):
        raise ValidationError("bad_param", f"{key} {value!r} is not finite")
    return float(value)


def _float_param(params: Params, key: str, low: float, high: float) -> float:
    value = _real(key, _require(params, key))
    if not low <= value <= high:
        raise ValidationError("bad_param", f"{key}={value} is outside [{low}, {high}]")
    return value


def _expect_dtype(key: str, array: Array, allowed: tuple[np.dtype[Any], ...]) -> None:
    if array.dtype not in allowed:
        names = [str(d) for d in allowed]
        raise ValidationError("bad_dtype", f"{key} has dtype {array.dtype}, expected {names}")


def _expect_ndim(key: str, array: Array, low: int, high: int) -> None:
    if not low <= array.ndim <= high:
        raise ValidationError("bad_ndim", f"{key} must have {low}..{high} dims, not {array.shape}")


def _expect_float_matrix(key: str, array: Array, max_dim: int) -> None:
    _expect_ndim(key, array, 2, 2)
    _expect_dtype(key, array, FLOAT_DTYPES)
    if min(array.shape) < 1:
        raise ValidationError("bad_shape", f"{key} has an empty dimension {array.shape}")
    if max(array.shape) > max_dim:
        raise ValidationError("too_large", f"{key} {array.shape} exceeds {max_dim}")


def _same_dtype(first: tuple[str, Array], second: tuple[str, Array]) -> None:
    if first[1].dtype != second[1].dtype:
        detail = f"{first[0]} is {first[1].dtype} but {second[0]} is {second[1].dtype}"
        raise ValidationError("dtype_mismatch", detail)


def _at_most(what: str, value: int, limit: int) -> None:
    if value > limit:
        raise ValidationError("too_large", f"{what} is {value}, above the limit {limit}")


# --- gemm, mlp, kmeans_step ---------------------------------------------------------


def _check_gemm(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ())
    a, b = inputs["a"], inputs["b"]
    _expect_float_matrix("a", a, MAX_GEMM_DIM)
    _expect_float_matrix("b", b, MAX_GEMM_DIM)
    _same_dtype(("a", a), ("b", b))
    if a.shape[1] != b.shape[0]:
        raise ValidationError("shape_mismatch", f"a {a.shape} @ b {b.shape}: inner dims differ")
    _at_most("c's size", a.shape[0] * b.shape[1], MAX_ELEMS)


def _cost_gemm(params: Params, inputs: Inputs) -> float:
    (m, k), n = inputs["a"].shape, inputs["b"].shape[1]
    return float(2.0 * m * n * k / 1e9)


def mlp_depth(inputs: Inputs) -> int:
    """How many layers an mlp task has: its weights are w0, w1, ... without gaps."""
    return sum(1 for i in range(MAX_LAYERS) if f"w{i}" in inputs)


def _mlp_names() -> tuple[str, ...]:
    return tuple(f"{kind}{i}" for i in range(MAX_LAYERS) for kind in ("w", "b"))


def _check_mlp(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ())
    depth = mlp_depth(inputs)
    expected = {f"{kind}{i}" for i in range(depth) for kind in ("w", "b")}
    if depth < 1 or set(inputs) - {"x"} != expected:
        raise ValidationError("missing_input", "mlp needs layers w0, b0, w1, b1, ... without gaps")
    x = inputs["x"]
    _expect_float_matrix("x", x, MAX_ELEMS)
    width = x.shape[1]
    for i in range(depth):
        w, b = inputs[f"w{i}"], inputs[f"b{i}"]
        _expect_float_matrix(f"w{i}", w, MAX_WIDTH)
        _expect_ndim(f"b{i}", b, 1, 1)
        _same_dtype(("x", x), (f"w{i}", w))
        _same_dtype(("x", x), (f"b{i}", b))
        _at_most(f"w{i}'s size", w.size, MAX_LAYER_ELEMS)
        if w.shape[0] != width or b.shape != (w.shape[1],):
            detail = f"layer {i}: input width {width}, w {w.shape}, b {b.shape}"
            raise ValidationError("shape_mismatch", detail)
        width = w.shape[1]
        _at_most(f"layer {i}'s output size", x.shape[0] * width, MAX_ELEMS)


def _cost_mlp(params: Params, inputs: Inputs) -> float:
    batch, flops = inputs["x"].shape[0], 0
    for i in range(mlp_depth(inputs)):
        fan_in, fan_out = inputs[f"w{i}"].shape
        flops += batch * fan_out * (2 * fan_in + 2)  # the product, the bias and the ReLU
    return flops / 1e9


def _check_kmeans_step(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ())
    points, centroids = inputs["points"], inputs["centroids"]
    _expect_float_matrix("points", points, MAX_KMEANS_ELEMS)
    _expect_float_matrix("centroids", centroids, MAX_FEATURES)
    _same_dtype(("points", points), ("centroids", centroids))
    if points.shape[1] != centroids.shape[1]:
        detail = f"points {points.shape} and centroids {centroids.shape} differ in features"
        raise ValidationError("shape_mismatch", detail)
    _at_most("clusters", centroids.shape[0], MAX_CLUSTERS)
    _at_most("points' size", points.size, MAX_KMEANS_ELEMS)
    if not np.all(np.isfinite(centroids)):
        raise ValidationError("bad_input", "centroids must be finite")


def _cost_kmeans_step(params: Params, inputs: Inputs) -> float:
    (n, d), k = inputs["points"].shape, inputs["centroids"].shape[0]
    return float(3.0 * n * k * d + n * d) / 1e9  # distances to every centroid, then the sums


# --- fft, stencil2d -----------------------------------------------------------------


def _check_fft(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("inverse",))
    if not isinstance(params.get("inverse", False), bool):
        raise ValidationError("bad_param", "inverse must be true or false")
    x = inputs["x"]
    _expect_ndim("x", x, 1, 3)
    _expect_dtype("x", x, FFT_DTYPES)
    if x.shape[-1] < 1:
        raise ValidationError("bad_shape", f"x has an empty last axis {x.shape}")
    _at_most("the transform length", x.shape[-1], MAX_FFT_LENGTH)
    _at_most("x's size", x.size, MAX_FFT_ELEMS)


def _cost_fft(params: Params, inputs: Inputs) -> float:
    x = inputs["x"]
    return 5.0 * x.size * math.log2(x.shape[-1]) / 1e9  # the usual 5 n log2 n per transform


def _check_stencil2d(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("weights", "iterations"))
    _int_param(params, "iterations", 1, MAX_STENCIL_ITERS)
    weights = _require(params, "weights")
    rows = weights if isinstance(weights, list | tuple) else []
    if len(rows) != 3 or any(not isinstance(r, list | tuple) or len(r) != 3 for r in rows):
        raise ValidationError("bad_param", "weights must be a 3x3 list of numbers")
    values = [_real("weight", v) for row in rows for v in row]
    # Non-expansive (sum |w| <= 1): values stay within the input's range, so rounding
    # errors add up at most linearly over the iterations and the tolerance holds.
    if sum(abs(v) for v in values) > 1.0 + 1e-12:
        raise ValidationError("bad_param", "the weights' absolute values must sum to <= 1")
    u = inputs["u"]
    _expect_ndim("u", u, 2, 2)
    _expect_dtype("u", u, FLOAT_DTYPES)
    if min(u.shape) < 3:
        raise ValidationError("bad_shape", f"u {u.shape} has no interior; it needs 3x3 or more")
    _at_most("u's size", u.size, MAX_STENCIL_CELLS)


def _cost_stencil2d(params: Params, inputs: Inputs) -> float:
    h, w = (int(edge) for edge in inputs["u"].shape)
    return STENCIL_FLOPS_PER_CELL * (h - 2) * (w - 2) * int(params["iterations"]) / 1e9


# --- monte_carlo_pi, option_mc ------------------------------------------------------


def _check_monte_carlo_pi(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("seed", "samples"))
    _int_param(params, "seed", 0, 2**63 - 1)
    _int_param(params, "samples", 1, MAX_MC_SAMPLES)


def _cost_monte_carlo_pi(params: Params, inputs: Inputs) -> float:
    return PI_FLOPS_PER_SAMPLE * int(params["samples"]) / 1e9


OPTION_PARAMS = ("seed", "paths", "s0", "strike", "rate", "sigma", "maturity", "kind")


def _check_option_mc(params: Params, inputs: Inputs) -> None:
    _expect_params(params, OPTION_PARAMS)
    _int_param(params, "seed", 0, 2**63 - 1)
    _int_param(params, "paths", 1, MAX_MC_SAMPLES)
    _float_param(params, "rate", -1.0, 1.0)
    for key, high in (("s0", 1e12), ("strike", 1e12), ("sigma", 5.0), ("maturity", 100.0)):
        if _float_param(params, key, 0.0, high) == 0.0:
            raise ValidationError("bad_param", f"{key} must be positive")
    if _require(params, "kind") not in OPTION_KINDS:
        raise ValidationError("bad_param", f"kind must be one of {OPTION_KINDS}")


def _cost_option_mc(params: Params, inputs: Inputs) -> float:
    return OPTION_FLOPS_PER_PATH * int(params["paths"]) / 1e9


# --- poly, reduce -------------------------------------------------------------------


def _check_poly(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("coeffs",))
    coeffs = _require(params, "coeffs")
    if not isinstance(coeffs, list | tuple) or not 1 <= len(coeffs) <= MAX_POLY_COEFFS:
        raise ValidationError("bad_param", f"coeffs must be a list of 1..{MAX_POLY_COEFFS}")
    for coeff in coeffs:
        _real("coefficient", coeff)
    _expect_dtype("x", inputs["x"], FLOAT_DTYPES)


def _cost_poly(params: Params, inputs: Inputs) -> float:
    return 2.0 * len(params["coeffs"]) * inputs["x"].size / 1e9  # Horner: a multiply-add each


def _check_reduce(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("op",))
    op = _require(params, "op")
    if op not in REDUCE_OPS:
        raise ValidationError("unknown_op", f"op {op!r} is not one of {REDUCE_OPS}")
    x = inputs["x"]
    _expect_dtype("x", x, REDUCE_DTYPES)
    if x.size == 0 and op in ("min", "max"):
        raise ValidationError("empty_input", f"{op} of an empty array is undefined")


def _cost_reduce(params: Params, inputs: Inputs) -> float:
    return (2.0 if params["op"] == "sumsq" else 1.0) * inputs["x"].size / 1e9


# --- the registry -------------------------------------------------------------------

_SPECS = (
    # A K-long float32 dot product errs by about sqrt(K) * 6e-8 of the result's scale,
    # 1.5e-5 at K = 65536. cuBLAS and OpenBLAS block K differently, and the K tiles add
    # in another order, so 1e-4 leaves headroom while catching any wrong tile or offset.
    KernelSpec(
        "gemm",
        ("a", "b"),
        _check_gemm,
        Tolerance(1e-4, 0.0),
        _cost_gemm,
        verification=Level.ALGEBRAIC,
    ),
    # Each layer is a gemm with K <= 16384 (sqrt(K) * 6e-8 = 8e-6 of its scale); ReLU
    # cannot amplify an error, so <= 8 layers stay within 8 * 8e-6, under 1e-4.
    KernelSpec("mlp", ("x",), _check_mlp, Tolerance(1e-4, 0.0), _cost_mlp, _mlp_names()),
    # Sums and distances are float64 (another order changes them by ~1e-13); float32
    # centroids round once (6e-8). Counts are integers, so 1e-6 of the largest count is
    # exact for any chunk below a million points: a point moving cluster is caught.
    KernelSpec(
        "kmeans_step",
        ("points", "centroids"),
        _check_kmeans_step,
        Tolerance(1e-6, 0.0),
        _cost_kmeans_step,
    ),
    # A radix FFT errs by about log2(n) * eps of the output's norm: 20 * 6e-8 = 1.2e-6 at
    # the longest transform in complex64; cuFFT and pocketfft factor n differently.
    KernelSpec(
        "fft",
        ("x",),
        _check_fft,
        Tolerance(1e-5, 0.0),
        _cost_fft,
        verification=Level.ALGEBRAIC,
    ),
    # With non-expansive weights each iteration adds at most ~10 float32 roundings of
    # the input's scale: 1024 * 10 * 6e-8 = 6e-4 after the most iterations allowed.
    KernelSpec("stencil2d", ("u",), _check_stencil2d, Tolerance(1e-3, 0.0), _cost_stencil2d),
    # A count from an integer generator: anything but exact is a bug.
    KernelSpec(
        "monte_carlo_pi", (), _check_monte_carlo_pi, Tolerance(0.0, 0.0), _cost_monte_carlo_pi
    ),
    # float64 throughout; CUDA's and NumPy's log/cos/exp differ by an ulp or two and the
    # sums add in another order (~1e-14). One path drawn differently moves the sum by
    # ~1e-6 of a million paths, so 1e-9 still catches any stream misalignment.
    KernelSpec("option_mc", (), _check_option_mc, Tolerance(1e-9, 0.0), _cost_option_mc),
    # Horner in float32 with <= 16 coefficients against a float64 reference errs by
    # ~2 * 15 * 6e-8 = 2e-6 of the largest term; 1e-4 allows mild cancellation.
    KernelSpec("poly", ("x",), _check_poly, Tolerance(1e-4, 0.0), _cost_poly),
    # float64 sums in another order (pairwise vs. a GPU tree) differ by ~log2(n) * 1e-16
    # of sum |x|, so 1e-9 of the result holds unless |sum| < 1e-5 * sum |x|.
    KernelSpec("reduce", ("x",), _check_reduce, Tolerance(1e-9, 0.0), _cost_reduce),
)
SPECS: Mapping[str, KernelSpec] = MappingProxyType({s.name: s for s in _SPECS})
BUILTIN: tuple[str, ...] = tuple(SPECS)


# Contracts of plugin kernels this process has loaded (``schemas.plugins``). Only a
# loader adds to it, never a lookup: a car must not import a package its operator has
# not approved just because a task named it.
_LOADED: dict[str, KernelSpec] = {}


def register_spec(kernel: KernelSpec) -> None:
    """Make a plugin kernel's contract known to this process (again: a no-op).

    A built-in name, or a name already taken by another contract, is refused: two
    packages must not both decide what a kernel name means.
    """
    if kernel.name in SPECS or _LOADED.get(kernel.name, kernel) is not kernel:
        raise ValidationError("name_taken", f"a kernel named {kernel.name!r} already exists")
    _LOADED[kernel.name] = kernel


def spec(name: str) -> KernelSpec:
    """The contract of kernel ``name``, built in or loaded as a plugin;
    ValidationError("unknown_kernel") otherwise."""
    try:
        return SPECS.get(name) or _LOADED[name]
    except (KeyError, TypeError):
        raise ValidationError("unknown_kernel", f"no kernel named {name!r}") from None


def validate_task(name: str, params: Params, inputs: Inputs) -> None:
    """Raise ValidationError(reason, detail) unless kernel ``name`` can run this task."""
    spec(name).validate(params, inputs)


def cost_gflop(name: str, params: Params, inputs: Inputs) -> float:
    """The task's floating-point work in 10^9 operations (validated like validate_task)."""
    kernel = spec(name)
    kernel.validate(params, inputs)
    return float(kernel.cost(params, inputs))
