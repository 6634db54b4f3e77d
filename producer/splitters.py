# SPDX-License-Identifier: Apache-2.0
"""Split a job into independent chunks, and put the chunks' results back together.

The planners for gemm, monte_carlo_pi, poly and reduce live here; fft, mlp and stencil2d
in ``producer.splitters_rows``, kmeans_step and option_mc in ``producer.splitters_stats``;
what they share in ``producer.plans``. ``PLANNERS`` names them all by kernel.

The producer never imports ``worker``: the kernels' contract is ``schemas.kernels``, and
every planned chunk is checked against it, so a job no car could run fails at plan time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

import numpy as np

from parkpool.producer.plans import (
    Array,
    Assembler,
    ChunkAssembler,
    ChunkSpec,
    JobPlan,
    chunk_seed,
    output,
    positive,
    seed_of,
    span_slices,
    validated,
    wire_copies,
)
from parkpool.producer.splitters_rows import plan_fft, plan_mlp, plan_stencil2d
from parkpool.producer.splitters_stats import (
    KMeansStep,
    OptionPrice,
    plan_kmeans_step,
    plan_option_mc,
)
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import FLOAT_DTYPES, MAX_GEMM_DIM, MAX_POLY_COEFFS, REDUCE_OPS
from parkpool.schemas.kernels import MAX_MC_SAMPLES as MAX_MC_CHUNK

__all__ = [
    "PLANNERS",
    "Assembler",
    "ChunkSpec",
    "JobPlan",
    "KMeansStep",
    "OptionPrice",
    "chunk_seed",
    "plan_fft",
    "plan_gemm",
    "plan_kmeans_step",
    "plan_map",
    "plan_mlp",
    "plan_monte_carlo_pi",
    "plan_option_mc",
    "plan_reduce",
    "plan_stencil2d",
]

# --- gemm ---------------------------------------------------------------------------


class _GemmAssembler(ChunkAssembler[Array]):
    def __init__(
        self,
        shape: tuple[int, int],
        dtype: np.dtype[Any],
        targets: tuple[tuple[slice, slice], ...],
        summed: bool,
    ) -> None:
        super().__init__(len(targets))
        self._targets = targets
        self._dtype = dtype
        self._summed = summed
        # Partial products over K tiles add in float64, without float32 rounding. Full-K
        # tiles each fill their own block once, so they go straight into the answer: a
        # float64 copy would double the SDK's memory for the result, and its final cast
        # is one more pass after the last tile is in (0.17 CPU-s at 4096², 2-core VM).
        self._out = np.zeros(shape, dtype=np.float64) if summed else np.empty(shape, dtype)

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        rows, cols = self._targets[chunk_id]
        block = self._out[rows, cols]
        value = output(outputs, "c", block.shape)
        if self._summed:
            block += value
        else:
            block[...] = value

    def _finish(self) -> Array:
        return self._out.astype(self._dtype, copy=False)


def _check_gemm_operands(a: Array, b: Array) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValidationError("bad_ndim", f"gemm needs 2-D a and b, got {a.shape}, {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValidationError("shape_mismatch", f"a {a.shape} @ b {b.shape}: inner dims differ")
    if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        raise ValidationError("bad_dtype", f"a, b must share float32/64, got {a.dtype}, {b.dtype}")
    if 0 in a.shape or 0 in b.shape:
        raise ValidationError("bad_shape", f"gemm of empty operands {a.shape}, {b.shape}")


def plan_gemm(
    a: Array,
    b: Array,
    *,
    tile: int = 256,
    k_tile: int | None = None,
) -> JobPlan[Array]:
    """Tile C = A @ B: chunk (i, j[, l]) is a[rows_i, k_l] @ b[k_l, cols_j].

    Without ``k_tile`` each chunk is a full-K row panel times a column panel; with it,
    the assembler sums the partial products. Edge tiles are simply smaller.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_gemm_operands(a, b)
    tile = positive("tile", tile)
    depth = positive("k_tile", k_tile) if k_tile is not None else a.shape[1]
    largest = max(min(tile, a.shape[0]), min(tile, b.shape[1]), min(depth, a.shape[1]))
    if largest > MAX_GEMM_DIM:
        raise ValidationError("too_large", f"tiles exceed {MAX_GEMM_DIM}; lower tile or k_tile")
    row_spans, k_spans = span_slices(a.shape[0], tile), span_slices(a.shape[1], depth)
    col_spans = span_slices(b.shape[1], tile)
    tiles = [(rows, cols, ks) for rows in row_spans for cols in col_spans for ks in k_spans]
    # One snapshot per distinct block, shared by every tile that reads it: a row panel
    # is copied once, not once per column, and the claim check stores it once.
    b_views = {_span(ks, cols): b[ks, cols] for ks in k_spans for cols in col_spans}
    a_views = {_span(rows, ks): a[rows, ks] for rows in row_spans for ks in k_spans}
    b_blocks = dict(zip(b_views, wire_copies(list(b_views.values())), strict=True))
    a_blocks = dict(zip(a_views, wire_copies(list(a_views.values())), strict=True))
    chunks = validated(
        "gemm",
        tuple(
            ChunkSpec({}, {"a": a_blocks[_span(rows, ks)], "b": b_blocks[_span(ks, cols)]})
            for rows, cols, ks in tiles
        ),
    )
    targets = tuple((rows, cols) for rows, cols, _ in tiles)
    shape = (a.shape[0], b.shape[1])
    assembler = partial(_GemmAssembler, shape, a.dtype, targets, len(k_spans) > 1)
    return JobPlan("gemm", chunks, assembler)


