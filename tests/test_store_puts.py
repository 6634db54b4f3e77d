# SPDX-License-Identifier: Apache-2.0
"""The embedded store streams a PutObject body to its file, hashed on the way
(broker_config.store_puts): the body is checked as S3 checks it, its ETag is the one the
other write paths give, and a PUT refused before its body was read is answered, not
reset."""

from __future__ import annotations

import hashlib
import io

import localbucket
import pytest

from parkpool.app.children import store_connection
from parkpool.broker_config import store_puts
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.store_etags import etag_of_bytes
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.schemas.blobref import output_key
from parkpool.worker.dataplane import upload

BODY = bytes(range(256)) * 12_000  # 3 MiB: several of the buffer's pieces


def test_a_streamed_body_is_written_whole_under_the_etag_of_its_bytes() -> None:
    written = io.BytesIO()
    body = store_puts.Body(io.BytesIO(BODY), len(BODY), sha256_hex(BODY))
    assert body.write_to(written) == etag_of_bytes(BODY)
    assert written.getvalue() == BODY and body.unread == 0


def test_a_body_that_is_not_what_its_request_signed_is_refused() -> None:
    body = store_puts.Body(io.BytesIO(BODY), len(BODY), hashlib.sha256(b"other").hexdigest())
    with pytest.raises(localbucket.S3Error) as refused:
        body.write_to(io.BytesIO())
    assert refused.value.code == "XAmzContentSHA256Mismatch"


def test_a_body_shorter_than_its_length_is_refused() -> None:
    body = store_puts.Body(io.BytesIO(BODY[:-1]), len(BODY), "")
    with pytest.raises(localbucket.S3Error) as refused:
        body.write_to(io.BytesIO())
    assert refused.value.code == "IncompleteBody"


def test_discard_reads_exactly_what_is_left() -> None:
    stream = io.BytesIO(BODY + b"next request")
    store_puts.Body(stream, len(BODY), "").discard()
    assert stream.read() == b"next request"


@pytest.mark.integration
def test_a_refused_large_put_is_answered_not_reset(brokers: EmbeddedBrokers) -> None:
    """A PUT refused before its body was read (412: the object exists) must still read
    the body: closing a socket with unread bytes resets it, and the client would see a
    broken connection instead of the store's answer."""
    store = BlobStore(store_connection(brokers))
    block = bytes(range(256)) * 65_536  # 16 MiB: more than the sockets' buffers hold
    key = f"jobs/streamed/in/{sha256_hex(block)}"
    # Given a content-addressed block already stored
    assert store.put_if_absent(key, block, sha256_hex(block))
    # When another job's upload of the same block races in (If-None-Match: *)
    # Then it is told the object is there, and nothing is rewritten
    assert not store.put_if_absent(key, block, sha256_hex(block))
    # And a car's retried result upload to its write-once URL is answered 412, not reset
    url = store.presign_put(output_key("streamed", "gw", 1, 1), 30)
    upload(url, block, 10)
    upload(url, block, 10)
    assert store.get(key) == block == store.get(output_key("streamed", "gw", 1, 1))
