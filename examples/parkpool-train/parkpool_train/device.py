# SPDX-License-Identifier: Apache-2.0
"""softmax_grad on the car: one function for NumPy and CuPy (``xp``), and its reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from parkpool.schemas.kernels import Array, Inputs, Params


def softmax_grad(xp: Any, params: Params, inputs: Any) -> dict[str, Any]:
    """The summed gradient of the cross-entropy of softmax(x @ w) against y, with
    respect to w, and the summed loss and the row count, so shards add up exactly."""
    x, y, w = inputs["x"], inputs["y"], inputs["w"]
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)  # exp cannot overflow
    log_norm = xp.log(xp.exp(logits).sum(axis=1, keepdims=True))
    log_p = logits - log_norm
    rows = xp.arange(x.shape[0])
    loss = -log_p[rows, y].sum()
    p = xp.exp(log_p)
    p[rows, y] -= 1.0
    return {
        "grad": x.T @ p,
        "loss": xp.asarray(loss, dtype=xp.float64),
        "count": xp.asarray(x.shape[0], dtype=xp.int64),
    }


def softmax_grad_reference(params: Params, inputs: Inputs) -> dict[str, Array]:
    """The same quantities written another way, as a second opinion is compared with:
    probabilities by plain exponentials, the labels as a one-hot matrix, and the loss
    as a log of probabilities, one row at a time."""
    x, w = (np.asarray(inputs[k], dtype=np.float64) for k in ("x", "w"))
    labels = np.asarray(inputs["y"])
    scores = x @ w
    exps = np.exp(scores - scores.max(axis=1)[:, None])
    probs = exps / exps.sum(axis=1)[:, None]
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    loss = -sum(float(np.log(probs[i, labels[i]])) for i in range(len(labels)))
    return {
        "grad": x.T @ (probs - onehot),
        "loss": np.asarray(loss),
        "count": np.asarray(len(labels), dtype=np.int64),
    }
