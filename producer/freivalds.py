# SPDX-License-Identifier: Apache-2.0
"""Freivalds' check of gemm tiles: is C = A·B, at O(n²) instead of the O(n³) product?

For a secret random sign vector x, A·(B·x) costs two matrix-vector products, and
C·x one more; a wrong C shows as a residual C·x - A·(B·x) far from zero. Tiles that
share a block of A are checked together (Σ_j C_j·x_j against A·Σ_j B_j·x_j), so each
block of A, each block of B and each tile is read once per job. On the claim-check
path the passes over A and B ride on the SDK's hashing of the blocks (``HashTap``),
and each tile is multiplied as it arrives: 6-10 CPU-ms for a 4096² gemm of 64 tiles on
a 2-core AMD EPYC VM, 0.46-0.73 % of the gemm's CPU time there (`make bench`,
"verification"); inline, where nothing is hashed, the products read A and B from
memory when a group's tiles are in: 12-13 CPU-ms.
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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from parkpool.producer.plans import row_bands
from parkpool.schemas.kernels import Tolerance

Array = npt.NDArray[np.floating]
DELTA = 1e-12  # the chance an honest row's residual exceeds the bound
Z = math.sqrt(2 * math.log(2 / DELTA))
# Rows sampled for max|C| in the fast path. A sample can only be smaller than the true
# maximum, so its bound is stricter: a group it passes would pass with the full one,
# and a tile is only ever judged wrong against its full max|C| (``_alone``).
SCALE_STRIDE = 64
DEFAULT_ROUNDS = 1
# Bands small enough to stay in a core's L2 while they are multiplied, and for OpenBLAS
# to run each product on one thread (``_product``).
BAND_BYTES = 256 * 1024


@dataclass(frozen=True)
class Prepared:
    """The input side of a job's check, computed while the SDK hashed each block for the
    claim check (``HashTap``): the secret signs per block of B, and A·Σ_j B_j·x_j per
    block of A. Keyed by the blocks' identity in the plan. B_j·x_j of one block alone is
    needed only to judge a tile alone, and is computed then."""

    signs: Mapping[int, Array]
    abx: Mapping[int, Array]


class HashTap:
    """The check's two passes over A and B, made on the claim check's own pass.

    The SDK hashes every stored block once (producer.claimcheck), one cache-sized band
    of rows at a time; each band is multiplied here right after, while still in cache.
    From memory the products took ~10 CPU-ms at 4096² on a 2-core AMD EPYC VM; on the
    hashing pass they add 4-6 ms to its 75 (``make bench``, "verification"; the
    difference includes hashing in bands). A's product needs Σ_j B_j·x_j
    over the blocks of B its tiles read, so every block of B is hashed first
    (``phases``). Thread-safe: blocks are hashed on several threads.

    A block the claim check did not hash (too small to store, or a confidential job's)
    leaves the tap incomplete: ``prepared()`` is then None, and the check computes its
    products itself when the tiles arrive.
    """

    def __init__(
        self,
        inputs: Sequence[Mapping[str, Array]],
        rounds: int = DEFAULT_ROUNDS,
        rng: np.random.Generator | None = None,
    ) -> None:
        rng = rng or np.random.default_rng()
        self._a = {id(chunk["a"]): chunk["a"] for chunk in inputs}
        self._b = {id(chunk["b"]): chunk["b"] for chunk in inputs}
        self._partners: dict[int, dict[int, None]] = {}  # id(A) -> the B blocks it meets
        for chunk in inputs:
            self._partners.setdefault(id(chunk["a"]), {})[id(chunk["b"])] = None
        self._signs = {
            key: rng.choice(np.array([-1.0, 1.0], b.dtype), (b.shape[1], rounds))
            for key, b in self._b.items()
        }
        self._bx = {k: np.empty((b.shape[0], rounds), b.dtype) for k, b in self._b.items()}
        self._abx = {k: np.empty((a.shape[0], rounds), a.dtype) for k, a in self._a.items()}
        self._rows_done: dict[int, int] = {}
        self._y: dict[int, Array | None] = {}  # id(A) -> Σ B·x of its partners
        self._lock = threading.Lock()

    def phases(self) -> list[list[Array]]:
        """The blocks to hash, in order: every block of B before any block of A."""
        return [list(self._b.values()), list(self._a.values())]

    def band(self, block: Array, rows: slice) -> None:
        """``block[rows]`` was just hashed: multiply it while it is in cache. One thread
        hashes a block, and a phase ends before the next begins, so only ``_y_for``,
        once per block of A, needs the lock."""
        key = id(block)
        if key in self._bx:
            np.matmul(block[rows], self._signs[key], out=self._bx[key][rows])
        else:
            y = self._y_for(key)
            if y is None:
                return  # a partner was not hashed here: the check makes this product
            np.matmul(block[rows], y, out=self._abx[key][rows])
        self._rows_done[key] = self._rows_done.get(key, 0) + len(range(*rows.indices(len(block))))

    def prepared(self) -> Prepared | None:
        """The check's input side, or None unless every block was hashed through here."""
        blocks = {**self._a, **self._b}
        if any(self._rows_done.get(key, 0) != len(block) for key, block in blocks.items()):
            return None
        return Prepared(dict(self._signs), dict(self._abx))

    def _y_for(self, a_key: int) -> Array | None:
        with self._lock:
            if a_key not in self._y:
                partners = [self._b[b] for b in self._partners[a_key]]
                hashed = all(self._rows_done.get(id(b), 0) == len(b) for b in partners)
                self._y[a_key] = (
                    np.sum([self._bx[id(b)] for b in partners], axis=0) if hashed else None
                )
            return self._y[a_key]


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
    (A·Σ_j B_j·x_j) is computed then too, unless the SDK's hashing prepared it."""

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
        """A·Σ_j B_j·x_j for a group: from the hashing pass when it prepared one."""
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
    """``matrix @ vectors`` in bands that OpenBLAS runs on one thread: whole, a block's
    product was split over the cores, and on a busy 2-core machine every product then
    waited for a descheduled thread (470 ms instead of 3-5 ms for a 4096² job)."""
    out = np.empty((matrix.shape[0], vectors.shape[1]), np.result_type(matrix, vectors))
    for band in row_bands(matrix, BAND_BYTES):
        np.matmul(matrix[band], vectors, out=out[band])
    return out


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
