# SPDX-License-Identifier: Apache-2.0
"""A random linear functional checks an fft chunk at O(n) per row, against its inputs.

The DFT matrix F is symmetric, so for any vector r, (F·x)·r = x·(F·r): one FFT of the
secret sign vector r per transform length, then one product with the car's rows and
one with the inputs' rows, against the chunk's O(n log n) per row. The inverse
transform is symmetric too (``ifft``), so the same holds with ``ifft(r)``.

The bound is gemm's (producer.freivalds): honest outputs may be off by the contract's
``rtol·max|y|`` per element, which adds up as a random walk over n terms in each of
the real and imaginary parts; a wrong element beyond the bound is caught with
probability at least 1 - 2^-rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from parkpool.producer.freivalds import Array, TileVerdict, Z
from parkpool.schemas.kernels import Tolerance


class FftCheck:
    """Checks each fft chunk on its own as it arrives (no groups)."""

    output = "y"

    def __init__(
        self,
        inputs: Sequence[Mapping[str, Array]],
        params: Sequence[Mapping[str, Any]],
        tolerance: Tolerance,
        rounds: int,
        rng: np.random.Generator,
    ) -> None:
        self._x = [chunk["x"] for chunk in inputs]
        self._inverse = [bool(p.get("inverse", False)) for p in params]
        self._rtol = tolerance.rtol
        self._rounds = rounds
        self._rng = rng
        self._vectors: dict[tuple[int, bool], tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}

    def shape(self, chunk_id: int) -> tuple[int, ...]:
        return tuple(self._x[chunk_id].shape)

    def add(self, chunk_id: int, y: Array) -> list[TileVerdict]:
        x = self._x[chunk_id]
        n = x.shape[-1]
        r, fr = self._functional(n, self._inverse[chunk_id])
        rows_y = y.reshape(-1, n)
        expected = x.reshape(-1, n) @ fr
        residual = float(np.max(np.abs(rows_y @ r - expected), initial=0.0))
        scale = float(np.max(np.abs(rows_y), initial=0.0))  # all of it: this judges
        eps = float(np.finfo(y.dtype).eps) if np.issubdtype(y.dtype, np.inexact) else 0.0
        bound = (Z * self._rtol + 8 * eps) * math.sqrt(2 * n) * scale
        if not np.all(np.isfinite(expected)):
            return [TileVerdict(chunk_id, True, "unchecked: the exact transform overflows")]
        if math.isfinite(bound) and residual <= bound:
            return [TileVerdict(chunk_id, True, "")]
        detail = f"linear functional residual {residual:.3g} over the bound {bound:.3g}"
        return [TileVerdict(chunk_id, False, detail)]

    def release(self, chunk_id: int) -> list[TileVerdict]:
        return []  # no chunk waits for another

    def forget(self, chunk_id: int) -> None:
        return None

    def _functional(self, n: int, inverse: bool) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        key = (n, inverse)
        if key not in self._vectors:
            r = self._rng.choice(np.array([-1.0, 1.0]), size=(n, self._rounds))
            transform = np.fft.ifft if inverse else np.fft.fft
            self._vectors[key] = (r, transform(r, axis=0))
        return self._vectors[key]
