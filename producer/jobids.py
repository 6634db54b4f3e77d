# SPDX-License-Identifier: Apache-2.0
"""Job ids that carry their submit time: UUIDv7 (RFC 9562), as 32 hex digits.

The time lets a reader that knows only the id start reading at the job
(``offsets_for_times``) instead of at the start of topics holding millions of records.
An id the caller chose, or an older random one, carries no time: ``id_time`` says so.
"""

from __future__ import annotations

import os
import time

# An id's time is believed only between these: a caller's own id that happens to look
# like a UUIDv7 must not send a reader years away from its job.
_EARLIEST_MS = 1_577_836_800_000  # 2020-01-01
_AHEAD_MS = 86_400_000  # a day ahead of this clock: clocks drift, not by days


def new_job_id(now: float | None = None) -> str:
    """A fresh UUIDv7: 48 bits of unix milliseconds, then 74 random bits."""
    ms = int((time.time() if now is None else now) * 1000) & (2**48 - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & (2**62 - 1))
    return f"{value:032x}"


def id_time(job_id: str) -> float | None:
    """The unix time (seconds) a UUIDv7 job id was minted at; None when it has none."""
    if len(job_id) != 32 or job_id[12] != "7" or job_id[16] not in "89ab":
        return None
    try:
        ms = int(job_id[:12], 16)
    except ValueError:
        return None
    if not _EARLIEST_MS <= ms <= time.time() * 1000 + _AHEAD_MS:
        return None
    return ms / 1000.0
