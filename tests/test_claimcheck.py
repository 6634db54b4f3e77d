# SPDX-License-Identifier: Apache-2.0
"""The claim check against the real object store and real brokers: bulk arrays go to
the store once per distinct block, records and messages carry references, cars fetch
with presigned URLs and check every hash, the SDK checks the hash of stored outputs,
confidential jobs store only ciphertext, and a job's objects go when the job ends."""

from __future__ import annotations

import dataclasses
import http.server
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from parkpool.gateway.settings import GatewaySettings
from parkpool.producer import client as client_module
from parkpool.producer import dlq
from parkpool.producer.claimcheck import MAX_OUTPUTS_BYTES, JobUploads, fetch_outputs
from parkpool.producer.jobs import JobFailed, JobState
from parkpool.producer.splitters import ChunkSpec, plan_gemm
from parkpool.producer.verify import input_tap
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.runtime.sealing import generate_box_key
from parkpool.runtime.settings import KafkaConnection, MqttConnection, Secret, StoreConnection
from parkpool.schemas import (
    Assignment,
    BlobRef,
    BrokerError,
    DecodeError,
    MqttTopics,
    Preempted,
    Result,
    TaskChunk,
    ValidationError,
    decode,
    encode,
)
from parkpool.schemas.blobref import input_key, job_prefix, output_key
from parkpool.schemas.kernels import MAX_ELEMS
from parkpool.schemas.reputation import Level
from parkpool.worker import transfer
from parkpool.worker.blobcache import BlobCache
from parkpool.worker.cancel import Cancel
from parkpool.worker.dataplane import CarData, fetch, upload
from parkpool.worker.fleet import Fleet
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.helpers import (
    SMALL_INLINE,
    RawMqtt,
    Unconfirmed,
    cancels_of,
    claim_check_client,
    hold_lease,
    job_objects,
    read_all,
    wait_for,
)


