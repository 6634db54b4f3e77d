# SPDX-License-Identifier: Apache-2.0
"""Whether any car of this gateway runs a plugin kernel that queued tasks ask for.

Every car runs the built-ins. A plugin kernel runs only on cars whose fleet manifest
approves it, and a car lists what it runs in every pull; a gateway sends such a task
only to a car that listed it (``gateway.dispatch``). A kernel no car here has listed
lately is one no car here can run: a car that does not run it takes its task only to
dead-letter it (``unknown_kernel``) rather than leave it until its deadline, except for
a grace period after the gateway starts, while its cars are still making first pulls.

Only kernels that tasks name are tracked, so a car announcing names by the thousand
grows nothing; the first time a task names a kernel, the cars' last pulls are looked
through once for it. Those passes are budgeted (``SCANS_PER_S``): tasks naming new
kernels by the thousand would otherwise cost a pass over every car each. A kernel
named past the budget counts as runnable for now, uncached: its task waits for a car
that lists it, and is looked at again later, so it is delayed, never wrongly
dead-lettered.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from parkpool.gateway.ratelimit import RateLimiter
from parkpool.schemas.kernels import BUILTIN

GRACE_S = 30.0  # three of a car's 10 s pull refreshes: every active car has spoken
MEMORY_S = 600.0  # a kernel no car listed (nor was given) for this long is not run here
MAX_TRACKED = 4096  # kernels that tasks name; beyond it the least recently named go
BUILT_IN = frozenset(BUILTIN)  # asked of every task a pull looks at: a set, not a tuple
SCANS_PER_S = 20.0  # passes over the cars for newly named kernels; burst as many
NEVER = float("-inf")

# The latest time (this clock) a car still known here listed the kernel; None: none did.
Announcers = Callable[[str], float | None]


class KernelRoutes:
    """Plugin kernels named by tasks, with when a car here last listed or ran each."""

    def __init__(
        self,
        announcers: Announcers,
        grace_s: float = GRACE_S,
        memory_s: float = MEMORY_S,
        clock: Callable[[], float] = time.monotonic,
        scans_per_s: float = SCANS_PER_S,
    ) -> None:
        self._announcers = announcers
        self._scans = RateLimiter(scans_per_s, max(1.0, scans_per_s), max_keys=1)
        self.scans_deferred = 0  # newly named kernels not looked up, over the budget
        self._clock = clock
        self._grace_until = clock() + grace_s
        self._memory_s = memory_s
        self._heard: OrderedDict[str, float] = OrderedDict()  # least recently named first

    def heard(self, kernels: Iterable[str]) -> None:
        """A car listed these kernels in a pull, or was just given a task of one."""
        now = self._clock()
        for kernel in kernels:
            if kernel in self._heard:
                self._heard[kernel] = now

    def unrunnable(self, kernel: str) -> bool:
        """Whether no car here runs ``kernel``: none listed it (or was given it) lately,
        and the cars have had their grace period to say so."""
        if kernel in BUILT_IN:
            return False
        last = self._tracked(kernel)
        now = self._clock()
        if now - last <= self._memory_s:
            return False
        return now >= self._grace_until

    def _tracked(self, kernel: str) -> float:
        last = self._heard.get(kernel)
        if last is None:
            if not self._scans.allow("scan", self._clock()):
                self.scans_deferred += 1
                return self._clock()  # runnable for now; looked up once the budget allows
            found = self._announcers(kernel)
            last = NEVER if found is None else found
            self._heard[kernel] = last
            while len(self._heard) > MAX_TRACKED:
                self._heard.popitem(last=False)
        self._heard.move_to_end(kernel)
        return last
