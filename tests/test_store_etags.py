# SPDX-License-Identifier: Apache-2.0
"""The embedded store's ETags (pure logic; the store itself is tested over HTTP in
tests/test_durable_kafka.py): a write reuses the digest its request's check made, and
only for that very body, and only until the request is over."""

from __future__ import annotations

import hashlib
import io

from parkpool.broker_config import store_etags


def test_a_write_reuses_the_checked_digest_of_its_own_body_only() -> None:
    body, other = b"checked body", b"another body"
    digest = hashlib.sha256(body).hexdigest()
    # Given a body the request thread checked
    store_etags.note_verified(body, digest)
    # Then writing another body hashes that one
    assert store_etags.write_bytes(io.BytesIO(), other) == store_etags.etag_of_bytes(other)
    # And the checked body's ETag is its digest's first 128 bits
    store_etags.note_verified(body, digest)
    assert store_etags.write_bytes(io.BytesIO(), body) == digest[:32]


def test_a_finished_request_lets_go_of_its_checked_body() -> None:
    body = b"never written"
    # Given a checked body whose write never came (a 412), under a digest that is not
    # its own, so that reusing it would show
    store_etags.note_verified(body, "0" * 64)
    # When the request ends
    store_etags.forget_verified()
    # Then a later write of the same object hashes it afresh
    assert store_etags.write_bytes(io.BytesIO(), body) == store_etags.etag_of_bytes(body)
