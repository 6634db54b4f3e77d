# SPDX-License-Identifier: Apache-2.0
"""What a gateway signs when it issues work: the canonical bytes of an assignment.

Part of the wire contract, so any implementation of a vehicle can verify. The signature
covers who issued it, to whom, under which lease (epoch, attempt, deadline), a fresh
nonce, a SHA-256 of the task bytes exactly as they travel, a confidential task's data key
as sealed to the car, and the store URLs the car may fetch from and upload to; changing
any of them breaks it. The primitive is
Ed25519 (RFC 8032), with 32-byte public keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack

from parkpool.schemas.codec import encode
from parkpool.schemas.messages import Assignment, Result

ASSIGNMENT_DOMAIN = b"parkpool/assignment/v1\x00"  # never valid as another kind of message
RESULT_DOMAIN = b"parkpool/result/v1\x00"


def assignment_digest_input(assignment: Assignment) -> bytes:
    """The exact bytes an assignment's signature is computed over."""
    fields = [
        assignment.gateway_id,
        assignment.vehicle_id,
        assignment.epoch,
        assignment.attempt,
        assignment.lease_deadline,
        assignment.nonce,
        hashlib.sha256(assignment.task).digest(),
        assignment.inputs_key,
        list(assignment.urls),
        assignment.upload_url,
    ]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return ASSIGNMENT_DOMAIN + packed


def result_digest_input(result: Result) -> bytes:
    """The exact bytes a result's signature is computed over: the SHA-256 of the result's
    own encoding without its signature (the encoding is deterministic, outputs included)."""
    return RESULT_DOMAIN + hashlib.sha256(encode(replace(result, signature=b""))).digest()