def _status(url: str, method: str = "GET", data: bytes | None = None, **headers: str) -> int:
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.integration
class TestStoreAccess:
    """What a car can do with a presigned URL, and nothing more (the store checks SigV4)."""

    def test_a_url_opens_only_its_own_object_for_its_own_method(self, store: BlobStore) -> None:
        # Given two objects and a GET URL for one
        store.put_if_absent("jobs/sec/in/a", b"A" * 100, sha256_hex(b"A" * 100))
        store.put_if_absent("jobs/sec/in/b", b"B" * 100, sha256_hex(b"B" * 100))
        url = store.presign_get("jobs/sec/in/a", 30)
        # Then it reads its object, and neither the other one nor a write nor a listing
        assert _status(url) == 200
        assert _status(url.replace("/in/a?", "/in/b?")) == 403
        assert _status(url, "PUT", b"x") == 403
        endpoint = store.conn.endpoint
        assert _status(f"{endpoint}/parkpool?list-type=2") == 403  # anonymous
        assert _status(f"{endpoint}/parkpool/jobs/sec/in/a") == 403

    def test_a_url_expires(self, store: BlobStore) -> None:
        # Given a URL asked to live one second, fetched within it
        data = b"expiring" * 10
        store.put_if_absent("jobs/exp/in/x", data, sha256_hex(data))
        signed = time.monotonic()
        url = store.presign_get("jobs/exp/in/x", 1)
        ref = BlobRef("x", sha256_hex(data), len(data))
        assert fetch(url, ref, 5) == data
        assert time.monotonic() - signed < 1  # else the next check proves nothing
        # When it has expired (its signed time is whole seconds, so it gets one more; by
        # 3 s after signing it must be refused)
        wait_for(lambda: _status(url) == 403, signed + 3.1 - time.monotonic(), "the expiry")
        # Then the store refuses it and the car sees a store error
        with pytest.raises(BrokerError, match="HTTP 403"):
            fetch(url, ref, 5)

    def test_an_upload_url_writes_once(self, store: BlobStore) -> None:
        # Given a lease's write-once upload URL
        url = store.presign_put(output_key("once", "gw-a", 3, 7), 30)
        # Then without the signed If-None-Match it is refused, with it it writes once
        assert _status(url, "PUT", b"first") == 403
        upload(url, b"first", 5)
        upload(url, b"second", 5)  # a retry is answered 412 and changes nothing
        assert store.get(output_key("once", "gw-a", 3, 7)) == b"first"
        # And it cannot write another lease's key, nor another gateway's lease of the chunk
        for other in (
            url.replace("/out/gw-a/3-7?", "/out/gw-a/3-8?"),
            url.replace("/out/gw-a/3-7?", "/out/gw-b/3-7?"),
        ):
            assert other != url
            assert _status(other, "PUT", b"x", **{"If-None-Match": "*"}) == 403

    def test_the_store_refuses_an_upload_that_is_not_what_its_checksum_names(
        self, store: BlobStore
    ) -> None:
        # Given the SDK's upload, whose body is bound by its SHA-256 checksum only
        # When the bytes sent are not the ones the checksum names
        with pytest.raises(BrokerError, match="XAmzContentSHA256Mismatch"):
            store.put_if_absent("jobs/bad/in/z", b"corrupted", sha256_hex(b"original"))
        # Then nothing was stored, and the right bytes are taken
        assert not store.exists("jobs/bad/in/z")
        assert store.put_if_absent("jobs/bad/in/z", b"original", sha256_hex(b"original"))

    def test_an_array_is_uploaded_from_its_own_memory(self, store: BlobStore) -> None:
        # Given a block larger than one read of the HTTP client, sent as a buffer
        block = np.arange(300_000, dtype=np.float32).reshape(600, 500)
        view = memoryview(block).cast("B")
        # When it is stored, and a copy with one element changed is sent under its hash
        assert store.put_if_absent("jobs/mv/in/a", view, sha256_hex(view))
        changed = block.copy()
        changed[599, 499] = -1
        with pytest.raises(BrokerError, match="XAmzContentSHA256Mismatch"):
            store.put_if_absent("jobs/mv/in/b", memoryview(changed), sha256_hex(view))
        # Then the store holds exactly the block's bytes, and not the copy
        assert store.get("jobs/mv/in/a") == block.tobytes()
        assert not store.exists("jobs/mv/in/b")

    def test_the_gemm_check_is_prepared_on_the_uploads_hashing_pass(self, store: BlobStore) -> None:
        # Given a gemm job's tasks (8 distinct blocks to store) and its check's tap
        rng = np.random.default_rng(9)
        a = rng.standard_normal((256, 128)).astype(np.float32)
        b = rng.standard_normal((128, 256)).astype(np.float32)
        plan = plan_gemm(a, b, tile=64)
        tasks = [
            TaskChunk("tap", i, len(plan.chunks), "gemm", {}, c.inputs, "r", 1e10, 0.0)
            for i, c in enumerate(plan.chunks)
        ]
        tap = input_tap("gemm", plan.chunks, rounds=1)
        assert tap is not None
        # When the claim check offloads them with it
        uploads = JobUploads(store, "tap", SMALL_INLINE, 1 << 20)
        try:
            sent = uploads.offload_all(tasks, tap)
            for task in sent:
                uploads.ready(task)
        finally:
            assert uploads.close() == 8
        # Then every block is stored under the hash of its bytes
        for task, chunk in zip(sent, plan.chunks, strict=True):
            for ref in task.refs:
                assert ref.sha256 == sha256_hex(chunk.inputs[ref.name].tobytes())
        # And the check's input side came with it: A·Σ_j B_j·x_j for every block of A
        prepared = tap.prepared()
        assert prepared is not None
        for block in {id(c.inputs["a"]): c.inputs["a"] for c in plan.chunks}.values():
            partners = {
                id(c.inputs["b"]): c.inputs["b"] for c in plan.chunks if c.inputs["a"] is block
            }
            y = sum(p.astype(np.float64) @ prepared.signs[k] for k, p in partners.items())
            np.testing.assert_allclose(prepared.abx[id(block)], block @ y, rtol=1e-4, atol=1e-3)

    def test_the_car_refuses_bytes_that_are_not_the_ones_named(self, store: BlobStore) -> None:
        # Given an object whose bytes differ from what a ref names
        store.put_if_absent("jobs/bad/in/y", b"tampered", sha256_hex(b"tampered"))
        url = store.presign_get("jobs/bad/in/y", 30)
        # Then the car refuses it by hash, and by size
        with pytest.raises(DecodeError, match="does not hash"):
            fetch(url, BlobRef("y", sha256_hex(b"original"), len(b"tampered")), 5)
        with pytest.raises(DecodeError, match="bytes, not"):
            fetch(url, BlobRef("y", sha256_hex(b"tampered"), 99), 5)

    def test_a_cached_block_named_with_another_size_is_refused(self, store: BlobStore) -> None:
        # Given a car that fetched and cached a 64-byte block
        block = np.arange(16, dtype=np.float32)
        sha = sha256_hex(block.tobytes())
        store.put_if_absent(f"jobs/hit/in/{sha}", block.tobytes(), sha)
        url = store.presign_get(f"jobs/hit/in/{sha}", 30)
        data = CarData(BlobCache(1 << 20), timeout_s=5)

        def task_naming(ref: BlobRef) -> tuple[Assignment, TaskChunk]:
            task = TaskChunk("hit", 0, 1, "reduce", {"op": "sum"}, {}, "r", 1e10, 0.0, refs=(ref,))
            return Assignment("gw1", "car", 1, 1, 1e10, encode(task), urls=(url,)), task

        good = BlobRef("x", sha, 64, "<f4", (16,))
        np.testing.assert_array_equal(data.hydrate(*task_naming(good)).inputs["x"], block)
        # When a later task names the same hash with another size and shape
        bad = BlobRef("x", sha, 128, "<f4", (32,))
        # Then the car refuses it as bad data (a nack), served from its cache or not
        with pytest.raises(DecodeError, match="bytes, not 128"):
            data.hydrate(*task_naming(bad))
        assert data.cache.stats().hits == 1

    def test_a_kernel_cannot_write_into_a_cached_block(self, store: BlobStore) -> None:
        # Given a car that fetched a block into its cache for one task
        block = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: read into a NumPy buffer
        sha = sha256_hex(block.tobytes())
        store.put_if_absent(f"jobs/ro/in/{sha}", block.tobytes(), sha)
        url = store.presign_get(f"jobs/ro/in/{sha}", 30)
        data = CarData(BlobCache(8 << 20), timeout_s=5)
        ref = BlobRef("x", sha, block.nbytes, "<f4", block.shape)
        task = TaskChunk("ro", 0, 1, "reduce", {"op": "sum"}, {}, "r", 1e10, 0.0, refs=(ref,))
        assignment = Assignment("gw1", "car", 1, 1, 1e10, encode(task), urls=(url,))
        first = data.hydrate(assignment, task).inputs["x"]
        # When a kernel tries to write into its input
        with pytest.raises(ValueError, match="read-only"):
            first[0] = 42.0
        # Then the next task that reads the block from the cache sees the store's bytes
        again = data.hydrate(assignment, task).inputs["x"]
        assert data.cache.stats().hits == 1
        np.testing.assert_array_equal(again, block)


