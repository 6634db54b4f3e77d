# SPDX-License-Identifier: Apache-2.0
"""A kernel package for parkpool: softmax regression's gradient over a shard of data.

Importing this module is all a car does before its first task of the kernel, so it
imports only the contract's needs (NumPy and ``parkpool.schemas``); the planner (SDK
side) and the device function (car side) are named, and imported where they run.
"""

from __future__ import annotations

from parkpool.schemas.plugins import KernelPlugin
from parkpool_train.contract import SPEC

SOFTMAX_GRAD = KernelPlugin(
    SPEC,
    planner="parkpool_train.planner:plan_softmax_grad",
    device="parkpool_train.device:softmax_grad",
    reference="parkpool_train.device:softmax_grad_reference",
    split_hint="more shards (shards=), so each chunk holds fewer rows",
)

__all__ = ["SOFTMAX_GRAD"]
