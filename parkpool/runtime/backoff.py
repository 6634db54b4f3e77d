# SPDX-License-Identifier: Apache-2.0
"""How long to wait before trying again: capped exponential backoff with full jitter.

Full jitter (a uniform draw from zero up to the exponential ceiling) is what spreads
clients that failed together: a restarted broker sees its cars come back over the whole
window instead of in the same second, and tasks that failed together on one bad car do
not return as one burst. See AWS's "Exponential Backoff And Jitter" for the comparison
with equal and decorrelated jitter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def compute_backoff(
    failures: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``failures + 1``: uniform in [0, min(cap, base*2^n)]."""
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    return (rng or random).uniform(0.0, ceiling)


@dataclass
class Backoff:
    """One client's retry schedule: each failure widens the window, success resets it."""

    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: int = 0
    # Off only to measure what jitter buys: every client then waits the whole ceiling.
    jitter: bool = True

    def next_delay(self) -> float:
        """Count one more failure and return the wait before the next attempt."""
        self.failures += 1
        if not self.jitter:
            return float(min(self.cap, self.base * 2 ** (self.failures - 1)))
        return compute_backoff(self.failures, base=self.base, cap=self.cap, rng=self.rng)

    def reset(self) -> None:
        self.failures = 0
