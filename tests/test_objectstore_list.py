# SPDX-License-Identifier: Apache-2.0
"""Listing in the embedded store walks only the folder a prefix names (Tansu lists a
partition on every fetch), and must answer exactly as S3 does: prefix, delimiter,
start-after and paging, checked over HTTP against a plain model of S3's rules."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest
from botocore.config import Config

from parkpool.broker_config.launcher import EmbeddedBrokers

pytestmark = pytest.mark.integration

# A folder-backed store cannot hold both "ab" and "ab/..."; S3 can, parkpool never does.
NAMES = ("a/1", "a/2", "a/b/3", "a/b/4/5", "ab", "abc/6", "b/1", "b/2/x", "c", "d/e/f/g")


def _client(brokers: EmbeddedBrokers) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=brokers.store_endpoint,
        aws_access_key_id=brokers.store_access_key,
        aws_secret_access_key=brokers.store_secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _s3_model(keys: list[str], prefix: str, delimiter: str, after: str) -> list[str]:
    """What S3 lists, in order: keys after ``after``, and the common prefixes those keys
    roll up into, marked with a trailing '*'."""
    out: list[str] = []
    for key in sorted(keys, key=str.encode):
        if not key.startswith(prefix) or key.encode() <= after.encode():
            continue
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        entry = f"{key[: cut + len(delimiter)]}*" if cut >= 0 else key
        if not out or out[-1] != entry:
            out.append(entry)
    return out


def _listed(client: Any, bucket: str, prefix: str, delimiter: str, after: str) -> list[str]:
    """Every entry the store lists, two per page, following continuation tokens."""
    entries: list[str] = []
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 2}
    if delimiter:
        args["Delimiter"] = delimiter
    if after:
        args["StartAfter"] = after
    while True:
        page = client.list_objects_v2(**args)
        entries += [c["Key"] for c in page.get("Contents", [])]
        entries += [f"{p['Prefix']}*" for p in page.get("CommonPrefixes", [])]
        if not page["IsTruncated"]:
            return sorted(entries, key=lambda e: e.rstrip("*").encode())
        args["ContinuationToken"] = page["NextContinuationToken"]


def test_listing_a_folder_answers_as_s3_does(brokers: EmbeddedBrokers) -> None:
    # Given objects in nested folders, under a root of their own in the shared bucket
    client, bucket = _client(brokers), brokers.data_bucket
    root = f"list-{uuid.uuid4().hex[:8]}/"
    keys = [root + name for name in NAMES]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    # When listed by folder and by partial name, with and without a delimiter and a
    # start-after inside, before and past the folder
    prefixes = ["", "a", "a/", "a/b/", "a/b/4/", "ab", "abc/", "b/2/", "d/e/", "zz/", "c"]
    afters = ["", "a/1", "a/b", "a/b/3", "ab", "abc/", "b", "zz"]
    for tail in prefixes:
        for delimiter in ("", "/"):
            for after in afters:
                prefix, start = root + tail, root + after if after else ""
                # Then the entries are exactly S3's
                expected = _s3_model(keys, prefix, delimiter, start)
                got = _listed(client, bucket, prefix, delimiter, start)
                assert got == expected, (prefix, delimiter, start)
    # And a start-after before the root, or past it, lists all of it or none of it
    assert len(_listed(client, bucket, root, "", root[:-1])) == len(keys)
    assert _listed(client, bucket, root + "a/", "", root + "b") == []
