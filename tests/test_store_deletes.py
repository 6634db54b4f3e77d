# SPDX-License-Identifier: Apache-2.0
"""Deleting a job's objects in batches (DeleteObjects), against the embedded store as S3
answers it, and creating a bucket where S3 wants its region named."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import localbucket
import pytest
from botocore.exceptions import ClientError

from parkpool.app.children import store_connection
from parkpool.broker_config import store_deletes
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime import blobstore
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.runtime.settings import Secret
from parkpool.schemas import BrokerError


def _put(store: BlobStore, prefix: str, n: int) -> list[str]:
    keys = []
    for i in range(n):
        data = f"{prefix}{i}".encode()
        keys.append(f"{prefix}{i}")
        store.put_if_absent(keys[-1], data, sha256_hex(data))
    return keys


def _listed(store: BlobStore, prefix: str) -> list[str]:
    return sorted(key for key, _ in store.keys(prefix))


@pytest.mark.integration
class TestBatchDeletes:
    def test_a_prefix_goes_in_batches_and_nothing_beside_it(
        self, store: BlobStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given 7 objects of one job and 2 of another, and batches of 3
        monkeypatch.setattr(blobstore, "DELETE_BATCH", 3)
        run = uuid.uuid4().hex[:8]
        _put(store, f"jobs/del{run}/in/", 7)
        kept = _put(store, f"jobs/keep{run}/in/", 2)
        # When the first job's prefix is deleted
        deleted = store.delete_prefix(f"jobs/del{run}/")
        # Then all 7 went, in 3 requests, and the other job's objects are still there
        assert deleted == 7
        assert store.delete_requests == 3
        assert _listed(store, f"jobs/del{run}/") == []
        assert _listed(store, f"jobs/keep{run}/") == kept

    def test_the_store_answers_each_key_as_s3_does(self, store: BlobStore) -> None:
        run = uuid.uuid4().hex[:8]
        there = _put(store, f"jobs/ans{run}/", 2)
        named = [*there, f"jobs/ans{run}/never-written", "jobs/../escape"]
        answer = store._client.delete_objects(
            Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in named]}
        )
        # A key that was never there counts as deleted; one that is no key is refused
        assert sorted(d["Key"] for d in answer["Deleted"]) == sorted(named[:3])
        assert [(e["Key"], e["Code"]) for e in answer["Errors"]] == [
            ("jobs/../escape", "InvalidArgument")
        ]
        assert _listed(store, f"jobs/ans{run}/") == []

    def test_a_key_below_an_object_counts_as_deleted(self, store: BlobStore) -> None:
        run = uuid.uuid4().hex[:8]
        [blocker] = _put(store, f"jobs/below{run}/a", 1)  # "a0": a file, not a folder
        answer = store._client.delete_objects(
            Bucket=store.bucket, Delete={"Objects": [{"Key": f"{blocker}/x"}]}
        )
        assert [d["Key"] for d in answer["Deleted"]] == [f"{blocker}/x"]
        assert "Errors" not in answer
        assert _listed(store, f"jobs/below{run}/") == [blocker]

    def test_a_quiet_answer_names_only_the_failures(self, store: BlobStore) -> None:
        run = uuid.uuid4().hex[:8]
        there = _put(store, f"jobs/quiet{run}/", 2)
        answer = store._client.delete_objects(
            Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in there], "Quiet": True}
        )
        assert "Deleted" not in answer and "Errors" not in answer
        assert _listed(store, f"jobs/quiet{run}/") == []

    def test_the_list_names_its_md5_for_stores_that_want_one(self, store: BlobStore) -> None:
        run = uuid.uuid4().hex[:8]
        there = _put(store, f"jobs/md5{run}/", 1)
        sent: list[dict[str, str]] = []
        store._client.meta.events.register(
            "before-send.s3.DeleteObjects", lambda request, **_: sent.append(dict(request.headers))
        )
        store.delete(there)
        assert "Content-MD5" in sent[0]  # and the store checked it: the delete went through
        assert _listed(store, f"jobs/md5{run}/") == []

    def test_a_list_changed_on_the_way_deletes_nothing(self, store: BlobStore) -> None:
        # Given a delete request for one object, whose body is changed after it was
        # signed so that it names another object of the same length
        run = uuid.uuid4().hex[:8]
        victim, target = _put(store, f"jobs/dig{run}/", 2)[::-1]

        def swap(request: Any, **_: Any) -> None:
            request.body = request.body.replace(target.encode(), victim.encode())

        store._client.meta.events.register("before-send.s3.DeleteObjects", swap)
        # Then the store refuses it by its digest, and both objects are still there
        with pytest.raises(ClientError, match="BadDigest"):
            store._client.delete_objects(Bucket=store.bucket, Delete={"Objects": [{"Key": target}]})
        assert _listed(store, f"jobs/dig{run}/") == sorted([victim, target])

    def test_a_refused_key_is_named(self, store: BlobStore) -> None:
        run = uuid.uuid4().hex[:8]
        there = _put(store, f"jobs/ref{run}/", 1)
        with pytest.raises(BrokerError, match=r"did not delete 1 of 2 objects: jobs/\.\./x: Inv"):
            store.delete([*there, "jobs/../x"])
        assert _listed(store, f"jobs/ref{run}/") == []  # the rest of the batch went


@pytest.mark.integration
class TestEnsureBucket:
    def test_a_bucket_outside_us_east_1_is_created_in_its_region(
        self, brokers: EmbeddedBrokers
    ) -> None:
        conn = dataclasses.replace(
            store_connection(brokers), bucket=f"pp-{uuid.uuid4().hex[:10]}", region="eu-west-1"
        )
        store = BlobStore(conn)
        sent: list[bytes] = []
        store._client.meta.events.register(
            "before-send.s3.CreateBucket", lambda request, **_: sent.append(request.body or b"")
        )
        store.ensure_bucket()
        store.ensure_bucket()  # there already: not created twice
        assert len(sent) == 1
        assert b"<LocationConstraint>eu-west-1</LocationConstraint>" in sent[0]
        store._client.head_bucket(Bucket=conn.bucket)

    def test_a_bucket_these_credentials_cannot_read_is_named_not_created(
        self, brokers: EmbeddedBrokers
    ) -> None:
        conn = dataclasses.replace(store_connection(brokers), secret_key=Secret("wrong"))
        with pytest.raises(BrokerError, match=f"cannot use bucket {conn.bucket}: 403"):
            BlobStore(conn).ensure_bucket()


class _NoBatchClient:
    """A store without DeleteObjects (GCS's XML API answers it NotImplemented)."""

    def __init__(self) -> None:
        self.batches = 0
        self.deleted: list[str] = []

    def delete_objects(self, **_: Any) -> dict[str, Any]:
        self.batches += 1
        error = {"Error": {"Code": "NotImplemented", "Message": "not here"}}
        raise ClientError(error, "DeleteObjects")  # type: ignore[arg-type]

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803 - boto3's names
        self.deleted.append(Key)


@pytest.fixture
def offline_store() -> Iterator[BlobStore]:
    from parkpool.runtime.settings import StoreConnection

    yield BlobStore(StoreConnection("http://127.0.0.1:9", "b", "k", Secret("s")))


def test_a_store_without_batch_deletes_is_asked_key_by_key_from_then_on(
    offline_store: BlobStore,
) -> None:
    client = _NoBatchClient()
    offline_store._client = client
    offline_store.delete(["a", "b"])
    offline_store.delete(["c"])
    assert client.deleted == ["a", "b", "c"]
    assert client.batches == 1  # asked once, then remembered


def test_a_store_without_batch_deletes_is_asked_again_after_a_while(
    offline_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One NotImplemented (a proxy, a store mid-upgrade) must not cost a request per key
    for the client's whole life: DeleteObjects is asked again after BATCH_PROBE_S."""
    now = [1000.0]
    monkeypatch.setattr(blobstore, "_clock", lambda: now[0])
    client = _NoBatchClient()
    offline_store._client = client
    offline_store.delete(["a"])
    now[0] += blobstore.BATCH_PROBE_S - 1
    offline_store.delete(["b"])
    assert client.batches == 1  # still remembered
    now[0] += 1
    offline_store.delete(["c"])
    assert client.batches == 2  # asked again, and refused again: key by key once more
    assert client.deleted == ["a", "b", "c"]


class _FlakyBatchClient:
    """A store whose first DeleteObjects fails outright (a 503) and whose others work."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:  # noqa: N803
        self.batches.append([o["Key"] for o in Delete["Objects"]])
        if len(self.batches) == 1:
            error = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate"}}
            raise ClientError(error, "DeleteObjects")  # type: ignore[arg-type]
        return {}


def test_a_failed_batch_does_not_keep_the_next_from_going(
    offline_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobstore, "DELETE_BATCH", 3)
    client = _FlakyBatchClient()
    offline_store._client = client
    with pytest.raises(BrokerError, match="did not delete 3 of 5 objects: a: SlowDown"):
        offline_store.delete(["a", "b", "c", "d", "e"])
    assert client.batches == [["a", "b", "c"], ["d", "e"]]


class _ConflictingClient:
    """S3 answering 409 ConditionalRequestConflict to the first write of a key."""

    def __init__(self, stored_by_other: bool) -> None:
        self.stored_by_other = stored_by_other
        self.puts = 0

    def put_object(self, **_: Any) -> None:
        self.puts += 1
        if self.puts == 1:
            error = {"Error": {"Code": "ConditionalRequestConflict", "Message": "retry"}}
            raise ClientError(error, "PutObject")  # type: ignore[arg-type]

    def head_object(self, **_: Any) -> None:
        if not self.stored_by_other:
            raise ClientError({"Error": {"Code": "404"}}, "HeadObject")  # type: ignore[arg-type]


def test_a_conflicting_write_is_tried_again_unless_the_object_is_there(
    offline_store: BlobStore,
) -> None:
    # A 409 whose object never landed: written on the next try, and counted as written
    lost = _ConflictingClient(stored_by_other=False)
    offline_store._client = lost
    assert offline_store.put_if_absent("jobs/j/in/x", b"x", sha256_hex(b"x"))
    assert lost.puts == 2
    # A 409 while another writer's same bytes landed: there, and not written by us
    landed = _ConflictingClient(stored_by_other=True)
    offline_store._client = landed
    assert not offline_store.put_if_absent("jobs/j/in/x", b"x", sha256_hex(b"x"))
    assert landed.puts == 1


def test_a_delete_list_is_read_as_s3_reads_it() -> None:
    body = (
        b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Object><Key>a/1</Key></Object><Object><Key>b</Key></Object><Quiet>true</Quiet>"
        b"</Delete>"
    )
    assert store_deletes.parse(body) == store_deletes.DeleteList(("a/1", "b"), quiet=True)
    plain = b"<Delete><Object><Key>x</Key></Object></Delete>"
    assert store_deletes.parse(plain) == store_deletes.DeleteList(("x",), quiet=False)


@pytest.mark.parametrize(
    "body",
    [
        b"not xml",
        b"<Remove><Object><Key>a</Key></Object></Remove>",
        b"<Delete><Object><Key></Key></Object></Delete>",
        b"<Delete></Delete>",
        b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>",
    ],
    ids=["not-xml", "not-delete", "empty-key", "no-object", "too-many"],
)
def test_a_delete_list_that_is_not_one_is_malformed(body: bytes) -> None:
    with pytest.raises(localbucket.S3Error) as caught:
        store_deletes.parse(body)
    assert caught.value.code == "MalformedXML"


def test_a_delete_list_must_name_its_digest() -> None:
    body = b"<Delete><Object><Key>a</Key></Object></Delete>"
    with pytest.raises(localbucket.S3Error, match="Missing required header") as caught:
        store_deletes.check_digest(body, {})
    assert caught.value.code == "InvalidRequest"
    # Any of S3's checksums will do; those the standard library computes are checked
    store_deletes.check_digest(body, {"x-amz-checksum-crc32c": "AAAAAA=="})
    with pytest.raises(localbucket.S3Error) as wrong:
        store_deletes.check_digest(body, {"x-amz-checksum-sha1": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="})
    assert wrong.value.code == "BadDigest"
