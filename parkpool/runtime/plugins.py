# SPDX-License-Identifier: Apache-2.0
"""Finding installed kernel packages, fingerprinting them, and loading their declarations.

``installed()`` reads only package metadata: nothing a package ships is imported until
``load`` is asked for it, so a car can check a package's files against its fleet's
manifest first (``content_hash``) and never run code it has not approved.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass, field
from importlib.metadata import Distribution, PackagePath, entry_points
from pathlib import Path
from typing import Any

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.plugins import GROUP, KernelPlugin

# Written by the installer, not shipped by the package, so they differ from one install
# of the same wheel to the next (paths, the tool's name); RECORD lists the others.
_INSTALL_RECORDS = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


@dataclass(frozen=True)
class InstalledKernel:
    """An entry point of the ``parkpool.kernels`` group, as its package's metadata says."""

    name: str
    package: str
    version: str
    ref: str  # "package.module:object", the KernelPlugin it names
    dist: Distribution | None = field(default=None, compare=False, repr=False)


def installed() -> tuple[InstalledKernel, ...]:
    """Every kernel entry point on sys.path, ordered by name; nothing is imported."""
    found = [
        InstalledKernel(ep.name, ep.dist.name, ep.dist.version, ep.value, ep.dist)
        if ep.dist is not None
        else InstalledKernel(ep.name, "", "", ep.value)
        for ep in entry_points(group=GROUP)
    ]
    return tuple(sorted(found, key=lambda k: (k.name, canonical(k.package))))


def canonical(package: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): case and -_. do not count."""
    return re.sub(r"[-_.]+", "-", package).lower()


def content_hash(dist: Distribution) -> str:
    """SHA-256 over every file the package installed (by RECORD) and its bytes as read
    now, so an altered, added-to-RECORD or missing file changes it; bytecode caches and
    the installer's own records are left out, as they differ between installs of one
    wheel. ValidationError("unhashable") where no RECORD lists the files."""
    files = dist.files
    if not files:
        raise ValidationError("unhashable", f"{dist.name} has no RECORD of its files")
    digest = hashlib.sha256()
    for path in sorted((p for p in files if _shipped(p)), key=str):
        try:
            body = Path(path.locate()).read_bytes()
        except OSError as exc:
            raise ValidationError("files_missing", f"{dist.name}: {path}: {exc}") from None
        digest.update(f"{path.as_posix()}\0{hashlib.sha256(body).hexdigest()}\n".encode())
    return digest.hexdigest()


def _shipped(path: PackagePath) -> bool:
    parts = path.parts
    if ".." in parts or "__pycache__" in parts or path.suffix == ".pyc":
        return False  # console scripts are rewritten for each interpreter; caches vary
    return not (parts[0].endswith(".dist-info") and path.name in _INSTALL_RECORDS)


def resolve(ref: str) -> Any:
    """The object ``package.module:attribute`` names, importing its module."""
    module, _, attribute = ref.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def load(kernel: InstalledKernel) -> KernelPlugin:
    """Import an entry point's declaration; ValidationError("load_failed") if it cannot
    be imported or is not the ``KernelPlugin`` of the kernel it is named for."""
    try:
        plugin = resolve(kernel.ref)
    except Exception as exc:  # a broken package must not take the process down
        detail = f"{kernel.package} {kernel.ref}: {type(exc).__name__}: {exc}"
        raise ValidationError("load_failed", detail) from exc
    if not isinstance(plugin, KernelPlugin) or plugin.name != kernel.name:
        detail = f"{kernel.ref} is not the KernelPlugin of {kernel.name!r}"
        raise ValidationError("load_failed", detail)
    return plugin
