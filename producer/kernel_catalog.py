# SPDX-License-Identifier: Apache-2.0
"""The kernels this SDK can plan: the built-ins, and every kernel package installed here.

All of them are ``KernelPlugin`` declarations, looked up one way. A plugin is imported
the first time its name is asked for, and its contract then joins ``schemas.kernels``,
so submit-time checks treat it exactly as a built-in. The SDK trusts what is installed
in its own environment: that is its user's choice. Cars do not: they run only what
their fleet's signed manifest approves (``worker.kernel_loading``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from parkpool.runtime.plugins import canonical, installed, load, resolve
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import KernelSpec, register_spec
from parkpool.schemas.kernels_builtin import BUILTINS, PACKAGE
from parkpool.schemas.plugins import KernelPlugin

__all__ = ["contract", "names", "planner", "plugin", "split_hint"]

Planner = Callable[..., Any]  # (**arrays and options) -> producer.plans.JobPlan

_lock = threading.Lock()
_plugins: dict[str, KernelPlugin] = dict(BUILTINS)
_planners: dict[str, Planner] = {}


def names() -> tuple[str, ...]:
    """Every kernel name that can be planned here, sorted; nothing is imported, and a
    package whose metadata cannot be read is left out."""
    return tuple(sorted(set(_plugins) | {k.name for k in installed() if not k.error}))


def plugin(name: str) -> KernelPlugin:
    """The declaration of kernel ``name``, importing its package on first use.

    ValidationError: ``unknown_kernel`` where no installed package declares it,
    ``name_taken`` where two do, ``load_failed`` where its declaration cannot be had.
    The import runs outside the lock: a package may look kernels up while it loads.
    """
    with _lock:
        known = _plugins.get(name)
    if known is not None:
        return known
    candidates = [
        k for k in installed() if k.name == name and not k.error and canonical(k.package) != PACKAGE
    ]
    if not candidates:
        choices = ", ".join(names())
        raise ValidationError("unknown_kernel", f"no kernel named {name!r}; known: {choices}")
    if len(candidates) > 1:
        packages = ", ".join(k.package for k in candidates)
        raise ValidationError("name_taken", f"kernel {name!r} is declared by {packages}")
    declared = load(candidates[0])
    with _lock:
        if name not in _plugins:  # another thread may have loaded it meanwhile
            register_spec(declared.spec)
            _plugins[name] = declared
        return _plugins[name]


def contract(name: str) -> KernelSpec:
    """Kernel ``name``'s contract, known to ``schemas.kernels`` from now on."""
    return plugin(name).spec


def planner(name: str) -> Planner:
    """The function that splits a job for kernel ``name`` into a ``JobPlan``."""
    declared = plugin(name)
    with _lock:
        known = _planners.get(name)
    if known is not None:
        return known
    try:
        found: Planner = resolve(declared.planner)
    except Exception as exc:  # a broken package is refused by name, not a crash
        detail = f"{declared.planner}: {type(exc).__name__}: {exc}"
        raise ValidationError("load_failed", detail) from exc
    with _lock:
        return _planners.setdefault(name, found)


def split_hint(name: str) -> str:
    """How to make the chunks of kernel ``name`` small enough for one Kafka record."""
    with _lock:
        known = _plugins.get(name)
    return known.split_hint if known is not None else "smaller chunks"
