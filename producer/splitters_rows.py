# SPDX-License-Identifier: Apache-2.0
"""Planners whose chunks are row blocks of one result: fft, mlp and stencil2d."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import numpy.typing as npt

from parkpool.producer.plans import (
    Array,
    ChunkAssembler,
    ChunkSpec,
    JobPlan,
    output,
    positive,
    span_slices,
    validated,
    wire_copies,
    wire_copy,
)
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import MAX_LAYERS

# --- fft, mlp, stencil2d (row blocks of one result) ---------------------------------


class _RowsAssembler(ChunkAssembler[Array]):
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
        block[...] = output(outputs, self._key, block.shape, self._kinds)

    def _finish(self) -> Array:
        return self._rows.reshape(self._shape)


def plan_fft(x: Array, *, inverse: bool = False, chunk_elems: int = 1 << 15) -> JobPlan[Array]:
    """The 1-D FFT of x along its last axis, whole rows per chunk; the result has x's shape."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValidationError("bad_shape", f"fft needs a non-empty last axis, got {x.shape}")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    spans = span_slices(rows.shape[0], max(1, positive("chunk_elems", chunk_elems) // n))
    params = {"inverse": bool(inverse)}
    chunks = validated(
        "fft",
        tuple(ChunkSpec(params, {"x": part}) for part in wire_copies([rows[s] for s in spans])),
    )
    single = x.dtype in (np.dtype(np.float32), np.dtype(np.complex64))
    dtype = np.complex64 if single else np.complex128
    return JobPlan(
        "fft", chunks, partial(_RowsAssembler, "y", "c", rows.shape, dtype, spans, x.shape)
    )


def plan_mlp(
    x: Array, weights: Sequence[Array], biases: Sequence[Array], *, chunk_rows: int = 256
) -> JobPlan[Array]:
    """Batched inference of a ReLU MLP (weights[i]: (in, out)), rows of x split over chunks."""
    x = np.asarray(x)
    if not 1 <= len(weights) == len(biases) <= MAX_LAYERS:
        raise ValidationError("bad_param", f"give 1..{MAX_LAYERS} weights and as many biases")
    if x.ndim != 2:
        raise ValidationError("bad_ndim", f"x must be (batch, features), not {x.shape}")
    layers = {f"w{i}": wire_copy(np.asarray(w)) for i, w in enumerate(weights)}
    layers |= {f"b{i}": wire_copy(np.asarray(b)) for i, b in enumerate(biases)}
    spans = span_slices(x.shape[0], positive("chunk_rows", chunk_rows))
    chunks = validated(
        "mlp",
        tuple(ChunkSpec({}, {"x": part, **layers}) for part in wire_copies([x[s] for s in spans])),
    )
    out = (x.shape[0], layers[f"w{len(weights) - 1}"].shape[1])
    return JobPlan("mlp", chunks, partial(_RowsAssembler, "y", "f", out, x.dtype, spans, out))


def plan_stencil2d(
    u: Array, weights: Sequence[Sequence[float]], *, iterations: int = 1
) -> JobPlan[Array]:
    """Iterate a 3x3 stencil over u: one chunk, since every sweep needs the whole grid."""
    u = np.asarray(u)
    try:
        rows = np.asarray(weights, dtype=np.float64).tolist()
    except (TypeError, ValueError):
        raise ValidationError("bad_param", "weights must be a 3x3 list of numbers") from None
    params = {"weights": rows, "iterations": iterations}
    chunks = validated("stencil2d", (ChunkSpec(params, {"u": wire_copy(u)}),))
    whole = [slice(0, u.shape[0])]
    assemble = partial(_RowsAssembler, "u", "f", u.shape, u.dtype, whole, u.shape)
    return JobPlan("stencil2d", chunks, assemble)
