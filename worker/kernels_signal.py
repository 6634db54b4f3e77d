# SPDX-License-Identifier: Apache-2.0
"""Signal and grid kernels: batched 1-D FFT, and an iterated 3x3 stencil on a 2-D grid.

The stencil runs the hand-written CUDA kernel (kernels_cuda) on CuPy and its NumPy twin,
``stencil_step_twin``, otherwise; the twin does the same operations in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from parkpool.schemas.kernels import Array, Inputs, Params
from parkpool.worker import kernels_cuda
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.kernels_slicing import Checkpoint, is_cupy, spans

DeviceInputs = Mapping[str, Any]
DFT_MAX_LENGTH = 1024  # the reference sums the DFT directly up to here, then uses pocketfft
_OFFSETS = tuple((di, dj) for di in range(3) for dj in range(3))

# --- fft ----------------------------------------------------------------------------


def fft_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """complex64 for single-precision input, complex128 for double."""
    single = dtype in (np.dtype(np.float32), np.dtype(np.complex64))
    return np.dtype(np.complex64 if single else np.complex128)


def fft(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """The DFT of every row along the last axis; ``inverse`` scales by 1/n like NumPy."""
    x = inputs["x"]
    n = x.shape[-1]
    transform = xp.fft.ifft if params.get("inverse", False) else xp.fft.fft
    rows = x.reshape(-1, n)
    y = xp.empty(rows.shape, dtype=fft_dtype(x.dtype))
    for batch in spans(rows.shape[0], slicing.sizes(xp).fft_elems // n):
        tick()
        y[batch] = transform(rows[batch], axis=-1)
    return {"y": y.reshape(x.shape)}


def fft_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    x = inputs["x"]
    n = x.shape[-1]
    inverse = bool(params.get("inverse", False))
    rows = x.reshape(-1, n).astype(np.complex128)
    if n <= DFT_MAX_LENGTH:
        # The defining sum, X_k = sum_j x_j exp(-+2 pi i jk/n); jk mod n keeps the angle
        # small, so the twiddles are accurate to an ulp.
        jk = np.outer(np.arange(n), np.arange(n)) % n
        sign = 1.0 if inverse else -1.0
        y = rows @ np.exp(sign * 2j * math.pi * jk / n)
        y = y / n if inverse else y
    else:
        y = np.fft.ifft(rows, axis=-1) if inverse else np.fft.fft(rows, axis=-1)
    return {"y": y.astype(fft_dtype(x.dtype)).reshape(x.shape)}


# --- stencil2d ----------------------------------------------------------------------


def stencil_weights(params: Params, dtype: np.dtype[Any]) -> list[float]:
    """The 3x3 weights, row-major, each rounded to ``dtype`` as the CUDA kernel sees them."""
    return [float(dtype.type(v)) for row in params["weights"] for v in row]


def stencil_step_twin(src: Any, dst: Any, weights: Sequence[float]) -> None:
    """One iteration into dst's interior; the CUDA kernel's order, one rounding per op.

    A Python float is a weak scalar (NEP 50), so each product is in the grid's dtype
    with the weight already rounded to it, exactly as the kernel computes it.
    """
    stencil_rows_twin(src, dst, weights, 1, src.shape[0] - 1)


def stencil_rows_twin(src: Any, dst: Any, weights: Sequence[float], lo: int, hi: int) -> None:
    """Interior rows ``lo`` to ``hi - 1`` of one iteration: rows are independent within
    an iteration, so a CPU can stop between row blocks of one large sweep."""
    w = src.shape[1]
    total = None
    for weight, (di, dj) in zip(weights, _OFFSETS, strict=True):
        term = weight * src[lo - 1 + di : hi - 1 + di, dj : w - 2 + dj]
        total = term if total is None else total + term
    dst[lo:hi, 1 : w - 1] = total


def stencil2d(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """``iterations`` Jacobi sweeps; boundary cells keep their values (Dirichlet)."""
    u = inputs["u"]
    weights = stencil_weights(params, np.dtype(u.dtype))
    src = xp.array(u, order="C", copy=True)
    dst = src.copy()  # both buffers hold the boundary; sweeps write interiors only
    cells = slicing.sizes(xp).stencil_cells
    iterations = int(params["iterations"])
    if is_cupy(xp):
        step = _cuda_step(xp, weights, u.dtype)
        per_slice = max(1, cells // u.size)
        for done in range(iterations):
            if done % per_slice == 0:
                tick()
            step(src, dst, weights)
            src, dst = dst, src
        return {"u": src}
    # On a CPU one sweep of a large grid is itself too long a slice: split it by rows.
    rows = max(1, cells // u.shape[1])
    for _ in range(iterations):
        for lo in range(1, u.shape[0] - 1, rows):
            tick()
            stencil_rows_twin(src, dst, weights, lo, min(lo + rows, u.shape[0] - 1))
        src, dst = dst, src
    return {"u": src}


def _cuda_step(xp: Any, weights: list[float], dtype: Any) -> Any:
    device_weights = xp.asarray(weights, dtype=dtype)

    def step(src: Any, dst: Any, _weights: Sequence[float]) -> None:
        kernels_cuda.stencil_step(xp, src, dst, device_weights)

    return step


def stencil2d_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    u = inputs["u"]
    weights = np.asarray(params["weights"], dtype=np.float64)
    grid = u.astype(np.float64)
    for _ in range(int(params["iterations"])):
        windows = np.lib.stride_tricks.sliding_window_view(grid, (3, 3))
        interior = np.einsum("ijkl,kl->ij", windows, weights)
        grid = grid.copy()
        grid[1:-1, 1:-1] = interior
    return {"u": grid.astype(u.dtype)}
