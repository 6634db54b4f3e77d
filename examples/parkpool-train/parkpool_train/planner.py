# SPDX-License-Identifier: Apache-2.0
"""softmax_grad in the SDK: split the rows into shards, and add the shards' gradients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from parkpool.producer.plans import (
    Array,
    ChunkAssembler,
    ChunkSpec,
    JobPlan,
    output,
    positive,
    span_slices,
    validated,
    wire_copy,
)


@dataclass(frozen=True)
class Gradient:
    """The whole data set's summed gradient and loss, and how many rows they cover."""

    grad: Array
    loss: float
    count: int

    def mean(self) -> Array:
        return self.grad / self.count


class _GradientAssembler(ChunkAssembler[Gradient]):
    def __init__(self, n_chunks: int, shape: tuple[int, int]) -> None:
        super().__init__(n_chunks)
        self._shape = shape
        self._parts: dict[int, tuple[Array, float, int]] = {}

    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        grad = output(outputs, "grad", self._shape, "f")
        loss = float(output(outputs, "loss", (), "f"))
        count = int(output(outputs, "count", (), "iu"))
        self._parts[chunk_id] = (grad.astype(np.float64), loss, count)

    def _finish(self) -> Gradient:
        # In chunk order, so the sum is the same whatever order the cars finished in.
        ordered = [self._parts[i] for i in sorted(self._parts)]
        grad = np.sum([g for g, _, _ in ordered], axis=0)
        return Gradient(grad, sum(loss for _, loss, _ in ordered), sum(n for _, _, n in ordered))


def plan_softmax_grad(x: Array, y: Array, w: Array, *, shards: int = 8) -> JobPlan[Gradient]:
    """One chunk per shard of rows: each computes its rows' summed gradient at ``w``."""
    x, y, w = np.asarray(x), np.asarray(y), np.asarray(w)
    size = -(-len(x) // positive("shards", shards))
    weights = wire_copy(w)
    chunks = tuple(
        ChunkSpec({}, {"x": wire_copy(x[rows]), "y": wire_copy(y[rows]), "w": weights})
        for rows in span_slices(len(x), max(size, 1))
    )
    validated("softmax_grad", chunks)
    return JobPlan("softmax_grad", chunks, partial(_GradientAssembler, len(chunks), tuple(w.shape)))
