# SPDX-License-Identifier: Apache-2.0
"""``python -m tests.lying_worker ARGS``: ``parkpool worker ARGS`` with a gemm that lies.

A normal worker process, enrolled and signing with its own valid key, whose gemm adds
noise of ``PARKPOOL_LIE_SCALE`` (default 1e-2) of the tile's largest value to every
element of a ``PARKPOOL_LIE_RATE`` share (default 1.0) of its tiles: what a tampered
car, or a GPU overclocked past its limits, would return.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from typing import Any

import numpy as np

from parkpool.app.cli import main
from parkpool.worker import kernels


def _lying(honest: kernels.KernelFn, rate: float, scale: float) -> kernels.KernelFn:
    def gemm(xp: Any, params: Any, inputs: Any, tick: Any) -> dict[str, Any]:
        outputs = honest(xp, params, inputs, tick)
        if random.random() < rate:
            c = outputs["c"]
            size = float(xp.max(xp.abs(c))) or 1.0
            noise = np.random.default_rng().standard_normal(c.shape).astype(c.dtype)
            outputs["c"] = c + xp.asarray(noise) * (scale * size)
        return outputs

    return gemm


def patch() -> None:
    rate = float(os.environ.get("PARKPOOL_LIE_RATE", "1.0"))
    scale = float(os.environ.get("PARKPOOL_LIE_SCALE", "1e-2"))
    kernel = kernels.REGISTRY["gemm"]
    liar = dataclasses.replace(kernel, fn=_lying(kernel.fn, rate, scale))
    kernels._KERNELS_BY_NAME["gemm"] = liar


if __name__ == "__main__":
    patch()
    sys.exit(main(["worker", *sys.argv[1:]]))