@pytest.mark.integration
class TestClaimCheckJob:
    def test_gemm_stores_each_block_once_and_deletes_them_at_the_end(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:
        # Given a gateway and cars that share the store, and someone reading all of MQTT
        sniffer = RawMqtt(mqtt_conn, f"sniff-{namespace}")
        sniffer.subscribe(f"{namespace}/#")
        gateway_factory(store=store_conn)
        fleet = fleet_factory(3, result_inline_bytes=SMALL_INLINE)
        rng = np.random.default_rng(7)
        a = rng.standard_normal((256, 128)).astype(np.float32)
        b = rng.standard_normal((128, 256)).astype(np.float32)
        # When a gemm of 4 x 4 tiles runs: 4 row blocks and 4 column blocks
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            handle = sdk.submit("gemm", {"a": a, "b": b}, tile=64, job_id="ccgemm")
            # Then each distinct block was uploaded once, and nothing else
            inputs = [k for k in job_objects(store, "ccgemm") if "/in/" in k]
            assert len(inputs) == 8
            assert sdk.metrics.registry.get_sample_value("parkpool_sdk_blobs_uploaded_total") == 8
            # And the answer is right, outputs having come back through the store
            np.testing.assert_allclose(handle.wait(timeout=60), a @ b, rtol=1e-4, atol=1e-4)
            # And when the job has ended its objects are deleted
            wait_for(lambda: not job_objects(store, "ccgemm"), 15, "the job's objects deleted")
        # And no record or message carried a block: references only
        records = read_all(kafka_conn, sdk.topics.tasks) + read_all(kafka_conn, sdk.topics.results)
        sizes = [len(r.value() or b"") for r in records]
        assert len(sizes) == 32 and max(sizes) < 2048
        mqtt = [len(m.payload) for m in sniffer.received]
        sniffer.close()
        assert mqtt and max(mqtt) < 8192
        cars = list(fleet.vehicles.values())
        fetched = sum(w.data.cache.stats().bytes_fetched for w in cars)
        assert fetched >= 8 * 64 * 128 * 4  # every block reached some car from the store
        # And cars that stop give their cached blocks back at once
        assert sum(w.data.cache.stats().held_bytes for w in cars) > 0
        fleet.stop_all()
        assert [w.data.cache.stats().held_bytes for w in cars] == [0, 0, 0]

    @pytest.mark.parametrize("confirmed", [True, False], ids=["confirmed", "unconfirmed"])
    def test_a_cancelled_jobs_objects_go_only_once_gateways_were_told(
        self,
        confirmed: bool,
        gateway_factory: Callable[..., RunningGateway],
        namespace: str,
        kafka_conn: KafkaConnection,
        store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:
        # Given a stored job no car runs
        gateway_factory(store=store_conn)
        x = np.arange(2048, dtype=np.float64)
        job_id = f"cccan{int(confirmed)}"
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            handle = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id=job_id)
            assert job_objects(store, job_id)
            if not confirmed:  # Kafka does not confirm the cancel records (injected)
                live = sdk._live_producer()
                sdk._live_producer = lambda: Unconfirmed(live)  # type: ignore[method-assign]
            # When the caller cancels it
            if confirmed:
                handle.cancel()
                # Then its objects are deleted
                wait_for(lambda: not job_objects(store, job_id), 15, "the job's objects deleted")
            else:
                with pytest.raises(BrokerError, match="not confirmed"):
                    handle.cancel()
                # Then they stay (a chunk still queued would be sent after them; the
                # store's TTL collects them)
                time.sleep(2)
                assert job_objects(store, job_id)

    def test_confidential_jobs_store_only_ciphertext(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:
        # Given gateways holding the box key, cars that store outputs of 4 KiB or more,
        # and a sealed gemm whose inputs and outputs are known constants
        private, public = generate_box_key(tmp_path / "keys", "gateway-box")
        gateway_factory(store=store_conn, box_keys=(private,))
        fleet_factory(2, result_inline_bytes=SMALL_INLINE)
        a = np.full((128, 64), 2.5, dtype=np.float32)
        b = np.full((64, 128), 1.5, dtype=np.float32)
        # Everything the SDK reads back from the store, as the store held it
        outputs_read: list[bytes] = []

        def reading(store_: BlobStore, result: Result) -> Result:
            blob = store_.get(
                output_key(result.job_id, result.gateway_id, result.chunk_id, result.epoch)
            )
            outputs_read.append(blob)
            return fetch_outputs(store_, result)

        monkeypatch.setattr(client_module, "fetch_outputs", reading)
        with claim_check_client(namespace, kafka_conn, store_conn, gateway_box_key=public) as sdk:
            handle = sdk.submit(
                "gemm", {"a": a, "b": b}, tile=64, confidential=True, job_id="ccsealed"
            )
            # When the inputs are in the store (read them before the job can end)
            inputs = [store.get(key) for key in job_objects(store, "ccsealed")]
            # Then the caller gets the right answer, its outputs read back from the store
            np.testing.assert_allclose(handle.wait(timeout=60), a @ b)
        # And the store held one sealed blob per chunk for the inputs and the outputs,
        # neither with the data in clear
        assert len(inputs) == 4 and len(outputs_read) == 4
        for needle in (a[0, :4].tobytes(), (a @ b)[0, :4].tobytes()):
            assert not [blob for blob in inputs + outputs_read if needle in blob]

    def test_a_car_fault_hands_the_task_back_and_keeps_the_slot(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        store_conn: StoreConnection,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given one car whose input handling fails once with an error nothing expects
        gateway = gateway_factory(store=store_conn)
        real = CarData.hydrate
        faults: list[int] = []

        def flaky(
            self: CarData, assignment: Assignment, task: TaskChunk, cancel: Cancel | None
        ) -> TaskChunk:
            if not faults:
                faults.append(1)
                raise RuntimeError("a bug in the car")
            return real(self, assignment, task, cancel)

        monkeypatch.setattr(CarData, "hydrate", flaky)
        fleet_factory(1, concurrency=1, prefetch=0)
        x = np.arange(4096, dtype=np.float64)
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            # When it is given a job of several stored chunks
            handle = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=1024)
            # Then the job completes on that same car: the faulted task came back as a
            # kernel error and was redone, and the car's only slot was not lost
            assert handle.wait(timeout=60) == float(x.sum())
        assert faults == [1]
        failures = gateway.metric("parkpool_gateway_task_failures_total", reason="kernel_error")
        assert failures == 1

    def test_a_tampered_input_is_refused_by_every_car(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:
        # Given a job whose one stored input was replaced after upload (a bad disk, or
        # someone with write access to the bucket)
        gateway = gateway_factory(store=store_conn, max_attempts=2)
        x = np.arange(2048, dtype=np.float64)
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            # Submitted before any car exists, so the swap happens before any fetch
            handle = sdk.submit(
                "reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id="cctamper"
            )
            (key,) = job_objects(store, "cctamper")
            store._client.put_object(Bucket=store.bucket, Key=key, Body=b"\0" * (2048 * 8))
            fleet_factory(2)
            # Then no car runs it: each refuses it as bad_data, and the job fails
            with pytest.raises(JobFailed):
                handle.wait(timeout=60)
        failures = gateway.metric("parkpool_gateway_task_failures_total", reason="bad_data")
        assert failures == 2
        # And once the failed job's objects are deleted, a replay of its dead letter is
        # refused by name instead of sending cars after an object that is gone
        wait_for(lambda: not job_objects(store, "cctamper"), 15, "the job's objects deleted")
        entries = [e for e in dlq.read_dead_letters(kafka_conn, namespace) if e.letter]
        mine = [e for e in entries if e.letter and e.letter.job_id == "cctamper"]
        report = dlq.replay(kafka_conn, namespace, mine, store=store)
        (outcome,) = report.outcomes
        assert outcome.kind is dlq.OutcomeKind.REFUSED
        assert "input 'x'" in outcome.detail and "no longer in the object store" in outcome.detail

    def test_the_sdk_refuses_stored_outputs_that_are_not_the_ones_named(
        self,
        gateway_factory: Callable[..., RunningGateway],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
        store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:
        # Given a scripted car holding the lease of a job's only chunk, for a client
        # without checks (a checked chunk is redone instead: the test below)
        gateway_factory(store=store_conn)
        x = np.arange(2048, dtype=np.float64)
        with claim_check_client(namespace, kafka_conn, store_conn, verify=False) as sdk:
            handle = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048)
            holder = hold_lease(mqtt_conn, mqtt_topics)
            assignment: Assignment = holder.assignment
            assert decode(assignment.task, TaskChunk).refs and assignment.upload_url
            # When it uploads one thing and names another in its result
            upload(assignment.upload_url, b"not the answer", 5)
            ref = BlobRef("outputs", sha256_hex(b"the answer"), len(b"not the answer"))
            result = holder.result({}, refs=(ref,))
            holder.car.publish(mqtt_topics.result(assignment.vehicle_id, "gw1"), encode(result))
            # Then the caller is told, by name, instead of waiting for ever
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=30)
            assert "outputs_unreadable" in next(iter(failed.value.reasons.values()))
            assert handle.state is JobState.FAILED
            holder.close()

    def test_a_checked_chunk_whose_stored_outputs_are_not_the_ones_named_is_redone(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
        store_conn: StoreConnection,
    ) -> None:
        # Given a checked gemm of two tiles that share their row block, one tile held
        # by a scripted car
        gateway_factory(store=store_conn)
        rng = np.random.default_rng(5)
        a = rng.standard_normal((64, 64), dtype=np.float32)
        b = rng.standard_normal((64, 128), dtype=np.float32)
        with claim_check_client(
            namespace, kafka_conn, store_conn, verification=Level.ALGEBRAIC
        ) as sdk:
            handle = sdk.submit("gemm", {"a": a, "b": b}, tile=64)
            assert handle.n_chunks == 2
            holder = hold_lease(mqtt_conn, mqtt_topics)
            assignment: Assignment = holder.assignment
            # When an honest car is about (started first: the slot the scripted car's
            # result frees would otherwise be refilled with the other tile, which it
            # would hold until its lease ran out), and the scripted car names outputs
            # it never uploaded
            fleet_factory(1, result_inline_bytes=SMALL_INLINE)
            ref = BlobRef("outputs", sha256_hex(b"the answer"), len(b"the answer"))
            result = holder.result({}, refs=(ref,))
            holder.car.publish(mqtt_topics.result(assignment.vehicle_id, "gw1"), encode(result))
            # Then the tile is redone on the honest car, the job is right, and the check
            # of the tile sharing its block did not wait for ever
            answer = handle.wait(timeout=60)
            assert np.allclose(answer, a @ b, rtol=1e-4, atol=1e-3)
            redo = sdk.metrics.value("parkpool_sdk_chunks_redone_total", why="unusable_outputs")
            invalid = sdk.metrics.value("parkpool_sdk_verdicts_total", outcome="invalid")
            assert redo >= 1 and invalid >= 1
            holder.close()

    @pytest.mark.parametrize("claimed", [16, MAX_OUTPUTS_BYTES + 1], ids=["small", "huge"])
    def test_the_sdk_reads_no_more_of_stored_outputs_than_the_car_named(
        self,
        claimed: int,
        gateway_factory: Callable[..., RunningGateway],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
        store_conn: StoreConnection,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given a scripted car that uploads 2 MiB under its lease
        reads: list[int | None] = []
        real_get = BlobStore.get

        def get(self: BlobStore, key: str, most: int | None = None) -> bytes:
            reads.append(most)
            return real_get(self, key, most)

        monkeypatch.setattr(BlobStore, "get", get)
        gateway_factory(store=store_conn)
        x = np.arange(2048, dtype=np.float64)
        with claim_check_client(namespace, kafka_conn, store_conn, verify=False) as sdk:
            handle = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048)
            holder = hold_lease(mqtt_conn, mqtt_topics)
            assignment: Assignment = holder.assignment
            upload(assignment.upload_url, b"\1" * (2 << 20), 5)
            # When its result names a size other than what it wrote
            ref = BlobRef("outputs", "0" * 64, claimed)
            result = holder.result({}, refs=(ref,))
            holder.car.publish(mqtt_topics.result(assignment.vehicle_id, "gw1"), encode(result))
            # Then the caller is told by name, having read at most one byte past the
            # named size, and nothing when the size named is past what it would decode
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=30)
            assert "outputs_unreadable" in next(iter(failed.value.reasons.values()))
            assert reads == ([claimed + 1] if claimed == 16 else [])
            holder.close()


@pytest.mark.integration
def test_jobs_fit_128_kib_records_and_messages(
    fleet_factory: Callable[..., Fleet],
    namespace: str,
    kafka_conn: KafkaConnection,
    mqtt_conn: MqttConnection,
    store_conn: StoreConnection,
) -> None:
    # Given every limit at 128 KiB (AWS IoT Core's), and blocks of 256 KiB each
    limit = 128 << 10
    kafka = dataclasses.replace(kafka_conn, max_record_bytes=limit)
    mqtt = dataclasses.replace(mqtt_conn, max_message_bytes=limit)
    settings = GatewaySettings(
        "gw1", kafka, mqtt, namespace, session_timeout_ms=TEST_SESSION_TIMEOUT_MS, store=store_conn
    )
    gateway = RunningGateway(settings)
    try:
        fleet_factory(2, mqtt=mqtt)
        rng = np.random.default_rng(3)
        a = rng.standard_normal((256, 512)).astype(np.float32)
        b = rng.standard_normal((512, 256)).astype(np.float32)
        # When a gemm runs whose tiles could never travel inline
        with claim_check_client(namespace, kafka, store_conn) as sdk:
            handle = sdk.submit("gemm", {"a": a, "b": b}, tile=128)
            # Then it completes, through the store
            np.testing.assert_allclose(handle.wait(timeout=60), a @ b, rtol=1e-4, atol=1e-4)
            records = read_all(kafka_conn, sdk.topics.tasks) + read_all(
                kafka_conn, sdk.topics.results
            )
    finally:
        gateway.stop()
    mine = [r for r in records if (r.key() or b"").startswith(handle.job_id.encode())]
    assert len(mine) == 8 and max(len(r.value() or b"") for r in mine) < limit


@pytest.mark.integration
def test_a_job_whose_inputs_cannot_be_stored_sends_no_record(
    namespace: str, kafka_conn: KafkaConnection, store_conn: StoreConnection
) -> None:
    # Given a client whose store credentials are wrong: every upload is refused
    wrong = dataclasses.replace(store_conn, secret_key=Secret("not-the-key"))
    a, b = np.ones((128, 64), np.float32), np.ones((64, 128), np.float32)
    with claim_check_client(namespace, kafka_conn, wrong) as sdk:
        # When a job that needs the store is submitted
        with pytest.raises(BrokerError, match="object store refused"):
            sdk.submit("gemm", {"a": a, "b": b}, tile=64, job_id="unstored")
        # Then it fails by name, and no record points at an object that is not there
        assert sdk.handle("unstored") is None
        assert not read_all(kafka_conn, sdk.topics.tasks)


@pytest.mark.integration
def test_a_job_kafka_did_not_confirm_leaves_its_objects_while_records_may_land(
    namespace: str, kafka_conn: KafkaConnection, store_conn: StoreConnection, store: BlobStore
) -> None:
    # Given a client whose records Kafka never confirms (injected), cancels included
    a, b = np.ones((128, 64), np.float32), np.ones((64, 128), np.float32)
    with claim_check_client(namespace, kafka_conn, store_conn, publish_timeout_s=2.0) as sdk:
        live = sdk._live_producer()
        sdk._live_producer = lambda: Unconfirmed(live)  # type: ignore[method-assign]
        # When a stored job is submitted
        with pytest.raises(BrokerError, match="not confirmed"):
            sdk.submit("gemm", {"a": a, "b": b}, tile=64, job_id="unconfirmed")
        # Then it fails by name and is not followed; its objects stay (a record of it may
        # still reach a gateway, and its withdrawal was not confirmed): the TTL's work
        assert sdk.handle("unconfirmed") is None
        time.sleep(2)
        assert job_objects(store, "unconfirmed")


@pytest.mark.integration
def test_a_submit_interrupted_midway_withdraws_the_job_before_its_objects_go(
    namespace: str,
    kafka_conn: KafkaConnection,
    store_conn: StoreConnection,
    store: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a submit that the caller interrupts after two task records went out
    real_ready = JobUploads.ready
    calls: list[int] = []

    def ready(self: JobUploads, task: TaskChunk) -> None:
        calls.append(task.chunk_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_ready(self, task)

    monkeypatch.setattr(JobUploads, "ready", ready)
    a, b = np.ones((128, 64), np.float32), np.ones((64, 128), np.float32)
    with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
        with pytest.raises(KeyboardInterrupt):
            sdk.submit("gemm", {"a": a, "b": b}, tile=64, job_id="interrupted")
        # Then gateways were told to drop the job (so no car goes after its objects),
        # and only then were its objects deleted
        cancels = cancels_of(kafka_conn, sdk.topics.tasks, "interrupted")
        assert cancels and sdk.handle("interrupted") is None
        wait_for(lambda: not job_objects(store, "interrupted"), 15, "the job's objects deleted")


@pytest.mark.integration
def test_a_gemm_chunk_without_its_operands_is_refused_by_name_on_the_store_path(
    namespace: str, kafka_conn: KafkaConnection, store_conn: StoreConnection
) -> None:
    # Given a checking client on the store path (its gemm check hashes through a tap)
    with claim_check_client(namespace, kafka_conn, store_conn, verification=Level.ALGEBRAIC) as sdk:
        # When a hand-made gemm chunk lacks its b
        chunk = ChunkSpec({}, {"a": np.ones((128, 64), np.float32)})
        # Then the contract refuses it, before any check or upload
        with pytest.raises(ValidationError):
            sdk.publish("gemm", [chunk], job_id="nob")
        assert sdk.handle("nob") is None
        assert not read_all(kafka_conn, sdk.topics.tasks)


@pytest.mark.integration
def test_the_ttl_sweep_deletes_what_a_crashed_client_left(store: BlobStore) -> None:
    # Given objects of a job whose client died before the job ended
    for n in range(3):
        data = f"left over {n}".encode()
        store.put_if_absent(input_key("crashed", sha256_hex(data)), data, sha256_hex(data))
    # When the sweep runs before the TTL has passed, Then it keeps them
    assert store.sweep(job_prefix("crashed"), older_than_s=3600) == 0
    assert len(job_objects(store, "crashed")) == 3
    # And once they are older than the TTL it deletes them all
    assert store.sweep(job_prefix("crashed"), older_than_s=3600, now=time.time() + 7200) == 3
    assert job_objects(store, "crashed") == []


def test_a_car_refuses_an_oversized_input_before_fetching_it() -> None:
    # Given a task naming a stored input larger than any kernel may take
    shape = (MAX_ELEMS + 1,)
    ref = BlobRef("x", "0" * 64, (MAX_ELEMS + 1) * 4, "<f4", shape)
    task = TaskChunk("big", 0, 1, "reduce", {"op": "sum"}, {}, "r", 1e10, 0.0, refs=(ref,))
    # Its URL points nowhere: a fetch would fail with a store error, not this one
    lease = Assignment("gw1", "car", 1, 1, 1e10, encode(task), urls=("http://127.0.0.1:9/x",))
    # Then the car refuses it as a task no car may run, without a byte fetched
    data = CarData(BlobCache(1 << 20))
    with pytest.raises(ValidationError, match="too_large"):
        data.hydrate(lease, task)
    assert data.cache.stats().misses == 0


def test_a_dropped_connection_is_tried_again_but_an_http_answer_is_not() -> None:
    # Given calls that fail with a reset connection twice, then succeed
    outcomes: list[Exception | bytes] = [ConnectionResetError(), ConnectionResetError(), b"ok"]

    def call() -> bytes:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # Then the third try's answer comes back
    assert transfer.with_retries(call) == b"ok"
    # And an HTTP answer (the store's word) is returned at once, not retried
    refusals: list[int] = []

    def refused() -> bytes:
        refusals.append(1)
        raise urllib.error.HTTPError("http://s/x", 403, "Forbidden", Message(), None)

    with pytest.raises(urllib.error.HTTPError):
        transfer.with_retries(refused)
    assert refusals == [1]


class _DropsFirstPut(http.server.BaseHTTPRequestHandler):
    """A store whose first answer to a PUT is lost: the body lands, the connection is
    reset; later PUTs of the same key are refused as already written (412)."""

    puts: ClassVar[list[int]] = []

    def log_message(self, *_args: object) -> None:
        pass

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.puts.append(1)
        if len(self.puts) == 1:
            linger = struct.pack("ii", 1, 0)  # close with RST, as a dropped link looks
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()
            return
        self.send_response(412)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_result_upload_whose_answer_was_lost_is_tried_again() -> None:
    # Given a store that resets the connection after taking the first PUT's body
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DropsFirstPut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # When a car uploads its result there
        upload(f"http://127.0.0.1:{server.server_port}/out", b"r" * 100_000, 5)
        # Then the upload is tried again, and the 412 (already written) is success
        assert _DropsFirstPut.puts == [1, 1]
    finally:
        server.shutdown()
        server.server_close()


class _StallsPut(http.server.BaseHTTPRequestHandler):
    """A store that takes a PUT's first bytes, then stops reading: a weak link."""

    def log_message(self, *_args: object) -> None:
        pass

    def do_PUT(self) -> None:
        self.rfile.read(1)
        time.sleep(30)


def test_a_result_upload_stops_once_its_task_is_let_go() -> None:
    # Given a store that stops reading a result's upload part way
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallsPut)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cancel = Cancel()
    try:
        # When the task is let go (the owner is back, or it was revoked) 0.5 s into it
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        # Then the upload stops at once, as the task's downloads do, and says why
        with pytest.raises(Preempted):
            upload(f"http://127.0.0.1:{server.server_port}/out", b"r" * (8 << 20), 60, cancel)
        assert time.monotonic() - started < 10  # not the 60 s (and more) it may take
    finally:
        server.shutdown()
        server.server_close()


def test_keys_are_per_job_and_content_addressed() -> None:
    sha = sha256_hex(b"x")
    assert input_key("job1", sha) == f"jobs/job1/in/{sha}"
    assert output_key("job1", "gw-1", 2, 9) == "jobs/job1/out/gw-1/2-9"
    # Epochs count per gateway: two gateways' leases of one chunk (a partition that moved
    # while the first one's car still ran it) never share a write-once key
    assert output_key("job1", "gw-1", 2, 9) != output_key("job1", "gw-2", 2, 9)
    with pytest.raises(DecodeError):
        output_key("job1", "../gw", 2, 9)
    with pytest.raises(DecodeError):
        input_key("../etc", sha)


@pytest.mark.integration
@pytest.mark.parametrize("legacy", [False, True], ids=["gateway-key", "legacy-key"])
def test_stored_outputs_are_read_where_the_granting_gateway_had_them_written(
    store: BlobStore, legacy: bool
) -> None:
    # Given a car's outputs stored under its lease's key: the gateway's, or (a gateway
    # not yet upgraded) the key without the gateway id
    from parkpool.schemas.blobref import OUTPUTS_BLOB, legacy_output_key
    from parkpool.schemas.codec import encode_arrays

    job = f"legacy{int(legacy)}{time.monotonic_ns() % 10**9}"
    blob = encode_arrays({"y": np.arange(4, dtype=np.float32)})
    key = legacy_output_key(job, 3, 7) if legacy else output_key(job, "gw-9", 3, 7)
    store.put_if_absent(key, blob, sha256_hex(blob))
    now = time.time()
    ref = BlobRef(OUTPUTS_BLOB, sha256_hex(blob), len(blob))
    result = Result(job, 3, 4, "car-1", "gw-9", 7, 1, {}, 0.1, now, now, refs=(ref,))
    # When the SDK reads them back, Then it finds them either way, checked by hash
    read = fetch_outputs(store, result)
    assert np.array_equal(read.outputs["y"], np.arange(4, dtype=np.float32))
