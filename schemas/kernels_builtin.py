# SPDX-License-Identifier: Apache-2.0
"""The built-in kernels, declared exactly as a kernel package declares its own.

Each is a ``KernelPlugin`` naming its planner (``producer``) and its device function and
reference (``worker``) by name, and an entry point in ``pyproject.toml`` names each
declaration, so ``parkpool kernels list`` and every loader see one kind of kernel. They
are also listed here, so a source tree with no installed metadata (``make gpu-check``)
has them. Being part of parkpool itself, they need no approval in a fleet's manifest:
a car trusts its own agent's code as much as it trusts the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from parkpool.schemas.kernels import SPECS
from parkpool.schemas.plugins import KernelPlugin

PACKAGE = "parkpool"  # the distribution whose entry points these are


def _builtin(name: str, planner: str, module: str, split_hint: str) -> KernelPlugin:
    """A built-in's declaration: its planner in ``producer``, its sliced device function
    and NumPy reference in ``worker.<module>``, named after the kernel."""
    return KernelPlugin(
        SPECS[name],
        planner=f"parkpool.producer.{planner}",
        device=f"parkpool.worker.{module}:{name}",
        reference=f"parkpool.worker.{module}:{name}_reference",
        sliced=True,
        split_hint=split_hint,
    )


GEMM = _builtin(
    "gemm",
    "splitters:plan_gemm",
    "kernels_linalg",
    "a smaller tile, or k_tile to split the inner dimension as well",
)
MLP = _builtin(
    "mlp",
    "splitters_rows:plan_mlp",
    "kernels_linalg",
    "a smaller chunk_rows (the weights travel with every chunk)",
)
KMEANS_STEP = _builtin(
    "kmeans_step",
    "splitters_stats:plan_kmeans_step",
    "kernels_linalg",
    "a smaller chunk_points (the centroids travel with every chunk)",
)
FFT = _builtin(
    "fft",
    "splitters_rows:plan_fft",
    "kernels_signal",
    "a smaller chunk_elems (whole rows go in a chunk, so one row must fit)",
)
STENCIL2D = _builtin(
    "stencil2d",
    "splitters_rows:plan_stencil2d",
    "kernels_signal",
    "a smaller grid: every sweep needs the whole grid, so it is one chunk",
)
MONTE_CARLO_PI = _builtin(
    "monte_carlo_pi",
    "splitters:plan_monte_carlo_pi",
    "kernels_sim",
    "a smaller chunk_samples",
)
OPTION_MC = _builtin(
    "option_mc",
    "splitters_stats:plan_option_mc",
    "kernels_sim",
    "a smaller chunk_paths",
)
POLY = _builtin(
    "poly",
    "splitters:plan_map",
    "kernels_map",
    "a smaller chunk_elems",
)
REDUCE = _builtin(
    "reduce",
    "splitters:plan_reduce",
    "kernels_map",
    "a smaller chunk_elems",
)

BUILTINS: Mapping[str, KernelPlugin] = MappingProxyType(
    {
        plugin.name: plugin
        for plugin in (
            GEMM,
            MLP,
            KMEANS_STEP,
            FFT,
            STENCIL2D,
            MONTE_CARLO_PI,
            OPTION_MC,
            POLY,
            REDUCE,
        )
    }
)
