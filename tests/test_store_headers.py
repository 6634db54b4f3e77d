# SPDX-License-Identifier: Apache-2.0
"""The store's request headers answer as http.server's own do (broker_config.store_headers)."""

from __future__ import annotations

import http.client
import io

import pytest

from parkpool.broker_config.store_headers import Headers

RAW = (
    b"Host: 127.0.0.1:9000\r\n"
    b"X-Amz-Date: 20261206T230000Z\r\n"
    b"x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
    b'If-Match: "first"\r\n'
    b'if-match: "second"\r\n'
    b"Content-Length: 12\r\n"
    b"X-Latin: caf\xe9\r\n"
    b"\r\n"
)
NAMES = ["host", "HOST", "x-amz-date", "X-AMZ-CONTENT-SHA256", "If-Match", "content-length",
         "x-latin", "absent", ""]  # fmt: skip


def parsed(cls: type[http.client.HTTPMessage]) -> http.client.HTTPMessage:
    return http.client.parse_headers(io.BytesIO(RAW), _class=cls)


@pytest.mark.parametrize("name", NAMES)
def test_lookups_are_the_plain_messages(name: str) -> None:
    ours, theirs = parsed(Headers), parsed(http.client.HTTPMessage)
    assert ours.get(name) == theirs.get(name)
    assert ours.get(name, "default") == theirs.get(name, "default")
    assert ours[name] == theirs[name]
    assert (name in ours) == (name in theirs)


def test_the_first_of_repeated_headers_is_answered() -> None:
    assert parsed(Headers)["if-match"] == '"first"'


def test_a_changed_header_list_is_answered_afresh() -> None:
    # Given headers already looked up once, and a plain message beside them
    ours, theirs = parsed(Headers), parsed(http.client.HTTPMessage)
    assert ours["If-Match"] == '"first"'
    # When both change the same ways, each lookup is the plain message's
    changes = [
        lambda m: m.__delitem__("If-Match"),  # every If-Match goes
        lambda m: m.__setitem__("Host", "elsewhere"),  # a second Host, after the first
        lambda m: m.__delitem__("host"),
        lambda m: m.replace_header("Content-Length", "0"),
    ]
    for change in changes:
        change(ours)
        change(theirs)
        for name in ("if-match", "host", "content-length"):
            assert (ours[name], name in ours) == (theirs[name], name in theirs), name


def test_a_non_string_is_not_in_the_headers() -> None:
    assert 1 not in parsed(Headers)
