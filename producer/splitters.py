# SPDX-License-Identifier: Apache-2.0
"""Split a job into independent chunks, and put the chunks' results back together.

A planner turns a whole job into a ``JobPlan``: the kernel to run, one ``ChunkSpec``
per task, and a factory for the ``Assembler`` that merges results. A chunk's id is its
index in ``JobPlan.chunks``. Chunks are independent, so they may finish in any order on
any car; every assembler's answer is the same whatever the order.

The producer never imports ``worker``: the kernels' contract is ``schemas.kernels``, and
every planned chunk is checked against it, so a job no car could run fails at plan time.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from schemas.errors import ValidationError
from schemas.kernels import (
    FLOAT_DTYPES,
    MAX_GEMM_DIM,
    MAX_LAYERS,
    MAX_POLY_COEFFS,
    REDUCE_OPS,
    validate_task,
)
from schemas.kernels import MAX_MC_SAMPLES as MAX_MC_CHUNK

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class ChunkSpec:
    """The params and input arrays of one task (arrays are C-contiguous and read-only)."""

    params: Mapping[str, Any]
    inputs: Mapping[str, Array]


class Assembler(Protocol):
    """Merges chunk results into the job's answer."""

    def add(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Merge one chunk's outputs; ValidationError for an unknown id or a wrong shape."""

    def result(self) -> Any:
        """The job's answer; ValidationError while any chunk is missing."""


@dataclass(frozen=True)
class JobPlan:
    """A job split into tasks for one kernel, with a way to assemble their results."""

    kernel: str
    chunks: tuple[ChunkSpec, ...]
    make_assembler: Callable[[], Assembler]


# --- shared helpers -----------------------------------------------------------------


def _wire_copy(array: Array) -> Array:
    """A C-contiguous, read-only snapshot: it goes on the wire, and the plan is frozen."""
    copy = np.array(array, order="C", copy=True)
    copy.flags.writeable = False
    return copy


def _spans(length: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(length)``; never none."""
    return [slice(i, min(i + size, length)) for i in range(0, length, size)] or [slice(0, 0)]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValidationError("bad_param", f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValidationError("bad_param", f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _real(name: str, value: Any) -> float:
    """A number as a plain float for the wire; the kernel's contract checks its range."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValidationError("bad_param", f"{name} must be a real number, got {value!r}")
    return float(value)


def _validated(kernel: str, chunks: tuple[ChunkSpec, ...]) -> tuple[ChunkSpec, ...]:
    """The chunks, once each meets the kernel's contract (the reason names what is wrong)."""
    for chunk in chunks:
        validate_task(kernel, chunk.params, chunk.inputs)
    return chunks


def _output(
    outputs: Mapping[str, Array], key: str, shape: tuple[int, ...], kinds: str = "biuf"
) -> Array:
    """Fetch one output of the expected shape and dtype kinds, or raise ValidationError."""
    if key not in outputs:
        raise ValidationError("missing_output", f"chunk result has no {key!r}")
    value = outputs[key]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        raise ValidationError("bad_output", f"{key!r} is not an ndarray of kind {kinds!r}")
    if value.shape != shape:
        raise ValidationError("bad_shape", f"{key!r} has shape {value.shape}, want {shape}")
    return value


class _ChunkAssembler(abc.ABC):
    """Bookkeeping shared by assemblers: expected ids, arrivals, completeness."""

    def __init__(self, n_chunks: int) -> None:
        self._n_chunks = n_chunks
        self._seen: set[int] = set()

    def add(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Merge one chunk; a rejected chunk leaves the assembler unchanged."""
        if isinstance(chunk_id, bool) or not isinstance(chunk_id, int | np.integer):
            raise ValidationError("unknown_chunk", f"chunk id {chunk_id!r} is not an integer")
        if not 0 <= chunk_id < self._n_chunks:
            raise ValidationError("unknown_chunk", f"no chunk {chunk_id} of {self._n_chunks}")
        if chunk_id in self._seen:
            # Adding twice would double-count a sum; the caller is meant to dedup first.
            raise ValidationError("duplicate_chunk", f"chunk {chunk_id} was already added")
        self._merge(int(chunk_id), outputs)
        self._seen.add(int(chunk_id))

    def result(self) -> Any:
        """The job's answer once every chunk has been added."""
        missing = self._n_chunks - len(self._seen)
        if missing:
            raise ValidationError("incomplete", f"{missing} of {self._n_chunks} chunks missing")
        return self._finish()

    @abc.abstractmethod
    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Validate, then fold one chunk's outputs in (validate before any mutation)."""

    @abc.abstractmethod
    def _finish(self) -> Any:
        """The assembled answer; called once every chunk is in."""


# --- gemm ---------------------------------------------------------------------------


class _GemmAssembler(_ChunkAssembler):
    def __init__(
        self, shape: tuple[int, int], dtype: np.dtype[Any], targets: tuple[tuple[slice, slice], ...]
    ) -> None:
        super().__init__(len(targets))
        self._targets = targets
        self._dtype = dtype
        # float64, so partial products over K tiles add without float32 rounding.
        self._acc = np.zeros(shape, dtype=np.float64)

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        rows, cols = self._targets[chunk_id]
        block = self._acc[rows, cols]
        block += _output(outputs, "c", block.shape)

    def _finish(self) -> Array:
        return self._acc.astype(self._dtype)


def _check_gemm_operands(a: Array, b: Array) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValidationError("bad_ndim", f"gemm needs 2-D a and b, got {a.shape}, {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValidationError("shape_mismatch", f"a {a.shape} @ b {b.shape}: inner dims differ")
    if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        raise ValidationError("bad_dtype", f"a, b must share float32/64, got {a.dtype}, {b.dtype}")
    if 0 in a.shape or 0 in b.shape:
        raise ValidationError("bad_shape", f"gemm of empty operands {a.shape}, {b.shape}")


def plan_gemm(a: Array, b: Array, *, tile: int = 256, k_tile: int | None = None) -> JobPlan:
    """Tile C = A @ B: chunk (i, j[, l]) is a[rows_i, k_l] @ b[k_l, cols_j].

    Without ``k_tile`` each chunk is a full-K row panel times a column panel; with it,
    the assembler sums the partial products. Edge tiles are simply smaller.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_gemm_operands(a, b)
    tile = _positive("tile", tile)
    depth = _positive("k_tile", k_tile) if k_tile is not None else a.shape[1]
    largest = max(min(tile, a.shape[0]), min(tile, b.shape[1]), min(depth, a.shape[1]))
    if largest > MAX_GEMM_DIM:
        raise ValidationError("too_large", f"tiles exceed {MAX_GEMM_DIM}; lower tile or k_tile")
    tiles = [
        (rows, cols, ks)
        for rows in _spans(a.shape[0], tile)
        for cols in _spans(b.shape[1], tile)
        for ks in _spans(a.shape[1], depth)
    ]
    chunks = _validated(
        "gemm",
        tuple(
            ChunkSpec({}, {"a": _wire_copy(a[rows, ks]), "b": _wire_copy(b[ks, cols])})
            for rows, cols, ks in tiles
        ),
    )
    targets = tuple((rows, cols) for rows, cols, _ in tiles)
    shape = (a.shape[0], b.shape[1])
    return JobPlan("gemm", chunks, partial(_GemmAssembler, shape, a.dtype, targets))


# --- monte_carlo_pi -----------------------------------------------------------------


class _PiAssembler(_ChunkAssembler):
    def __init__(self, samples: tuple[int, ...]) -> None:
        super().__init__(len(samples))
        self._samples = samples
        self._hits = 0

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        hits = int(_output(outputs, "hits", ()))
        samples = int(_output(outputs, "samples", ()))
        # A chunk that ran the wrong number of samples would bias the estimate silently.
        if samples != self._samples[chunk_id] or not 0 <= hits <= samples:
            raise ValidationError("bad_output", f"chunk {chunk_id}: {hits} hits of {samples}")
        self._hits += hits

    def _finish(self) -> float:
        return 4.0 * self._hits / sum(self._samples)


def chunk_seed(seed: int, index: int) -> int:
    """The 63-bit seed of chunk ``index`` of a job seeded ``seed``.

    SeedSequence hashes (seed, index), so neighbouring chunks get unrelated generator
    streams, unlike seed + index which would put them one step apart in splitmix64.
    """
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def plan_monte_carlo_pi(samples: int, *, chunk_samples: int = 1_000_000, seed: int = 0) -> JobPlan:
    """Estimate pi from ``samples`` points in chunks of ``chunk_samples``; result is a float."""
    samples = _positive("samples", samples)
    chunk_samples = _positive("chunk_samples", chunk_samples)
    if chunk_samples > MAX_MC_CHUNK:
        raise ValidationError("bad_param", f"chunk_samples must be <= {MAX_MC_CHUNK}")
    seed = _seed(seed)
    sizes = tuple(s.stop - s.start for s in _spans(samples, chunk_samples))
    chunks = _validated(
        "monte_carlo_pi",
        tuple(
            ChunkSpec({"seed": chunk_seed(seed, i), "samples": n}, {}) for i, n in enumerate(sizes)
        ),
    )
    return JobPlan("monte_carlo_pi", chunks, partial(_PiAssembler, sizes))


# --- poly (element-wise map) --------------------------------------------------------


class _MapAssembler(_ChunkAssembler):
    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], spans: list[slice]) -> None:
        super().__init__(len(spans))
        self._shape = shape
        self._spans = spans
        self._flat = np.empty(math.prod(shape), dtype=dtype)

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        span = self._spans[chunk_id]
        self._flat[span] = _output(outputs, "y", (span.stop - span.start,))

    def _finish(self) -> Array:
        return self._flat.reshape(self._shape)


def plan_map(x: Array, coeffs: list[float], *, chunk_elems: int = 1 << 20) -> JobPlan:
    """Evaluate the polynomial ``coeffs`` (highest degree first) at every element of x."""
    x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValidationError("bad_dtype", f"x must be float32 or float64, not {x.dtype}")
    if not 1 <= len(coeffs) <= MAX_POLY_COEFFS:
        raise ValidationError("bad_param", f"coeffs must hold 1..{MAX_POLY_COEFFS} numbers")
    params = {"coeffs": [float(c) for c in coeffs]}
    flat = x.reshape(-1)
    spans = _spans(flat.size, _positive("chunk_elems", chunk_elems))
    chunks = _validated(
        "poly", tuple(ChunkSpec(params, {"x": _wire_copy(flat[span])}) for span in spans)
    )
    return JobPlan("poly", chunks, partial(_MapAssembler, x.shape, x.dtype, spans))


# --- reduce -------------------------------------------------------------------------


class _ReduceAssembler(_ChunkAssembler):
    def __init__(self, op: str, n_chunks: int) -> None:
        super().__init__(n_chunks)
        self._op = op
        self._partials: dict[int, float] = {}

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        self._partials[chunk_id] = float(_output(outputs, "value", ()))

    def _finish(self) -> float:
        values = np.array(list(self._partials.values()), dtype=np.float64)
        if self._op in ("min", "max"):
            # np.min/np.max propagate NaN like the whole-array reduction would.
            return float(np.min(values) if self._op == "min" else np.max(values))
        if not np.all(np.isfinite(values)):
            return float(np.sum(values))  # inf/nan arithmetic; fsum raises on inf - inf
        # fsum rounds the exact total once, so arrival order cannot change the answer.
        return math.fsum(values.tolist())


def plan_reduce(x: Array, op: str = "sum", *, chunk_elems: int = 1 << 20) -> JobPlan:
    """Reduce all of x with ``op`` ("sum", "sumsq", "min", "max"); result is a float."""
    x = np.asarray(x)
    if op not in REDUCE_OPS:
        raise ValidationError("unknown_op", f"op {op!r} is not one of {REDUCE_OPS}")
    if x.size == 0 and op in ("min", "max"):
        raise ValidationError("empty_input", f"{op} of an empty array is undefined")
    flat = x.reshape(-1)
    spans = _spans(flat.size, _positive("chunk_elems", chunk_elems))
    chunks = _validated(
        "reduce", tuple(ChunkSpec({"op": op}, {"x": _wire_copy(flat[span])}) for span in spans)
    )
    return JobPlan("reduce", chunks, partial(_ReduceAssembler, op, len(spans)))


# --- fft, mlp, stencil2d (row blocks of one result) ---------------------------------


class _RowsAssembler(_ChunkAssembler):
    """Chunk i holds rows ``spans[i]`` of a 2-D result, which then takes ``shape``."""

    def __init__(
        self,
        key: str,
        kinds: str,
        rows: tuple[int, int],
        dtype: npt.DTypeLike,
        spans: list[slice],
        shape: tuple[int, ...],
    ) -> None:
        super().__init__(len(spans))
        self._key, self._kinds, self._spans, self._shape = key, kinds, spans, shape
        self._rows = np.empty(rows, dtype=dtype)

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        block = self._rows[self._spans[chunk_id]]
        block[...] = _output(outputs, self._key, block.shape, self._kinds)

    def _finish(self) -> Array:
        return self._rows.reshape(self._shape)


def plan_fft(x: Array, *, inverse: bool = False, chunk_elems: int = 1 << 22) -> JobPlan:
    """The 1-D FFT of x along its last axis, whole rows per chunk; the result has x's shape."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValidationError("bad_shape", f"fft needs a non-empty last axis, got {x.shape}")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    spans = _spans(rows.shape[0], max(1, _positive("chunk_elems", chunk_elems) // n))
    params = {"inverse": bool(inverse)}
    chunks = _validated(
        "fft", tuple(ChunkSpec(params, {"x": _wire_copy(rows[span])}) for span in spans)
    )
    single = x.dtype in (np.dtype(np.float32), np.dtype(np.complex64))
    dtype = np.complex64 if single else np.complex128
    return JobPlan(
        "fft", chunks, partial(_RowsAssembler, "y", "c", rows.shape, dtype, spans, x.shape)
    )


def plan_mlp(
    x: Array, weights: Sequence[Array], biases: Sequence[Array], *, chunk_rows: int = 4096
) -> JobPlan:
    """Batched inference of a ReLU MLP (weights[i]: (in, out)), rows of x split over chunks."""
    x = np.asarray(x)
    if not 1 <= len(weights) == len(biases) <= MAX_LAYERS:
        raise ValidationError("bad_param", f"give 1..{MAX_LAYERS} weights and as many biases")
    if x.ndim != 2:
        raise ValidationError("bad_ndim", f"x must be (batch, features), not {x.shape}")
    layers = {f"w{i}": _wire_copy(np.asarray(w)) for i, w in enumerate(weights)}
    layers |= {f"b{i}": _wire_copy(np.asarray(b)) for i, b in enumerate(biases)}
    spans = _spans(x.shape[0], _positive("chunk_rows", chunk_rows))
    chunks = _validated(
        "mlp", tuple(ChunkSpec({}, {"x": _wire_copy(x[span]), **layers}) for span in spans)
    )
    out = (x.shape[0], layers[f"w{len(weights) - 1}"].shape[1])
    return JobPlan("mlp", chunks, partial(_RowsAssembler, "y", "f", out, x.dtype, spans, out))


def plan_stencil2d(u: Array, weights: Sequence[Sequence[float]], *, iterations: int = 1) -> JobPlan:
    """Iterate a 3x3 stencil over u: one chunk, since every sweep needs the whole grid."""
    u = np.asarray(u)
    try:
        rows = np.asarray(weights, dtype=np.float64).tolist()
    except (TypeError, ValueError):
        raise ValidationError("bad_param", "weights must be a 3x3 list of numbers") from None
    params = {"weights": rows, "iterations": iterations}
    chunks = _validated("stencil2d", (ChunkSpec(params, {"u": _wire_copy(u)}),))
    whole = [slice(0, u.shape[0])]
    assemble = partial(_RowsAssembler, "u", "f", u.shape, u.dtype, whole, u.shape)
    return JobPlan("stencil2d", chunks, assemble)


# --- kmeans_step --------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansStep:
    """One Lloyd step over every point: the new centroids, cluster sizes and inertia."""

    centroids: Array  # a cluster that got no point keeps its old centroid
    counts: Array
    inertia: float  # the sum of squared distances to the nearest old centroid


class _KMeansAssembler(_ChunkAssembler):
    def __init__(self, centroids: Array, sizes: tuple[int, ...]) -> None:
        super().__init__(len(sizes))
        self._old, self._sizes = centroids, sizes
        self._sums = np.zeros(centroids.shape, dtype=np.float64)
        self._counts = np.zeros(centroids.shape[0], dtype=np.int64)
        self._inertia: list[float] = []

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        sums = _output(outputs, "sums", self._sums.shape)
        counts = _output(outputs, "counts", self._counts.shape, "iu")
        inertia = float(_output(outputs, "inertia", ()))
        # Every point lands in exactly one cluster; anything else is a wrong result.
        if np.any(counts < 0) or int(counts.sum()) != self._sizes[chunk_id]:
            raise ValidationError("bad_output", f"chunk {chunk_id}: counts do not add up")
        self._sums += sums
        self._counts += counts.astype(np.int64)
        self._inertia.append(inertia)

    def _finish(self) -> KMeansStep:
        means = self._sums / np.maximum(self._counts, 1)[:, None]
        new = np.where(self._counts[:, None] > 0, means, self._old).astype(self._old.dtype)
        return KMeansStep(new, self._counts.copy(), math.fsum(self._inertia))


def plan_kmeans_step(points: Array, centroids: Array, *, chunk_points: int = 65536) -> JobPlan:
    """One k-means step; chunks of points return partial sums the assembler merges."""
    points, centroids = np.asarray(points), np.asarray(centroids)
    if points.ndim != 2:
        raise ValidationError("bad_ndim", f"points must be (n, features), not {points.shape}")
    spans = _spans(points.shape[0], _positive("chunk_points", chunk_points))
    shared = _wire_copy(centroids)
    chunks = _validated(
        "kmeans_step",
        tuple(ChunkSpec({}, {"points": _wire_copy(points[s]), "centroids": shared}) for s in spans),
    )
    sizes = tuple(s.stop - s.start for s in spans)
    return JobPlan("kmeans_step", chunks, partial(_KMeansAssembler, shared, sizes))


# --- option_mc ----------------------------------------------------------------------


@dataclass(frozen=True)
class OptionPrice:
    """A Monte Carlo price: the mean discounted payoff and its standard error."""

    price: float
    stderr: float
    paths: int


class _OptionAssembler(_ChunkAssembler):
    def __init__(self, paths: tuple[int, ...]) -> None:
        super().__init__(len(paths))
        self._paths = paths
        self._sums: list[float] = []
        self._squares: list[float] = []

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        total = float(_output(outputs, "sum", ()))
        squares = float(_output(outputs, "sumsq", ()))
        paths = int(_output(outputs, "paths", (), "iu"))
        if paths != self._paths[chunk_id] or total < 0 or squares < 0:
            raise ValidationError("bad_output", f"chunk {chunk_id}: {paths} paths, sum {total}")
        self._sums.append(total)
        self._squares.append(squares)

    def _finish(self) -> OptionPrice:
        # fsum rounds each exact total once, so arrival order cannot change the price.
        n = sum(self._paths)
        mean = math.fsum(self._sums) / n
        variance = max(math.fsum(self._squares) / n - mean * mean, 0.0)
        return OptionPrice(mean, math.sqrt(variance / n), n)


def plan_option_mc(
    paths: int,
    *,
    s0: float,
    strike: float,
    rate: float,
    sigma: float,
    maturity: float,
    kind: str = "call",
    seed: int = 0,
    chunk_paths: int = 1_000_000,
) -> JobPlan:
    """Price a European option under GBM from ``paths`` paths; the result is an OptionPrice."""
    paths, chunk_paths = _positive("paths", paths), _positive("chunk_paths", chunk_paths)
    if chunk_paths > MAX_MC_CHUNK:
        raise ValidationError("bad_param", f"chunk_paths must be <= {MAX_MC_CHUNK}")
    seed = _seed(seed)
    market = {"s0": s0, "strike": strike, "rate": rate, "sigma": sigma, "maturity": maturity}
    terms: dict[str, Any] = {key: _real(key, value) for key, value in market.items()}
    sizes = tuple(s.stop - s.start for s in _spans(paths, chunk_paths))
    chunks = _validated(
        "option_mc",
        tuple(
            ChunkSpec({"seed": chunk_seed(seed, i), "paths": n, "kind": kind, **terms}, {})
            for i, n in enumerate(sizes)
        ),
    )
    return JobPlan("option_mc", chunks, partial(_OptionAssembler, sizes))


PLANNERS: Mapping[str, Callable[..., JobPlan]] = MappingProxyType(
    {
        "gemm": plan_gemm,
        "monte_carlo_pi": plan_monte_carlo_pi,
        "poly": plan_map,
        "reduce": plan_reduce,
        "fft": plan_fft,
        "mlp": plan_mlp,
        "stencil2d": plan_stencil2d,
        "kmeans_step": plan_kmeans_step,
        "option_mc": plan_option_mc,
    }
)
