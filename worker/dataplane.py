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

import contextlib
import hashlib
import http.client
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

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
from parkpool.worker.kernels import BUILTIN, get_kernel

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
RETRIES = 3  # per GET or PUT, on a dropped connection only
RETRY_BASE_S = 0.1
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

T = TypeVar("T")


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

        Raises ValidationError for inputs the kernel would not take (before fetching
        any: ``check_refs``), DecodeError ``bad_data`` when the store's bytes are not the
        ones named (or are gone), and BrokerError when the store cannot be reached or
        refuses the URL.
        """
        if not task.refs:
            return task
        if len(assignment.urls) != len(task.refs):
            detail = f"{len(assignment.urls)} URLs for {len(task.refs)} stored inputs"
            raise DecodeError("bad_data", detail)
        check_refs(task)
        arrays: dict[str, np.ndarray] = {}
        for ref, url in zip(task.refs, assignment.urls, strict=True):
            data = self._blob(ref, url)
            if not ref.is_array:  # a confidential chunk's sealed inputs: the only ref
                return replace(task, sealed_inputs=bytes(data), refs=())
            arrays[ref.name] = np.frombuffer(data, dtype=ref.dtype).reshape(ref.shape)
        return replace(task, inputs={**task.inputs, **arrays}, refs=())

    def _blob(self, ref: BlobRef, url: str) -> Blob:
        data = self.cache.fetch_once(ref.sha256, lambda: fetch(url, ref, self.timeout_s))
        # A hit was checked against the ref that fetched it, not this one: a ref naming
        # a cached hash with another size is refused here, not by a reshape that raises.
        if len(data) != ref.size:
            detail = f"input {_short(ref)} is {len(data)} bytes, not {ref.size}"
            raise DecodeError("bad_data", detail)
        return data

    def offload(self, result: Result, assignment: Assignment) -> Result:
        """The result with large outputs (sealed or not) uploaded under the lease's URL
        and named by hash; unchanged when small, or when the gateway gave no URL.

        Raises ValidationError ``too_large``, before uploading, for outputs larger than
        the SDK reads back: every car's outputs for the task would be as large."""
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
        upload(assignment.upload_url, blob, self.timeout_s)
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


def fetch(url: str, ref: BlobRef, timeout_s: float) -> memoryview:
    """GET one blob and check it is exactly what ``ref`` names; BrokerError when it
    takes longer than ``timeout_s`` plus a second per MiB. The bytes come back as a
    read-only view, so a kernel does not write into a block the cache shares by mistake
    (a kernel is trusted code: built in, or approved by the fleet's signed manifest)."""
    limit_s = _limit(timeout_s, ref.size)
    try:
        # One byte more than named shows a longer body.
        data = _with_retries(lambda: _get(url, ref.size + 1, timeout_s, limit_s))
    except _TooSlowError:
        detail = f"input {_short(ref)} not fetched within {limit_s:.1f} s"
        raise BrokerError(detail) from None
    except _BadURLError as exc:
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


def upload(url: str, blob: bytes, timeout_s: float) -> None:
    """PUT one blob to a write-once URL. 412 means this lease already wrote it: a retry
    after a lost answer; the reader checks the hash either way."""
    limit_s = _limit(timeout_s, len(blob))
    try:
        # A connection dropped after the body landed is tried again, and answered 412.
        _with_retries(lambda: _send(url, blob, timeout_s, limit_s))
    except _TooSlowError:
        raise BrokerError(f"the result upload took longer than {limit_s:.1f} s") from None
    except _BadURLError as exc:
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


