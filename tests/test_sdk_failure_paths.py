# SPDX-License-Identifier: Apache-2.0
"""The SDK's failure paths end: a chunk whose stored outputs cannot be used fails by
name, a failed submit stops its queued uploads, takes back what it sent and leaves no
handle behind, and a job's objects are deleted even when it ends while the client
closes."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from parkpool.producer import client as client_module
from parkpool.producer.claimcheck import JobUploads
from parkpool.producer.jobs import JobFailed, JobState
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.runtime.sealing import BoxKey, generate_box_key
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas import (
    BlobRef,
    BrokerError,
    MqttTopics,
    Result,
    TaskChunk,
    ValidationError,
    encode,
)
from parkpool.schemas.blobref import SEALED_OUTPUTS_BLOB
from parkpool.worker.dataplane import upload
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import (
    SMALL_INLINE,
    Unconfirmed,
    cancels_of,
    claim_check_client,
    hold_lease,
    job_objects,
    read_all,
    wait_for,
)


def _reason(failed: pytest.ExceptionInfo[JobFailed]) -> str:
    (reason,) = failed.value.reasons.values()
    return reason


# ---------------------------------------------------------------- unit: uploads


class _GatedStore:
    """A store whose first put is refused (a 403) and whose others hang until the test
    opens the gate, as puts to a store that went away do until boto gives up."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def put_if_absent(self, key: str, _body: object, _sha: str) -> bool:
        with self._lock:
            self.started.append(key)
            first = len(self.started) == 1
        if first:
            raise BrokerError(f"the object store refused {key}: 403")
        self.gate.wait(30)
        with self._lock:
            self.finished.append(key)
        return True


class TestAbandonedUploads:
    """A submit that failed drops the uploads not yet started, and still waits for the
    ones running before its objects may be deleted."""

    def test_a_failed_upload_stops_the_queued_ones(self) -> None:
        # Given a job of 12 distinct stored blocks, on 4 upload threads, whose first
        # upload is refused while the next ones hang
        fake = _GatedStore()
        uploads = JobUploads(cast(BlobStore, fake), "abandoned", 64, 1 << 20)
        now = time.time()
        tasks = [
            TaskChunk(
                "abandoned", i, 12, "reduce", {"op": "sum"}, {"x": np.full(16, float(i))},
                "results", now + 60, now,
            )
            for i in range(12)
        ]  # fmt: skip
        stored = uploads.offload_all(tasks)
        with pytest.raises(BrokerError, match="403"):
            uploads.ready(stored[0])
        # When the submit gives up on the job
        written: list[int] = []
        closer = threading.Thread(target=lambda: written.append(uploads.close(abandon=True)))
        closer.start()
        queued = list(uploads._sent.values())
        wait_for(lambda: any(u.cancelled() for u in queued), 10, "queued uploads dropped")
        # Then it still waits for the uploads already running (the job's objects may go
        # only once nothing can add one) ...
        assert closer.is_alive()
        fake.gate.set()
        closer.join(30)
        assert not closer.is_alive()
        # ... and none queued behind them was started: at most one per thread, plus the
        # refused one
        assert len(fake.started) <= 5 < len(tasks)
        assert written == [len(fake.finished)] and len(fake.finished) == len(fake.started) - 1


# ---------------------------------------------------------------- stored outputs


