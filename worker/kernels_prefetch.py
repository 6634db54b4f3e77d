# SPDX-License-Identifier: Apache-2.0
"""Prefetch: copy the next task's inputs to the GPU while the current kernel runs.

A worker that copies inputs, runs the kernel and copies outputs back one task at a time
leaves the GPU idle during every host-to-device copy. ``Stager`` issues the copy on a
second (copy) stream and records an event; ``Staged.inputs_on(stream)`` makes the compute
stream wait for that event on the device, not the host, so the copy of task n+1
overlaps the kernel of task n. Asynchronous copies need page-locked host memory; from
pageable memory CUDA copies through a staging buffer and the overlap shrinks.

Keep a ``Staged`` alive until the kernel reading it has finished (copying its outputs
back waits for that): its blocks belong to the copy stream's pool, which would reuse them.
On NumPy there is nothing to overlap: staging is the (free) ``to_device``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from parkpool.worker.backend import Backend


@dataclass(frozen=True)
class Staged:
    """A task's inputs on the device, and the event after which they are complete."""

    inputs: Mapping[str, Any]
    ready: Any  # a cupy.cuda.Event on CuPy, None on NumPy

    def inputs_on(self, stream: Any) -> Mapping[str, Any]:
        """The inputs, once ``stream`` has been told to wait for their copy (no host wait)."""
        if self.ready is not None:
            stream.wait_event(self.ready)
        return self.inputs


class Stager:
    """Copies task inputs to the device on its own stream (CuPy) or at once (NumPy)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._stream = backend.xp.cuda.Stream(non_blocking=True) if backend.is_gpu else None

    def stage(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Staged:
        """Queue the copies and return at once; the arrays are ready after ``Staged.ready``."""
        if self._stream is None:
            return Staged({k: self.backend.to_device(v) for k, v in inputs.items()}, None)
        xp, device = self.backend.xp, {}
        # Allocating under the copy stream keeps the pool from handing these blocks to
        # work on another stream before the copy into them is done.
        with self._stream:
            for key, host in inputs.items():
                device[key] = xp.empty(host.shape, dtype=host.dtype)
                device[key].set(host, stream=self._stream)
            return Staged(device, self._stream.record())
