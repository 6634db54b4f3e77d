# SPDX-License-Identifier: Apache-2.0
"""Monte Carlo kernels on a counter-based generator: pi by darts, European options by GBM.

Both draw from splitmix64 at explicit counters, so any batch of the stream is computed
directly and NumPy and CuPy draw the very same numbers; library RNGs differ between the
two. ``option_mc`` runs a fused CUDA kernel on CuPy (kernels_cuda) and its NumPy twin,
``option_payoffs_twin``, otherwise. Their answers are defined by the generator, so each
reference is the twin run on NumPy; tests pin the twins against scalar Python oracles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from parkpool.schemas.kernels import Array, Inputs, Params
from parkpool.worker import kernels_cuda
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.kernels_slicing import Checkpoint, is_cupy, spans

DeviceInputs = Mapping[str, Any]
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TWO_M53 = 2.0**-53


def splitmix64(xp: Any, seed: int, counters: Any) -> Any:
    """Output number ``counters[i]`` (0-based) of Vigna's splitmix64 seeded with ``seed``.

    The generator is counter-based: its state after n+1 steps is seed + (n+1)*golden
    mod 2**64, so any slice of the stream is computed directly with uint64 array ops
    that wrap identically on NumPy and CuPy.
    """
    u64 = xp.uint64
    with np.errstate(over="ignore"):
        z = (counters + u64(1)) * u64(_GOLDEN) + u64(seed)
        z = (z ^ (z >> u64(30))) * u64(_MIX1)
        z = (z ^ (z >> u64(27))) * u64(_MIX2)
        return z ^ (z >> u64(31))


def _no_tick() -> None:
    """References run on NumPy and are never preempted."""


# --- monte_carlo_pi -----------------------------------------------------------------


def monte_carlo_pi(
    xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint
) -> dict[str, Any]:
    """Count points (u[2i], u[2i+1]) of the unit square inside the quarter circle."""
    seed, samples = int(params["seed"]), int(params["samples"])
    hits = xp.zeros((), dtype=xp.int64)
    for batch in spans(samples, slicing.sizes(xp).mc_batch):
        tick()
        z = splitmix64(xp, seed, xp.arange(2 * batch.start, 2 * batch.stop, dtype=xp.uint64))
        # 53 random bits -> exact float64 in [0, 1). Every step below is a separate,
        # correctly rounded IEEE op (no fused multiply-add), so both backends agree bit
        # for bit.
        u = (z >> xp.uint64(11)).astype(xp.float64) * _TWO_M53
        x, y = u[0::2], u[1::2]
        hits += xp.count_nonzero(x * x + y * y <= 1.0)
    return {"hits": hits, "samples": xp.asarray(samples, dtype=xp.int64)}


def monte_carlo_pi_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    out = monte_carlo_pi(np, params, inputs, _no_tick)
    return {key: np.asarray(value) for key, value in out.items()}


# --- option_mc ----------------------------------------------------------------------


def option_terms(params: Params) -> tuple[float, float, float, float, float, int]:
    """(s0, strike, drift, vol, discount, put) of a GBM European option, on the host.

    S_T = s0 * exp(drift + vol * Z) with drift = (r - sigma^2/2) T and vol = sigma sqrt(T)
    is the exact solution of GBM at maturity, so one step per path is not a discretisation.
    """
    rate, sigma, maturity = (float(params[k]) for k in ("rate", "sigma", "maturity"))
    drift = (rate - 0.5 * sigma * sigma) * maturity
    return (
        float(params["s0"]),
        float(params["strike"]),
        drift,
        sigma * math.sqrt(maturity),
        math.exp(-rate * maturity),
        1 if params["kind"] == "put" else 0,
    )


def option_payoffs_twin(
    xp: Any, seed: int, first: int, count: int, terms: tuple[float, ...]
) -> Any:
    """Discounted payoffs of paths first .. first + count - 1: the CUDA kernel's steps.

    Path p uses generator outputs 2p and 2p + 1 for one Box-Muller normal (the cosine
    branch), so a path's draw does not depend on how the paths are batched.
    """
    s0, strike, drift, vol, discount, put = terms
    counters = xp.arange(first, first + count, dtype=xp.uint64) * xp.uint64(2)
    bits1 = splitmix64(xp, seed, counters) >> xp.uint64(11)
    bits2 = splitmix64(xp, seed, counters + xp.uint64(1)) >> xp.uint64(11)
    u1 = (bits1 + xp.uint64(1)).astype(xp.float64) * _TWO_M53  # (0, 1]: log is finite
    u2 = bits2.astype(xp.float64) * _TWO_M53
    normal = xp.sqrt(-2.0 * xp.log(u1)) * xp.cos(kernels_cuda.TWO_PI * u2)
    price = s0 * xp.exp(drift + vol * normal)
    gain = strike - price if put else price - strike
    return discount * xp.maximum(gain, 0.0)


def option_mc(xp: Any, params: Params, inputs: DeviceInputs, tick: Checkpoint) -> dict[str, Any]:
    """Sums of discounted payoffs and of their squares over ``paths`` GBM paths."""
    seed, paths = int(params["seed"]), int(params["paths"])
    terms = option_terms(params)
    total = xp.zeros((), dtype=xp.float64)
    total_sq = xp.zeros((), dtype=xp.float64)
    for batch in spans(paths, slicing.sizes(xp).option_batch):
        tick()
        count = batch.stop - batch.start
        if is_cupy(xp):
            payoff = xp.empty(count, dtype=xp.float64)
            kernels_cuda.option_payoffs(xp, payoff, seed, batch.start, terms)
        else:
            payoff = option_payoffs_twin(xp, seed, batch.start, count, terms)
        total += payoff.sum()
        total_sq += (payoff * payoff).sum()
    return {"sum": total, "sumsq": total_sq, "paths": xp.asarray(paths, dtype=xp.int64)}


def option_mc_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    out = option_mc(np, params, inputs, _no_tick)
    return {key: np.asarray(value) for key, value in out.items()}
