# SPDX-License-Identifier: Apache-2.0
"""A car's data plane: fetch a task's inputs from the object store, send large outputs
back the same way. The brokers carry only the references (schemas.blobref).

The car holds no store credentials: each assignment carries presigned URLs, one per
input, and one write-once URL for this lease's outputs, all covered by the gateway's
signature. Every fetched byte is checked against the SHA-256 the producer named before
any kernel sees it; a mismatch is refused (``bad_data``), never run. The standard
library's HTTP client is enough here: one GET or PUT per blob, no credentials to sign
(``worker.transfer``: time limits, retries, and cutting a let-go task's download).
"""

from __future__ import annotations

import hashlib
import http.client
import math
import urllib.error
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
from parkpool.schemas.kernels import MAX_ELEMS, MAX_LAYER_ELEMS, MAX_LAYERS, MAX_WIDTH, check_inputs
from parkpool.worker.blobcache import Blob, BlobCache
from parkpool.worker.cancel import Cancel
from parkpool.worker.kernels import BUILTIN, get_kernel
from parkpool.worker.transfer import BadURLError, TooSlowError, get, send, with_retries

__all__ = [
    "DEFAULT_RESULT_INLINE_BYTES",
    "MAX_OUTPUTS_BYTES",
    "MAX_SEALED_OUTPUTS_BYTES",
    "MAX_TASK_INPUT_BYTES",
    "CarData",
    "check_refs",
    "fetch",
    "upload",
]

# Outputs whose encoding is at least this large go to the lease's upload URL.
DEFAULT_RESULT_INLINE_BYTES = 64 << 10
# A transfer slower than this, once its first ``timeout_s`` is spent, is given up:
# urllib's timeout is per read, so a store (or a path to it) that drips bytes would hold
# one of the car's slots, and every task waiting on the same block, while it dripped.
MIN_BYTES_PER_S = 1 << 20
# The stored inputs one task may name, all its refs together. Each ref is bounded on its
# own, but 64 of them could still have a car fetch and hold a hundred GiB before a kernel
# looked at them. The largest task a built-in kernel takes is an mlp at every limit, in
# float64: x of MAX_ELEMS, and MAX_LAYERS layers of MAX_LAYER_ELEMS weights and at most
# MAX_WIDTH biases; 6 GiB and 1 MiB.
MAX_TASK_INPUT_BYTES = 8 * (MAX_ELEMS + MAX_LAYERS * (MAX_LAYER_ELEMS + MAX_WIDTH))
# The most stored outputs the SDK reads back: an outputs map it can decode, or a sealed
# one with 64 KiB more for its envelope (the SDK's own bound is MAX_OUTPUTS_BYTES in
# producer/claimcheck.py, defined the same way; a car does not import the producer).
# Anything larger would be uploaded only for the SDK to refuse it.
MAX_OUTPUTS_BYTES = MAX_MESSAGE_BYTES
MAX_SEALED_OUTPUTS_BYTES = MAX_MESSAGE_BYTES + (64 << 10)


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

    def hydrate(
        self, assignment: Assignment, task: TaskChunk, cancel: Cancel | None = None
    ) -> TaskChunk:
        """The task with every input in hand: fetched (or cached) and checked.

        Raises ValidationError for inputs the kernel would not take (before fetching
        any: ``check_refs``), DecodeError ``bad_data`` when the store's bytes are not the
        ones named (or are gone), BrokerError when the store cannot be reached or
        refuses the URL, and Preempted once ``cancel`` is set (the task was let go).
        """
        if not task.refs:
            return task
        if len(assignment.urls) != len(task.refs):
            detail = f"{len(assignment.urls)} URLs for {len(task.refs)} stored inputs"
            raise DecodeError("bad_data", detail)
        check_refs(task)
        arrays: dict[str, np.ndarray] = {}
        for ref, url in zip(task.refs, assignment.urls, strict=True):
            data = self._blob(ref, url, cancel)
            if not ref.is_array:  # a confidential chunk's sealed inputs: the only ref
                return replace(task, sealed_inputs=bytes(data), refs=())
            arrays[ref.name] = np.frombuffer(data, dtype=ref.dtype).reshape(ref.shape)
        return replace(task, inputs={**task.inputs, **arrays}, refs=())

    def _blob(self, ref: BlobRef, url: str, cancel: Cancel | None) -> Blob:
        def download(unwanted: Cancel) -> Blob:
            return fetch(url, ref, self.timeout_s, unwanted)

        data = self.cache.fetch_once(ref.sha256, download, cancel)
        # A hit was checked against the ref that fetched it, not this one: a ref naming
        # a cached hash with another size is refused here, not by a reshape that raises.
        if len(data) != ref.size:
            detail = f"input {_short(ref)} is {len(data)} bytes, not {ref.size}"
            raise DecodeError("bad_data", detail)
        return data

    def offload(
        self, result: Result, assignment: Assignment, cancel: Cancel | None = None
    ) -> Result:
        """The result with large outputs (sealed or not) uploaded under the lease's URL
        and named by hash; unchanged when small, or when the gateway gave no URL.

        Raises ValidationError ``too_large``, before uploading, for outputs larger than
        the SDK reads back: every car's outputs for the task would be as large; and
        Preempted once ``cancel`` is set (the task let go) while uploading."""
        if not assignment.upload_url or result.refs:
            return result
        sealed = bool(result.sealed_outputs)
        blob = result.sealed_outputs if sealed else encode_arrays(result.outputs)
        if len(blob) < self.result_inline_bytes:
            return result
        most = MAX_SEALED_OUTPUTS_BYTES if sealed else MAX_OUTPUTS_BYTES
        if len(blob) > most:
            detail = f"outputs of {len(blob):,} bytes; the SDK reads {most:,} at most"
            raise ValidationError("too_large", detail)
        digest = hashlib.sha256(blob).hexdigest()
        upload(assignment.upload_url, blob, self.timeout_s, cancel)
        ref = BlobRef(SEALED_OUTPUTS_BLOB if sealed else OUTPUTS_BLOB, digest, len(blob))
        return replace(result, outputs={}, sealed_outputs=b"", refs=(ref,))