def _span(first: slice, second: slice) -> tuple[int, int, int, int]:
    return (first.start, first.stop, second.start, second.stop)


# --- monte_carlo_pi -----------------------------------------------------------------


class _PiAssembler(ChunkAssembler[float]):
    def __init__(self, samples: tuple[int, ...]) -> None:
        super().__init__(len(samples))
        self._samples = samples
        self._hits = 0

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        hits = int(output(outputs, "hits", ()))
        samples = int(output(outputs, "samples", ()))
        # A chunk that ran the wrong number of samples would bias the estimate silently.
        if samples != self._samples[chunk_id] or not 0 <= hits <= samples:
            raise ValidationError("bad_output", f"chunk {chunk_id}: {hits} hits of {samples}")
        self._hits += hits

    def _finish(self) -> float:
        return 4.0 * self._hits / sum(self._samples)


def plan_monte_carlo_pi(
    samples: int, *, chunk_samples: int = 1_000_000, seed: int = 0
) -> JobPlan[float]:
    """Estimate pi from ``samples`` points in chunks of ``chunk_samples``; result is a float."""
    samples = positive("samples", samples)
    chunk_samples = positive("chunk_samples", chunk_samples)
    if chunk_samples > MAX_MC_CHUNK:
        raise ValidationError("bad_param", f"chunk_samples must be <= {MAX_MC_CHUNK}")
    seed = seed_of(seed)
    sizes = tuple(s.stop - s.start for s in span_slices(samples, chunk_samples))
    chunks = validated(
        "monte_carlo_pi",
        tuple(
            ChunkSpec({"seed": chunk_seed(seed, i), "samples": n}, {}) for i, n in enumerate(sizes)
        ),
    )
    return JobPlan("monte_carlo_pi", chunks, partial(_PiAssembler, sizes))


# --- poly (element-wise map) --------------------------------------------------------


class _MapAssembler(ChunkAssembler[Array]):
    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], spans: list[slice]) -> None:
        super().__init__(len(spans))
        self._shape = shape
        self._spans = spans
        self._flat = np.empty(math.prod(shape), dtype=dtype)

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        span = self._spans[chunk_id]
        self._flat[span] = output(outputs, "y", (span.stop - span.start,))

    def _finish(self) -> Array:
        return self._flat.reshape(self._shape)


def plan_map(x: Array, coeffs: list[float], *, chunk_elems: int = 1 << 16) -> JobPlan[Array]:
    """Evaluate the polynomial ``coeffs`` (highest degree first) at every element of x."""
    x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValidationError("bad_dtype", f"x must be float32 or float64, not {x.dtype}")
    if not 1 <= len(coeffs) <= MAX_POLY_COEFFS:
        raise ValidationError("bad_param", f"coeffs must hold 1..{MAX_POLY_COEFFS} numbers")
    params = {"coeffs": [float(c) for c in coeffs]}
    flat = x.reshape(-1)
    spans = span_slices(flat.size, positive("chunk_elems", chunk_elems))
    chunks = validated(
        "poly",
        tuple(ChunkSpec(params, {"x": part}) for part in wire_copies([flat[s] for s in spans])),
    )
    return JobPlan("poly", chunks, partial(_MapAssembler, x.shape, x.dtype, spans))


# --- reduce -------------------------------------------------------------------------


class _ReduceAssembler(ChunkAssembler[float]):
    def __init__(self, op: str, n_chunks: int) -> None:
        super().__init__(n_chunks)
        self._op = op
        self._partials: dict[int, float] = {}

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        self._partials[chunk_id] = float(output(outputs, "value", ()))

    def _finish(self) -> float:
        values = np.array(list(self._partials.values()), dtype=np.float64)
        if self._op in ("min", "max"):
            # np.min/np.max propagate NaN like the whole-array reduction would.
            return float(np.min(values) if self._op == "min" else np.max(values))
        if not np.all(np.isfinite(values)):
            return float(np.sum(values))  # inf/nan arithmetic; fsum raises on inf - inf
        # fsum rounds the exact total once, so arrival order cannot change the answer.
        return math.fsum(values.tolist())


def plan_reduce(x: Array, op: str = "sum", *, chunk_elems: int = 1 << 16) -> JobPlan[float]:
    """Reduce all of x with ``op`` ("sum", "sumsq", "min", "max"); result is a float."""
    x = np.asarray(x)
    if op not in REDUCE_OPS:
        raise ValidationError("unknown_op", f"op {op!r} is not one of {REDUCE_OPS}")
    if x.size == 0 and op in ("min", "max"):
        raise ValidationError("empty_input", f"{op} of an empty array is undefined")
    flat = x.reshape(-1)
    spans = span_slices(flat.size, positive("chunk_elems", chunk_elems))
    chunks = validated(
        "reduce",
        tuple(ChunkSpec({"op": op}, {"x": part}) for part in wire_copies([flat[s] for s in spans])),
    )
    return JobPlan("reduce", chunks, partial(_ReduceAssembler, op, len(spans)))


PLANNERS: Mapping[str, Callable[..., JobPlan[Any]]] = MappingProxyType(
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
