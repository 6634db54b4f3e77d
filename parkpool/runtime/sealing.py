# SPDX-License-Identifier: Apache-2.0
"""Sealing confidential jobs (the format is in ``schemas.sealing``): X25519 box keys,
HKDF-SHA256 and ChaCha20-Poly1305, all from ``cryptography``.

Each party holds one box key:

* the gateways share one (``--box-key``; several may be given while rotating);
* each car makes a fresh one when its worker starts and announces the public half in
  its pulls, so a stolen car's key opens nothing it was not sent while it ran;
* each SDK client makes a fresh one (or loads ``reply_box_key``) for its results.

Anything that does not open raises ``DecodeError("unsealable", ...)``: the wire's one
error for bytes that are not what they claim to be.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from parkpool.runtime.keyfiles import read_key_file, write_key_pair
from parkpool.schemas.codec import decode_arrays, encode_arrays
from parkpool.schemas.errors import DecodeError
from parkpool.schemas.messages import Result, TaskChunk
from parkpool.schemas.sealing import (
    KEY_BYTES,
    NONCE,
    SEAL_INFO,
    SEAL_OVERHEAD,
    inputs_context,
    inputs_key_context,
    outputs_context,
)


@dataclass(frozen=True)
class BoxKey:
    """A private X25519 key; its repr never shows the key."""

    _key: X25519PrivateKey

    def __repr__(self) -> str:
        return "BoxKey(<secret>)"

    @classmethod
    def generate(cls) -> BoxKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> BoxKey:
        return cls(X25519PrivateKey.from_private_bytes(read_key_file(path, "private")))

    @property
    def public(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def open(self, sealed: bytes, context: bytes) -> bytes:
        """The plaintext of ``seal(self.public, plaintext, context)``."""
        if len(sealed) < SEAL_OVERHEAD:
            raise DecodeError("unsealable", f"{len(sealed)} bytes is shorter than a seal")
        ephemeral = sealed[:KEY_BYTES]
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        except ValueError:  # a low-order point: no shared secret exists
            raise DecodeError("unsealable", "the sender's key is not a usable point") from None
        key = _derive(shared, ephemeral, self.public)
        return _decrypt(key, sealed[KEY_BYTES:], context)


def seal(recipient: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient``'s key reads it."""
    ephemeral = X25519PrivateKey.generate()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        raise DecodeError("unsealable", "the recipient's key is not a usable point") from None
    mine = ephemeral.public_key().public_bytes_raw()
    key = _derive(shared, mine, recipient)
    return mine + ChaCha20Poly1305(key).encrypt(NONCE, plaintext, context)


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=SEAL_INFO + ephemeral + recipient)
    return hkdf.derive(shared)


def _decrypt(key: bytes, ciphertext: bytes, context: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE, ciphertext, context)
    except InvalidTag:
        raise DecodeError("unsealable", "wrong key, or the sealed bytes were altered") from None


# ---------------------------------------------------------------- the producer


def seal_task(task: TaskChunk, gateway_key: bytes, reply_key: bytes) -> TaskChunk:
    """The task with its inputs encrypted, their key sealed to the gateways, and the
    results to be sealed to ``reply_key``."""
    data_key = secrets.token_bytes(KEY_BYTES)
    job, chunk = task.job_id, task.chunk_id
    sealed = ChaCha20Poly1305(data_key).encrypt(
        NONCE, encode_arrays(task.inputs), inputs_context(job, chunk)
    )
    wrapped = seal(gateway_key, data_key, inputs_key_context(job, chunk))
    return replace(task, inputs={}, sealed_inputs=sealed, inputs_key=wrapped, reply_key=reply_key)


def open_result(result: Result, reply: BoxKey) -> Result:
    """The result with its outputs in clear; unchanged when it was not sealed."""
    if not result.sealed_outputs:
        return result
    plain = reply.open(result.sealed_outputs, outputs_context(result.job_id, result.chunk_id))
    return replace(result, outputs=decode_arrays(plain), sealed_outputs=b"")


# ---------------------------------------------------------------- the gateway


@dataclass(frozen=True)
class GatewayBox:
    """The gateways' box keys: the newest first, older ones kept while rotating. With
    none, every confidential task is refused: no car could ever run it from here."""

    keys: tuple[BoxKey, ...]

    @classmethod
    def load(cls, paths: Iterable[Path]) -> GatewayBox:
        return cls(tuple(BoxKey.load(path) for path in paths))

    def rewrap(self, task: TaskChunk, car_key: bytes) -> bytes:
        """The task's data key, sealed to one car instead of to the gateways.

        Raises DecodeError ``unsealable`` when no key of ours opens the task (the task's
        fault: no car could ever run it from here), and ``bad_box_key`` when the car's
        key is one nothing can be sealed to (the car's fault: another car can run it).
        """
        context = inputs_key_context(task.job_id, task.chunk_id)
        data_key = self._open(task.inputs_key, context)
        try:
            return seal(car_key, data_key, context)
        except DecodeError as exc:
            raise DecodeError("bad_box_key", exc.detail) from None

    def _open(self, inputs_key: bytes, context: bytes) -> bytes:
        refusal = DecodeError("unsealable", "this gateway holds no box key (--box-key)")
        for key in self.keys:
            try:
                return key.open(inputs_key, context)
            except DecodeError as exc:
                refusal = exc
        raise refusal


# ---------------------------------------------------------------- the car


def open_task(task: TaskChunk, inputs_key: bytes, car: BoxKey) -> TaskChunk:
    """The task with its inputs in clear; unchanged when it was not sealed."""
    if not task.sealed_inputs:
        return task
    job, chunk = task.job_id, task.chunk_id
    data_key = car.open(inputs_key, inputs_key_context(job, chunk))
    plain = _decrypt(data_key, task.sealed_inputs, inputs_context(job, chunk))
    return replace(task, inputs=decode_arrays(plain), sealed_inputs=b"", inputs_key=b"")


def seal_outputs(result: Result, reply_key: bytes) -> Result:
    """The result with its outputs sealed to the producer's ``reply_key``."""
    plain = encode_arrays(result.outputs)
    sealed = seal(reply_key, plain, outputs_context(result.job_id, result.chunk_id))
    return replace(result, outputs={}, sealed_outputs=sealed)


# ---------------------------------------------------------------- key files


def generate_box_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a new box key pair: ``NAME.key`` (private, 0600) and ``NAME.pub``."""
    key = X25519PrivateKey.generate()
    return write_key_pair(
        directory, name, key.private_bytes_raw(), key.public_key().public_bytes_raw()
    )
