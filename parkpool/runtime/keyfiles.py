# SPDX-License-Identifier: Apache-2.0
"""Key files: 32 raw bytes in hex, the private half mode 0600 and the public beside it.

Signing keys (Ed25519) and box keys (X25519) share the format, so one reader and one
writer serve both, and a key is easy to inspect and to move with ordinary tools.
"""

from __future__ import annotations

import os
from pathlib import Path

from parkpool.schemas.errors import ConfigError

KEY_BYTES = 32


def write_key_pair(directory: Path, name: str, private: bytes, public: bytes) -> tuple[Path, Path]:
    """``NAME.key`` (the private bytes in hex, mode 0600) and ``NAME.pub`` beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    # Both halves are written aside, then moved in: a failure between them (a full
    # disk) must not leave a new private key beside the old public one.
    staged_private, staged_public = (
        p.with_name(f".{p.name}.new") for p in (private_path, public_path)
    )
    fd = os.open(staged_private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies to a new file only, not one replaced
    with os.fdopen(fd, "w") as out:
        out.write(private.hex() + "\n")
    staged_public.write_text(public.hex() + "\n")
    os.replace(staged_public, public_path)
    os.replace(staged_private, private_path)
    return private_path, public_path


def read_key_file(path: Path, kind: str) -> bytes:
    """A 32-byte key written in hex, as ``write_key_pair`` leaves it."""
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {kind} key {path}: {exc}") from exc
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{kind} key {path} must be {KEY_BYTES} bytes in hex, not {len(raw)}")
    return raw
