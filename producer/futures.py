# SPDX-License-Identifier: Apache-2.0
"""``as_completed`` and ``wait`` across jobs, as ``concurrent.futures`` has them for futures.

Each ``JobHandle`` exposes its answer as a ``concurrent.futures.Future``; these map the
standard functions over those futures and hand back the handles, so code written for
``concurrent.futures``, Dask or ``ray.wait`` reads the same here.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from parkpool.producer.jobs import JobHandle

FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION
ALL_COMPLETED = concurrent.futures.ALL_COMPLETED


H = TypeVar("H", bound=JobHandle[Any])  # a handle, kept as typed as it came


def as_completed(handles: Iterable[H], timeout: float | None = None) -> Iterator[H]:
    """The handles as their jobs end (done, failed or cancelled), first ended first;
    TimeoutError if ``timeout`` seconds pass before all have."""
    by_future = {handle.future: handle for handle in handles}
    for future in concurrent.futures.as_completed(by_future, timeout):
        yield by_future[future]


def wait(
    handles: Iterable[H],
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> tuple[set[H], set[H]]:
    """(ended, still running) once ``return_when`` holds or ``timeout`` passes."""
    by_future = {handle.future: handle for handle in handles}
    done, pending = concurrent.futures.wait(by_future, timeout, return_when)
    return {by_future[f] for f in done}, {by_future[f] for f in pending}


__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "as_completed", "wait"]
