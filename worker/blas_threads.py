# SPDX-License-Identifier: Apache-2.0
"""One BLAS thread per kernel while a process hosts a simulated fleet.

A real car computes on its own hardware. A fleet simulated in one process runs many
cars' kernels at once on a few shared cores, and OpenBLAS's own thread pool, shared by
every car, then has each call wait for threads that another car's call is using: on the
2-core machine, 64 gemm tiles (512x4096 by 4096x512) from 8 car threads ran at
40-49 GFLOP/s with 2 BLAS threads, and 113-132 GFLOP/s with 1 (``docs/DECISIONS.md``).
Child processes that host cars get ``OPENBLAS_NUM_THREADS=1`` (``app.children``); this
does the same for a fleet inside a process that was started otherwise (tests, bench),
and gives the process its own setting back when its last fleet stops. The limit is
the process's: anything else computing in it meanwhile gets one thread too.
"""

from __future__ import annotations

import threading
from typing import Any

from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread", "restore_blas_threads"]


class _SharedLimit:
    """Counted holders of the limit: the first sets it, the last restores the original."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._limiter: Any = None  # threadpoolctl's: restores the original counts

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._limiter = threadpool_limits(1, user_api="blas")
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


_LIMIT = _SharedLimit()


def one_blas_thread() -> None:
    """Limit BLAS to one thread per call until every caller has restored it."""
    _LIMIT.hold()


def restore_blas_threads() -> None:
    """Undo one ``one_blas_thread()``; the last one gives back the original setting."""
    _LIMIT.release()
