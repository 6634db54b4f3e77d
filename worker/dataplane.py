# SPDX-License-Identifier: Apache-2.0
"""A car's data plane: fetch a task's inputs from the object store, send large outputs
back the same way. The brokers carry only the references (schemas.blobref).

The car holds no store credentials: each assignment carries presigned URLs, one per
input, and one write-once URL for this lease's outputs, all covered by the gateway's
signature. Every fetched byte is checked against the SHA-256 the producer named before
any kernel sees it; a mismatch is refused (``bad_data``), never run. The standard
library's HTTP client is enough here: one GET or PUT per blob, no credentials to sign.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from parkpool.schemas import (
    Assignment,
    BlobRef,
    BrokerError,
    DecodeError,
    Result,
    TaskChunk,
    ValidationError,
)
from parkpool.schemas.blobref import OUTPUTS_BLOB, SEALED_OUTPUTS_BLOB
from parkpool.schemas.codec import MAX_MESSAGE_BYTES, encode_arrays
from parkpool.schemas.kernels import MAX_ELEMS
from parkpool.worker.blobcache import BlobCache

__all__ = ["DEFAULT_RESULT_INLINE_BYTES", "CarData", "fetch", "upload"]

# Outputs whose encoding is at least this large go to the lease's upload URL.
DEFAULT_RESULT_INLINE_BYTES = 64 << 10
RETRIES = 3  # per GET or PUT, on a dropped connection only
RETRY_BASE_S = 0.1


class CarData:
    """Inputs in, outputs out, through one car's cache."""

    def __init__(
        self,
        cache: BlobCache,
        *,
        timeout_s: float = 60.0,
        result_inline_bytes: int = DEFAULT_RESULT_INLINE_BYTES,
    ) -> None:
        self.cache = cache
        self.timeout_s = timeout_s
        self.result_inline_bytes = result_inline_bytes

    def hydrate(self, assignment: Assignment, task: TaskChunk) -> TaskChunk:
        """The task with every input in hand: fetched (or cached) and checked.

        Raises ValidationError for an input no kernel may take (before fetching it),
        DecodeError ``bad_data`` when the store's bytes are not the ones named (or are
        gone), and BrokerError when the store cannot be reached or refuses the URL.
        """
        if not task.refs:
            return task
        if len(assignment.urls) != len(task.refs):
            detail = f"{len(assignment.urls)} URLs for {len(task.refs)} stored inputs"
            raise DecodeError("bad_data", detail)
        for ref in task.refs:
            _check_size(ref)
        arrays: dict[str, np.ndarray] = {}
        for ref, url in zip(task.refs, assignment.urls, strict=True):
            data = self._blob(ref, url)
            if not ref.is_array:  # a confidential chunk's sealed inputs: the only ref
                return replace(task, sealed_inputs=data, refs=())
            arrays[ref.name] = np.frombuffer(data, dtype=ref.dtype).reshape(ref.shape)
        return replace(task, inputs={**task.inputs, **arrays}, refs=())

    def _blob(self, ref: BlobRef, url: str) -> bytes:
        data = self.cache.fetch_once(ref.sha256, lambda: fetch(url, ref, self.timeout_s))
        # A hit was checked against the ref that fetched it, not this one: a ref naming
        # a cached hash with another size is refused here, not by a reshape that raises.
        if len(data) != ref.size:
            detail = f"input {_short(ref)} is {len(data)} bytes, not {ref.size}"
            raise DecodeError("bad_data", detail)
        return data

    def offload(self, result: Result, assignment: Assignment) -> Result:
        """The result with large outputs (sealed or not) uploaded under the lease's URL
        and named by hash; unchanged when small, or when the gateway gave no URL."""
        if not assignment.upload_url or result.refs:
            return result
        sealed = bool(result.sealed_outputs)
        blob = result.sealed_outputs if sealed else encode_arrays(result.outputs)
        if len(blob) < self.result_inline_bytes:
            return result
        digest = hashlib.sha256(blob).hexdigest()
        upload(assignment.upload_url, blob, self.timeout_s)
        ref = BlobRef(SEALED_OUTPUTS_BLOB if sealed else OUTPUTS_BLOB, digest, len(blob))
        return replace(result, outputs={}, sealed_outputs=b"", refs=(ref,))


def _check_size(ref: BlobRef) -> None:
    """Refuse, before a byte is fetched, an input no kernel may take: the car's memory
    is the owner's, and a ref's size is the producer's word until the bytes arrive."""
    count = math.prod(ref.shape)
    if ref.is_array and count > MAX_ELEMS:
        raise ValidationError("too_large", f"input {_short(ref)} has {count:,} elements")
    if not ref.is_array and ref.size > MAX_MESSAGE_BYTES:
        raise ValidationError("too_large", f"sealed inputs of {ref.size:,} bytes")


def fetch(url: str, ref: BlobRef, timeout_s: float) -> bytes:
    """GET one blob and check it is exactly what ``ref`` names."""
    try:
        # One byte more than named shows a longer body.
        data = _with_retries(lambda: _get(url, ref.size + 1, timeout_s))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise DecodeError("bad_data", f"input {_short(ref)} is gone from the store") from None
        raise BrokerError(f"store refused input {_short(ref)}: HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise BrokerError(f"cannot fetch input {_short(ref)}: {exc}") from None
    if len(data) != ref.size:
        detail = f"input {_short(ref)} is {len(data)} bytes, not {ref.size}"
        raise DecodeError("bad_data", detail)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DecodeError("bad_data", f"input {_short(ref)} does not hash to its name")
    return data


def upload(url: str, blob: bytes, timeout_s: float) -> None:
    """PUT one blob to a write-once URL. 412 means this lease already wrote it: a retry
    after a lost answer; the reader checks the hash either way."""
    request = urllib.request.Request(url, data=blob, method="PUT", headers={"If-None-Match": "*"})
    try:
        # A connection dropped after the body landed is tried again, and answered 412.
        _with_retries(lambda: _send(request, timeout_s))
    except urllib.error.HTTPError as exc:
        if exc.code == 412:
            return
        raise BrokerError(f"store refused the result upload: HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise BrokerError(f"cannot upload the result: {exc}") from None


def _get(url: str, most: int, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data: bytes = response.read(most)
        return data


def _send(request: urllib.request.Request, timeout_s: float) -> bytes:
    with urllib.request.urlopen(request, timeout=timeout_s):
        return b""


def _with_retries(call: Callable[[], bytes], tries: int = RETRIES) -> bytes:
    """A dropped or reset connection is tried again, shortly, as S3 clients do; an HTTP
    answer (403, 404, 412, 5xx) is the store's word and goes back to the caller."""
    for attempt in range(tries):
        try:
            return call()
        except urllib.error.HTTPError:
            raise
        except (OSError, http.client.HTTPException):
            if attempt == tries - 1:
                raise
            time.sleep(RETRY_BASE_S * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _short(ref: BlobRef) -> str:
    return f"{ref.name or 'blob'}@{ref.sha256[:12]}"