@pytest.mark.integration
class TestUnusableStoredOutputs:
    """A chunk whose stored outputs this client cannot use fails by name; no caller
    waits on it for ever."""

    def test_outputs_stored_for_a_client_without_a_store_fail_the_chunk(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
        store_conn: StoreConnection,
    ) -> None:
        # Given a gateway with a store, and a car that stores outputs of 4 KiB or more
        gateway_factory(store=store_conn)
        fleet_factory(1, result_inline_bytes=SMALL_INLINE)
        a = np.ones((64, 64), np.float32)
        # When a client that has no store submits a job whose tile is stored
        with claim_check_client(namespace, kafka_conn, None) as sdk:
            handle = sdk.submit("gemm", {"a": a, "b": a}, tile=64)
            # Then the caller is told why, instead of waiting for ever
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=60)
        assert "outputs_unreadable" in _reason(failed) and "no object store" in _reason(failed)
        assert handle.state is JobState.FAILED

    def test_sealed_stored_outputs_that_do_not_open_fail_the_chunk(
        self,
        tmp_path: Path,
        gateway_factory: Callable[..., RunningGateway],
        namespace: str,
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
        store_conn: StoreConnection,
    ) -> None:
        # Given a scripted car holding the lease of a confidential job's only chunk
        private, public = generate_box_key(tmp_path / "keys", "gateway-box")
        gateway_factory(store=store_conn, box_keys=(private,))
        x = np.ones(2048)
        with claim_check_client(
            namespace, kafka_conn, store_conn, gateway_box_key=public, verify=False
        ) as sdk:
            handle = sdk.submit(
                "reduce", {"x": x, "op": "sum"}, chunk_elems=2048, confidential=True
            )
            holder = hold_lease(mqtt_conn, mqtt_topics, box_key=BoxKey.generate().public)
            # When it stores bytes that are no seal, and names them rightly
            blob = b"\1" * 512
            upload(holder.assignment.upload_url, blob, 5)
            ref = BlobRef(SEALED_OUTPUTS_BLOB, sha256_hex(blob), len(blob))
            result: Result = holder.result({}, refs=(ref,))
            topic = mqtt_topics.result(holder.assignment.vehicle_id, "gw1")
            holder.car.publish(topic, encode(result))
            # Then the caller is told, by name, instead of waiting for ever
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=30)
            holder.close()
        assert "outputs_unreadable" in _reason(failed)
        assert sdk.metrics.value("parkpool_sdk_results_refused_total", reason="unsealable") == 1


# ---------------------------------------------------------------- submitting


class _InterruptedFlush:
    """A producer whose first flush is cut short by the caller's Ctrl-C."""

    def __init__(self, producer: object) -> None:
        self._producer = producer
        self.interrupted = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._producer, name)

    def flush(self, timeout: float = -1) -> int:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return int(self._producer.flush(timeout))  # type: ignore[attr-defined]


