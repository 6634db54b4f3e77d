# SPDX-License-Identifier: Apache-2.0
"""What softmax_grad accepts, how exact its answer must be, and what it costs.

The SDK checks every chunk against this before anything is sent, and a car checks
again before it touches device memory: a task one side accepts, the other runs.
"""

from __future__ import annotations

import numpy as np

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import Inputs, KernelSpec, Params, Tolerance

MAX_ROWS = 1 << 20
MAX_FEATURES = 4096
MAX_CLASSES = 1024


def check(params: Params, inputs: Inputs) -> None:
    """x: (rows, features) float64; y: (rows,) int64 in [0, classes); w: (features,
    classes) float64; no params."""
    if params:
        raise ValidationError("unexpected_param", f"softmax_grad takes no {sorted(params)}")
    x, y, w = inputs["x"], inputs["y"], inputs["w"]
    expected = (("x", x, 2, np.float64), ("y", y, 1, np.int64), ("w", w, 2, np.float64))
    for key, array, ndim, dtype in expected:
        if array.ndim != ndim or array.dtype != dtype:
            got = f"{array.dtype} {array.shape}"
            raise ValidationError(
                "bad_input", f"{key} must be {ndim}-D {dtype.__name__}, not {got}"
            )
    rows, features = x.shape
    if not (0 < rows <= MAX_ROWS and 0 < features <= MAX_FEATURES):
        raise ValidationError("bad_shape", f"x {x.shape} is empty or too large")
    if y.shape != (rows,):
        raise ValidationError("bad_shape", f"y {y.shape} does not match x's {rows} rows")
    if w.shape[0] != features or not 1 < w.shape[1] <= MAX_CLASSES:
        raise ValidationError("bad_shape", f"w {w.shape} does not fit x's {features} features")
    if y.min() < 0 or y.max() >= w.shape[1]:
        raise ValidationError("bad_label", f"labels must be in [0, {w.shape[1]})")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise ValidationError("not_finite", "x and w must be finite")


def cost(params: Params, inputs: Inputs) -> float:
    """Two matrix products of rows x features x classes, plus the softmax: 10^9 flops."""
    rows, features = inputs["x"].shape
    classes = inputs["w"].shape[1]
    return (4.0 * rows * features * classes + 5.0 * rows * classes) / 1e9


# float64 throughout. A sum over a shard of r rows in another order (BLAS blocking on the
# CPU, a tree on the GPU) differs by about log2(r) * 1e-16 of the sum's scale; exp and
# log differ by an ulp. 1e-9 of the largest gradient entry holds that with room, and
# still catches one row left out or counted twice.
SPEC = KernelSpec("softmax_grad", ("x", "y", "w"), check, Tolerance(1e-9, 0.0), cost)