def check_refs(task: TaskChunk) -> None:
    """Refuse, before a byte is fetched, stored inputs the car would refuse once they
    arrived: too large, one by one or together, or not what the task's kernel takes.
    The car's memory is the owner's, and a ref's size is the producer's word until the
    bytes arrive; ValidationError, as the kernel's own checks raise."""
    for ref in task.refs:
        _check_size(ref)
    total = sum(ref.size for ref in task.refs)
    if total > MAX_TASK_INPUT_BYTES:
        detail = f"stored inputs of {total:,} bytes in all, over {MAX_TASK_INPUT_BYTES:,}"
        raise ValidationError("too_large", detail)
    if all(ref.is_array for ref in task.refs):  # sealed inputs are checked once opened
        _check_kernel_takes(task)


def _check_kernel_takes(task: TaskChunk) -> None:
    """The kernel's checks, with each stored input stood in for by zeros broadcast to
    its dtype and shape (no memory). The built-in checks look at names, dtypes, shapes
    and params only (kmeans_step's finite centroids hold for zeros), so they run in
    full; a plugin's may read values, so a plugin kernel gets the shared checks only."""
    kernel = get_kernel(task.kernel)
    stand_ins = {r.name: np.broadcast_to(np.zeros((), r.dtype), r.shape) for r in task.refs}
    inputs = {**task.inputs, **stand_ins}
    if kernel.name in BUILTIN:
        kernel.validate(task.params, inputs)
    else:
        required, optional = kernel.required_inputs, kernel.optional_inputs
        check_inputs(kernel.name, required, optional, task.params, inputs)


def _check_size(ref: BlobRef) -> None:
    """Refuse an input no kernel may take, whatever the task."""
    count = math.prod(ref.shape)
    if ref.is_array and count > MAX_ELEMS:
        raise ValidationError("too_large", f"input {_short(ref)} has {count:,} elements")
    if not ref.is_array and ref.size > MAX_MESSAGE_BYTES:
        raise ValidationError("too_large", f"sealed inputs of {ref.size:,} bytes")


def fetch(url: str, ref: BlobRef, timeout_s: float, cancel: Cancel | None = None) -> memoryview:
    """GET one blob and check it is exactly what ``ref`` names; BrokerError when it
    takes longer than ``timeout_s`` plus a second per MiB, Preempted as soon as
    ``cancel`` is set. The bytes come back as a read-only view, so a kernel does not
    write into a block the cache shares by mistake (a kernel is trusted code: built in,
    or approved by the fleet's signed manifest)."""
    limit_s = _limit(timeout_s, ref.size)
    cancel = cancel or Cancel()
    try:
        # One byte more than named shows a longer body.
        data = with_retries(lambda: get(url, ref.size + 1, timeout_s, limit_s, cancel), cancel)
    except TooSlowError:
        detail = f"input {_short(ref)} not fetched within {limit_s:.1f} s"
        raise BrokerError(detail) from None
    except BadURLError as exc:
        raise BrokerError(f"cannot fetch input {_short(ref)}: bad URL: {exc}") from None
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise DecodeError("bad_data", f"input {_short(ref)} is gone from the store") from None
        raise BrokerError(f"store refused input {_short(ref)}: {_answer(exc)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise BrokerError(f"cannot fetch input {_short(ref)}: {exc}") from None
    if len(data) != ref.size:
        detail = f"input {_short(ref)} is {len(data)} bytes, not {ref.size}"
        raise DecodeError("bad_data", detail)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DecodeError("bad_data", f"input {_short(ref)} does not hash to its name")
    return data


def upload(url: str, blob: bytes, timeout_s: float, cancel: Cancel | None = None) -> None:
    """PUT one blob to a write-once URL. 412 means this lease already wrote it: a retry
    after a lost answer; the reader checks the hash either way. Cut at once, raising
    Preempted, when ``cancel`` is set: the car's link is its owner's, as for downloads."""
    limit_s = _limit(timeout_s, len(blob))
    cancel = cancel or Cancel()
    try:
        # A connection dropped after the body landed is tried again, and answered 412.
        with_retries(lambda: send(url, blob, timeout_s, limit_s, cancel), cancel)
    except TooSlowError:
        raise BrokerError(f"the result upload took longer than {limit_s:.1f} s") from None
    except BadURLError as exc:
        raise BrokerError(f"cannot upload the result: bad URL: {exc}") from None
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 412:
            return
        raise BrokerError(f"store refused the result upload: {_answer(exc)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise BrokerError(f"cannot upload the result: {exc}") from None


def _limit(timeout_s: float, size: int) -> float:
    return timeout_s + size / MIN_BYTES_PER_S


def _answer(exc: urllib.error.HTTPError) -> str:
    if 300 <= exc.code < 400:
        return f"HTTP {exc.code}, a redirect (not followed: presigned URLs do not redirect)"
    return f"HTTP {exc.code}"


def _short(ref: BlobRef) -> str:
    return f"{ref.name or 'blob'}@{ref.sha256[:12]}"
