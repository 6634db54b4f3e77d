# SPDX-License-Identifier: Apache-2.0
"""Requests a car could send with a presigned URL that S3 refuses, refused by the
embedded store too, over a real socket: headers the URL did not sign, bodies shorter
than announced, lengths that are not lengths, and bodies with no length at all."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import pytest

from parkpool.runtime.blobstore import BlobStore, ObjectMissing, sha256_hex
from parkpool.schemas.blobref import output_key
from parkpool.worker.dataplane import upload

pytestmark = pytest.mark.integration


def _raw(url: str, method: str, headers: dict[str, str], body: bytes, half_close: bool) -> str:
    """Send one request as written, and return the status line and headers it got."""
    parts = urlsplit(url)
    lines = [f"{method} {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # the client is gone before the body's end
        answer = b""
        while b"\r\n\r\n" not in answer:
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    return answer.decode("latin-1")


def _lease_url(store: BlobStore) -> tuple[str, str]:
    key = output_key(f"req{uuid.uuid4().hex[:8]}", "gw", 1, 1)
    return key, store.presign_put(key, 60)


def _absent(store: BlobStore, key: str) -> bool:
    try:
        store.get(key)
    except ObjectMissing:
        return True
    return False


def test_a_header_the_url_did_not_sign_is_refused(store: BlobStore) -> None:
    # Given a secret object, and a car's write-once URL for its own outputs
    secret = f"jobs/other{uuid.uuid4().hex[:8]}/in/{sha256_hex(b'secret')}"
    store.put_if_absent(secret, b"secret", sha256_hex(b"secret"))
    key, url = _lease_url(store)
    # When the car adds a copy source to it, Then the store refuses, as S3 does
    headers = {"If-None-Match": "*", "x-amz-copy-source": f"/{store.bucket}/{secret}"}
    answer = _raw(url, "PUT", {**headers, "Content-Length": "0"}, b"", half_close=False)
    assert answer.startswith("HTTP/1.1 403")
    assert _absent(store, key)  # nothing was copied into the car's key


def test_a_body_cut_short_is_not_stored_and_the_key_stays_writable(store: BlobStore) -> None:
    key, url = _lease_url(store)
    headers = {"If-None-Match": "*", "Content-Length": "100"}
    answer = _raw(url, "PUT", headers, b"abc", half_close=True)
    assert answer.startswith("HTTP/1.1 400")
    assert _absent(store, key)
    # The car's retry, whole this time, still writes its one object
    upload(url, b"x" * 100, 10)
    assert store.get(key) == b"x" * 100


@pytest.mark.parametrize("length", ["-1", "1e3", "1 2", "6000000000"])
def test_a_length_that_is_not_one_is_refused_before_any_body_is_read(
    store: BlobStore, length: str
) -> None:
    key, url = _lease_url(store)
    headers = {"If-None-Match": "*", "Content-Length": length}
    answer = _raw(url, "PUT", headers, b"x" * 1000, half_close=True)
    assert answer.startswith("HTTP/1.1 400")
    assert _absent(store, key)


@pytest.mark.parametrize("key", ["k" * 1025, "jobs/" + "p" * 256 + "/x"], ids=["key", "part"])
def test_a_key_too_long_is_refused_by_name(store: BlobStore, key: str) -> None:
    url = store.presign_put(key, 60)
    answer = _raw(url, "PUT", {"If-None-Match": "*", "Content-Length": "1"}, b"x", False)
    assert answer.startswith("HTTP/1.1 400")
    # and the store goes on answering
    assert store.put_if_absent(f"jobs/after{uuid.uuid4().hex[:6]}", b"y", sha256_hex(b"y"))


def test_a_length_with_spaces_around_it_is_a_length(store: BlobStore) -> None:
    key, url = _lease_url(store)
    answer = _raw(url, "PUT", {"If-None-Match": "*", "Content-Length": "3 "}, b"abc", False)
    assert answer.startswith("HTTP/1.1 200")
    assert store.get(key) == b"abc"


@pytest.mark.parametrize("encoded", [False, True], ids=["plain", "percent-encoded-name"])
def test_a_presigned_body_with_no_length_is_refused(store: BlobStore, encoded: bool) -> None:
    key, url = _lease_url(store)
    if encoded:  # the same URL, its signature's name spelled another way
        assert "X-Amz-Signature=" in url
        url = url.replace("X-Amz-Signature=", "X-Amz-Signatur%65=")
    headers = {"If-None-Match": "*", "Transfer-Encoding": "chunked"}
    answer = _raw(url, "PUT", headers, b"3\r\nabc\r\n0\r\n\r\n", half_close=True)
    assert answer.startswith("HTTP/1.1 501")
    assert _absent(store, key)
