# SPDX-License-Identifier: Apache-2.0
"""A store that drips bytes cannot hold a car's slot: each transfer has a time limit.

urllib's timeout is per read, so a server that sends one byte just inside it, again and
again, kept a car's fetch (and every task waiting on the same block) for as long as it
liked. The stores here are real HTTP servers on loopback that do exactly that.
"""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from parkpool.broker_config.certs import make_certs
from parkpool.schemas import BlobRef, BrokerError
from parkpool.worker import dataplane
from parkpool.worker.dataplane import fetch, upload

DRIP_S = 0.1  # far inside the per-read timeout below, so only the limit can end it
TIMEOUT_S = 0.5  # per read; the limit is this plus a second per MiB: ~0.5 s here


class _Dripping(http.server.BaseHTTPRequestHandler):
    """Answers every request a byte at a time, ``DRIP_S`` apart: the headers (``mode``
    "headers") or the ``size`` bytes of the body ("body")."""

    mode: ClassVar[str] = "body"  # or "headers", or "redirect" (then the body, dripped)
    redirect: ClassVar[int] = 307
    size: ClassVar[int] = 80  # 8 s of body, far past the limit
    requests: ClassVar[list[str]] = []
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def _drip(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(DRIP_S)
        except OSError:
            pass  # the car hung up: what this test wants

    def _answer(self) -> None:
        self.requests.append(self.path)
        if self.mode == "redirect" and self.path == "/blob":
            self.send_response(self.redirect)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = body_of(self.size)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
        if self.mode == "headers":
            self._drip((head + "X-Slow: " + "s" * 80 + "\r\n\r\n").encode() + body)
        else:
            self.wfile.write((head + "\r\n").encode())
            self._drip(body)

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer()


def _serve(context: ssl.SSLContext | None = None) -> Iterator[str]:
    """The dripping store on a free loopback port (behind TLS with ``context``): its URL."""
    _Dripping.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Dripping)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scheme = "http" if context is None else "https"
        yield f"{scheme}://127.0.0.1:{server.server_port}/blob"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dripping() -> Iterator[str]:
    yield from _serve()


def body_of(size: int) -> bytes:
    return b"b" * size


def ref(size: int = _Dripping.size) -> BlobRef:
    body = body_of(size)
    return BlobRef("a", hashlib.sha256(body).hexdigest(), size, "|u1", (size,))


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_a_dripped_input_is_given_up_at_its_limit(
    dripping: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store that sends an 80-byte input (or its headers) a byte every 0.1 s: 8 s
    monkeypatch.setattr(_Dripping, "mode", mode)
    started = time.monotonic()
    # When a car fetches it with a 0.5 s read timeout
    with pytest.raises(BrokerError, match=r"not fetched within 0\.5 s"):
        fetch(dripping, ref(), TIMEOUT_S)
    # Then it gives up at its limit, not after 8 s, and once: a cut is not tried again
    assert time.monotonic() - started < 4
    assert len(_Dripping.requests) == 1


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_not_followed(
    dripping: str, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store that redirects a car's GET and PUT elsewhere
    monkeypatch.setattr(_Dripping, "mode", "redirect")
    monkeypatch.setattr(_Dripping, "redirect", code)
    # When the car fetches an input, and uploads its outputs, there
    # Then each is a store error that names the redirect, at once and after one request:
    # a presigned URL is answered by the store itself, and a redirect could lead anywhere
    started = time.monotonic()
    with pytest.raises(BrokerError, match=f"HTTP {code}, a redirect \\(not followed"):
        fetch(dripping, ref(), TIMEOUT_S)
    with pytest.raises(BrokerError, match=f"upload: HTTP {code}, a redirect"):
        upload(dripping, b"r" * 1000, TIMEOUT_S)
    assert time.monotonic() - started < 1
    assert _Dripping.requests == ["/blob", "/blob"]


@pytest.fixture
def tls_dripping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The dripping store behind TLS, with a CA the car trusts."""
    certs = make_certs(tmp_path / "certs", [])
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    yield from _serve(context)


def test_a_dripped_input_over_tls_is_given_up(
    tls_dripping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TLS detaches the socket it wraps: the cut must reach the connection all the same.
    monkeypatch.setattr(_Dripping, "mode", "body")
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"not fetched within 0\.5 s"):
        fetch(tls_dripping, ref(), TIMEOUT_S)
    assert time.monotonic() - started < 4


def test_a_dripped_answer_to_a_result_upload_is_given_up(
    dripping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store takes the body, then sends its answer's headers a byte at a time.
    monkeypatch.setattr(_Dripping, "mode", "headers")
    started = time.monotonic()
    with pytest.raises(BrokerError, match="upload took longer than"):
        upload(dripping, b"r" * 1000, TIMEOUT_S)
    assert time.monotonic() - started < 4


def test_a_store_in_time_is_not_cut_off(dripping: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the same dripping store with a 10-byte input (1 s), and a limit of 2.5 s
    monkeypatch.setattr(dataplane, "MIN_BYTES_PER_S", 5)
    monkeypatch.setattr(_Dripping, "mode", "body")
    monkeypatch.setattr(_Dripping, "size", 10)
    # Then the car waits for every byte, and checks them as always
    assert fetch(dripping, ref(10), TIMEOUT_S) == body_of(10)
