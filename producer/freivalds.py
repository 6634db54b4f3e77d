# SPDX-License-Identifier: Apache-2.0
"""Freivalds' check of gemm tiles: is C = A·B, at O(n²) instead of the O(n³) product?

For a secret random sign vector x, A·(B·x) costs two matrix-vector products, and
C·x one more; a wrong C shows as a residual C·x - A·(B·x) far from zero. Tiles that
share a block of A are checked together (Σ_j C_j·x_j against A·Σ_j B_j·x_j), so each
block of A, each block of B and each tile is read once per job: three passes of
matrix-vector products, 1.65-1.87 % of the 4096² gemm's CPU time on a 2-core machine
(3.3-3.7 % of its wall time, the gemm using both cores; `make bench`, "verification").
Only a group that fails is checked tile by tile, to find the liar.

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

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
class Prepared:
    """The input side of a job's check, computed by its planner while each block it
    copied was still in cache (``Preparer``): the secret signs per block of B, and
    A·Σ_j B_j·x_j per block of A. Keyed by the blocks' identity in the plan. B_j·x_j of
    one block alone is needed only to judge a tile alone, and is computed then."""

    signs: Mapping[int, Array]
    abx: Mapping[int, Array]
    seconds: float = 0.0  # what the products and signs added to planning (wall)
    cpu_seconds: float = 0.0  # the same, in this thread's CPU time


class Preparer:
    """Copies a gemm plan's blocks and computes the check's products on the way, so the
    two passes over A and B that the check needs cost little more than the copies the
    plan makes anyway. Copy every block of B before any block of A.

    Each step copies a band of rows and multiplies the copy while it is still in cache:
    the check is made against exactly the bytes sent, even if the caller's array
    changes meanwhile.
    """

    # Bands small enough to stay in a core's L2 while they are multiplied, and for
    # OpenBLAS to run each product on one thread: with 2 MiB bands it split them, and
    # on a busy 2-core machine every product then waited for a descheduled thread
    # (prepare took 470 ms instead of 3-5 ms). Of 128 KiB to 512 KiB, 256 KiB added the
    # least to a 4096² plan (``make bench``, "verification").
    STEP_BYTES = 256 * 1024

    def __init__(self, rounds: int = DEFAULT_ROUNDS, rng: np.random.Generator | None = None):
        self._rounds = rounds
        self._rng = rng or np.random.default_rng()
        self._signs: dict[int, Array] = {}
        self._abx: dict[int, Array] = {}
        self._y: dict[tuple[int, int], Array] = {}  # rows of B -> Σ B·x over its blocks
        self._seconds = 0.0
        self._cpu_seconds = 0.0

    def b_block(self, source: Array, rows: tuple[int, int]) -> Array:
        started, cpu = time.perf_counter(), time.thread_time()
        x = self._rng.choice(np.array([-1.0, 1.0], source.dtype), (source.shape[1], self._rounds))
        self._count(started, cpu)
        block, bx = self._copy_times(source, x)
        self._signs[id(block)] = x
        total = self._y.get(rows)
        self._y[rows] = bx if total is None else total + bx
        return block

    def a_block(self, source: Array, columns: tuple[int, int]) -> Array:
        block, abx = self._copy_times(source, self._y[columns])
        self._abx[id(block)] = abx
        return block

    def prepared(self) -> Prepared:
        return Prepared(dict(self._signs), dict(self._abx), self._seconds, self._cpu_seconds)

    def _copy_times(self, source: Array, vectors: Array) -> tuple[Array, Array]:
        """A C-contiguous, read-only copy of ``source`` and ``copy @ vectors``, one
        cache-sized band of rows at a time; the products' time (wall and CPU) is counted."""
        copy = np.empty(source.shape, source.dtype)
        product = np.empty((source.shape[0], vectors.shape[1]), source.dtype)
        for band in _bands(source):
            copy[band] = source[band]
            started, cpu = time.perf_counter(), time.thread_time()
            np.matmul(copy[band], vectors, out=product[band])
            self._count(started, cpu)
        copy.flags.writeable = False
        return copy, product

    def _count(self, started: float, cpu: float) -> None:
        self._seconds += time.perf_counter() - started
        self._cpu_seconds += time.thread_time() - cpu


