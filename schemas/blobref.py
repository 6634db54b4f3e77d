# SPDX-License-Identifier: Apache-2.0
"""Claim checks: what a message carries instead of bulk bytes held in the object store.

A ``BlobRef`` names an object by the SHA-256 of its bytes. It carries no URL: the SDK and
the gateways know the store, and a car gets a short-lived presigned URL for each ref in
its signed assignment. Objects live under one prefix per job, so a job's end deletes them
all with one listing, and the same bytes in one job (gemm's shared blocks) are one object.

Layout (part of the contract: the SDK writes, gateways presign, cars and the SDK read)::

    jobs/<job_id>/in/<sha256>              an input array's raw C-order bytes, or the
                                           sealed inputs of a confidential chunk
    jobs/<job_id>/out/<gateway>/<chunk>-<epoch>
                                           one lease's encoded (or sealed) outputs map;
                                           epochs count per gateway, so two gateways
                                           that leased one chunk (a rebalance) never
                                           share a key
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.validate import (
    ALLOWED_DTYPES,
    MAX_NDIM,
    require_int,
    require_name,
    require_str,
)

__all__ = [
    "BLOB",
    "MAX_BLOB_BYTES",
    "OUTPUTS_BLOB",
    "SEALED_OUTPUTS_BLOB",
    "BlobRef",
    "input_key",
    "job_prefix",
    "legacy_output_key",
    "output_key",
]

BLOB = ""  # the dtype of a ref that is not one array: sealed inputs, an outputs map
MAX_BLOB_BYTES = 5 * 1024**3  # S3's single-PUT ceiling
# The name of a result's one stored blob says how to read it: an encoded outputs map, or
# the sealed one only the caller can open (the wire contract; asyncapi.yaml).
OUTPUTS_BLOB = "outputs"
SEALED_OUTPUTS_BLOB = "sealed_outputs"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class BlobRef:
    """One object in the store, named by content; an array's dtype and shape ride along
    so a car can allocate and check it before a byte arrives."""

    name: str  # the input's or output's name; "" for an opaque blob
    sha256: str  # hex SHA-256 of the stored bytes
    size: int
    dtype: str = BLOB  # numpy dtype.str of an array; BLOB for opaque bytes
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.name != "":  # anything else, even a falsy non-string, must be a name
            require_name("ref name", self.name)
        require_str("sha256", self.sha256, pattern=_SHA256)
        require_int("size", self.size, 0, MAX_BLOB_BYTES)
        require_str("dtype", self.dtype)
        shape = self.shape
        if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
            raise ValidationError("wrong_type", f"shape must be a list of at most {MAX_NDIM}")
        object.__setattr__(self, "shape", tuple(require_int("dim", d) for d in shape))
        if self.is_array:
            self._check_array()
        elif self.shape:
            raise ValidationError("bad_value", "an opaque blob has no shape")

    def _check_array(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise ValidationError("bad_value", f"dtype {self.dtype!r} is not allowed")
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if expected != self.size:
            raise ValidationError(
                "bad_value",
                f"shape {self.shape} of {self.dtype} is {expected} bytes, not {self.size}",
            )

    @property
    def is_array(self) -> bool:
        return self.dtype != BLOB


def job_prefix(job_id: str) -> str:
    return f"jobs/{_job(job_id)}/"


def input_key(job_id: str, sha256: str) -> str:
    require_str("sha256", sha256, pattern=_SHA256)
    return f"{job_prefix(job_id)}in/{sha256}"


def output_key(job_id: str, gateway_id: str, chunk_id: int, epoch: int) -> str:
    """The key one lease's outputs are written under, once. The granting gateway is part
    of it: its epochs are unique only among its own leases, and a car that finds the key
    taken (412) takes it as its own earlier write."""
    gateway = require_str("gateway_id", gateway_id, pattern=_JOB)
    chunk, lease = require_int("chunk_id", chunk_id), require_int("epoch", epoch, 1)
    return f"{job_prefix(job_id)}out/{gateway}/{chunk}-{lease}"


def legacy_output_key(job_id: str, chunk_id: int, epoch: int) -> str:
    """Where gateways before the gateway id was in the key (2026-12-07) had cars write a
    lease's outputs: the SDK reads there when the new key is empty, so SDK clients can
    be upgraded before gateways (docs/DECISIONS.md, "Write-once results")."""
    chunk, lease = require_int("chunk_id", chunk_id), require_int("epoch", epoch, 1)
    return f"{job_prefix(job_id)}out/{chunk}-{lease}"


def _job(job_id: str) -> str:
    return require_str("job_id", job_id, pattern=_JOB)