def _get(url: str, most: int, timeout_s: float, limit_s: float) -> memoryview:
    # Read into a NumPy buffer, not a new bytes object: NumPy asks the kernel for huge
    # pages for blocks of 4 MiB and more, so far fewer page faults fill a fresh block
    # (8 MiB: 2.4 ms against 6.3 ms on the 2-core VM, docs/BENCHMARKS.md), and a car's
    # cache is fresh memory.
    buffer = np.empty(most, dtype=np.uint8)
    with _Cutoff(limit_s) as cutoff:
        try:
            with _open(cutoff, url, timeout_s) as response:
                got = _read_into(response, buffer.data)
        except (OSError, http.client.HTTPException):
            if cutoff.fired:
                raise _TooSlowError from None
            raise
    if cutoff.fired and got < most - 1:  # cut short, cleanly: not the store's bytes
        raise _TooSlowError
    buffer.flags.writeable = False
    return buffer.data[:got]


def _read_into(response: Any, view: memoryview) -> int:
    """Fill ``view`` from the body, up to its end or the body's; how much was read."""
    got = 0
    while got < len(view):
        count = response.readinto(view[got:])
        if not count:
            break
        got += count
    return got


def _send(url: str, blob: bytes, timeout_s: float, limit_s: float) -> bytes:
    headers = {"If-None-Match": "*"}
    with _Cutoff(limit_s) as cutoff:
        try:
            with _open(cutoff, url, timeout_s, data=blob, method="PUT", headers=headers):
                pass
        except (OSError, http.client.HTTPException):
            if cutoff.fired:
                raise _TooSlowError from None
            raise
    return b""


def _open(cutoff: _Cutoff, url: str, timeout_s: float, **kwargs: Any) -> Any:
    """The response to one request; _BadURLError when its URL cannot be requested at
    all: a bad host, port or path makes urllib raise ValueError (UnicodeError for a host
    IDNA refuses), InvalidURL, or OverflowError (a port past a C long). No retry helps,
    and none of them may reach the car's catch-all as a fault of its own."""
    try:
        return _OPENER.open(_Request(cutoff, url, **kwargs), timeout=timeout_s)
    except (ValueError, OverflowError, http.client.InvalidURL) as exc:
        raise _BadURLError(str(exc)) from None


class _TooSlowError(Exception):
    """A transfer cut off at its time limit; never tried again."""


class _BadURLError(Exception):
    """A URL that cannot be requested; never tried again."""


class _Cutoff:
    """Shuts one transfer's socket once ``limit_s`` has passed, from a timer thread: the
    blocked read wakes with an error or an early end. Covers the TLS handshake, the
    headers and the body (the connect is bounded by the read timeout itself), without
    copying what is read.

    It keeps a duplicate of the socket's descriptor: TLS detaches the socket it wraps,
    and a shutdown through the duplicate still ends the connection both share."""

    def __init__(self, limit_s: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(limit_s, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Cutoff:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._release()

    def arm(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._release()
            with contextlib.suppress(OSError):
                self._sock = sock.dup()
            if self.fired and self._sock is not None:
                _shut(self._sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shut(self._sock)

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Request(urllib.request.Request):
    def __init__(self, cutoff: _Cutoff, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.cutoff = cutoff


class _Watched:
    """Hands each new connection's socket to its request's cutoff (HTTPConnection makes
    it with ``_create_connection``; TLS is set up on that socket afterwards)."""

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        cutoff = getattr(req, "cutoff", None)

        def connection(host: str, **conn_kwargs: Any) -> http.client.HTTPConnection:
            conn = http_class(host, **conn_kwargs)
            if cutoff is not None:
                create = conn._create_connection
                conn._create_connection = lambda *a, **k: cutoff.arm(create(*a, **k))
            return conn  # type: ignore[no-any-return]

        return super().do_open(connection, req, **kwargs)  # type: ignore[misc]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """No redirect is followed: the store answers a presigned GET or PUT itself, and a
    redirect could lead anywhere, to plain http:// or ftp:// too. The 3xx then reaches
    the caller as an HTTPError, the store's answer, and is refused like any other."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


# urllib's default opener with these in place of its HTTP, HTTPS and redirect handlers
# (proxies from the environment and the rest as before).
_OPENER = urllib.request.build_opener(_WatchedHTTP, _WatchedHTTPS, _NoRedirects)


def _with_retries(call: Callable[[], T], tries: int = RETRIES) -> T:
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
