# SPDX-License-Identifier: Apache-2.0
"""The kernels a parked car can run, registered by name.

A kernel is a function written against ``xp`` (NumPy or CuPy), a validator that rejects
a bad task before device memory is touched, a plain-NumPy reference, and the tolerance
within which every backend must match that reference. A new kernel (FFT, stencil,
k-means, MLP, ...) is those three functions plus one entry in ``_KERNELS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.errors import KernelError, Reject, Retry, ValidationError
from worker.backend import Backend

Array = npt.NDArray[Any]
Params = Mapping[str, Any]  # plain msgpack-able values: int, float, str, list
Inputs = Mapping[str, Array]  # host (NumPy) arrays, as decoded from the wire
DeviceInputs = Mapping[str, Any]  # the same arrays on the backend (xp) device
KernelFn = Callable[[Any, Params, DeviceInputs], dict[str, Any]]
CheckFn = Callable[[Params, Inputs], None]
ReferenceFn = Callable[[Params, Inputs], dict[str, Array]]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
REDUCE_DTYPES = (*FLOAT_DTYPES, np.dtype(np.int32), np.dtype(np.int64))
REDUCE_OPS = ("sum", "sumsq", "min", "max")
MAX_GEMM_DIM = 65536
MAX_POLY_COEFFS = 16
MAX_MC_SAMPLES = 2**31
MC_BATCH = 1 << 20  # samples per batch: temporaries stay under ~100 MiB for any "samples"

# Errors that already say what should happen to the task; wrapping them would hide that.
_PASS_THROUGH = (ValidationError, KernelError, Retry, Reject)


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
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        scale = float(np.max(np.abs(e64)))
        return bool(np.max(np.abs(a64 - e64)) <= self.atol + self.rtol * scale)


@dataclass(frozen=True)
class Kernel:
    """A named computation: device function, validator, reference and tolerance."""

    name: str
    fn: KernelFn
    tolerance: Tolerance
    required_inputs: tuple[str, ...]
    check: CheckFn
    reference_fn: ReferenceFn

    def validate(self, params: Params, inputs: Inputs) -> None:
        """Raise ValidationError(reason, detail) unless the task can run as given."""
        if not isinstance(params, Mapping):
            raise ValidationError("bad_params", f"params must be a mapping, not {type(params)}")
        missing = [key for key in self.required_inputs if key not in inputs]
        if missing:
            raise ValidationError("missing_input", f"{self.name} needs inputs {missing}")
        unexpected = sorted(set(inputs) - set(self.required_inputs))
        if unexpected:
            raise ValidationError("unexpected_input", f"{self.name} takes no {unexpected}")
        for key, value in inputs.items():
            if not isinstance(value, np.ndarray):
                raise ValidationError("bad_input_type", f"input {key!r} is not an ndarray")
        self.check(params, inputs)

    def matches(self, actual: Mapping[str, Array], expected: Mapping[str, Array]) -> bool:
        """Whether every output in ``actual`` is within tolerance of ``expected``."""
        if set(actual) != set(expected):
            return False
        return all(self.tolerance.allclose(actual[k], expected[k]) for k in expected)


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


def _expect_dtype(key: str, array: Array, allowed: tuple[np.dtype[Any], ...]) -> None:
    if array.dtype not in allowed:
        names = [str(d) for d in allowed]
        raise ValidationError("bad_dtype", f"{key} has dtype {array.dtype}, expected {names}")


# --- gemm ---------------------------------------------------------------------------


def _gemm(xp: Any, params: Params, inputs: DeviceInputs) -> dict[str, Any]:
    return {"c": xp.matmul(inputs["a"], inputs["b"])}


def _check_gemm(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ())
    a, b = inputs["a"], inputs["b"]
    for key, array in (("a", a), ("b", b)):
        if array.ndim != 2:
            raise ValidationError("bad_ndim", f"{key} must be 2-D, got shape {array.shape}")
        _expect_dtype(key, array, FLOAT_DTYPES)
        if min(array.shape) < 1:
            raise ValidationError("bad_shape", f"{key} has an empty dimension {array.shape}")
        if max(array.shape) > MAX_GEMM_DIM:
            raise ValidationError("too_large", f"{key} {array.shape} exceeds {MAX_GEMM_DIM}")
    if a.dtype != b.dtype:
        raise ValidationError("dtype_mismatch", f"a is {a.dtype} but b is {b.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValidationError("shape_mismatch", f"a {a.shape} @ b {b.shape}: inner dims differ")


def _gemm_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    return {"c": np.matmul(inputs["a"], inputs["b"])}


# --- monte_carlo_pi -----------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def splitmix64(xp: Any, seed: int, counters: Any) -> Any:
    """Output number ``counters[i]`` (0-based) of Vigna's splitmix64 seeded with ``seed``.

    The generator is counter-based: its state after n+1 steps is seed + (n+1)*golden
    mod 2**64, so any slice of the stream is computed directly with uint64 array ops
    that wrap identically on NumPy and CuPy. Library RNGs differ between the two.
    """
    u64 = xp.uint64
    with np.errstate(over="ignore"):
        z = (counters + u64(1)) * u64(_GOLDEN) + u64(seed)
        z = (z ^ (z >> u64(30))) * u64(_MIX1)
        z = (z ^ (z >> u64(27))) * u64(_MIX2)
        return z ^ (z >> u64(31))


def _monte_carlo_pi(xp: Any, params: Params, inputs: DeviceInputs) -> dict[str, Any]:
    seed, samples = int(params["seed"]), int(params["samples"])
    hits = xp.zeros((), dtype=xp.int64)
    for start in range(0, samples, MC_BATCH):
        stop = min(start + MC_BATCH, samples)
        z = splitmix64(xp, seed, xp.arange(2 * start, 2 * stop, dtype=xp.uint64))
        # 53 random bits -> exact float64 in [0, 1). Every step below is a separate,
        # correctly rounded IEEE op (no fused multiply-add), so both backends agree bit
        # for bit.
        u = (z >> xp.uint64(11)).astype(xp.float64) * 2.0**-53
        x, y = u[0::2], u[1::2]
        hits += xp.count_nonzero(x * x + y * y <= 1.0)
    return {"hits": hits, "samples": xp.asarray(samples, dtype=xp.int64)}


def _check_monte_carlo_pi(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("seed", "samples"))
    _int_param(params, "seed", 0, 2**63 - 1)
    _int_param(params, "samples", 1, MAX_MC_SAMPLES)


def _monte_carlo_pi_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    # The answer is defined by the generator, so the reference is the NumPy run itself;
    # tests pin the generator against a scalar splitmix64.
    out = _monte_carlo_pi(np, params, inputs)
    return {key: np.asarray(value) for key, value in out.items()}


# --- poly ---------------------------------------------------------------------------


def _poly(xp: Any, params: Params, inputs: DeviceInputs) -> dict[str, Any]:
    x = inputs["x"]
    y = xp.zeros_like(x)
    for coeff in params["coeffs"]:
        # A Python float is a "weak" scalar, so float32 x stays float32 (NEP 50).
        y = y * x + float(coeff)
    return {"y": y}


def _check_poly(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("coeffs",))
    coeffs = _require(params, "coeffs")
    if not isinstance(coeffs, list | tuple) or not 1 <= len(coeffs) <= MAX_POLY_COEFFS:
        raise ValidationError("bad_param", f"coeffs must be a list of 1..{MAX_POLY_COEFFS}")
    for coeff in coeffs:
        if isinstance(coeff, bool) or not isinstance(coeff, int | float | np.integer | np.floating):
            raise ValidationError("bad_param", f"coefficient {coeff!r} is not a real number")
        if not math.isfinite(float(coeff)):
            raise ValidationError("bad_param", f"coefficient {coeff!r} is not finite")
    _expect_dtype("x", inputs["x"], FLOAT_DTYPES)


def _poly_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x = inputs["x"]
    coeffs = np.asarray(params["coeffs"], dtype=np.float64)
    return {"y": np.asarray(np.polyval(coeffs, x), dtype=x.dtype)}


# --- reduce -------------------------------------------------------------------------


def _reduce(xp: Any, params: Params, inputs: DeviceInputs) -> dict[str, Any]:
    x, op = inputs["x"], params["op"]
    if op == "sum":
        value = xp.sum(x, dtype=xp.float64)
    elif op == "sumsq":
        x64 = x.astype(xp.float64)
        value = xp.sum(x64 * x64)
    else:
        value = xp.min(x) if op == "min" else xp.max(x)
    return {"value": xp.asarray(value, dtype=xp.float64)}


def _check_reduce(params: Params, inputs: Inputs) -> None:
    _expect_params(params, ("op",))
    op = _require(params, "op")
    if op not in REDUCE_OPS:
        raise ValidationError("unknown_op", f"op {op!r} is not one of {REDUCE_OPS}")
    x = inputs["x"]
    _expect_dtype("x", x, REDUCE_DTYPES)
    if x.size == 0 and op in ("min", "max"):
        raise ValidationError("empty_input", f"{op} of an empty array is undefined")


def _reduce_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x64 = np.asarray(inputs["x"], dtype=np.float64)
    ops: dict[str, Callable[[Array], Any]] = {
        "sum": np.sum,
        "sumsq": lambda v: np.sum(np.square(v)),
        "min": np.min,
        "max": np.max,
    }
    return {"value": np.asarray(ops[params["op"]](x64), dtype=np.float64)}


# --- registry -----------------------------------------------------------------------

# Tolerances are for float32, the loosest dtype each kernel accepts.
_KERNELS = (
    # A K-long float32 dot product errs by about sqrt(K) * 6e-8 of the result's scale,
    # 1.5e-5 at K = 65536. cuBLAS and OpenBLAS block K differently, so 1e-4 leaves
    # headroom while still catching any wrong tile, offset or transposition.
    Kernel("gemm", _gemm, Tolerance(1e-4, 0.0), ("a", "b"), _check_gemm, _gemm_reference),
    # A count from an integer generator: anything but exact is a bug.
    Kernel(
        "monte_carlo_pi",
        _monte_carlo_pi,
        Tolerance(0.0, 0.0),
        (),
        _check_monte_carlo_pi,
        _monte_carlo_pi_reference,
    ),
    # Horner in float32 with <= 16 coefficients against a float64 reference errs by
    # ~2 * 15 * 6e-8 = 2e-6 of the largest term; 1e-4 allows mild cancellation.
    Kernel("poly", _poly, Tolerance(1e-4, 0.0), ("x",), _check_poly, _poly_reference),
    # float64 sums in another order (pairwise vs. a GPU tree) differ by ~log2(n) * 1e-16
    # of sum |x|, so 1e-9 of the result holds unless |sum| < 1e-5 * sum |x|.
    Kernel("reduce", _reduce, Tolerance(1e-9, 0.0), ("x",), _check_reduce, _reduce_reference),
)
_KERNELS_BY_NAME: dict[str, Kernel] = {k.name: k for k in _KERNELS}
BUILTIN: tuple[str, ...] = tuple(_KERNELS_BY_NAME)
REGISTRY: Mapping[str, Kernel] = MappingProxyType(_KERNELS_BY_NAME)


def register(kernel: Kernel) -> None:
    """Add a kernel to this process's registry; a name can be registered only once."""
    if kernel.name in _KERNELS_BY_NAME:
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    _KERNELS_BY_NAME[kernel.name] = kernel


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; ValidationError("unknown_kernel") otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValidationError("unknown_kernel", f"no kernel named {name!r}") from None


def reference(name: str, params: Params, inputs: Inputs) -> dict[str, Array]:
    """Run the plain-NumPy reference of a kernel (validated like ``execute``)."""
    kernel = get_kernel(name)
    kernel.validate(params, inputs)
    return kernel.reference_fn(params, inputs)


def execute(name: str, params: Params, inputs: Inputs, backend: Backend) -> dict[str, Array]:
    """Validate, copy inputs to the device, run the kernel and copy outputs back.

    Any failure after validation (device out of memory, a bug in the kernel) becomes a
    KernelError naming the kernel; errors that already carry a decision pass through.
    """
    kernel = get_kernel(name)
    kernel.validate(params, inputs)
    try:
        device_inputs = {key: backend.to_device(value) for key, value in inputs.items()}
        device_outputs = kernel.fn(backend.xp, params, device_inputs)
        outputs = {key: backend.to_host(value) for key, value in device_outputs.items()}
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise KernelError(f"kernel {name!r} failed on {backend.name}: {detail}") from exc
    return outputs
