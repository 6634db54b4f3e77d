# SPDX-License-Identifier: Apache-2.0
"""Element-wise and reduction kernels over flat arrays: poly (Horner) and reduce."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from parkpool.schemas.kernels import Array, Inputs, Params
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.kernels_slicing import Checkpoint, spans

DeviceInputs = Mapping[str, Any]

# --- poly ---------------------------------------------------------------------------


def poly(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """The polynomial ``coeffs`` (highest degree first) at every element of x."""
    x = inputs["x"]
    flat = x.reshape(-1)
    y = xp.empty_like(flat)
    coeffs = [float(c) for c in params["coeffs"]]
    for batch in spans(flat.size, slicing.sizes(xp).map_elems):
        tick()
        y[batch] = _horner(xp, flat[batch], coeffs)
    return {"y": y.reshape(x.shape)}


def _horner(xp: Any, x: Any, coeffs: list[float]) -> Any:
    y = xp.zeros_like(x)
    for coeff in coeffs:
        # A Python float is a "weak" scalar, so float32 x stays float32 (NEP 50).
        y = y * x + coeff
    return y


def poly_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x = inputs["x"]
    coeffs = np.asarray(params["coeffs"], dtype=np.float64)
    return {"y": np.asarray(np.polyval(coeffs, x), dtype=x.dtype)}


# --- reduce -------------------------------------------------------------------------


def reduce(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """sum, sumsq (accumulated in float64), min or max of every element of x."""
    x, op = inputs["x"].reshape(-1), params["op"]
    value = xp.zeros((), dtype=xp.float64)  # the empty sum; min/max of nothing is refused
    for i, batch in enumerate(spans(x.size, slicing.sizes(xp).map_elems)):
        tick()
        part = _partial(xp, op, x[batch])
        value = part if i == 0 else _combine(xp, op, value, part)
    return {"value": xp.asarray(value, dtype=xp.float64)}


def _partial(xp: Any, op: str, x: Any) -> Any:
    if op == "sum":
        return xp.sum(x, dtype=xp.float64)
    if op == "sumsq":
        x64 = x.astype(xp.float64)
        return xp.sum(x64 * x64)
    return (xp.min(x) if op == "min" else xp.max(x)).astype(xp.float64)


def _combine(xp: Any, op: str, total: Any, part: Any) -> Any:
    if op in ("sum", "sumsq"):
        return total + part
    # minimum/maximum propagate NaN, like a reduction over the whole array would.
    return xp.minimum(total, part) if op == "min" else xp.maximum(total, part)


def reduce_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x64 = np.asarray(inputs["x"], dtype=np.float64)
    ops: dict[str, Callable[[Array], Any]] = {
        "sum": np.sum,
        "sumsq": lambda v: np.sum(np.square(v)),
        "min": np.min,
        "max": np.max,
    }
    return {"value": np.asarray(ops[params["op"]](x64), dtype=np.float64)}
