# SPDX-License-Identifier: Apache-2.0
"""The embedded store's ETags: the first 128 bits of the object's SHA-256, not its MD5.

S3 promises an ETag that changes when an object's bytes do. It is their MD5 only for
some uploads (not multipart ones, not SSE-KMS), and nothing here reads it as one: Tansu
and the SDK use it as an opaque version for If-Match. localbucket hashed every upload
with MD5 for it, on top of the SHA-256 the store already checks against the request's
signed checksum (``objectstore.VerifyingHandler._read_body``). MD5 ran at 691 MiB/s on
a 2-core VM, SHA-256 at 1,369 MiB/s, so each data-plane PUT paid 1.45 CPU-ms per MiB
for a tag. Here the tag reuses the digest that check made, and where no check ran, one
SHA-256 pass makes it.

Every place localbucket makes an ETag (a write, a copy, a multipart part, a cache miss
after a restart) goes through ``install()``'s functions, so one object always has one
ETag, whichever path computed it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

import localbucket

__all__ = [
    "etag_of_bytes",
    "etag_of_fd",
    "etag_of_sha256",
    "forget",
    "forget_verified",
    "install",
    "note_verified",
    "object_etag",
    "signature",
]

_BLOCK = 1024 * 1024
_HEX_CHARS = 32  # an MD5's length: clients that size ETags keep working

_verified = threading.local()  # the body this request thread checked, and its SHA-256
_cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}
_cache_lock = threading.Lock()


def etag_of_bytes(data: bytes | memoryview) -> str:
    return _tag(hashlib.sha256(data).hexdigest())


def etag_of_sha256(sha256_hex: str) -> str:
    """The ETag of bytes whose SHA-256 the caller has just computed."""
    return _tag(sha256_hex)


def etag_of_fd(fd: int) -> str:
    """The ETag of what an open file holds, read from offset 0 whatever its position."""
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _BLOCK, offset):
        digest.update(block)
        offset += len(block)
    return _tag(digest.hexdigest())


def note_verified(body: bytes, sha256_hex: str) -> None:
    """The request thread checked ``body`` against ``sha256_hex``: writing it reuses that."""
    _verified.entry = (body, sha256_hex)


def forget_verified() -> None:
    """The request is over: let go of the body it checked, written or not."""
    _verified.entry = None


def signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What a cached ETag is kept against: the file's identity, size and mtime."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def object_etag(path: Path | str, stat: os.stat_result | None = None) -> str:
    """A stored file's ETag, cached while its identity, size and mtime are unchanged
    (``stat``: the file's, when the caller has just taken it)."""
    stat = stat or os.stat(path)
    signature_now = signature(stat)
    with _cache_lock:
        cached = _cache.get(str(path))
    if cached and cached[0] == signature_now:
        return cached[1]
    with open(path, "rb") as file:
        etag = etag_of_fd(file.fileno())
    remember_etag(path, etag, signature_now)
    return etag


def forget(path: Path | str) -> None:
    """The object at ``path`` was deleted: its entry would otherwise stay for good."""
    with _cache_lock:
        _cache.pop(str(path), None)


def remember_etag(
    path: Path | str, etag: str, signature: tuple[int, int, int, int] | None = None
) -> None:
    signature = signature or localbucket.stat_signature(Path(path))
    with _cache_lock:
        _cache[str(path)] = (signature, etag)


def write_bytes(file: BinaryIO, data: bytes) -> str:
    """localbucket's PUT and UploadPart write: the bytes, and their ETag."""
    file.write(data)
    entry = getattr(_verified, "entry", None)
    _verified.entry = None
    if entry is not None and entry[0] is data:
        return _tag(entry[1])
    return etag_of_bytes(data)


def copy_ranges(destination: BinaryIO, ranges: list[tuple[Path, int, int]]) -> str:
    """localbucket's CopyObject and CompleteMultipartUpload: (path, start, length) file
    ranges written to ``destination``; the ETag of what was written."""
    digest = hashlib.sha256()
    for source, start, length in ranges:
        with source.open("rb") as file:
            file.seek(start)
            remaining = length
            while remaining > 0:
                block = file.read(min(remaining, _BLOCK))
                if not block:
                    raise localbucket.S3Error(
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "A source file changed while it was being copied.",
                    )
                destination.write(block)
                digest.update(block)
                remaining -= len(block)
    return _tag(digest.hexdigest())


def install() -> None:
    """Make localbucket's every ETag these; call once, in the store's process, before it
    serves (localbucket looks these functions up by name on each request)."""
    localbucket.object_etag = object_etag
    localbucket.remember_etag = remember_etag
    localbucket.write_bytes = write_bytes
    localbucket.copy_ranges = copy_ranges


def _tag(sha256_hex: str) -> str:
    return sha256_hex[:_HEX_CHARS]
