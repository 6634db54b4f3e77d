# SPDX-License-Identifier: Apache-2.0
"""Ed25519 keys for signed work: gateways sign assignments and vehicles verify them;
vehicles sign results with their own keys and gateways verify those.

Keys are files: a private key is the 32-byte seed in hex (mode 0600), a public key the
32-byte key in hex. ``parkpool keys generate DIR`` writes a pair. Several public keys may
be trusted at once, so a signing key can be rotated without a flag day.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from parkpool.runtime.keyfiles import read_key_file, write_key_pair
from parkpool.schemas.errors import ConfigError
from parkpool.schemas.messages import Assignment, Result
from parkpool.schemas.signing import assignment_digest_input, result_digest_input

NONCE_BYTES = 16


@dataclass(frozen=True)
class TaskSigner:
    """A gateway's signing key; its repr never shows the key."""

    _key: Ed25519PrivateKey

    def __repr__(self) -> str:
        return "TaskSigner(<secret>)"

    @classmethod
    def load(cls, path: Path) -> TaskSigner:
        seed = read_key_file(path, "private")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def sign(self, assignment: Assignment) -> Assignment:
        """The assignment with a fresh nonce and its signature."""
        unsigned = replace(assignment, nonce=secrets.token_bytes(NONCE_BYTES), signature=b"")
        signature = self._key.sign(assignment_digest_input(unsigned))
        return replace(unsigned, signature=signature)


@dataclass(frozen=True)
class TaskVerifier:
    """The public keys a vehicle trusts to issue its work."""

    keys: tuple[Ed25519PublicKey, ...]

    @classmethod
    def load(cls, paths: Iterable[Path]) -> TaskVerifier:
        keys = tuple(Ed25519PublicKey.from_public_bytes(read_key_file(p, "public")) for p in paths)
        if not keys:
            raise ConfigError("no trusted task-signing key given")
        return cls(keys)

    def verify(self, assignment: Assignment) -> bool:
        if not assignment.signature or not assignment.nonce:
            return False
        message = assignment_digest_input(replace(assignment, signature=b""))
        for key in self.keys:
            try:
                key.verify(assignment.signature, message)
            except InvalidSignature:
                continue
            return True
        return False


@dataclass(frozen=True)
class ResultSigner:
    """A vehicle's own key, which signs its results; its repr never shows the key."""

    _key: Ed25519PrivateKey

    def __repr__(self) -> str:
        return "ResultSigner(<secret>)"

    @classmethod
    def load(cls, path: Path) -> ResultSigner:
        return cls(Ed25519PrivateKey.from_private_bytes(read_key_file(path, "private")))

    def sign(self, result: Result) -> Result:
        unsigned = replace(result, signature=b"")
        return replace(unsigned, signature=self._key.sign(result_digest_input(unsigned)))


class VehicleKeys:
    """The public keys of enrolled vehicles (``<dir>/<vehicle id>.pub``), read on first
    use; a gateway checks every result against its sender's key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, Ed25519PublicKey | None] = {}

    def check(self, result: Result) -> str | None:
        """None when the result is signed by its vehicle's key, else why not."""
        key = self._key(result.vehicle_id)
        if key is None:
            return "unknown_vehicle_key"
        try:
            key.verify(result.signature, result_digest_input(replace(result, signature=b"")))
        except InvalidSignature:
            return "bad_signature"
        return None

    def _key(self, vehicle_id: str) -> Ed25519PublicKey | None:
        if vehicle_id not in self._keys:
            path = self.directory / f"{vehicle_id}.pub"
            try:
                raw = read_key_file(path, "public")
            except ConfigError:
                return None  # not enrolled (yet): not cached, so enrolling takes effect
            self._keys[vehicle_id] = Ed25519PublicKey.from_public_bytes(raw)
        return self._keys[vehicle_id]


def generate(directory: Path, name: str = "task-signing") -> tuple[Path, Path]:
    """Write a new key pair: ``NAME.key`` (private, 0600) and ``NAME.pub``."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    return write_key_pair(directory, name, key.private_bytes_raw(), public)
