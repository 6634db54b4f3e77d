# SPDX-License-Identifier: Apache-2.0
"""Finding installed kernel packages, fingerprinting them, and loading their declarations.

``installed()`` reads only package metadata, and ``check_origin`` finds where a module
would be imported from without running it: nothing a package ships is executed until
``load`` is asked for it, so a car can first check a package's files against its
fleet's manifest (``content_hash``) and that the code it is about to import is those
files (``check_origin``), and never run code it has not approved.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from importlib.metadata import Distribution, PathDistribution, distributions
from pathlib import Path, PurePosixPath
from typing import Any

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.plugins import GROUP, KernelPlugin

# Written by the installer, not shipped by the package, so they differ from one install
# of the same wheel to the next (paths, the tool's name).
_INSTALL_RECORDS = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
# What the declaration a car imports is read from: it must be among the hashed files.
_DECLARING_FILES = ("METADATA", "entry_points.txt")
MAX_PACKAGE_BYTES = 1 << 30  # a package larger than this is refused, not read
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InstalledKernel:
    """An entry point of the ``parkpool.kernels`` group, as its package's metadata says;
    ``error`` says why the metadata could not be read (then the rest may be empty)."""

    name: str
    package: str
    version: str
    ref: str  # "package.module:object", the KernelPlugin it names
    dist: Distribution | None = field(default=None, compare=False, repr=False)
    error: str = ""


def installed() -> tuple[InstalledKernel, ...]:
    """Every kernel entry point of every package folder on sys.path, ordered by name;
    a package found twice is listed twice (a car refuses such a name). Nothing is
    imported, and a package whose metadata cannot be read is listed with its error."""
    found: list[InstalledKernel] = []
    seen: set[str] = set()
    for dist in distributions():
        # One folder reached twice (a path entry listed twice) is one package, not two.
        where = os.path.realpath(str(getattr(dist, "_path", id(dist))))
        if where not in seen:
            seen.add(where)
            found += _declared(dist)
    return tuple(sorted(found, key=lambda k: (k.name, canonical(k.package), k.error)))


def _declared(dist: Distribution) -> list[InstalledKernel]:
    try:
        points = [ep for ep in dist.entry_points if ep.group == GROUP]
        package, version = (dist.metadata["Name"], dist.version) if points else ("", "")
    except Exception as exc:  # a half-installed package must not stop anyone else
        return [_unreadable(dist, str(exc))]
    if points and not (isinstance(package, str) and package and isinstance(version, str)):
        return [_unreadable(dist, "its METADATA has no Name or Version")]
    return [InstalledKernel(ep.name, package, version, ep.value, dist) for ep in points]


def _unreadable(dist: Distribution, why: str) -> InstalledKernel:
    return InstalledKernel("", "", "", "", dist, error=f"{getattr(dist, '_path', '?')}: {why}")


def canonical(package: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): case and -_. do not count."""
    return re.sub(r"[-_.]+", "-", package).lower()


def content_hash(dist: Distribution) -> str:
    """SHA-256 over the package's files as they are on disk now: every file its RECORD
    lists, and every file in the folders it installed, so an altered, added or removed
    file changes it. Bytecode caches and the installer's own records are left out, as
    they differ between installs of one wheel. ValidationError("unhashable") where the
    files cannot all be read, or the RECORD does not cover the package's declaration."""
    try:
        root, files = _package_files(dist)
        digest, budget = hashlib.sha256(), MAX_PACKAGE_BYTES
        for relative in sorted(files):
            file_digest, length = _file_digest(root / relative, budget)
            budget -= length
            digest.update(f"{relative}\0{file_digest}\n".encode())
    except ValidationError:
        raise
    except Exception as exc:  # whatever a hostile RECORD makes of it: refused, not a crash
        raise ValidationError("unhashable", f"{getattr(dist, '_path', '')}: {exc}") from None
    return digest.hexdigest()


def package_files(dist: Distribution) -> frozenset[Path]:
    """The absolute paths ``content_hash`` covers."""
    root, files = _package_files(dist)
    return frozenset(Path(os.path.realpath(root / f)) for f in files)


def _package_files(dist: Distribution) -> tuple[Path, set[str]]:
    """(install root, the package's files relative to it, as POSIX paths)."""
    if not isinstance(dist, PathDistribution) or not dist.files:
        raise ValidationError("unhashable", "no RECORD of the package's files")
    info = Path(str(dist._path))  # no public accessor; stable since Python 3.8
    root = info.parent
    listed = {
        PurePosixPath(str(p)).as_posix()
        for p in dist.files
        if _shipped(PurePosixPath(str(p)).parts)
    }
    missing = [f for f in _DECLARING_FILES if f"{info.name}/{f}" not in listed]
    if missing:
        raise ValidationError("unhashable", f"its RECORD does not list its own {missing}")
    folders = {p.split("/")[0] for p in listed if "/" in p and not p.endswith(".dist-info")}
    for folder in folders - {info.name}:
        listed |= _walk(root, folder)
    return root, listed


def _shipped(parts: tuple[str, ...]) -> bool:
    if not parts or ".." in parts or parts[0].startswith("/") or "__pycache__" in parts:
        return False  # console scripts live outside, rewritten per interpreter
    if parts[-1].endswith(".pyc"):
        return False
    return not (parts[0].endswith(".dist-info") and parts[-1] in _INSTALL_RECORDS)


def _walk(root: Path, folder: str) -> set[str]:
    """Every file under ``root/folder``; a linked folder is listed as a file, so hashing
    refuses it rather than following it elsewhere."""
    if (root / folder).is_symlink():
        return {folder}
    found: set[str] = set()
    for directory, dirs, names in os.walk(root / folder):
        linked = [d for d in dirs if Path(directory, d).is_symlink()]
        dirs[:] = [d for d in dirs if d != "__pycache__" and d not in linked]
        for name in [*names, *linked]:
            relative = Path(directory, name).relative_to(root)
            if _shipped(relative.parts):
                found.add(relative.as_posix())
    return found


def _file_digest(path: Path, budget: int) -> tuple[str, int]:
    """The file's SHA-256 and length, read in chunks; ValueError past ``budget`` bytes
    (the package's size limit, less what its other files took)."""
    if not path.exists() and not path.is_symlink():
        raise ValidationError("files_missing", f"{path} is gone")
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    digest, length = hashlib.sha256(), 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            length += len(chunk)
            if length > budget:
                raise ValueError(f"the package is larger than {MAX_PACKAGE_BYTES} bytes")
            digest.update(chunk)
    return digest.hexdigest(), length


def check_origin(ref: str, allowed: frozenset[Path]) -> None:
    """Refuse (ValidationError "shadowed") unless importing the module of ``ref`` would
    run only files in ``allowed``: each package on its dotted path, and the module, is
    found as the import system would find it, without running anything, so a module
    earlier on sys.path, or a file added beside the approved ones, is caught."""
    module = ref.partition(":")[0]
    search: list[str] | None = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        origin, search = _origin(name, search)
        if origin is None or Path(os.path.realpath(origin)) not in allowed:
            raise ValidationError("shadowed", f"{name} would be imported from {origin}")


def _origin(name: str, search: list[str] | None) -> tuple[str | None, list[str] | None]:
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        return origin, list(getattr(loaded, "__path__", []) or []) or None
    spec = PathFinder.find_spec(name, search)
    if spec is None or not spec.has_location:
        return None, None  # not found, a namespace package, or not from a file
    locations = spec.submodule_search_locations
    return spec.origin, list(locations) if locations is not None else None


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