@dataclass(frozen=True)
class TileVerdict:
    chunk_id: int
    valid: bool
    detail: str  # the residual against its bound, for the evidence


@dataclass(slots=True)
class _Tile:
    a: Array
    b: Array
    group: int  # id(a): the tiles that share it are checked together
    cx: Array | None = None  # C·x once the tile arrived
    c: Array | None = None  # the tile, for its max|C| when the group is judged


@dataclass(slots=True)
class _Group:
    members: list[int]
    waiting: int  # members not arrived yet
    settled: bool = False  # checked once: later tiles (redos) go alone


class GemmCheck:
    """Freivalds over one job's gemm chunks; feed tiles as they arrive.

    A tile's arrival costs one matrix-vector product and no other NumPy call: with the
    tile just read, every call beyond that pays for the cache the tile evicted (a
    sampled max|C| per tile cost half as much as the product). max|C| is sampled once
    per group, when it is judged (``_judge_group``), and the group's input side
    (A·Σ_j B_j·x_j) is computed then too, unless the planner prepared it."""

    output = "c"

    def __init__(
        self,
        inputs: Sequence[Mapping[str, Array]],
        tolerance: Tolerance,
        rounds: int = DEFAULT_ROUNDS,
        rng: np.random.Generator | None = None,
        prepared: Prepared | None = None,
    ) -> None:
        self._rtol = tolerance.rtol
        self._rng = rng or np.random.default_rng()
        self._rounds = rounds
        self._tiles = [_Tile(chunk["a"], chunk["b"], id(chunk["a"])) for chunk in inputs]
        self._groups: dict[int, _Group] = {}
        for chunk_id, tile in enumerate(self._tiles):
            group = self._groups.setdefault(tile.group, _Group([], 0))
            group.members.append(chunk_id)
            group.waiting += 1
        self._x: dict[int, Array] = {}  # id(B block) -> its secret signs
        self._y: dict[int, Array] = {}  # id(B block) -> B·x
        self._z: dict[int, Array] = {}  # id(A block) -> A·Σ B·x over its group
        if prepared is not None:
            self._x, self._z = dict(prepared.signs), dict(prepared.abx)
            if self._x.keys() != {id(t.b) for t in self._tiles}:
                raise ValueError("the prepared check was made for another plan's blocks")
            self._rounds = next(iter(self._x.values())).shape[1] if self._x else rounds

    def shape(self, chunk_id: int) -> tuple[int, int]:
        """The shape tile ``chunk_id`` must have."""
        tile = self._tiles[chunk_id]
        return (tile.a.shape[0], tile.b.shape[1])

    def add(self, chunk_id: int, c: Array) -> list[TileVerdict]:
        """Take one tile; verdicts for every tile that could be judged now (none while
        its group waits for other tiles)."""
        tile = self._tiles[chunk_id]
        group = self._groups[tile.group]
        first_arrival = tile.cx is None
        tile.cx = c @ self._signs(tile.b)
        tile.c = c
        if first_arrival:  # counted once the product is made: a raise leaves it uncounted
            group.waiting -= 1
        if group.settled:
            return [self._alone(chunk_id)]
        if group.waiting > 0:
            return []
        group.settled = True
        return self._judge_group(group.members, chunk_id)

    def release(self, chunk_id: int) -> list[TileVerdict]:
        """The chunk will never arrive: judge its group's arrived tiles alone."""
        group = self._groups[self._tiles[chunk_id].group]
        if group.settled:
            return []
        group.settled = True
        return [self._alone(m) for m in group.members if self._tiles[m].cx is not None]

    def forget(self, chunk_id: int) -> None:
        """A tile judged wrong: its redo will be checked alone when it comes."""
        tile = self._tiles[chunk_id]
        tile.cx = None
        tile.c = None

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
                self._y[id(b)] = _product(b, self._signs(b))
        return [self._y[id(b)] for b in blocks]

    def _judge_group(self, members: list[int], last: int) -> list[TileVerdict]:
        """Σ_j C_j·x_j against A·Σ_j B_j·x_j, with max|C| sampled from the tile that
        completed the group (``last``, still in cache), then from every tile; only a
        group that fails both is judged tile by tile. A sample is never above the
        true max|C|, so each bound is stricter than the full one: a group passed here
        would pass with it (and the second try spares honest groups whose last tile
        happens to be small, such as a zero block of a block-diagonal product)."""
        tiles = [self._tiles[m] for m in members]
        a = tiles[0].a
        residual = -self._abx(a, tiles)
        for tile in tiles:  # not np.sum of the list: stacking it costs 40 µs a group
            assert tile.cx is not None
            residual = residual + tile.cx
        peak = float(np.abs(residual).max(initial=0.0))
        width = sum(t.b.shape[1] for t in tiles)
        first = _sampled_max(self._tiles[last].c)
        if self._within(peak, width, first, a.dtype):
            return [TileVerdict(m, True, "") for m in members]
        every = max(_sampled_max(t.c) for t in tiles)
        if every > first and self._within(peak, width, every, a.dtype):
            return [TileVerdict(m, True, "") for m in members]
        return [self._alone(m) for m in members]

    def _within(self, peak: float, width: int, scale: float, dtype: np.dtype[Any]) -> bool:
        bound = self._bound(width, scale, dtype)
        return math.isfinite(bound) and peak <= bound

    def _abx(self, a: Array, tiles: list[_Tile]) -> Array:
        """A·Σ_j B_j·x_j for a group: from the planner when it prepared one."""
        z = self._z.get(id(a))
        if z is None:
            zero = np.zeros((a.shape[1], self._rounds), a.dtype)
            z = _product(a, sum(self._bx_all([t.b for t in tiles]), zero))
        return z

    def _alone(self, chunk_id: int) -> TileVerdict:
        tile = self._tiles[chunk_id]
        assert tile.cx is not None and tile.c is not None
        expected = _product(tile.a, self._bx(tile.b))
        residual = float(np.max(np.abs(tile.cx - expected), initial=0.0))
        bound = self._bound(tile.b.shape[1], _max_abs(tile.c), tile.a.dtype)
        if not np.all(np.isfinite(expected)):
            # The inputs overflow the dtype: no car can be held to a bound; say so.
            return TileVerdict(chunk_id, True, "unchecked: the exact product overflows")
        if math.isfinite(bound) and residual <= bound:  # a NaN or inf in the tile fails
            return TileVerdict(chunk_id, True, "")
        detail = f"Freivalds residual {residual:.3g} over the bound {bound:.3g}"
        return TileVerdict(chunk_id, False, detail)

    def _bound(self, width: int, scale: float, dtype: np.dtype[Any]) -> float:
        # The contract's noise as a random walk over the row, plus this check's own
        # rounding (a few ulps of the same walk), which rtol >> eps makes minor.
        return (Z * self._rtol + 8 * _eps(dtype)) * math.sqrt(width) * scale


def _product(matrix: Array, vectors: Array) -> Array:
    """``matrix @ vectors`` in bands that OpenBLAS runs on one thread (see Preparer):
    whole, a block's product was split over the cores and waited on a busy one."""
    out = np.empty((matrix.shape[0], vectors.shape[1]), np.result_type(matrix, vectors))
    for band in _bands(matrix):
        np.matmul(matrix[band], vectors, out=out[band])
    return out


def _bands(matrix: Array) -> Iterator[slice]:
    """Consecutive spans of rows, each about ``Preparer.STEP_BYTES`` of ``matrix``."""
    step = max(1, Preparer.STEP_BYTES // max(1, matrix.shape[1] * matrix.itemsize))
    for start in range(0, matrix.shape[0], step):
        yield slice(start, start + step)


@functools.cache
def _eps(dtype: np.dtype[Any]) -> float:
    return float(np.finfo(dtype).eps)  # np.finfo costs microseconds a call


def _sampled_max(values: Array | None) -> float:
    if values is None:
        return 0.0
    return float(np.abs(values[::SCALE_STRIDE]).max(initial=0.0))


def _max_abs(values: Array) -> float:
    if values.size == 0:
        return 0.0
    return float(max(np.max(values), -np.min(values)))
