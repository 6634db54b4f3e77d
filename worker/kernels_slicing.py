# SPDX-License-Identifier: Apache-2.0
"""Bounded slices: how much work one launch may hold the GPU for, and the pace between them.

Every built-in kernel splits its task into slices (output tiles, row batches, sample
batches, stencil iterations) and calls ``Pacer.tick()`` before queueing each slice.
From the second slice on, ``tick`` runs the worker's checkpoint, which may raise
``Preempted``, and keeps at most ``DEPTH`` slices queued on the device.

Launches are asynchronous: without that cap the host would queue a whole task in
milliseconds and a checkpoint would stop nothing. With it, once the pipeline is full the
host ticks about once per slice, and a checkpoint that raises leaves at most DEPTH slices
to finish, so the GPU is free within about DEPTH + 1 slice durations of the request.
NumPy runs each slice before ``tick`` returns, so there it is one slice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Checkpoint = Callable[[], None]
DEPTH = 2  # slices queued ahead of the GPU: enough to keep it busy, few enough to stop soon


@dataclass(frozen=True)
class SliceSizes:
    """The largest slice each kernel queues as one unit of work (see docs/KERNELS.md)."""

    gemm_tile: int = 4096  # output tile edge: a launch is 2 * 4096^2 * k_tile flops
    gemm_k_tile: int = 2048  # 69 GFLOP per launch: ~1.4 ms on an H200, ~7 ms at 10 TFLOP/s
    mlp_flops: int = 2**33  # per row batch through every layer: 8.6 GFLOP
    kmeans_pairs: int = 2**24  # point-centroid distances per batch (128 MiB of float64)
    fft_elems: int = 2**24  # transformed elements per batch of rows
    stencil_cells: int = 2**26  # cell updates per batch of iterations (at least one)
    mc_batch: int = 2**20  # monte_carlo_pi samples per batch
    option_batch: int = 2**22  # option_mc paths per batch
    map_elems: int = 2**24  # poly and reduce elements per batch


# Kernels read these at call time (through ``sizes``), so a test may swap in tiny slices.
SLICES = SliceSizes()
# A CPU core is two to three orders of magnitude slower than a data-centre GPU, so the
# GPU's slices would hold a CPU for seconds. These keep one NumPy slice to about 5 ms on
# one core of the 2-core development machine (measured; see docs/KERNELS.md), which is
# what bounds preemption latency where there is no GPU.
CPU_SLICES = SliceSizes(
    gemm_tile=512,
    gemm_k_tile=512,
    mlp_flops=2**28,
    kmeans_pairs=2**18,
    fft_elems=2**19,
    stencil_cells=2**18,
    mc_batch=2**18,
    option_batch=2**16,
    map_elems=2**18,
)


def sizes(xp: Any) -> SliceSizes:
    """The slice sizes for a backend: GPU-sized on CuPy, CPU-sized on NumPy."""
    return SLICES if is_cupy(xp) else CPU_SLICES


def spans(length: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` (>= 1) covering ``range(length)``."""
    step = max(1, int(size))
    return [slice(i, min(i + step, length)) for i in range(0, length, step)]


def _no_checkpoint() -> None:
    """The checkpoint of a caller that never preempts."""


def is_cupy(xp: Any) -> bool:
    """Whether ``xp`` is the CuPy module (kernels never import it themselves)."""
    return getattr(xp, "__name__", "") == "cupy"


class Pacer:
    """Runs the checkpoint between slices and caps how many are queued on the GPU."""

    def __init__(self, xp: Any, checkpoint: Checkpoint | None) -> None:
        self._checkpoint = checkpoint or _no_checkpoint
        self._cuda = xp.cuda if is_cupy(xp) else None
        self._queued: deque[Any] = deque()
        self.slices = 0

    def tick(self) -> None:
        """Call before queueing each slice; from the second on it may raise Preempted."""
        self.slices += 1
        if self.slices == 1:
            return  # nothing queued yet: a checkpoint goes between launches
        if self._cuda is not None:
            # A blocking event sleeps the host thread instead of spinning a car's CPU.
            event = self._cuda.Event(block=True, disable_timing=True)
            event.record(self._cuda.get_current_stream())
            self._queued.append(event)
            if len(self._queued) > DEPTH:
                self._queued.popleft().synchronize()
        self._checkpoint()
