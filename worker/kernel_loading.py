# SPDX-License-Identifier: Apache-2.0
"""Which plugin kernels this car runs: those its fleet's signed manifest approves.

A kernel package installed on a car is checked before any of its code is imported: its
entry point must be the only one of its name, approved by name, from the same package,
at the same version; the SHA-256 of its files on disk must equal the approved one; and
each module the car is about to import must resolve to one of those files. Anything
else is refused with a reason, logged and counted, and its kernel is neither registered
nor announced, so gateways send this car none of its tasks. Built-in kernels are
parkpool's own code and need no approval.

What this cannot stop is code that runs before the agent does (a ``.pth`` file or
``sitecustomize`` in the image): that is the image's integrity (docs/SECURITY.md).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from parkpool.runtime import logs
from parkpool.runtime.kernel_manifest import read_verified
from parkpool.runtime.plugins import (
    InstalledKernel,
    canonical,
    check_origin,
    content_hash,
    installed,
    load,
    package_files,
)
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import register_spec
from parkpool.schemas.kernels_builtin import BUILTINS, PACKAGE
from parkpool.schemas.plugins import KernelManifest, KernelPlugin
from parkpool.worker.kernels import REGISTRY, Kernel, register

log = logs.get_logger("parkpool.worker")

# Why a car refused a kernel package (a metric label: a closed set).
REFUSAL_REASONS = (
    "not_allowlisted",  # no manifest, or the manifest does not approve this name/package
    "version_mismatch",  # approved at another version
    "hash_mismatch",  # its files differ from the approved ones
    "files_missing",  # a file its RECORD lists is gone
    "unhashable",  # no usable RECORD, an unreadable or irregular file
    "bad_metadata",  # its metadata cannot be read (a half-installed package)
    "name_taken",  # claims a built-in's name, or another package declares it too
    "shadowed",  # a module it names would be imported from a file it did not ship
    "load_failed",  # approved, but importing its declaration or functions failed
)

_lock = threading.Lock()


@dataclass(frozen=True)
class Refusal:
    """A kernel package this car will not run, and why."""

    name: str
    package: str
    version: str
    reason: str
    detail: str

    @classmethod
    def of(cls, entry: InstalledKernel, reason: str, detail: str) -> Refusal:
        return cls(entry.name, entry.package, entry.version, reason, detail)


@dataclass(frozen=True)
class KernelLoad:
    """What one pass over the installed kernel packages decided."""

    loaded: tuple[str, ...]
    refused: tuple[Refusal, ...]


def load_from_files(manifest: Path | None, keys: Iterable[Path]) -> KernelLoad:
    """Verify the manifest (ConfigError if it does not verify), then load what it
    approves. No manifest: every plugin kernel is refused, built-ins run as ever."""
    approved = read_verified(manifest, keys) if manifest is not None else None
    return load_approved(approved)


def load_approved(manifest: KernelManifest | None) -> KernelLoad:
    """Register every installed plugin kernel ``manifest`` approves; refuse the rest."""
    loaded: list[str] = []
    refused: list[Refusal] = []
    with _lock:  # a simulated fleet's cars share one registry
        entries = [e for e in installed() if canonical(e.package) != PACKAGE or e.error]
        declared = collections.Counter(e.name for e in entries)
        for entry in entries:
            refusal = _refusal(entry, manifest, declared[entry.name]) or _register(entry)
            if refusal is None:
                loaded.append(entry.name)
            else:
                refused.append(refusal)
    for refusal in refused:
        log.warning(
            "kernel_refused",
            kernel=refusal.name,
            package=refusal.package,
            version=refusal.version,
            reason=refusal.reason,
            detail=refusal.detail,
        )
    if loaded:
        log.info("kernels_loaded", kernels=loaded)
    return KernelLoad(tuple(loaded), tuple(refused))


def _refusal(
    entry: InstalledKernel, manifest: KernelManifest | None, declarations: int
) -> Refusal | None:
    """Why ``entry`` may not run here, from its metadata and files alone; None: it may."""
    if entry.error:
        return Refusal.of(entry, "bad_metadata", entry.error)
    if entry.name in BUILTINS or declarations > 1:
        why = "a built-in kernel" if entry.name in BUILTINS else f"declared {declarations} times"
        return Refusal.of(entry, "name_taken", f"{entry.name!r} is {why}")
    approval = manifest.approval(entry.name) if manifest is not None else None
    if approval is None:
        why = "no kernel manifest was given" if manifest is None else "the manifest omits it"
        return Refusal.of(entry, "not_allowlisted", why)
    if canonical(approval.package) != canonical(entry.package):
        return Refusal.of(entry, "not_allowlisted", f"approved from {approval.package}")
    if approval.version != entry.version:
        return Refusal.of(entry, "version_mismatch", f"approved at {approval.version}")
    return _altered(entry, approval.sha256)


def _altered(entry: InstalledKernel, approved: str) -> Refusal | None:
    """Why the package's files are not the approved ones; None: they are."""
    try:
        digest = content_hash(entry.dist) if entry.dist is not None else "no package metadata"
    except ValidationError as exc:
        return Refusal.of(entry, exc.reason, exc.detail)
    if digest == approved:
        return None
    detail = f"its files hash to {digest}, the manifest approves {approved}"
    return Refusal.of(entry, "hash_mismatch", detail)


def _register(entry: InstalledKernel) -> Refusal | None:
    """Import an approved kernel, each module only once it is known to come from the
    approved files, and make it runnable here (again: nothing to do)."""
    if entry.name in REGISTRY:
        return None  # this process loaded it already (one more simulated car)
    assert entry.dist is not None  # hashed just before
    try:
        allowed = package_files(entry.dist)
        check_origin(entry.ref, allowed)
        plugin = load(entry)
        _check_refs(plugin, allowed)
        kernel = Kernel.from_plugin(plugin)
        register_spec(plugin.spec)
    except ValidationError as exc:
        return Refusal.of(entry, exc.reason, exc.detail)
    except Exception as exc:  # an approved but broken package must not stop the car
        return Refusal.of(entry, "load_failed", f"{type(exc).__name__}: {exc}")
    register(kernel)
    return None


def _check_refs(plugin: KernelPlugin, allowed: frozenset[Path]) -> None:
    for ref in (plugin.device, plugin.reference, plugin.cupy):
        if ref:
            check_origin(ref, allowed)
