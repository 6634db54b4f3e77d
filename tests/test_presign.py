# SPDX-License-Identifier: Apache-2.0
"""The presigner makes the very URLs boto3's ``generate_presigned_url`` makes.

Pure signing, no store: the integration tests (test_claimcheck.py) prove the store
accepts these URLs for their own object and method only, and refuses them once expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import CredentialRetrievalError

from parkpool.gateway.gateway import Gateway, GatewaySettings
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.presign import Presigner
from parkpool.runtime.settings import KafkaConnection, MqttConnection, Secret, StoreConnection
from parkpool.schemas.errors import BrokerError, ConfigError
from tests.test_presign_refresh import metadata

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

    creds = RefreshableCredentials.create_from_metadata(
        metadata("AKIDFIRST", 300), lambda: metadata("AKIDSECOND", 3600), "test"
    )
    signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", creds)
    # When a URL is signed after the presigner was made
    url = signer.get(KEYS[0], 30)
    # Then it names the refreshed key, not the one the presigner was made with
    assert "X-Amz-Credential=AKIDSECOND%2F" in url


def test_no_credentials_is_a_clear_error_at_start() -> None:
    # When a presigner is made without credentials, Then it says so before any URL
    with pytest.raises(ConfigError, match="no credentials"):
        Presigner(ENDPOINT, "parkpool", "eu-west-1", None)


@pytest.fixture
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's chain finds nothing: no AWS_* keys, no files, no instance role."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_ambient_credentials")
@pytest.mark.parametrize(
    ("access", "secret", "match"),
    [("", "", "no credentials for the object store at"), ("AKIDEXAMPLE", "", "both")],
)
def test_a_store_without_credentials_fails_at_start(access: str, secret: str, match: str) -> None:
    # Given a store configured without (whole) credentials, and none in the environment
    conn = StoreConnection(ENDPOINT, access_key=access, secret_key=Secret(secret))
    # When it is opened (a gateway's or client's start), Then it fails by name, at once
    with pytest.raises(ConfigError, match=match):
        BlobStore(conn)


@pytest.mark.usefixtures("no_ambient_credentials")
def test_a_gateway_without_store_credentials_does_not_start() -> None:
    # Given a gateway configured with a store but no credentials for it
    settings = GatewaySettings(
        "gw1",
        KafkaConnection("127.0.0.1:9"),
        MqttConnection("127.0.0.1", 9),
        "ns",
        store=StoreConnection(ENDPOINT),
    )
    # Then it refuses to be built, before it could lease a task it cannot presign
    with pytest.raises(ConfigError, match="--store-access-key"):
        Gateway(settings)


def test_a_failed_refresh_is_a_broker_error() -> None:
    # Given credentials about to expire whose refresh fails (an instance role's metadata
    # service that does not answer)
    def refresh() -> dict[str, str]:
        raise CredentialRetrievalError(provider="iam-role", error_msg="no answer")

    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    creds = RefreshableCredentials.create_from_metadata(
        {"access_key": "AKID", "secret_key": "s", "token": "", "expiry_time": expiry},
        refresh,
        "test",
    )
    store = BlobStore(StoreConnection(ENDPOINT, access_key="AKID", secret_key=Secret("s")))
    store._presigner = Presigner(ENDPOINT, "parkpool", "eu-west-1", creds)
    # When a URL is signed, Then the failure is the project's own, naming the key
    with pytest.raises(BrokerError, match=f"cannot presign {KEYS[0]}"):
        store.presign_get(KEYS[0], 30)


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
