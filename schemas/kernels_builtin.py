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


GEMM = KernelPlugin(
    SPECS["gemm"],
    planner="parkpool.producer.splitters:plan_gemm",
    device="parkpool.worker.kernels_linalg:gemm",
    reference="parkpool.worker.kernels_linalg:gemm_reference",
    sliced=True,
    split_hint="a smaller tile, or k_tile to split the inner dimension as well",
)

MLP = KernelPlugin(
    SPECS["mlp"],
    planner="parkpool.producer.splitters_rows:plan_mlp",
    device="parkpool.worker.kernels_linalg:mlp",
    reference="parkpool.worker.kernels_linalg:mlp_reference",
    sliced=True,
    split_hint="a smaller chunk_rows (the weights travel with every chunk)",
)

KMEANS_STEP = KernelPlugin(
    SPECS["kmeans_step"],
    planner="parkpool.producer.splitters_stats:plan_kmeans_step",
    device="parkpool.worker.kernels_linalg:kmeans_step",
    reference="parkpool.worker.kernels_linalg:kmeans_step_reference",
    sliced=True,
    split_hint="a smaller chunk_points (the centroids travel with every chunk)",
)

FFT = KernelPlugin(
    SPECS["fft"],
    planner="parkpool.producer.splitters_rows:plan_fft",
    device="parkpool.worker.kernels_signal:fft",
    reference="parkpool.worker.kernels_signal:fft_reference",
    sliced=True,
    split_hint="a smaller chunk_elems (whole rows go in a chunk, so one row must fit)",
)

STENCIL2D = KernelPlugin(
    SPECS["stencil2d"],
    planner="parkpool.producer.splitters_rows:plan_stencil2d",
    device="parkpool.worker.kernels_signal:stencil2d",
    reference="parkpool.worker.kernels_signal:stencil2d_reference",
    sliced=True,
    split_hint="a smaller grid: every sweep needs the whole grid, so it is one chunk",
)

MONTE_CARLO_PI = KernelPlugin(
    SPECS["monte_carlo_pi"],
    planner="parkpool.producer.splitters:plan_monte_carlo_pi",
    device="parkpool.worker.kernels_sim:monte_carlo_pi",
    reference="parkpool.worker.kernels_sim:monte_carlo_pi_reference",
    sliced=True,
    split_hint="a smaller chunk_samples",
)

OPTION_MC = KernelPlugin(
    SPECS["option_mc"],
    planner="parkpool.producer.splitters_stats:plan_option_mc",
    device="parkpool.worker.kernels_sim:option_mc",
    reference="parkpool.worker.kernels_sim:option_mc_reference",
    sliced=True,
    split_hint="a smaller chunk_paths",
)

POLY = KernelPlugin(
    SPECS["poly"],
    planner="parkpool.producer.splitters:plan_map",
    device="parkpool.worker.kernels_map:poly",
    reference="parkpool.worker.kernels_map:poly_reference",
    sliced=True,
    split_hint="a smaller chunk_elems",
)

REDUCE = KernelPlugin(
    SPECS["reduce"],
    planner="parkpool.producer.splitters:plan_reduce",
    device="parkpool.worker.kernels_map:reduce",
    reference="parkpool.worker.kernels_map:reduce_reference",
    sliced=True,
    split_hint="a smaller chunk_elems",
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
