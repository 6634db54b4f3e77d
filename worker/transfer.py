# SPDX-License-Identifier: Apache-2.0
"""One HTTP transfer between a car and the object store: a GET into a fresh buffer or a
PUT of one blob, to a presigned URL, with the standard library's client.

Every transfer has two ways to end early, and both shut its socket from another thread,
since a blocked read looks at nothing until its next byte: a time limit (urllib's
timeout is per read, so a store that drips bytes would otherwise hold the transfer for
as long as it liked), and its task's ``Cancel`` (the task was let go, and the car's
bandwidth is its owner's). What the bytes mean is ``worker.dataplane``'s business.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from parkpool.schemas import Preempted
from parkpool.worker.cancel import Cancel

__all__ = ["RETRIES", "RETRY_BASE_S", "BadURLError", "TooSlowError", "get", "send", "with_retries"]

RETRIES = 3  # per GET or PUT, on a dropped connection only
RETRY_BASE_S = 0.1

T = TypeVar("T")


class TooSlowError(Exception):
    """A transfer cut off at its time limit; never tried again."""


class BadURLError(Exception):
    """A URL that cannot be requested; never tried again."""


def get(url: str, most: int, timeout_s: float, limit_s: float, cancel: Cancel) -> memoryview:
    """Up to ``most`` bytes of the body, read-only. Raises TooSlowError past ``limit_s``,
    Preempted once ``cancel`` is set, and urllib's own errors otherwise."""
    # Read into a NumPy buffer, not a new bytes object: NumPy asks the kernel for huge
    # pages for blocks of 4 MiB and more, so far fewer page faults fill a fresh block
    # (8 MiB: 2.4 ms against 6.3 ms on the 2-core VM, docs/BENCHMARKS.md), and a car's
    # cache is fresh memory.
    buffer = np.empty(most, dtype=np.uint8)
    with _Cutoff(limit_s, cancel) as cutoff:
        try:
            with _open(cutoff, url, timeout_s) as response:
                got = _read_into(response, buffer.data)
        except (OSError, http.client.HTTPException):
            cutoff.raise_if_cut()
            raise
    if got < most - 1:  # cut short, cleanly: not the store's bytes
        cutoff.raise_if_cut()
    buffer.flags.writeable = False
    return buffer.data[:got]


def send(url: str, blob: bytes, timeout_s: float, limit_s: float, cancel: Cancel) -> bytes:
    """PUT ``blob`` once it was not there yet (``If-None-Match: *``); raises as ``get``."""
    headers = {"If-None-Match": "*"}
    with _Cutoff(limit_s, cancel) as cutoff:
        try:
            with _open(cutoff, url, timeout_s, data=blob, method="PUT", headers=headers):
                pass
        except (OSError, http.client.HTTPException):
            cutoff.raise_if_cut()
            raise
    return b""


def with_retries(call: Callable[[], T], cancel: Cancel | None = None, tries: int = RETRIES) -> T:
    """A dropped or reset connection is tried again, shortly, as S3 clients do; an HTTP
    answer (403, 404, 412, 5xx) is the store's word and goes back to the caller. A
    cancel during the pause between tries ends it at once (Preempted)."""
    cancel = cancel or Cancel()
    for attempt in range(tries):
        try:
            return call()
        except urllib.error.HTTPError:
            raise
        except (OSError, http.client.HTTPException):
            if attempt == tries - 1:
                raise
            if cancel.wait(RETRY_BASE_S * 2**attempt * (0.5 + random.random())):
                raise Preempted("transfer abandoned: its task was let go") from None
    raise AssertionError("unreachable")


def _read_into(response: Any, view: memoryview) -> int:
    """Fill ``view`` from the body, up to its end or the body's; how much was read."""
    got = 0
    while got < len(view):
        count = response.readinto(view[got:])
        if not count:
            break
        got += count
    return got


def _open(cutoff: _Cutoff, url: str, timeout_s: float, **kwargs: Any) -> Any:
    """The response to one request; BadURLError when its URL cannot be requested at
    all: a bad host, port or path makes urllib raise ValueError (UnicodeError for a host
    IDNA refuses), InvalidURL, or OverflowError (a port past a C long). No retry helps,
    and none of them may reach the car's catch-all as a fault of its own."""
    try:
        return _OPENER.open(_Request(cutoff, url, **kwargs), timeout=timeout_s)
    except (ValueError, OverflowError, http.client.InvalidURL) as exc:
        raise BadURLError(str(exc)) from None


class _Cutoff:
    """Shuts one transfer's socket once ``limit_s`` has passed (from a timer thread) or
    once ``cancel`` is set (from the cancelling thread): the blocked read wakes with an
    error or an early end. Covers the TLS handshake, the headers and the body (the
    connect is bounded by the read timeout itself), without copying what is read.

    It keeps a duplicate of the socket's descriptor: TLS detaches the socket it wraps,
    and a shutdown through the duplicate still ends the connection both share."""

    def __init__(self, limit_s: float, cancel: Cancel) -> None:
        self.fired = False  # the time limit passed
        self.cancelled = False  # the task was let go
        self._cancel = cancel
        self._unhook: Callable[[], None] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(limit_s, self._cut, kwargs={"slow": True})
        self._timer.daemon = True

    def __enter__(self) -> _Cutoff:
        if self._cancel.is_set():  # let go before it began: not even a connect
            raise Preempted("transfer abandoned: its task was let go")
        self._timer.start()
        self._unhook = self._cancel.hook(self._cut)
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
        if self._unhook is not None:
            self._unhook()
        with self._lock:
            self._release()

    def raise_if_cut(self) -> None:
        """Say why the transfer ended early, if this cut it."""
        if self.cancelled:
            raise Preempted("transfer abandoned: its task was let go")
        if self.fired:
            raise TooSlowError

    def arm(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._release()
            with contextlib.suppress(OSError):
                self._sock = sock.dup()
            if (self.fired or self.cancelled) and self._sock is not None:
                _shut(self._sock)
        return sock

    def _cut(self, slow: bool = False) -> None:
        with self._lock:
            if slow:
                self.fired = True
            else:
                self.cancelled = True
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
