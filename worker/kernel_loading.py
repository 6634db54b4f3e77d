# SPDX-License-Identifier: Apache-2.0
"""Which plugin kernels this car runs: those its fleet's signed manifest approves.

A kernel package installed on a car is checked before any of its code is imported: its
entry point must be approved by name, from the same package, at the same version, and
the SHA-256 of its installed files must equal the approved one. Anything else is
refused with a reason, logged and counted, and its kernel is neither registered nor
announced, so gateways send this car none of its tasks. Built-in kernels are parkpool's
own code and need no approval.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from parkpool.runtime import logs
from parkpool.runtime.kernel_manifest import read_verified
from parkpool.runtime.plugins import InstalledKernel, canonical, content_hash, installed, load
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import register_spec
from parkpool.schemas.kernels_builtin import BUILTINS, PACKAGE
from parkpool.schemas.plugins import KernelManifest
from parkpool.worker.kernels import REGISTRY, Kernel, register

log = logs.get_logger("parkpool.worker")

# Why a car refused a kernel package (a metric label: a closed set).
REFUSAL_REASONS = (
    "not_allowlisted",  # no manifest, or the manifest does not approve this name/package
    "version_mismatch",  # approved at another version
    "hash_mismatch",  # its files differ from the approved ones
    "files_missing",  # a file its RECORD lists is gone
    "unhashable",  # no RECORD to say which files are its own
    "name_taken",  # claims a built-in kernel's name
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
        for entry in installed():
            if canonical(entry.package) == PACKAGE:
                continue  # a built-in: registered when worker.kernels was imported
            refusal = _refusal(entry, manifest) or _register(entry)
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


def _refusal(entry: InstalledKernel, manifest: KernelManifest | None) -> Refusal | None:
    """Why ``entry`` may not run here, from its metadata and files alone; None: it may."""

    def refuse(reason: str, detail: str) -> Refusal:
        return Refusal(entry.name, entry.package, entry.version, reason, detail)

    if entry.name in BUILTINS:
        return refuse("name_taken", f"{entry.name!r} is a built-in kernel")
    approval = manifest.approval(entry.name) if manifest is not None else None
    if approval is None:
        why = "no kernel manifest was given" if manifest is None else "the manifest omits it"
        return refuse("not_allowlisted", why)
    if canonical(approval.package) != canonical(entry.package):
        return refuse("not_allowlisted", f"the manifest approves it from {approval.package}")
    if approval.version != entry.version:
        return refuse("version_mismatch", f"the manifest approves version {approval.version}")
    return _altered(entry, approval.sha256)


def _altered(entry: InstalledKernel, approved: str) -> Refusal | None:
    """Why the package's files are not the approved ones; None: they are."""
    try:
        digest = content_hash(entry.dist) if entry.dist is not None else "no package metadata"
    except ValidationError as exc:
        return Refusal(entry.name, entry.package, entry.version, exc.reason, exc.detail)
    if digest == approved:
        return None
    detail = f"its files hash to {digest}, the manifest approves {approved}"
    return Refusal(entry.name, entry.package, entry.version, "hash_mismatch", detail)


def _register(entry: InstalledKernel) -> Refusal | None:
    """Import an approved kernel and make it runnable here (again: nothing to do)."""
    if entry.name in REGISTRY:
        return None  # this process loaded it already (one more simulated car)
    try:
        plugin = load(entry)
        kernel = Kernel.from_plugin(plugin)
        register_spec(plugin.spec)
    except Exception as exc:  # an approved but broken package must not stop the car
        detail = f"{type(exc).__name__}: {exc}"
        return Refusal(entry.name, entry.package, entry.version, "load_failed", detail)
    register(kernel)
    return None
