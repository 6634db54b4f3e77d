# SPDX-License-Identifier: Apache-2.0
"""The kernels a parked car can run, registered by name, and how one task is executed.

Every kernel is declared as a ``schemas.plugins.KernelPlugin``: its contract (inputs,
validator, tolerance, cost model, shared with the producer) and the names of a function
written against ``xp`` (NumPy or CuPy) and of a plain-NumPy reference. The built-ins'
declarations are ``schemas.kernels_builtin`` and their functions live in
``kernels_linalg``, ``kernels_signal``, ``kernels_sim`` and ``kernels_map``; plugin
kernels join only once their fleet's manifest approves them (``kernel_loading``).
Built-in kernels work in bounded slices and call the caller's checkpoint between them
(see ``kernels_slicing``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from parkpool.runtime.plugins import resolve
from parkpool.schemas.errors import KernelError, Preempted, Reject, Retry, ValidationError
from parkpool.schemas.kernels import (
    FLOAT_DTYPES,
    MAX_GEMM_DIM,
    MAX_MC_SAMPLES,
    MAX_POLY_COEFFS,
    REDUCE_DTYPES,
    REDUCE_OPS,
    Array,
    CheckFn,
    Inputs,
    Params,
    Tolerance,
    check_inputs,
)
from parkpool.schemas.kernels_builtin import BUILTINS
from parkpool.schemas.plugins import KernelPlugin
from parkpool.worker.backend import Backend
from parkpool.worker.kernels_sim import splitmix64
from parkpool.worker.kernels_slicing import SLICES, Checkpoint, Pacer

__all__ = [
    "BUILTIN",
    "FLOAT_DTYPES",
    "MAX_GEMM_DIM",
    "MAX_MC_SAMPLES",
    "MAX_POLY_COEFFS",
    "MC_BATCH",
    "REDUCE_DTYPES",
    "REDUCE_OPS",
    "REGISTRY",
    "Kernel",
    "Tolerance",
    "execute",
    "get_kernel",
    "reference",
    "register",
    "splitmix64",
]

DeviceInputs = Mapping[str, Any]  # the task's arrays on the backend (xp) device
KernelFn = Callable[..., dict[str, Any]]  # (xp, params, inputs[, tick]) -> outputs
ReferenceFn = Callable[[Params, Inputs], dict[str, Array]]
MC_BATCH = SLICES.mc_batch  # monte_carlo_pi samples per slice

# Errors that already say what should happen to the task; wrapping them would hide that.
_PASS_THROUGH = (ValidationError, KernelError, Retry, Reject, Preempted)


@dataclass(frozen=True)
class Kernel:
    """A named computation: device function, validator, reference and tolerance.

    ``fn(xp, params, inputs)`` runs as one unit; a ``sliced`` kernel is called as
    ``fn(xp, params, inputs, tick)`` and calls ``tick()`` before each slice of work.
    """

    name: str
    fn: KernelFn
    tolerance: Tolerance
    required_inputs: tuple[str, ...]
    check: CheckFn
    reference_fn: ReferenceFn
    sliced: bool = False
    optional_inputs: tuple[str, ...] = ()
    cupy_fn: KernelFn | None = None  # used instead of fn where the backend is CuPy

    @classmethod
    def from_plugin(cls, plugin: KernelPlugin) -> Kernel:
        """The kernel a declaration describes, importing the functions it names."""
        spec = plugin.spec
        return cls(
            spec.name,
            resolve(plugin.device),
            spec.tolerance,
            spec.required_inputs,
            spec.check,
            resolve(plugin.reference),
            sliced=plugin.sliced,
            optional_inputs=spec.optional_inputs,
            cupy_fn=resolve(plugin.cupy) if plugin.cupy else None,
        )

    def validate(self, params: Params, inputs: Inputs) -> None:
        """Raise ValidationError(reason, detail) unless the task can run as given."""
        check_inputs(self.name, self.required_inputs, self.optional_inputs, params, inputs)
        self.check(params, inputs)

    def matches(self, actual: Mapping[str, Array], expected: Mapping[str, Array]) -> bool:
        """Whether every output in ``actual`` is within tolerance of ``expected``."""
        if set(actual) != set(expected):
            return False
        return all(self.tolerance.allclose(actual[k], expected[k]) for k in expected)


_KERNELS_BY_NAME: dict[str, Kernel] = {
    name: Kernel.from_plugin(plugin) for name, plugin in BUILTINS.items()
}
BUILTIN: tuple[str, ...] = tuple(_KERNELS_BY_NAME)
REGISTRY: Mapping[str, Kernel] = MappingProxyType(_KERNELS_BY_NAME)


def register(kernel: Kernel) -> None:
    """Add a kernel to this process's registry; a name can be registered only once."""
    if kernel.name in _KERNELS_BY_NAME:
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    _KERNELS_BY_NAME[kernel.name] = kernel


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; ValidationError("unknown_kernel") otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValidationError("unknown_kernel", f"no kernel named {name!r}") from None


def reference(name: str, params: Params, inputs: Inputs) -> dict[str, Array]:
    """Run the plain-NumPy reference of a kernel (validated like ``execute``)."""
    kernel = get_kernel(name)
    kernel.validate(params, inputs)
    return kernel.reference_fn(params, inputs)


def execute(
    name: str,
    params: Params,
    inputs: Inputs,
    backend: Backend,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Array]:
    """Validate, copy inputs to the device, run the kernel and copy outputs back.

    ``checkpoint`` is called between the slices of a built-in kernel and may raise
    Preempted, which reaches the caller unwrapped with the device memory already given
    back. Any other failure after validation (device out of memory, a bug in the
    kernel) becomes a KernelError naming the kernel; decisions pass through.
    """
    kernel = get_kernel(name)
    kernel.validate(params, inputs)
    try:
        return _run(kernel, params, inputs, backend, checkpoint)
    except Preempted as exc:
        # The traceback holds the kernel's frames and so every device array it made;
        # dropping it frees them now, and the pool can hand the memory back at once.
        exc.with_traceback(None)
        backend.free_memory()
        raise
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise KernelError(f"kernel {name!r} failed on {backend.name}: {detail}") from exc


def _run(
    kernel: Kernel,
    params: Params,
    inputs: Inputs,
    backend: Backend,
    checkpoint: Checkpoint | None,
) -> dict[str, Array]:
    device_inputs = {key: backend.to_device(value) for key, value in inputs.items()}
    fn = kernel.cupy_fn if kernel.cupy_fn is not None and backend.name == "cupy" else kernel.fn
    if kernel.sliced:
        tick = Pacer(backend.xp, checkpoint).tick
        device_outputs = fn(backend.xp, params, device_inputs, tick)
    else:
        device_outputs = fn(backend.xp, params, device_inputs)
    return {key: backend.to_host(value) for key, value in device_outputs.items()}
