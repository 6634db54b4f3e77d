# SPDX-License-Identifier: Apache-2.0
"""A PutObject body streamed into its file, hashed on the way, for the embedded store.

localbucket reads a whole body into a new bytes object, hashes it, then writes it out:
three passes over memory the VM has to hand the process fresh, for every 8 MiB block a
job uploads. Here the body goes through one reused 1 MiB buffer: each piece is hashed
while it is still in cache and written straight after. The SHA-256 checks the body
against the hash its request signed (or its ``x-amz-checksum-sha256``), as S3 does, and
is the object's ETag (broker_config.store_etags). A body that does not match is
refused, and the half-written file goes with it (localbucket writes to a temporary file
and renames it into place only when the write returned).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
from collections.abc import Iterator
from http import HTTPStatus
from typing import BinaryIO, Protocol

import localbucket

from parkpool.broker_config import store_etags

__all__ = ["STREAMED_BYTES", "Body"]

STREAMED_BYTES = 256 * 1024  # smaller bodies take localbucket's path: one read is cheap
PIECE_BYTES = 1 << 20


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


_buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # one per PUT in flight


class Body:
    """One request's body, ``length`` bytes still unread on ``stream``."""

    def __init__(self, stream: Readable, length: int, signed_sha256: str) -> None:
        self.stream = stream
        self.unread = length
        self.signed_sha256 = signed_sha256  # "" where the request left it unsigned

    def write_to(self, file: BinaryIO) -> str:
        """Copy the body into ``file``; its ETag. S3Error when it ends early or does not
        hash to what its request signed."""
        digest = hashlib.sha256()
        for piece in self._pieces():
            digest.update(piece)
            file.write(piece)
        sha256 = digest.hexdigest()
        if self.signed_sha256 and sha256 != self.signed_sha256:
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST,
                "XAmzContentSHA256Mismatch",
                "The body does not hash to the SHA-256 its request signed",
            )
        return store_etags.etag_of_sha256(sha256)

    def discard(self) -> None:
        """Read what is left and drop it. A PUT refused before its body was read (a 412)
        must still read it: the store closes the connection after an error, and closing
        a socket with unread bytes resets it, so the client would see a broken
        connection, not the 412."""
        for _ in self._pieces():
            pass

    def _pieces(self) -> Iterator[memoryview]:
        with _buffer() as buffer:
            view = memoryview(buffer)
            while self.unread:
                count = self.stream.readinto(view[: min(self.unread, len(view))])
                if not count:
                    raise localbucket.S3Error(
                        HTTPStatus.BAD_REQUEST,
                        "IncompleteBody",
                        "The request body ended before its Content-Length",
                    )
                self.unread -= count
                yield view[:count]


@contextlib.contextmanager
def _buffer() -> Iterator[bytearray]:
    try:
        buffer = _buffers.get_nowait()
    except queue.Empty:
        buffer = bytearray(PIECE_BYTES)
    try:
        yield buffer
    finally:
        _buffers.put(buffer)
