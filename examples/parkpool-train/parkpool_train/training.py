# SPDX-License-Identifier: Apache-2.0
"""Data-parallel SGD for softmax regression: each round's mini-batch is one job whose
chunks are its shards, run by the fleet; here, the SDK averages and steps.

The same loop runs with the gradient computed in this process by NumPy, on the same
batches from the same seed, so the two runs can be compared round for round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.plans import Array
from parkpool_train.device import softmax_grad_reference
from parkpool_train.planner import Gradient

GradientFn = Callable[[Array, Array, Array], Gradient]  # (x, y, w) -> summed gradient


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits, scaled to [0, 1] with a bias column, split once."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array

    @classmethod
    def load(cls, seed: int = 0, test_fraction: float = 0.25) -> Digits:
        from sklearn.datasets import load_digits  # ships in the package: no download

        digits = load_digits()
        x = np.hstack([digits.data / 16.0, np.ones((len(digits.data), 1))])
        y = digits.target.astype(np.int64)
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(len(x) * (1 - test_fraction))
        train, test = order[:cut], order[cut:]
        return cls(x[train], y[train], x[test], y[test])

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


@dataclass(frozen=True)
class Run:
    """A finished training run: test accuracy, mean loss and wall time of each round."""

    accuracy: float
    losses: tuple[float, ...]
    round_s: tuple[float, ...]

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s)


def train(
    gradient: GradientFn,
    data: Digits,
    *,
    rounds: int = 40,
    batch: int = 512,
    lr: float = 2.0,
    seed: int = 0,
) -> Run:
    """SGD from zero weights: each round draws a mini-batch (the same ones for the same
    seed), asks ``gradient`` for its summed gradient, and steps by its mean."""
    rng = np.random.default_rng(seed)
    w = np.zeros((data.x_train.shape[1], data.classes))
    losses: list[float] = []
    round_s: list[float] = []
    for _ in range(rounds):
        rows = rng.choice(len(data.x_train), size=min(batch, len(data.x_train)), replace=False)
        started = time.perf_counter()
        g = gradient(data.x_train[rows], data.y_train[rows], w)
        w = w - lr * g.mean()
        round_s.append(time.perf_counter() - started)
        losses.append(g.loss / g.count)
    accuracy = float(np.mean(np.argmax(data.x_test @ w, axis=1) == data.y_test))
    return Run(accuracy, tuple(losses), tuple(round_s))


def on_fleet(client: ParkpoolClient, shards: int, timeout_s: float = 120.0) -> GradientFn:
    """Each call is one job: the batch split into ``shards`` chunks, run by the cars."""

    def gradient(x: Array, y: Array, w: Array) -> Gradient:
        job = client.submit("softmax_grad", {"x": x, "y": y, "w": w}, shards=shards)
        result: Gradient = job.wait(timeout_s)
        return result

    return gradient


def in_process(x: Array, y: Array, w: Array) -> Gradient:
    """The same gradient by NumPy, here, in one piece."""
    out = softmax_grad_reference({}, {"x": x, "y": y, "w": w})
    return Gradient(out["grad"], float(out["loss"]), int(out["count"]))
