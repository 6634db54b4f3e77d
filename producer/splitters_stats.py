# SPDX-License-Identifier: Apache-2.0
"""Planners whose chunks return partial statistics the assembler merges: a k-means
step's sums and counts, and a Monte Carlo option price's sums of payoffs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from parkpool.producer.plans import (
    Array,
    ChunkAssembler,
    ChunkSpec,
    JobPlan,
    chunk_seed,
    output,
    positive,
    real_param,
    seed_of,
    span_slices,
    validated,
    wire_copies,
    wire_copy,
)
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import MAX_MC_SAMPLES as MAX_MC_CHUNK

# --- kmeans_step --------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansStep:
    """One Lloyd step over every point: the new centroids, cluster sizes and inertia."""

    centroids: Array  # a cluster that got no point keeps its old centroid
    counts: Array
    inertia: float  # the sum of squared distances to the nearest old centroid


class _KMeansAssembler(ChunkAssembler["KMeansStep"]):
    def __init__(self, centroids: Array, sizes: tuple[int, ...]) -> None:
        super().__init__(len(sizes))
        self._old, self._sizes = centroids, sizes
        self._sums = np.zeros(centroids.shape, dtype=np.float64)
        self._counts = np.zeros(centroids.shape[0], dtype=np.int64)
        self._inertia: list[float] = []

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        sums = output(outputs, "sums", self._sums.shape)
        counts = output(outputs, "counts", self._counts.shape, "iu")
        inertia = float(output(outputs, "inertia", ()))
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


def plan_kmeans_step(
    points: Array, centroids: Array, *, chunk_points: int = 8192
) -> JobPlan[KMeansStep]:
    """One k-means step; chunks of points return partial sums the assembler merges."""
    points, centroids = np.asarray(points), np.asarray(centroids)
    if points.ndim != 2:
        raise ValidationError("bad_ndim", f"points must be (n, features), not {points.shape}")
    spans = span_slices(points.shape[0], positive("chunk_points", chunk_points))
    shared = wire_copy(centroids)
    chunks = validated(
        "kmeans_step",
        tuple(
            ChunkSpec({}, {"points": part, "centroids": shared})
            for part in wire_copies([points[s] for s in spans])
        ),
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


class _OptionAssembler(ChunkAssembler["OptionPrice"]):
    def __init__(self, paths: tuple[int, ...]) -> None:
        super().__init__(len(paths))
        self._paths = paths
        self._sums: list[float] = []
        self._squares: list[float] = []

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        total = float(output(outputs, "sum", ()))
        squares = float(output(outputs, "sumsq", ()))
        paths = int(output(outputs, "paths", (), "iu"))
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
) -> JobPlan[OptionPrice]:
    """Price a European option under GBM from ``paths`` paths; the result is an OptionPrice."""
    paths, chunk_paths = positive("paths", paths), positive("chunk_paths", chunk_paths)
    if chunk_paths > MAX_MC_CHUNK:
        raise ValidationError("bad_param", f"chunk_paths must be <= {MAX_MC_CHUNK}")
    seed = seed_of(seed)
    market = {"s0": s0, "strike": strike, "rate": rate, "sigma": sigma, "maturity": maturity}
    terms: dict[str, Any] = {key: real_param(key, value) for key, value in market.items()}
    sizes = tuple(s.stop - s.start for s in span_slices(paths, chunk_paths))
    chunks = validated(
        "option_mc",
        tuple(
            ChunkSpec({"seed": chunk_seed(seed, i), "paths": n, "kind": kind, **terms}, {})
            for i, n in enumerate(sizes)
        ),
    )
    return JobPlan("option_mc", chunks, partial(_OptionAssembler, sizes))
