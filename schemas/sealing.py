# SPDX-License-Identifier: Apache-2.0
"""Confidential jobs on the wire: what is sealed, to whom, and bound to what.

Part of the contract, so any implementation of a producer, gateway or vehicle can
interoperate. A confidential chunk keeps its inputs and its outputs unreadable to the
brokers (Kafka, Mosquitto), to anything that logs or mirrors their topics, and to every
car but the one running it:

* The producer encrypts the encoded inputs map once, with a fresh 32-byte data key
  (``sealed_inputs``), and seals the data key to the gateways' box key (``inputs_key``).
  It names its own box public key as ``reply_key``.
* The gateway that leases the chunk opens the data key, and seals it again to the
  box key the car announced in its pull (``Assignment.inputs_key``). It never decrypts
  the inputs themselves; the signed assignment carries the car's copy of the key.
* The car opens the data key, decrypts the inputs, runs the kernel, and seals the
  encoded outputs map to ``reply_key`` (``Result.sealed_outputs``). Only the producer
  can read them.

Primitives (all from RFC 7748, 5869 and 8439):

* ``seal(recipient, plaintext, context)`` = ``E || ChaCha20-Poly1305(k, 0^96,
  plaintext, aad=context)`` with ``E`` a fresh X25519 public key, and ``k`` =
  HKDF-SHA256(X25519(e, recipient), salt empty, info = ``SEAL_INFO || E || recipient``).
  Each key ``k`` encrypts one message, so the fixed nonce is never reused.
* Inputs: ``ChaCha20-Poly1305(data_key, 0^96, encode_arrays(inputs), aad=inputs
  context)``; the data key, too, encrypts exactly one message.

Every ciphertext is bound to its job and chunk through its context, so no sealed part
can be moved to another chunk, or from inputs to outputs, without failing to open.
"""

from __future__ import annotations

import msgpack

KEY_BYTES = 32  # X25519 public keys and data keys
TAG_BYTES = 16  # Poly1305
SEAL_OVERHEAD = KEY_BYTES + TAG_BYTES
WRAPPED_KEY_BYTES = KEY_BYTES + SEAL_OVERHEAD  # a data key sealed to a box key
NONCE = bytes(12)  # safe only because every key encrypts a single message

SEAL_INFO = b"parkpool/seal/v1\x00"
_INPUTS = b"parkpool/inputs/v1\x00"
_INPUTS_KEY = b"parkpool/inputs-key/v1\x00"
_OUTPUTS = b"parkpool/outputs/v1\x00"


def _bound(domain: bytes, job_id: str, chunk_id: int) -> bytes:
    packed: bytes = msgpack.packb([job_id, chunk_id], use_bin_type=True)
    return domain + packed


def inputs_context(job_id: str, chunk_id: int) -> bytes:
    """The associated data of a chunk's encrypted inputs."""
    return _bound(_INPUTS, job_id, chunk_id)


def inputs_key_context(job_id: str, chunk_id: int) -> bytes:
    """The associated data of a chunk's data key, sealed to a gateway or to a car."""
    return _bound(_INPUTS_KEY, job_id, chunk_id)


def outputs_context(job_id: str, chunk_id: int) -> bytes:
    """The associated data of a chunk's outputs, sealed to the producer."""
    return _bound(_OUTPUTS, job_id, chunk_id)
