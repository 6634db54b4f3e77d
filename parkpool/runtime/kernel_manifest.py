# SPDX-License-Identifier: Apache-2.0
"""The signed fleet manifest of approved kernels, as a file: write, sign, read, verify.

The file is JSON: ``{"manifest": {...}, "signature": HEX, "public_key": HEX}``. The
signature is Ed25519 over ``schemas.plugins.manifest_digest_input``; the public key is
only a hint for people, since a car checks it against the keys it was configured to
trust (``--kernel-keys``), never against the one the file brings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from parkpool.runtime.keyfiles import read_key_file
from parkpool.schemas.errors import ConfigError, ValidationError
from parkpool.schemas.plugins import KernelManifest, manifest_digest_input

MAX_MANIFEST_BYTES = 1 << 20


def signed(manifest: KernelManifest, key_path: Path) -> dict[str, Any]:
    """The manifest file's content, signed with the private key at ``key_path``."""
    key = Ed25519PrivateKey.from_private_bytes(read_key_file(key_path, "private"))
    return {
        "manifest": manifest.to_json(),
        "signature": key.sign(manifest_digest_input(manifest)).hex(),
        "public_key": key.public_key().public_bytes_raw().hex(),
    }


def read_unsigned(path: Path) -> KernelManifest:
    """A manifest body (as ``parkpool kernels pin`` writes it), for signing."""
    return _parse(path, _load_json(path))


def read_verified(path: Path, key_paths: Iterable[Path]) -> KernelManifest:
    """The manifest at ``path``, once its signature verifies with one of the keys.
    ConfigError, naming the file, for anything else: a car must not start on a
    manifest it cannot trust, rather than run fewer kernels than its operator meant."""
    keys = [Ed25519PublicKey.from_public_bytes(read_key_file(p, "public")) for p in key_paths]
    if not keys:
        raise ConfigError(f"kernel manifest {path}: no --kernel-keys to verify it with")
    document = _load_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("signature"), str):
        raise ConfigError(f"kernel manifest {path}: not a signed manifest (run kernels sign)")
    manifest = _parse(path, document.get("manifest"))
    try:
        signature = bytes.fromhex(document["signature"])
    except ValueError:
        raise ConfigError(f"kernel manifest {path}: the signature is not hex") from None
    if not any(_verifies(key, signature, manifest) for key in keys):
        raise ConfigError(f"kernel manifest {path}: the signature does not verify with any key")
    return manifest


def _verifies(key: Ed25519PublicKey, signature: bytes, manifest: KernelManifest) -> bool:
    try:
        key.verify(signature, manifest_digest_input(manifest))
    except InvalidSignature:
        return False
    return True


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"kernel manifest {path}: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"kernel manifest {path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested a million deep
        raise ConfigError(f"kernel manifest {path}: not JSON: {exc}") from None


def _parse(path: Path, body: Any) -> KernelManifest:
    try:
        return KernelManifest.from_json(body)
    except ValidationError as exc:
        raise ConfigError(f"kernel manifest {path}: {exc}") from None
