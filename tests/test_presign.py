# SPDX-License-Identifier: Apache-2.0
"""The presigner makes the very URLs boto3's ``generate_presigned_url`` makes.

Pure signing, no store: the integration tests (test_claimcheck.py) prove the store
accepts these URLs for their own object and method only, and refuses them once expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.credentials import Credentials, RefreshableCredentials

from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.presign import Presigner
from parkpool.runtime.settings import Secret, StoreConnection

ENDPOINT = "http://127.0.0.1:9000"
KEYS = [
    "jobs/0123abcd/in/" + "f" * 64,
    "jobs/0123abcd/out/3-7",
    "odd keys/with spaces+plus/ünïcode~tilde/a=b&c",
]


def boto3_url(method: str, key: str, expires: int, **credentials: Any) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name="eu-west-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        **credentials,
    )
    params = {"Bucket": "parkpool", "Key": key}
    if method == "put_object":
        params["IfNoneMatch"] = "*"
    url: str = client.generate_presigned_url(method, Params=params, ExpiresIn=expires)
    return url


def same_second(make: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """Both URLs signed within one clock second (X-Amz-Date is whole seconds)."""
    for _ in range(5):
        before = int(time.time())
        pair = make()
        if int(time.time()) == before:
            return pair
    raise AssertionError("could not sign twice within one second")


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method", ["get_object", "put_object"])
def test_the_presigner_makes_boto3s_url(method: str, key: str) -> None:
    # Given the same key, credentials, endpoint, region and lifetime
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG")
    signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", creds)
    sign = signer.get if method == "get_object" else signer.put_once

    def both() -> tuple[str, str]:
        theirs = boto3_url(
            method, key, 61, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=creds.secret_key
        )
        return theirs, sign(key, 61)

    # When both sign it in the same second
    theirs, ours = same_second(both)
    # Then the URLs are the same, signature included
    assert ours == theirs
    assert "X-Amz-Signature=" in ours


def test_a_session_token_is_signed_into_the_url() -> None:
    # Given temporary credentials (an instance role's, IRSA's)
    creds = Credentials("ASIAEXAMPLE", "secret", token="session/token+1==")
    signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", creds)

    def both() -> tuple[str, str]:
        theirs = boto3_url(
            "get_object",
            KEYS[0],
            30,
            aws_access_key_id="ASIAEXAMPLE",
            aws_secret_access_key="secret",
            aws_session_token="session/token+1==",
        )
        return theirs, signer.get(KEYS[0], 30)

    theirs, ours = same_second(both)
    # Then the token travels in the URL, as boto3 puts it there
    assert "X-Amz-Security-Token=session%2Ftoken%2B1%3D%3D" in ours
    assert ours == theirs


def test_rotating_credentials_are_read_at_each_signature() -> None:
    # Given credentials about to expire, which a refresh replaces (an instance role's)
    def metadata(access_key: str, lifetime_s: float) -> dict[str, str]:
        expiry = time.gmtime(time.time() + lifetime_s)
        return {
            "access_key": access_key,
            "secret_key": "s",
            "token": "",
            "expiry_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", expiry),
        }

    creds = RefreshableCredentials.create_from_metadata(
        metadata("AKIDFIRST", 300), lambda: metadata("AKIDSECOND", 3600), "test"
    )
    signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", creds)
    # When a URL is signed after the presigner was made
    url = signer.get(KEYS[0], 30)
    # Then it names the refreshed key, not the one the presigner was made with
    assert "X-Amz-Credential=AKIDSECOND%2F" in url


def test_no_credentials_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no credentials"):
        Presigner(ENDPOINT, "parkpool", "eu-west-1", None).get(KEYS[0], 30)


def test_the_blob_store_presigns_for_its_public_endpoint() -> None:
    # Given a store reached at one address by the SDK and another by cars
    conn = StoreConnection(
        "http://10.0.0.5:9000",
        access_key="AKIDEXAMPLE",
        secret_key=Secret("s"),
        public_endpoint="https://store.example.com",
    )
    url = BlobStore(conn).presign_get(KEYS[0], 10)
    # Then the URL names the public one, and lives a second longer than asked
    assert url.startswith("https://store.example.com/parkpool/jobs/0123abcd/in/")
    assert "X-Amz-Expires=11&" in url
