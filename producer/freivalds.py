# SPDX-License-Identifier: Apache-2.0
"""Freivalds' check of gemm tiles: is C = A·B, at O(n²) instead of the O(n³) product?

For a secret random sign vector x, A·(B·x) costs two matrix-vector products, and
C·x one more; a wrong C shows as a residual C·x - A·(B·x) far from zero. Tiles that
share a block of A are checked together (Σ_j C_j·x_j against A·Σ_j B_j·x_j), so each
block of A, each block of B and each tile is read once per job: three memory-bound
passes, 1.2-1.5 % of the 4096² gemm's own time on a 2-core machine (`make bench`,
"verification"). Only a group that fails is checked tile by tile, to find the liar.

Honest results differ from the exact product by floating point, up to the contract's
tolerance ``rtol·max|C|`` per element (schemas.kernels). With random signs that noise
adds up as a random walk: by Hoeffding, |Σ_j e_j·x_j| stays under ``Z·sqrt(n)·rtol·max|C|``
except with probability 1e-12, so an honest car is never accused. A wrong element d
beyond that bound is caught with probability at least 1 - 2^-rounds (the sign of d's
term is a coin flip that cannot cancel both ways), and errors spread over many elements
are caught almost surely. ``max|C|`` comes from the car's own tile: inflating it takes
an element that wrong, which the same check catches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from parkpool.schemas.kernels import Tolerance

Array = npt.NDArray[np.floating]
DELTA = 1e-12  # the chance an honest row's residual exceeds the bound
Z = math.sqrt(2 * math.log(2 / DELTA))
# Rows sampled for max|C| in the fast path. A sample can only be smaller than the true
# maximum, so its bound is stricter: a group it passes would pass with the full one,
# and a tile is only ever judged wrong against its full max|C| (``_alone``).
SCALE_STRIDE = 64
DEFAULT_ROUNDS = 1


@dataclass(frozen=True)
class TileVerdict:
    chunk_id: int
    valid: bool
    detail: str  # the residual against its bound, for the evidence


@dataclass
class _Tile:
    a: Array
    b: Array
    cx: Array | None = None  # C·x once the tile arrived
    scale: float = 0.0  # sampled max|C|
    c: Array | None = None  # the tile, for its full max|C| if it must be judged alone


class GemmCheck:
    """Freivalds over one job's gemm chunks; feed tiles as they arrive."""

    output = "c"

    def __init__(
        self,
        inputs: Sequence[Mapping[str, Array]],
        tolerance: Tolerance,
        rounds: int = DEFAULT_ROUNDS,
        rng: np.random.Generator | None = None,
    ) -> None:
        self._rtol = tolerance.rtol
        self._rng = rng or np.random.default_rng()
        self._rounds = rounds
        self._tiles = [_Tile(chunk["a"], chunk["b"]) for chunk in inputs]
        self._groups: dict[int, list[int]] = {}  # id(A block) -> its chunks
        for chunk_id, tile in enumerate(self._tiles):
            self._groups.setdefault(id(tile.a), []).append(chunk_id)
        self._x: dict[int, Array] = {}  # id(B block) -> its secret signs
        self._y: dict[int, Array] = {}  # id(B block) -> B·x
        self._settled: set[int] = set()  # groups checked once: later tiles go alone

    def shape(self, chunk_id: int) -> tuple[int, int]:
        """The shape tile ``chunk_id`` must have."""
        tile = self._tiles[chunk_id]
        return (tile.a.shape[0], tile.b.shape[1])

    def add(self, chunk_id: int, c: Array) -> list[TileVerdict]:
        """Take one tile; verdicts for every tile that could be judged now (none while
        its group waits for other tiles)."""
        tile = self._tiles[chunk_id]
        tile.cx = c @ self._signs(tile.b)
        tile.scale = float(np.abs(c[::SCALE_STRIDE]).max(initial=0.0))
        tile.c = c
        group = id(tile.a)
        if group in self._settled:
            return [self._alone(chunk_id)]
        members = self._groups[group]
        if any(self._tiles[m].cx is None for m in members):
            return []
        self._settled.add(group)
        return self._judge_group(members)

    def release(self, chunk_id: int) -> list[TileVerdict]:
        """The chunk will never arrive: judge its group's arrived tiles alone."""
        group = id(self._tiles[chunk_id].a)
        if group in self._settled:
            return []
        self._settled.add(group)
        members = self._groups[group]
        return [self._alone(m) for m in members if self._tiles[m].cx is not None]

    def forget(self, chunk_id: int) -> None:
        """A tile judged wrong: its redo will be checked alone when it comes."""
        self._tiles[chunk_id].cx = None
        self._tiles[chunk_id].c = None

    def _signs(self, b: Array) -> Array:
        key = id(b)
        x = self._x.get(key)
        if x is None:
            shape = (b.shape[1], self._rounds)
            x = self._rng.choice(np.array([-1.0, 1.0], dtype=b.dtype), size=shape)
            self._x[key] = x
        return x

    def _bx(self, b: Array) -> Array:
        return self._bx_all([b])[0]

    def _bx_all(self, blocks: list[Array]) -> list[Array]:
        """B·x of each block, computed once per job."""
        for b in blocks:
            if id(b) not in self._y:
                self._y[id(b)] = b @ self._signs(b)
        return [self._y[id(b)] for b in blocks]

    def _judge_group(self, members: list[int]) -> list[TileVerdict]:
        tiles = [self._tiles[m] for m in members]
        a = tiles[0].a
        y = sum(self._bx_all([t.b for t in tiles]), np.zeros((a.shape[1], self._rounds), a.dtype))
        residual = sum((t.cx for t in tiles if t.cx is not None), -(a @ y))
        width = sum(t.b.shape[1] for t in tiles)
        bound = self._bound(width, max(t.scale for t in tiles), a.dtype)
        if math.isfinite(bound) and float(np.max(np.abs(residual), initial=0.0)) <= bound:
            return [TileVerdict(m, True, "") for m in members]
        return [self._alone(m) for m in members]

    def _alone(self, chunk_id: int) -> TileVerdict:
        tile = self._tiles[chunk_id]
        assert tile.cx is not None and tile.c is not None
        expected = tile.a @ self._bx(tile.b)
        residual = float(np.max(np.abs(tile.cx - expected), initial=0.0))
        bound = self._bound(tile.b.shape[1], _max_abs(tile.c), tile.a.dtype)
        if not np.all(np.isfinite(expected)):
            # The inputs overflow the dtype: no car can be held to a bound; say so.
            return TileVerdict(chunk_id, True, "unchecked: the exact product overflows")
        if math.isfinite(bound) and residual <= bound:  # a NaN or inf in the tile fails
            return TileVerdict(chunk_id, True, "")
        detail = f"Freivalds residual {residual:.3g} over the bound {bound:.3g}"
        return TileVerdict(chunk_id, False, detail)

    def _bound(self, width: int, scale: float, dtype: np.dtype[np.floating]) -> float:
        # The contract's noise as a random walk over the row, plus this check's own
        # rounding (a few ulps of the same walk), which rtol >> eps makes minor.
        eps = float(np.finfo(dtype).eps)
        return (Z * self._rtol + 8 * eps) * math.sqrt(width) * scale


def _max_abs(values: Array) -> float:
    if values.size == 0:
        return 0.0
    return float(max(np.max(values), -np.min(values)))
