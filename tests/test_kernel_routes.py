# SPDX-License-Identifier: Apache-2.0
"""Which plugin kernels a gateway's cars run: heard from pulls, forgotten when silent,
and a kernel no car runs known as such only after the cars' grace period."""

from __future__ import annotations

import pytest

from parkpool.gateway import kernel_routes
from parkpool.gateway.kernel_routes import KernelRoutes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_kernel_is_unrunnable_only_after_the_grace_and_while_unannounced() -> None:
    # Given a gateway that just started, with a 30 s grace and a 600 s memory
    clock = Clock()
    routes = KernelRoutes(grace_s=30.0, memory_s=600.0, clock=clock)
    # Then during the grace nothing is unrunnable, and built-ins never are
    assert not routes.unrunnable("softmax_grad")
    clock.now += 31
    assert routes.unrunnable("softmax_grad")
    assert not routes.unrunnable("gemm")
    # When a car announces it, Then it is runnable until it has been silent 600 s
    routes.heard(["gemm", "softmax_grad"])
    clock.now += 600
    assert not routes.unrunnable("softmax_grad")
    clock.now += 1
    assert routes.unrunnable("softmax_grad")


def test_a_car_announcing_endless_names_cannot_grow_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a small bound on the names kept
    monkeypatch.setattr(kernel_routes, "MAX_KERNELS", 3)
    clock = Clock()
    routes = KernelRoutes(grace_s=0.0, clock=clock)
    # When a car announces five names, oldest first
    routes.heard([f"k{i}" for i in range(5)])
    # Then only the three newest are kept: the oldest are forgotten first
    assert [routes.unrunnable(f"k{i}") for i in range(5)] == [True, True, False, False, False]
