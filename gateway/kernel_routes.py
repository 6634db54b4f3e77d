# SPDX-License-Identifier: Apache-2.0
"""Which plugin kernels this gateway's cars run, as their pulls announce them.

Every car runs the built-ins. A plugin kernel runs only on cars whose fleet manifest
approves it, and a car lists what it runs in every pull, so a gateway sends such a task
only to a car that listed it. A kernel no car has listed lately is one no car here can
run: its tasks are dead-lettered at once (``unknown_kernel``) rather than held until
their deadline, except for a grace period after the gateway starts, while its cars are
still making their first pulls.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from parkpool.schemas.kernels import BUILTIN

GRACE_S = 30.0  # three of a car's 10 s pull refreshes: every active car has spoken
MEMORY_S = 600.0  # a kernel unannounced this long is no longer run here
MAX_KERNELS = 4096  # a hostile car announcing names by the thousand cannot grow it more


class KernelRoutes:
    """Plugin kernels heard from this gateway's cars, with when each was last heard."""

    def __init__(
        self,
        grace_s: float = GRACE_S,
        memory_s: float = MEMORY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._grace_until = clock() + grace_s
        self._memory_s = memory_s
        self._heard: OrderedDict[str, float] = OrderedDict()  # oldest first

    def heard(self, kernels: Iterable[str]) -> None:
        """A car's pull listed these kernels."""
        now = self._clock()
        for kernel in kernels:
            if kernel in BUILTIN:
                continue
            self._heard[kernel] = now
            self._heard.move_to_end(kernel)
        while len(self._heard) > MAX_KERNELS:
            self._heard.popitem(last=False)

    def unrunnable(self, kernel: str) -> bool:
        """Whether no car here runs ``kernel``: none listed it lately, and the cars
        have had their grace period to say so."""
        if kernel in BUILTIN:
            return False
        now = self._clock()
        last = self._heard.get(kernel)
        if last is not None and now - last <= self._memory_s:
            return False
        return now >= self._grace_until
