# SPDX-License-Identifier: Apache-2.0
"""Rendezvous (highest-random-weight) hashing: which K of N members a key belongs to.

A car picks its cell among the cells, and its K gateways among its cell's roster, this
way. Every car decides alone, with no coordinator and no message, and when a member
joins or leaves only the keys whose top K included it move: about K/N of them, not all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(key: str, member: str) -> int:
    """The member's weight for this key: a stable 64-bit hash of both."""
    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def top(key: str, members: Iterable[str], k: int) -> tuple[str, ...]:
    """The ``k`` members of highest weight for ``key``, best first (all when ``k`` <= 0)."""
    ranked = sorted(set(members), key=lambda m: (-score(key, m), m))
    return tuple(ranked if k <= 0 else ranked[:k])
