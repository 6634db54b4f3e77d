# SPDX-License-Identifier: Apache-2.0
"""The array backend a worker runs kernels on: CuPy on a GPU, NumPy otherwise.

Kernels are written once against the array-API subset that NumPy and CuPy share and
receive the backend's module as ``xp``. CuPy is an optional extra (``parkpool[gpu]``),
so it is imported only when a backend is selected, never at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from parkpool.schemas.errors import ConfigError

BackendName = Literal["cupy", "numpy"]
PREFERENCES = ("auto", "cupy", "numpy")


@dataclass(frozen=True)
class Backend:
    """An array module plus the few host/device operations a worker needs."""

    name: BackendName
    xp: ModuleType

    @property
    def is_gpu(self) -> bool:
        """Whether arrays of this backend live in GPU memory."""
        return self.name == "cupy"

    def to_device(self, array: npt.NDArray[Any]) -> Any:
        """Copy a host array to the backend (no copy for NumPy)."""
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> npt.NDArray[Any]:
        """Return ``array`` as a NumPy array; 0-d results stay 0-d arrays."""
        if self.is_gpu:
            return np.asarray(self.xp.asnumpy(array))
        return np.asarray(array)

    def synchronize(self) -> None:
        """Wait for queued device work, so timings and errors land where they belong."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def free_memory(self) -> None:
        """Give cached device and pinned memory back, e.g. before the car drives away."""
        if self.is_gpu:
            self.xp.get_default_memory_pool().free_all_blocks()
            self.xp.get_default_pinned_memory_pool().free_all_blocks()


def numpy_backend() -> Backend:
    """The always-available CPU backend."""
    return Backend(name="numpy", xp=np)


def _load_cupy() -> ModuleType | None:
    """Import CuPy and check for a usable GPU; None when either is missing.

    ``getDeviceCount`` raises (not returns 0) when there is no driver, so any error
    from it means "no GPU" rather than a crash of the worker.
    """
    try:
        import cupy
    except ImportError:
        return None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return None
    return cupy if count > 0 else None


def select_backend(prefer: str = "auto") -> Backend:
    """Pick a backend: "auto" (CuPy if a GPU is usable), "cupy" (required) or "numpy"."""
    if prefer not in PREFERENCES:
        raise ConfigError(f"backend must be one of {PREFERENCES}, not {prefer!r}")
    if prefer == "numpy":
        return numpy_backend()
    cupy = _load_cupy()
    if cupy is not None:
        return Backend(name="cupy", xp=cupy)
    if prefer == "cupy":
        raise ConfigError("backend 'cupy' requested but CuPy or a CUDA GPU is not available")
    return numpy_backend()


def available_backends() -> tuple[Backend, ...]:
    """Every backend usable on this machine, NumPy first (for parity checks)."""
    cupy = _load_cupy()
    gpu = (Backend(name="cupy", xp=cupy),) if cupy is not None else ()
    return (numpy_backend(), *gpu)