@pytest.mark.integration
class TestFailedSubmits:
    """A submit that fails takes back what it sent and leaves nothing running."""

    def test_a_submit_interrupted_while_kafka_confirms_withdraws_the_job(
        self, namespace: str, kafka_conn: KafkaConnection, store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:  # fmt: skip
        a, b = np.ones((128, 64), np.float32), np.ones((64, 128), np.float32)
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            # Given a caller who hits Ctrl-C while Kafka confirms the job's records
            interrupted = _InterruptedFlush(sdk._live_producer())
            sdk._live_producer = lambda: interrupted  # type: ignore[method-assign,assignment]
            with pytest.raises(KeyboardInterrupt):
                sdk.submit("gemm", {"a": a, "b": b}, tile=64, job_id="flushcut")
            # Then gateways are told to drop the job, nothing follows it, and only then
            # are its objects deleted
            assert cancels_of(kafka_conn, sdk.topics.tasks, "flushcut")
            assert sdk.handle("flushcut") is None
            wait_for(lambda: not job_objects(store, "flushcut"), 15, "the job's objects deleted")

    def test_a_submit_that_meets_close_is_refused(
        self, namespace: str, kafka_conn: KafkaConnection
    ) -> None:
        # Given a submit past its check that the client is open
        sdk = claim_check_client(namespace, kafka_conn, None)
        real_tasks = sdk._tasks

        def tasks_then_close(*args: object) -> list[TaskChunk]:
            made = real_tasks(*args)  # type: ignore[arg-type]
            sdk.close()  # another thread's close() lands here
            return made

        sdk._tasks = tasks_then_close  # type: ignore[method-assign,assignment]
        # When it goes on after the client closed
        # Then it is refused by name: no job runs that nobody can hear end
        with pytest.raises(BrokerError, match="closed"):
            sdk.submit("reduce", {"x": np.ones(8), "op": "sum"}, job_id="lateone")
        assert sdk.handle("lateone") is None
        assert not read_all(kafka_conn, sdk.topics.tasks)

    def test_a_cancel_kafka_did_not_confirm_leaves_no_handle_behind(
        self, namespace: str, kafka_conn: KafkaConnection
    ) -> None:
        # Given a running job whose cancel Kafka does not confirm (injected)
        with claim_check_client(namespace, kafka_conn, None, publish_timeout_s=2.0) as sdk:
            handle = sdk.submit("reduce", {"x": np.ones(8), "op": "sum"}, job_id="unheard")
            live = sdk._live_producer()
            sdk._live_producer = lambda: Unconfirmed(live)  # type: ignore[method-assign]
            # When the caller cancels it, and is told the cancel failed
            try:
                handle.cancel()
            except BrokerError as exc:
                assert "not confirmed" in str(exc)
            else:
                pytest.fail("the cancel was not reported as failed")
            assert handle.state is JobState.CANCELLED
            # Then once the caller lets go of the handle, the client keeps nothing of it
            ended = weakref.ref(handle)
            del handle
            gc.collect()
            assert ended() is None and sdk.handle("unheard") is None

    def test_a_job_id_whose_objects_are_being_deleted_is_refused_until_they_are(
        self, namespace: str, kafka_conn: KafkaConnection, store_conn: StoreConnection,
        store: BlobStore,
    ) -> None:  # fmt: skip
        x = np.arange(2048, dtype=np.float64)
        with claim_check_client(namespace, kafka_conn, store_conn) as sdk:
            # Given a cancelled stored job whose delete is still queued (the cleaner is
            # busy with another job's)
            handle = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id="again")
            busy = threading.Event()
            sdk._cleaner.submit(busy.wait, 30)
            handle.cancel()
            # When the caller submits again under that id
            # Then it is refused by name: the queued delete would take the new job's inputs
            with pytest.raises(ValidationError, match="being deleted"):
                sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id="again")
            busy.set()
            sdk._cleaner.submit(lambda: None).result(30)  # after the delete, in order
            # And once the delete is done the id can be used, and its inputs stay
            again = sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id="again")
            assert again.state is JobState.RUNNING and job_objects(store, "again")
            # And while that job runs its id is refused too, before anything is uploaded:
            # its end would delete the newcomer's inputs with its own
            with pytest.raises(ValidationError, match="still running"):
                sdk.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=2048, job_id="again")
            assert again.state is JobState.RUNNING


# ---------------------------------------------------------------- closing


@pytest.mark.integration
def test_a_job_that_ends_while_the_client_closes_still_has_its_objects_deleted(
    gateway_factory: Callable[..., RunningGateway],
    fleet_factory: Callable[..., Fleet],
    namespace: str,
    kafka_conn: KafkaConnection,
    store_conn: StoreConnection,
    store: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a stored one-tile job whose outputs are still being read back
    gateway_factory(store=store_conn)
    fleet_factory(1, result_inline_bytes=SMALL_INLINE)
    arrived, released = threading.Event(), threading.Event()
    real_fetch = client_module.fetch_outputs

    def held_fetch(store_: BlobStore, result: Result) -> Result:
        arrived.set()
        released.wait(30)
        return real_fetch(store_, result)

    monkeypatch.setattr(client_module, "fetch_outputs", held_fetch)
    a = np.ones((64, 64), np.float32)
    sdk = claim_check_client(namespace, kafka_conn, store_conn)
    handle = sdk.submit("gemm", {"a": a, "b": a}, tile=64, job_id="endsclosing")
    assert arrived.wait(60), "the car's outputs never came"
    real_end = sdk._end_running

    def end_running() -> None:
        released.set()  # the client is closing: the read-back ends the job now
        handle.wait(timeout=30)
        real_end()

    sdk._end_running = end_running  # type: ignore[method-assign]
    # When the client closes meanwhile
    sdk.close()
    # Then the job completed, and its objects were deleted before close() returned
    assert handle.state is JobState.DONE
    assert not job_objects(store, "endsclosing")
