# SPDX-License-Identifier: Apache-2.0
"""Dense linear-algebra kernels: tiled gemm, batched mlp inference, one k-means step.

Each kernel is written once against ``xp`` (NumPy or CuPy) and calls ``tick()`` before
every slice (see kernels_slicing). Each reference is plain NumPy in float64, computed
another way where there is one (direct differences for k-means, whole products for gemm
and mlp), so that a wrong tile, offset or batch shows up as a mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from parkpool.schemas.kernels import Array, Inputs, Params, mlp_depth
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.kernels_slicing import Checkpoint, spans

DeviceInputs = Mapping[str, Any]

# --- gemm ---------------------------------------------------------------------------


def gemm(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """C = A @ B, one output tile and one K tile per launch, K tiles summed per tile."""
    a, b = inputs["a"], inputs["b"]
    sizes = slicing.sizes(xp)
    c = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    # One scratch tile for the whole task: a fresh array per K tile costs the host new
    # pages, zeroed by the OS, for every slice (about 4 % of the SDK, gateway and cars'
    # CPU in a bulk job on the 2-core VM: docs/BENCHMARKS.md). Same sums, same order.
    scratch = None
    for rows in spans(a.shape[0], sizes.gemm_tile):
        for cols in spans(b.shape[1], sizes.gemm_tile):
            scratch = _tile(
                xp, a[rows], b[:, cols], c[rows, cols], sizes.gemm_k_tile, tick, scratch
            )
    return {"c": c}


def _tile(
    xp: Any, a_rows: Any, b_cols: Any, out: Any, k_tile: int, tick: Checkpoint, scratch: Any
) -> Any:
    """``out = a_rows @ b_cols``, one K tile per launch, summed in ``out``; returns the
    scratch tile it used, for the next output tile to reuse."""
    depths = spans(a_rows.shape[1], k_tile)
    if not depths:  # K = 0: the empty sum
        out[...] = 0
    for i, depth in enumerate(depths):
        tick()
        if i == 0 and out.flags.c_contiguous:  # the whole of C: the first product lands there
            xp.matmul(a_rows[:, depth], b_cols[depth], out=out)
            continue
        if scratch is None or scratch.shape != out.shape:
            scratch = xp.empty(out.shape, dtype=out.dtype)
        xp.matmul(a_rows[:, depth], b_cols[depth], out=scratch)
        if i == 0:
            out[...] = scratch
        else:
            out += scratch
    return scratch


def gemm_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    a, b = inputs["a"], inputs["b"]
    return {"c": (a.astype(np.float64) @ b.astype(np.float64)).astype(a.dtype)}


# --- mlp ----------------------------------------------------------------------------


def _layers(inputs: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    return [(inputs[f"w{i}"], inputs[f"b{i}"]) for i in range(mlp_depth(inputs))]


def mlp(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """y = layer_L(...relu(layer_1(x))): every layer for one batch of rows per slice."""
    x, layers = inputs["x"], _layers(inputs)
    per_row = sum(2 * w.shape[0] * w.shape[1] for w, _ in layers)
    y = xp.empty((x.shape[0], layers[-1][0].shape[1]), dtype=x.dtype)
    for rows in spans(x.shape[0], slicing.sizes(xp).mlp_flops // per_row):
        tick()
        y[rows] = _forward(xp, x[rows], layers)
    return {"y": y}


def _forward(xp: Any, h: Any, layers: list[tuple[Any, Any]]) -> Any:
    for i, (w, b) in enumerate(layers):
        h = xp.matmul(h, w) + b
        if i < len(layers) - 1:
            h = xp.maximum(h, 0)  # ReLU on hidden layers; the output layer stays linear
    return h


def mlp_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x = inputs["x"]
    h = x.astype(np.float64)
    layers = _layers(inputs)
    for i, (w, b) in enumerate(layers):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if i < len(layers) - 1:
            h = np.where(h > 0.0, h, 0.0)
    return {"y": h.astype(x.dtype)}


# --- kmeans_step --------------------------------------------------------------------


def kmeans_step(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """Assign each point to its nearest centroid; per-cluster sums, counts and new centroids.

    Distances use |p|^2 - 2 p.c + |c|^2 (a matmul) in float64, after shifting everything
    by the centroids' mean so the expansion does not cancel for data far from the origin.
    """
    points, centroids = inputs["points"], inputs["centroids"]
    k = centroids.shape[0]
    c64 = centroids.astype(xp.float64)
    shift = c64.mean(axis=0)
    c = c64 - shift
    c_norm = (c * c).sum(axis=1)
    sums = xp.zeros(c.shape, dtype=xp.float64)
    counts = xp.zeros(k, dtype=xp.int64)
    inertia = xp.zeros((), dtype=xp.float64)
    clusters = xp.arange(k)
    for rows in spans(points.shape[0], slicing.sizes(xp).kmeans_pairs // k):
        tick()
        p = points[rows].astype(xp.float64) - shift
        d2 = (p * p).sum(axis=1)[:, None] - 2.0 * (p @ c.T) + c_norm[None, :]
        labels = xp.argmin(d2, axis=1)
        nearest = xp.take_along_axis(d2, labels[:, None], axis=1)
        inertia += xp.maximum(nearest, 0.0).sum()
        sums += (labels[:, None] == clusters[None, :]).astype(xp.float64).T @ p
        counts += xp.bincount(labels, minlength=k)
    sums += counts[:, None] * shift  # the sums of the points, not of the shifted points
    return {
        "centroids": _new_centroids(xp, sums, counts, c64).astype(centroids.dtype),
        "counts": counts,
        "sums": sums,
        "inertia": inertia,
    }


def _new_centroids(xp: Any, sums: Any, counts: Any, old: Any) -> Any:
    """Each cluster's mean; a cluster that got no point keeps its centroid."""
    means = sums / xp.maximum(counts, 1)[:, None]
    return xp.where(counts[:, None] > 0, means, old)


def kmeans_step_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    points, centroids = inputs["points"], inputs["centroids"]
    p, c = points.astype(np.float64), centroids.astype(np.float64)
    labels = np.empty(p.shape[0], dtype=np.int64)
    nearest = np.empty(p.shape[0], dtype=np.float64)
    for rows in spans(p.shape[0], 4096):
        d2 = np.square(p[rows, None, :] - c[None, :, :]).sum(axis=2)
        labels[rows] = d2.argmin(axis=1)
        nearest[rows] = d2.min(axis=1)
    counts = np.bincount(labels, minlength=c.shape[0]).astype(np.int64)
    sums = np.zeros_like(c)
    np.add.at(sums, labels, p)
    return {
        "centroids": _new_centroids(np, sums, counts, c).astype(centroids.dtype),
        "counts": counts,
        "sums": sums,
        "inertia": np.asarray(nearest.sum()),
    }
