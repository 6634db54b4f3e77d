# SPDX-License-Identifier: Apache-2.0
"""Hand-written CUDA for the kernels where a generic CuPy expression wastes the GPU.

* ``stencil3x3<T>`` (a RawModule template): one stencil iteration reads each cell's 3x3
  neighbourhood once, where the array expression makes nine passes over the grid.
* ``parkpool_option_payoff`` (an ElementwiseKernel): generator, Box-Muller, the GBM step
  and the payoff fused, so no random numbers are ever stored.

Each has a NumPy twin (in kernels_signal and kernels_sim) that does the same operations
in the same order. Both compile with ``--fmad=false``: a fused multiply-add rounds once
where NumPy rounds twice, and keeping them apart leaves only the libm functions (log,
cos, exp) to differ by an ulp. CuPy is imported by the caller and passed in; nothing
here compiles until the first launch on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

_NO_FMA = ("--fmad=false",)
_BLOCK = (32, 8, 1)
_MAX_GRID_Y = 65535

_STENCIL_SOURCE = r"""
template<typename T>
__global__ void stencil3x3(const T* __restrict__ src, T* __restrict__ dst,
                           const T* __restrict__ wt, const int h, const int w) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x + 1;
    if (j >= w - 1) return;
    // Rows stride by the grid: gridDim.y is capped at 65535, a tall grid is not.
    for (int i = blockIdx.y * blockDim.y + threadIdx.y + 1; i < h - 1;
         i += gridDim.y * blockDim.y) {
        const T* up = src + (long long)(i - 1) * w + (j - 1);
        const T* mid = up + w;
        const T* down = mid + w;
        // The twin's order: row by row, left to right, rounding after every operation.
        T acc = wt[0] * up[0];
        acc = acc + wt[1] * up[1];
        acc = acc + wt[2] * up[2];
        acc = acc + wt[3] * mid[0];
        acc = acc + wt[4] * mid[1];
        acc = acc + wt[5] * mid[2];
        acc = acc + wt[6] * down[0];
        acc = acc + wt[7] * down[1];
        acc = acc + wt[8] * down[2];
        dst[(long long)i * w + j] = acc;
    }
}
"""
_STENCIL_NAMES = {
    np.dtype(np.float32): "stencil3x3<float>",
    np.dtype(np.float64): "stencil3x3<double>",
}

_SPLITMIX_SOURCE = r"""
__device__ __forceinline__ unsigned long long parkpool_splitmix64(
        unsigned long long seed, unsigned long long k) {
    unsigned long long z = (k + 1ULL) * 0x9E3779B97F4A7C15ULL + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
"""
_OPTION_IN = (
    "uint64 seed, uint64 first, float64 s0, float64 strike, float64 drift, float64 vol, "
    "float64 discount, int32 put"
)
_OPTION_BODY = r"""
// "i" is the element index; "n" is reserved by CuPy, hence "path".
const unsigned long long path = first + (unsigned long long)i;
// 53 random bits each; u1 in (0, 1] so that log(u1) is finite.
const double u1 = (double)((parkpool_splitmix64(seed, 2ULL * path) >> 11) + 1ULL) * TWO_M53;
const double u2 = (double)(parkpool_splitmix64(seed, 2ULL * path + 1ULL) >> 11) * TWO_M53;
const double g = sqrt(-2.0 * log(u1)) * cos(TWO_PI * u2);
const double st = s0 * exp(drift + vol * g);
const double gain = put ? strike - st : st - strike;
payoff = discount * (gain > 0.0 ? gain : 0.0);
"""
TWO_PI = 2.0 * math.pi
_OPTION_PREAMBLE = (
    _SPLITMIX_SOURCE + f"#define TWO_M53 (1.0 / 9007199254740992.0)\n#define TWO_PI {TWO_PI!r}\n"
)


@functools.cache
def _stencil_module(cupy: Any) -> Any:
    return cupy.RawModule(
        code=_STENCIL_SOURCE, options=_NO_FMA, name_expressions=list(_STENCIL_NAMES.values())
    )


@functools.cache
def _stencil_kernel(cupy: Any, dtype: np.dtype[Any]) -> Any:
    return _stencil_module(cupy).get_function(_STENCIL_NAMES[dtype])


@functools.cache
def _option_kernel(cupy: Any) -> Any:
    return cupy.ElementwiseKernel(
        _OPTION_IN,
        "float64 payoff",
        _OPTION_BODY,
        "parkpool_option_payoff",
        preamble=_OPTION_PREAMBLE,
        options=_NO_FMA,
    )


def stencil_step(cupy: Any, src: Any, dst: Any, weights: Any) -> None:
    """One iteration: dst's interior from src's 3x3 neighbourhoods (C-contiguous arrays).

    ``weights`` is a device array of 9 values in src's dtype, row-major. The boundary of
    dst is not written: both buffers start as copies of the grid and keep it.
    """
    h, w = src.shape
    kernel = _stencil_kernel(cupy, np.dtype(src.dtype))
    grid_x = -(-(w - 2) // _BLOCK[0])
    grid_y = min(-(-(h - 2) // _BLOCK[1]), _MAX_GRID_Y)
    kernel((grid_x, grid_y, 1), _BLOCK, (src, dst, weights, np.int32(h), np.int32(w)))


def option_payoffs(cupy: Any, out: Any, seed: int, first: int, terms: tuple[float, ...]) -> None:
    """Discounted payoffs of paths first .. first + out.size - 1 into ``out`` (float64).

    ``terms`` is (s0, strike, drift, vol, discount, put) as computed on the host.
    """
    s0, strike, drift, vol, discount, put = terms
    _option_kernel(cupy)(
        np.uint64(seed),
        np.uint64(first),
        np.float64(s0),
        np.float64(strike),
        np.float64(drift),
        np.float64(vol),
        np.float64(discount),
        np.int32(put),
        out,
    )
