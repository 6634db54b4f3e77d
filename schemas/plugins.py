# SPDX-License-Identifier: Apache-2.0
"""How a kernel is declared, and what a fleet operator signs to let cars run it.

A kernel package, built in or not, declares each kernel as a ``KernelPlugin`` object
named by an entry point in the ``parkpool.kernels`` group. The declaration carries the
contract (``KernelSpec``: inputs, checks, tolerance, cost) and *names*, not objects, of
the code each side runs: the planner the SDK calls, and the device function and NumPy
reference a car runs. Names keep the sides apart: the SDK never imports a car's code,
and a car checks a package's files before importing any of them.

A ``KernelManifest`` is the fleet's allowlist: package, version and content hash of each
approved kernel. ``manifest_digest_input`` gives the exact bytes its Ed25519 signature
covers, so any implementation of a car can verify it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.kernels import KernelSpec

GROUP = "parkpool.kernels"  # the entry-point group every kernel package declares
MANIFEST_DOMAIN = b"parkpool/kernel-manifest/v1\x00"  # never valid as another message
MANIFEST_VERSION = 1
# A car announces at most 256 kernels in a pull (Capabilities), the built-ins included.
MAX_APPROVALS = 200

# "package.module:attribute", as entry points name objects.
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class KernelPlugin:
    """One kernel, as a package declares it.

    ``device`` is called as ``fn(xp, params, inputs)`` with ``xp`` NumPy or CuPy, or, if
    ``sliced``, as ``fn(xp, params, inputs, tick)``, calling ``tick()`` before each
    bounded slice of work so the owner can take the car back (docs/KERNELS.md). ``cupy``
    names a CuPy-only implementation used instead where the car has a GPU. ``planner``
    takes the job's arrays and options as keywords and returns a ``JobPlan``.
    """

    spec: KernelSpec
    planner: str
    device: str
    reference: str
    cupy: str = ""
    sliced: bool = False
    split_hint: str = "smaller chunks"  # how to make a chunk too large for Kafka smaller

    def __post_init__(self) -> None:
        if not isinstance(self.spec, KernelSpec) or not _NAME.match(self.spec.name):
            raise ValidationError("bad_plugin", f"{self.spec!r} is not a named KernelSpec")
        refs = {"planner": self.planner, "device": self.device, "reference": self.reference}
        for field, ref in (refs | ({"cupy": self.cupy} if self.cupy else {})).items():
            _check_ref(field, ref)

    @property
    def name(self) -> str:
        return self.spec.name


def _check_ref(field: str, ref: str) -> None:
    if not isinstance(ref, str) or not _REF.match(ref):
        raise ValidationError("bad_plugin", f"{field} {ref!r} is not 'package.module:name'")


@dataclass(frozen=True)
class KernelApproval:
    """One approved kernel: the package that provides it, exactly which release, and the
    SHA-256 of its installed files (``parkpool.runtime.plugins.content_hash``)."""

    name: str
    package: str
    version: str
    sha256: str

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and _NAME.match(self.name)):
            raise ValidationError("bad_manifest", f"kernel name {self.name!r} is not valid")
        for field in ("package", "version"):
            value = getattr(self, field)
            if not isinstance(value, str) or not 0 < len(value) <= 200:
                raise ValidationError("bad_manifest", f"{field} {value!r} is not valid")
        if not (isinstance(self.sha256, str) and _SHA256.match(self.sha256)):
            raise ValidationError("bad_manifest", f"sha256 {self.sha256!r} is not 64 hex digits")


@dataclass(frozen=True)
class KernelManifest:
    """The fleet operator's allowlist of plugin kernels, as signed."""

    approvals: tuple[KernelApproval, ...]
    issued_at: float = 0.0  # seconds since the epoch; for people reading it
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.version != MANIFEST_VERSION:
            raise ValidationError("bad_manifest", f"manifest version {self.version!r} unknown")
        if len(self.approvals) > MAX_APPROVALS:
            raise ValidationError("bad_manifest", f"more than {MAX_APPROVALS} approvals")
        names = [a.name for a in self.approvals]
        if len(set(names)) != len(names):
            raise ValidationError("bad_manifest", "a kernel name is approved twice")

    def approval(self, name: str) -> KernelApproval | None:
        return next((a for a in self.approvals if a.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "issued_at": self.issued_at,
            "kernels": [
                {"name": a.name, "package": a.package, "version": a.version, "sha256": a.sha256}
                for a in self.approvals
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> KernelManifest:
        """Parse the manifest's body; ValidationError("bad_manifest") for any wrong shape."""
        if not isinstance(data, Mapping) or not isinstance(data.get("kernels"), list):
            raise ValidationError("bad_manifest", "a manifest is an object with a kernels list")
        try:
            approvals = tuple(KernelApproval(**entry) for entry in data["kernels"])
            issued = float(data.get("issued_at", 0.0))
            return cls(approvals, issued, data.get("version", MANIFEST_VERSION))
        except (TypeError, ValueError) as exc:
            raise ValidationError("bad_manifest", f"a manifest entry is malformed: {exc}") from None


def manifest_digest_input(manifest: KernelManifest) -> bytes:
    """The exact bytes a manifest's signature covers: its body as canonical JSON."""
    body = json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":"))
    return MANIFEST_DOMAIN + body.encode()
