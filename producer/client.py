# SPDX-License-Identifier: Apache-2.0
"""The SDK backend services use: submit a job, follow it, get each chunk once.

Publishing uses the idempotent producer (acks=all) and waits for every delivery report:
``submit`` returns only when every chunk is durable in Kafka, or raises.

Results are read with ``assign()`` from the reply topic's end as it was when the client
started, never through a consumer group: no group join delay, and any number of clients
can share one reply topic. Duplicates (the gateway may write a result twice after a
crash) are dropped per job by chunk id.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry

from parkpool.producer import kernel_catalog
from parkpool.producer.attach import CLOCK_SKEW_S, find_job, high_watermarks, job_starts
from parkpool.producer.checking import ResultChecks, note_misfit
from parkpool.producer.claimcheck import JobUploads, fetch_outputs
from parkpool.producer.jobids import new_job_id
from parkpool.producer.jobs import JobHandle, JobState
from parkpool.producer.metrics import SdkMetrics
from parkpool.producer.plans import Array
from parkpool.producer.splitters import Assembler, ChunkSpec, JobPlan
from parkpool.producer.splitters_stats import KMeansStep, OptionPrice
from parkpool.producer.verify import input_tap, reachable
from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.fetchwait import MAX_FETCH_WAIT_MS, FetchWaitLadder
from parkpool.runtime.http import StatusServer, request_counter
from parkpool.runtime.kafka import (
    RESULT_FETCH_WAIT_MS,
    answers,
    cached_high,
    check_record,
    produce,
    producer_config,
    reader_config,
)
from parkpool.runtime.keyfiles import read_key_file
from parkpool.runtime.offsets import PATIENCE_S, OffsetLedger
from parkpool.runtime.sealing import BoxKey, open_result, seal, seal_task
from parkpool.runtime.settings import KafkaConnection, StoreConnection
from parkpool.schemas import (
    BrokerError,
    CancelJob,
    ConfigError,
    DeadLetter,
    DecodeError,
    JobSubmitted,
    KafkaTopics,
    ParkpoolError,
    Priority,
    Result,
    TaskChunk,
    ValidationError,
    decode,
    encode,
)
from parkpool.schemas.blobref import job_prefix
from parkpool.schemas.kernels import cost_gflop, validate_task
from parkpool.schemas.kernels import spec as kernel_spec
from parkpool.schemas.reputation import Level
from parkpool.schemas.topics import task_key

log = logs.get_logger("parkpool.producer")
R = TypeVar("R")  # a job's answer


@dataclass(frozen=True)
class ProducerSettings:
    kafka: KafkaConnection
    namespace: str = "parkpool"
    reply_topic: str = ""  # empty: the namespace's results topic
    deadline_s: float = 3600.0
    publish_timeout_s: float = 60.0
    metrics_port: int | None = None  # None: no metrics server; 0: any free port
    metrics_addr: str = "127.0.0.1"  # never all interfaces unless the service says so
    # Confidential jobs (parkpool.runtime.sealing): the gateways' box public key, to which inputs
    # are sealed; and this client's own box key for results (None: a fresh one per client,
    # so results of jobs submitted before a restart cannot be read after it).
    gateway_box_key: Path | None = None
    reply_box_key: Path | None = None
    # Kafka unreachable for this long while reading results: every running job fails
    # with a BrokerError naming the broker, instead of a wait() that never returns.
    results_unreachable_s: float = 60.0
    # How long the result reader's fetches wait at first; doubled, up to 5 s, while a
    # partition stops advancing (runtime.fetchwait). Short: on the embedded Kafka a
    # result can wait up to half of it for the reader to look again.
    result_fetch_wait_ms: int = RESULT_FETCH_WAIT_MS
    # The object store for bulk arrays (producer.claimcheck); disabled: inline only.
    store: StoreConnection = field(default_factory=StoreConnection)
    # Results are checked before the caller sees them (producer.verify); off, every
    # result is handed over unchecked and no car's record is kept.
    verify: bool = True
    freivalds_rounds: int = 1  # each round halves the chance a wrong gemm tile passes
    # The level a job demands when its submit names none (schemas.reputation.Level).
    verification: Level = Level.RINGER_TRUSTED
    # The host's Prometheus registry for the SDK's series (producer.metrics); None: one of
    # the client's own. An object, not configuration: no repr, no comparison.
    registry: CollectorRegistry | None = field(default=None, repr=False, compare=False)


class ParkpoolClient:
    def __init__(self, settings: ProducerSettings) -> None:
        if not 1 <= settings.result_fetch_wait_ms <= MAX_FETCH_WAIT_MS:
            raise ConfigError(
                f"result_fetch_wait_ms must be 1-{MAX_FETCH_WAIT_MS}, "
                f"got {settings.result_fetch_wait_ms}"
            )
        # Key files first: a bad one fails here, before any Kafka client exists.
        self._gateway_key = _gateway_key(settings.gateway_box_key)
        self._reply_box = (
            BoxKey.load(settings.reply_box_key) if settings.reply_box_key else BoxKey.generate()
        )
        self.settings = settings
        self.topics = KafkaTopics(settings.namespace)
        self.reply_topic = settings.reply_topic or self.topics.results
        self.decode_errors = 0
        self.metrics = SdkMetrics.on(settings.registry)
        # Replaced when it fails for good or stalls (a restarted broker that forgot its
        # producer id refuses it for ever); each operation takes the live one once.
        self._producer_lock = threading.Lock()
        self._failed_producer: Producer | None = None  # to be replaced at the next use
        self._retired: list[Producer] = []  # replaced, still delivering what they hold
        self._producer = self._new_producer()
        self._handles: dict[str, JobHandle[Any]] = {}
        self._attached: set[str] = set()  # jobs this client did not submit: no checks here
        # Per job being published: whether, should it fail, nothing of it can still run.
        self._withdrawn: dict[str, bool] = {}
        # Ended jobs' handles while their callers still hold them: ``attach`` and
        # ``handle`` give those back, and nothing here keeps an answer alive.
        self._ended: weakref.WeakValueDictionary[str, JobHandle[Any]] = (
            weakref.WeakValueDictionary()
        )
        self._cancel_reasons: dict[str, str] = {}  # a caller's reason, while its handle ends
        self._deleting: dict[str, int] = {}  # job id -> its deletes queued or running
        self._lock = threading.Lock()
        self._closed = threading.Event()
        try:
            self._start(settings)
        except BaseException:
            self._stop_started()
            raise

    def _start(self, settings: ProducerSettings) -> None:
        """What runs beside the caller: the checks' reputation reader, the result
        reader, the status server and the pools."""
        # Before the result reader, which hands what it reads to the checks.
        self._checks = (
            ResultChecks(
                settings.kafka,
                self.topics.reputation,
                uuid.uuid4().hex[:16],
                self.metrics,
                self._send_task,
                settings.freivalds_rounds,
            )
            if settings.verify
            else None
        )
        self._reader = _ResultReader(self, [self.reply_topic, self.topics.dead_letter])
        self._reader.start()
        self._jobs_topic = self._jobs_topic_if_there()
        self._status = self._serve_metrics(settings)
        self._store = BlobStore(settings.store) if settings.store.enabled else None
        # A job's objects are deleted when it ends, and stored outputs read back, off
        # the reader's thread.
        self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="pp-cleanup")
        self._fetcher = ThreadPoolExecutor(4, thread_name_prefix="pp-outputs")

    def _stop_started(self) -> None:
        """A constructor that failed part way (Kafka out of reach, the metrics port
        taken, bad store credentials) stops what it had started: a service that retries
        making its client while Kafka is down would otherwise leak threads and Kafka
        clients on every try. Only what exists by then is there to stop."""
        self._closed.set()
        status = getattr(self, "_status", None)
        if status is not None:
            status.close()
        reader = getattr(self, "_reader", None)
        if reader is not None and reader.is_alive():
            reader.join(timeout=10)  # it closes its consumer as it ends
        checks = getattr(self, "_checks", None)
        if checks is not None:
            checks.close()
        self._producer.flush(1)

    def _new_producer(self) -> Producer:
        made: list[Producer] = []

        def on_error(err: KafkaError) -> None:  # served by poll/flush, on their thread
            if err.fatal() and made:
                self._renew(made[0])

        producer = Producer(producer_config(self.settings.kafka, error_cb=on_error))
        made.append(producer)
        return producer

    def _renew(self, producer: Producer) -> None:
        """``producer`` failed for good or stalled: the next operation gets a new one,
        if it is still the live one (a late report of an old one changes nothing)."""
        self._failed_producer = producer

    def _live_producer(self) -> Producer:
        """The producer to send with. One that failed is replaced, and kept until what
        it holds is delivered or fails (a redo already handed to it is not dropped),
        while the submits still using it finish with it."""
        with self._producer_lock:
            self._retired = [old for old in self._retired if old.flush(0) > 0]
            failed, self._failed_producer = self._failed_producer, None
            if failed is not None and failed is self._producer:
                self._retired.append(self._producer)
                self._producer = self._new_producer()
                self.metrics.producer_recreated.inc()
                log.warning("sdk_producer_recreated")
            return self._producer

    def _jobs_topic_if_there(self) -> str | None:
        """The jobs topic, or None in a namespace bootstrapped before it existed: its
        jobs then run as before and cannot be attached to, rather than fail at submit."""
        try:
            # All topics, not one: asking for one by name may create it with defaults.
            found = self._live_producer().list_topics(timeout=10).topics
        except KafkaException:
            found = {}
        topic = found.get(self.topics.jobs)
        if topic is None or topic.error is not None:
            log.warning(
                "jobs_topic_missing",
                topic=self.topics.jobs,
                fix="run `parkpool brokers bootstrap` so jobs can be attached to by id",
            )
            return None
        return self.topics.jobs

    def _serve_metrics(self, settings: ProducerSettings) -> StatusServer | None:
        if settings.metrics_port is None:
            return None
        requests = request_counter(self.metrics.registry, role="sdk")
        server = StatusServer(
            settings.metrics_addr,
            settings.metrics_port,
            self.metrics.registry,
            self._health,
            self._health,
            requests=requests,
        )
        return server.start()

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics server listens on, or None when it is off."""
        return self._status.port if self._status is not None else None

    def _health(self) -> tuple[bool, Mapping[str, Any]]:
        alive = self._reader.is_alive() and not self._closed.is_set()
        return alive, {"result_reader": "running" if alive else "stopped"}

    def __enter__(self) -> ParkpoolClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ParkpoolClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await asyncio.to_thread(self.close)  # it joins the client's threads

    async def asubmit(
        self, kernel: str, inputs: Mapping[str, Any] | None = None, **options: Any
    ) -> JobHandle[Any]:
        """``submit`` for asyncio: the wait for Kafka's acknowledgements happens off the
        event loop; ``await`` the handle for the answer, ``async for`` its chunks."""
        return await asyncio.to_thread(lambda: self.submit(kernel, inputs, **options))

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
        self._closed.set()
        self._reader.join(timeout=10)
        self._end_running()
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        self._cleaner.shutdown(wait=True)
        if self._checks is not None:
            self._checks.close()
        for producer in (*self._retired, self._producer):
            producer.flush(10 / (1 + len(self._retired)))
        # Break the cycles (reader -> client, handle -> client.cancel) so the Kafka clients
        # are freed now, not at some later garbage collection while brokers may be gone.
        self._reader.client = None
        with self._lock:
            self._handles.clear()

    def _need_reader(self) -> None:
        """New work only while results can be read: a job whose end nobody could hear
        would leave its waiter blocked for ever. Asked again under the lock as a job is
        registered: the reader sets its failure before it ends, under that lock, every
        job it knows of, so a job registered then either is one of them or is refused."""
        if self._closed.is_set():
            raise BrokerError("the client is closed")
        if self._reader.failure or not self._reader.is_alive():
            raise BrokerError(
                f"the result reader stopped ({self._reader.failure or 'unknown'}): "
                "this client cannot follow a job; make a new one"
            )

    def _follow(self, job_id: str, handle: JobHandle[Any]) -> None:
        """Route a job's results to ``handle``. Refused once the client closed or its
        reader stopped, checked under the lock ``_end_running`` and ``_broker_lost``
        take: either happening since ``_need_reader`` (a submit uploads for seconds)
        would leave the job with nobody to hear it end."""
        with self._lock:
            self._need_reader()
            self._handles[job_id] = handle

    def _end_running(self) -> None:
        """Jobs still running when the client closes: their waiters are told now rather
        than left blocked. Their chunks may still run on the fleet and their objects stay
        (another client can ``attach`` and follow them; the TTL collects them)."""
        with self._lock:
            running = list(self._handles.values())
        for handle in running:
            handle.lost(
                ParkpoolError(
                    f"the client closed before job {handle.job_id} ended; "
                    "attach from another client to follow it"
                )
            )

    # ---------------------------------------------------------------- submitting

    @overload
    def submit(
        self,
        kernel: Literal["gemm", "mlp", "fft", "stencil2d", "poly"],
        inputs: Mapping[str, Any] | None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
        **split_options: Any,
    ) -> JobHandle[Array]: ...

    @overload
    def submit(
        self,
        kernel: Literal["reduce", "monte_carlo_pi"],
        inputs: Mapping[str, Any] | None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
        **split_options: Any,
    ) -> JobHandle[float]: ...

    @overload
    def submit(
        self,
        kernel: Literal["kmeans_step"],
        inputs: Mapping[str, Any] | None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
        **split_options: Any,
    ) -> JobHandle[KMeansStep]: ...

    @overload
    def submit(
        self,
        kernel: Literal["option_mc"],
        inputs: Mapping[str, Any] | None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
        **split_options: Any,
    ) -> JobHandle[OptionPrice]: ...

    @overload
    def submit(
        self,
        kernel: str,
        inputs: Mapping[str, Any] | None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
        **split_options: Any,
    ) -> JobHandle[Any]: ...

    def submit(
        self,
        kernel: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        priority: Priority | str = Priority.BATCH,
        deadline_s: float | None = None,
        job_id: str | None = None,
        confidential: bool = False,
        verification: Level | str | None = None,
        **split_options: Any,
    ) -> JobHandle[Any]:
        """Split a job with the kernel's planner and publish it; see producer.splitters.

        The handle is typed by the kernel's answer: ``JobHandle[np.ndarray]`` for gemm,
        mlp, fft, stencil2d and poly, ``JobHandle[float]`` for reduce and
        monte_carlo_pi, ``KMeansStep`` and ``OptionPrice`` for the other two.

        ``confidential`` seals every chunk's inputs and results (``parkpool.runtime.sealing``), so
        brokers, logs and other cars never see them; it needs ``gateway_box_key``.
        ``verification`` is the least check every chunk must pass before it reaches the
        caller (``schemas.reputation.Level``; None: the settings' default); a kernel that
        cannot reach it is refused.
        """
        with self._counting_refusals():
            plan = kernel_catalog.planner(kernel)(**dict(inputs or {}), **split_options)
        return self.submit_plan(
            plan,
            priority=priority,
            deadline_s=deadline_s,
            job_id=job_id,
            confidential=confidential,
            verification=verification,
        )

    def submit_plan(
        self,
        plan: JobPlan[R],
        *,
        priority: Priority | str = Priority.BATCH,
        deadline_s: float | None = None,
        job_id: str | None = None,
        confidential: bool = False,
        verification: Level | str | None = None,
    ) -> JobHandle[R]:
        return self.publish(
            plan.kernel,
            plan.chunks,
            plan.make_assembler(),
            priority=priority,
            deadline_s=deadline_s,
            job_id=job_id,
            confidential=confidential,
            verification=verification,
        )

    @overload
    def publish(
        self,
        kernel: str,
        chunks: Sequence[ChunkSpec],
        assembler: None = ...,
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
    ) -> JobHandle[None]: ...

    @overload
    def publish(
        self,
        kernel: str,
        chunks: Sequence[ChunkSpec],
        assembler: Assembler[R],
        *,
        priority: Priority | str = ...,
        deadline_s: float | None = ...,
        job_id: str | None = ...,
        confidential: bool = ...,
        verification: Level | str | None = ...,
    ) -> JobHandle[R]: ...

    def publish(
        self,
        kernel: str,
        chunks: Sequence[ChunkSpec],
        assembler: Assembler[Any] | None = None,
        *,
        priority: Priority | str = Priority.BATCH,
        deadline_s: float | None = None,
        job_id: str | None = None,
        confidential: bool = False,
        verification: Level | str | None = None,
    ) -> JobHandle[Any]:
        """Publish prepared chunks as one job; every chunk is durable when this returns.

        Every chunk is checked against the kernel's contract first: a job with one bad
        chunk, or naming no known kernel, raises ValidationError and sends nothing.
        ``verification`` is as for ``submit``.
        """
        self._need_reader()
        if confidential and self._gateway_key is None:
            raise ConfigError("a confidential job needs the gateways' box key (gateway_box_key)")
        job_id = job_id or new_job_id()
        with self._counting_refusals():
            self._not_being_deleted(job_id)
            contract = kernel_catalog.contract(kernel)  # a plugin's, once imported
            minimum = _level(verification or self.settings.verification)
            if self._checks is not None:
                reachable(contract, minimum)
        uploads = self._uploads(job_id)
        tap = None
        try:
            with self._counting_refusals():
                tasks = self._tasks(kernel, chunks, job_id, priority, deadline_s, confidential)
                if uploads is not None:
                    # The check's products ride on the claim check's hashing, which reads
                    # every stored block anyway (a confidential job's are hashed sealed).
                    if self._checks is not None and not confidential:
                        tap = input_tap(kernel, chunks, self._checks.rounds)
                    tasks = uploads.offload_all(tasks, tap)
                records = [self._record(task) for task in tasks]
        except BaseException:
            self._abandon(job_id, uploads)  # refused after its uploads began: take them back
            raise
        handle = JobHandle(
            job_id,
            len(tasks),
            assembler,
            canceller=self.cancel,
            observer=self.metrics,
            on_end=self._job_ended,
            created_at=tasks[0].created_at,
        )
        try:
            if self._checks is not None:
                prepared = tap.prepared() if tap is not None else None
                self._checks.begin(job_id, kernel, chunks, tasks, minimum, prepared)
            self._follow(job_id, handle)  # before publishing: results may come fast
            self._publish_all(job_id, self._header(kernel, tasks), records, tasks, uploads)
        except BaseException:  # Kafka's refusal, a bug, or the caller's Ctrl-C
            with self._lock:
                self._handles.pop(job_id, None)
            if self._checks is not None:
                self._checks.end(job_id)
            # The caller was told it failed: nobody reads it. Its objects go only if no
            # record of it can still send a car after them.
            self._abandon(job_id, uploads, delete=self._withdrawn.pop(job_id, True))
            raise
        self._withdrawn.pop(job_id, None)
        if uploads is not None:
            self._stored(job_id, uploads)
        self.metrics.job_submitted(len(tasks))
        log.info("job_submitted", job_id=job_id, kernel=kernel, chunks=len(tasks))
        return handle

    def _tasks(
        self,
        kernel: str,
        chunks: Sequence[ChunkSpec],
        job_id: str,
        priority: Priority | str,
        deadline_s: float | None,
        confidential: bool,
    ) -> list[TaskChunk]:
        """The job's task records, each checked against the kernel's contract."""
        kernel_spec(kernel)  # refused by name even when there are no chunks to check
        if not chunks:
            raise ValidationError("no_chunks", f"a {kernel} job needs at least one chunk")
        for spec in chunks:
            validate_task(kernel, spec.params, spec.inputs)
        now = time.time()
        deadline = now + (deadline_s or self.settings.deadline_s)
        tasks = [
            TaskChunk(
                job_id,
                i,
                len(chunks),
                kernel,
                spec.params,
                spec.inputs,
                self.reply_topic,
                deadline,
                now,
                priority=Priority(priority),
                cost_gflop=cost_gflop(kernel, spec.params, spec.inputs),
            )
            for i, spec in enumerate(chunks)
        ]
        if confidential:
            assert self._gateway_key is not None  # checked before any work was done
            reply = self._reply_box.public
            tasks = [seal_task(task, self._gateway_key, reply) for task in tasks]
        return tasks

    def _uploads(self, job_id: str) -> JobUploads | None:
        if self._store is None:
            return None
        return JobUploads(
            self._store,
            job_id,
            self.settings.store.inline_max_bytes,
            self.settings.kafka.max_record_bytes,
        )

    def _stored(self, job_id: str, uploads: JobUploads) -> None:
        written = uploads.close()
        self.metrics.blobs_uploaded.inc(written)
        log.info("job_inputs_stored", job_id=job_id, distinct=uploads.distinct, written=written)

    def _abandon(self, job_id: str, uploads: JobUploads | None, delete: bool = True) -> None:
        """A job that was not submitted: its objects go once no upload can still add one
        (unless ``delete`` is false: a record of it may still reach a gateway)."""
        if uploads is not None:
            self.metrics.blobs_uploaded.inc(uploads.close(abandon=True))
            if delete:
                self._delete_soon(job_id)

    def _job_ended(self, job_id: str, state: JobState, unfollowed: bool) -> None:
        """Completed or failed: its stored inputs and outputs are deleted now. Not yet when
        cancelled (``cancel`` deletes once gateways were told to drop it), nor when the
        client stopped following a job whose chunks may still run (Kafka lost, the client
        closed): cars would be sent after objects that are gone. A store lifecycle rule
        catches what is left."""
        if self._checks is not None:
            self._checks.end(job_id)
        if state is JobState.CANCELLED:
            return  # ``cancel`` forgets it, and deletes its objects once gateways were told
        if self._forget(job_id) and not unfollowed:
            self._delete_soon(job_id)

    def _forget(self, job_id: str) -> bool:
        """Stop following an ended job: a client that lives for many jobs must not keep
        every answer it handed out. Whether it was this client's own (not attached)."""
        with self._lock:
            handle = self._handles.pop(job_id, None)
            attached = job_id in self._attached
            self._attached.discard(job_id)
            if handle is not None:
                self._ended[job_id] = handle
        return handle is not None and not attached

    def _delete_soon(self, job_id: str) -> None:
        """Queue the deletion of a job's objects. Also while the client closes: a job
        that a fetcher thread ends then is still deleted, as ``close`` shuts the
        cleaner down only after the fetchers."""
        if self._store is None:
            return
        with self._lock:
            self._deleting[job_id] = self._deleting.get(job_id, 0) + 1
        try:
            self._cleaner.submit(self._delete_job, job_id)
        except RuntimeError:  # closed: the TTL collects them
            self._deleted(job_id)

    def _delete_job(self, job_id: str) -> None:
        assert self._store is not None
        try:
            deleted = self._store.delete_prefix(job_prefix(job_id))
        except BrokerError as exc:
            log.warning("job_objects_not_deleted", job_id=job_id, reason=str(exc))
            return
        finally:
            self._deleted(job_id)
        self.metrics.blobs_deleted.inc(deleted)

    def _deleted(self, job_id: str) -> None:
        with self._lock:
            left = self._deleting.pop(job_id, 1) - 1
            if left:
                self._deleting[job_id] = left

    def _not_being_deleted(self, job_id: str) -> None:
        """A job id this client still runs, or whose last job's delete is queued, is
        refused before anything is uploaded: the job's objects share one prefix, and that
        job's end (or the delete) would take the new job's inputs from under its cars."""
        with self._lock:
            running, deleting = job_id in self._handles, job_id in self._deleting
        if running:
            raise ValidationError("job_id_in_use", f"job {job_id} is still running")
        if deleting:
            detail = f"job {job_id}'s objects are still being deleted; submit again once they are"
            raise ValidationError("job_id_in_use", detail)

    @contextlib.contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """Count a job refused before anything was sent, by the refusal's reason."""
        try:
            yield
        except ValidationError as exc:
            self.metrics.jobs_refused.labels(exc.reason).inc()
            raise

    def _record(self, task: TaskChunk) -> tuple[str, bytes]:
        """A task's Kafka key and value, refused here when the record would be too large:
        a job is sent whole or not at all, and never as records the broker refuses."""
        key = task_key(task.job_id, task.chunk_id)
        value = encode(task)
        what = f"chunk {task.chunk_id} of this {task.kernel} job"
        how = kernel_catalog.split_hint(task.kernel)
        check_record(self.settings.kafka, value, key, what, how)
        return key, value

    def _header(self, kernel: str, tasks: list[TaskChunk]) -> JobSubmitted:
        first = tasks[0]
        return JobSubmitted(
            first.job_id,
            kernel,
            len(tasks),
            first.reply_topic,
            time.time(),
            sealed=bool(first.reply_key),
            created_at=first.created_at,
        )

    def _publish_all(
        self,
        job_id: str,
        header: JobSubmitted,
        records: list[tuple[str, bytes]],
        tasks: list[TaskChunk],
        uploads: JobUploads | None,
    ) -> None:
        """Produce the job's JobSubmitted, then each task once the objects it names are
        stored (the first cars start while later blocks upload), then wait for Kafka to
        confirm them all."""
        failures: list[str] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        sent = 0
        producer = self._live_producer()
        self._withdrawn[job_id] = False  # until the job is known to be dropped or unsent
        try:
            if self._jobs_topic is not None:
                refused = produce(producer, self._jobs_topic, encode(header), job_id, report)
                if refused is not None:
                    failures.append(str(refused))
            for (key, value), task in zip(records, tasks, strict=True):
                if uploads is not None:
                    uploads.ready(task)
                refused = produce(producer, self.topics.tasks, value, key, report)
                if refused is not None:
                    failures.append(str(refused))
                sent += 1
            remaining = producer.flush(self.settings.publish_timeout_s)
        except BaseException:  # Kafka's refusal, a failed upload, or the caller's Ctrl-C
            self._withdrawn[job_id] = self._withdraw(job_id, header.created_at, sent)
            raise
        if remaining:  # stalled, as one a restarted broker forgot is: the next gets a new one
            self._renew(producer)
        if remaining or failures:
            self.metrics.delivery_errors.inc(len(failures) + remaining)
            # Some may still land (or were written unconfirmed): gateways drop the job
            # rather than send cars after the objects about to be deleted.
            self._withdrawn[job_id] = self._withdraw(job_id, header.created_at, len(records))
            raise BrokerError(
                f"{len(failures) + remaining} of {len(records) + 1} records not confirmed by "
                f"Kafka: {failures[:3]}"
            )

    def _send_task(self, task: TaskChunk) -> None:
        """One more record of a task (a redo or second opinion), from a reader thread:
        produce and move on; a refusal is raised, a failed delivery only logged (the
        chunk's deadline then ends it through the dead-letter topic)."""
        key, value = self._record(task)

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.warning("redo_not_delivered", job_id=task.job_id, reason=str(err))

        producer = self._live_producer()
        try:
            refused = produce(producer, self.topics.tasks, value, key, report)
            producer.poll(0)
        except KafkaException as exc:  # a fatal producer error, raised by poll
            self._renew(producer)
            raise BrokerError(f"redo of chunk {task.chunk_id} not sent: {exc}") from None
        if refused is not None:
            raise BrokerError(f"redo of chunk {task.chunk_id} refused: {refused}")

    def _withdraw(self, job_id: str, created_at: float, sent: int) -> bool:
        """A submit failed after part of the job went to Kafka: gateways are told to drop
        it, so no car is sent after objects about to be deleted. Whether that is known
        (nothing sent, or the cancel confirmed); if not, the objects are left to the
        store's TTL, and leases and the dead-letter topic end what got through."""
        if not sent:
            return True
        try:
            self._send_cancel(job_id, created_at, "submit_failed")
        except BrokerError as exc:
            log.warning("failed_job_not_withdrawn", job_id=job_id, reason=str(exc))
            return False
        return True

    def cancel(self, job_id: str, reason: str = "cancelled_by_caller") -> None:
        """Tell every gateway to drop the job: one CancelJob record on each task partition.

        A job's chunks are spread over partitions, and each partition's owner sees the
        cancel after the job's own records there, so no chunk can slip past it.
        """
        own = self.handle(job_id)
        if own is not None and own.state is JobState.RUNNING:
            self._cancel_reasons[job_id] = reason
            own.cancel()  # ends the handle, then calls back here to tell the gateways
            return
        sent = False
        try:
            # Without a handle, or with one of an older submitter's job (0.0), the cancel
            # names no submission: gateways then drop the tasks created before it.
            created_at = own.created_at if own is not None else 0.0
            self._send_cancel(job_id, created_at, self._cancel_reasons.pop(job_id, reason))
            sent = True
        finally:
            # Forgotten either way (the handle has ended); its objects go only once
            # gateways were told, else a chunk still queued is sent after them.
            if self._forget(job_id) and sent:
                self._delete_soon(job_id)

    def _send_cancel(self, job_id: str, created_at: float, reason: str) -> None:
        """One CancelJob record on each task partition, for the submission stamped
        ``created_at``, confirmed; BrokerError if not (the job's objects then stay:
        chunks still queued would be sent after them)."""
        record = encode(CancelJob(job_id, time.time(), reason, created_at))
        producer = self._live_producer()
        try:
            partitions = producer.list_topics(self.topics.tasks, timeout=10)
        except KafkaException as exc:
            raise BrokerError(f"cancel of job {job_id} not sent: {exc}") from None
        failures: list[str] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for partition in partitions.topics[self.topics.tasks].partitions:
            producer.produce(
                self.topics.tasks, record, key=job_id, partition=partition, on_delivery=report
            )
        if producer.flush(self.settings.publish_timeout_s) or failures:
            raise BrokerError(f"cancel of job {job_id} not confirmed by Kafka: {failures[:3]}")
        log.info("job_cancel_sent", job_id=job_id)

    # ---------------------------------------------------------------- results

    def _broker_lost(self, error: BrokerError) -> None:
        """The results can no longer be read: every running job ends with ``error``."""
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.lost(error)

    def handle(self, job_id: str) -> JobHandle[Any] | None:
        with self._lock:
            live = self._handles.get(job_id)
            return live if live is not None else self._ended.get(job_id)

    @overload
    def attach(
        self, job_id: str, assembler: None = ..., *, timeout: float = ...
    ) -> JobHandle[Any]: ...

    @overload
    def attach(
        self, job_id: str, assembler: Assembler[R], *, timeout: float = ...
    ) -> JobHandle[R]: ...

    def attach(
        self,
        job_id: str,
        assembler: Assembler[Any] | None = None,
        *,
        timeout: float = 60.0,
    ) -> JobHandle[Any]:
        """A live handle on a job submitted by another client or process, or before a
        restart, found by its id: its chunks so far come at once, the rest as they finish.

        Results are read from the job's submit time on (``offsets_for_times``), never
        from the topics' start. ``assembler`` (``plan.make_assembler()`` of the same
        plan) gives the handle an answer; without it the answer is None and the chunks
        are the result. Only the submitting client can check results against their
        inputs, so an attached job's chunks come as their cars sent them (the level
        ``unchecked``), but for those of a car the fleet quarantined (with ``verify``,
        the default), which are skipped for the chunk's redo; the submitter, if it
        still runs, checks its own.
        A job of this client gives its own handle, while running or while its caller
        still holds it. BrokerError when the job cannot be
        found in ``timeout`` s; ConfigError when this client cannot read its results.
        """
        own = self.handle(job_id)
        if own is not None:
            return own
        self._need_reader()
        job = find_job(self.settings.kafka, self.topics.jobs, job_id, timeout)
        self._can_follow(job)
        starts = job_starts(
            self.settings.kafka,
            [self.reply_topic, self.topics.dead_letter],
            job.submitted_at - CLOCK_SKEW_S,
        )
        if self._checks is not None:  # the quarantines so far, before any result
            self._checks.reader.caught_up.wait(timeout)
        handle = JobHandle(
            job_id,
            job.n_chunks,
            assembler,
            canceller=self.cancel,
            observer=self.metrics,
            on_end=self._job_ended,  # forgotten once ended; its objects are not ours
            created_at=job.created_at,
        )
        with self._lock:
            other = self._handles.get(job_id)
            if other is not None:
                return other  # attached by another thread meanwhile
            self._need_reader()  # as in ``publish``: nobody would hear it end
            self._attached.add(job_id)
            self._handles[job_id] = handle  # before the rewind: the live reader goes on
        self._reader.rewind(job_id, starts, timeout)
        log.info("job_attached", job_id=job_id, kernel=job.kernel, chunks=job.n_chunks)
        return handle

    def _can_follow(self, job: JobSubmitted) -> None:
        if job.reply_topic != self.reply_topic:
            raise ConfigError(
                f"job {job.job_id} replies on {job.reply_topic}; this client reads "
                f"{self.reply_topic}: attach with reply_topic={job.reply_topic!r}"
            )
        if job.sealed and self.settings.reply_box_key is None:
            raise ConfigError(
                f"job {job.job_id}'s results are sealed to its submitter's reply key: "
                "attach with that key (reply_box_key)"
            )

    def _route(self, record: Message) -> None:
        key = (record.key() or b"").decode("utf-8", "replace")
        handle = self.handle(key)
        if handle is None:
            return  # another caller's job, or one we stopped following
        with self._refusing(key, record.topic()):
            if record.topic() != self.reply_topic:
                letter = decode(record.value() or b"", DeadLetter)
                if self._elsewhere(handle, letter.task_created_at):
                    return
                handle.dead_lettered(letter)
                if self._checks is not None:
                    self._checks.abandoned(handle, letter.chunk_id)
                return
            result = decode(record.value() or b"", Result)
            if self._elsewhere(handle, result.task_created_at):
                return
            if result.refs and self._wanted(handle, result):
                # Read back off the reader's thread: one slow GET must not hold up
                # every other job's results.
                with contextlib.suppress(RuntimeError):  # closing: nobody waits for it
                    self._fetcher.submit(self._deliver_stored, handle, result)
            else:
                self._take(handle, self._opened(handle, result))

    def _elsewhere(self, handle: JobHandle[Any], created_at: float) -> bool:
        """A record of another submission under this job's id (one cancelled, or lost
        with its client, whose cars finish late): counted, never taken for this one's."""
        if handle.of_this_submission(created_at):
            return False
        if handle.state is not JobState.RUNNING:
            return True  # an ended job takes nothing: not worth a count per record
        self.metrics.results_refused.labels("other_submission").inc()
        log.debug("other_submission_skipped", job_id=handle.job_id, created_at=created_at)
        return True

    def _wanted(self, handle: JobHandle[Any], result: Result) -> bool:
        if handle.job_id in self._attached:
            return handle.awaits(result.chunk_id) and not self._quarantined(result)
        if self._checks is None:
            return handle.awaits(result.chunk_id)
        return self._checks.wants(handle, result)

    def _take(self, handle: JobHandle[Any], result: Result) -> None:
        """A result with its outputs in clear: checked, then handed to the job. Checks
        deal with outputs that do not fit the job themselves, as with a wrong number."""
        try:
            if handle.job_id in self._attached:
                if not self._quarantined(result):
                    handle.deliver(result, time.time())
            elif self._checks is None:
                handle.deliver(result, time.time())
            else:
                self._checks.take(handle, result)
        except ValidationError as exc:
            self._misfit(handle, result, exc)

    def _misfit(self, handle: JobHandle[Any], result: Result, exc: ValidationError) -> None:
        """Outputs the job's assembler refused: the chunk fails by name, as unreadable
        ones do without checks; an attached job waits for its submitter's redo."""
        note_misfit(self.metrics, handle.job_id, result, str(exc))
        if handle.job_id not in self._attached:
            handle.refused(result.chunk_id, f"outputs_misfit: {exc}")

    def _quarantined(self, result: Result) -> bool:
        """An attached job's result from a car the fleet quarantined: the submitter
        caught it lying (one wrong result is enough) and had the chunk redone, so the
        redo's result is the one to take. Without checks no quarantine is known."""
        if self._checks is None or not self._checks.book.quarantined(result.vehicle_id):
            return False
        self.metrics.results_refused.labels("quarantined_car").inc()
        return True

    def _deliver_stored(self, handle: JobHandle[Any], result: Result) -> None:
        try:
            with self._refusing(handle.job_id, self.reply_topic):
                self._take(handle, self._stored_outputs(handle, result))
        except Exception as exc:
            # On the fetcher's thread an error nobody expects would vanish with its
            # future, and the caller would wait on the chunk for ever.
            log.exception("result_unreadable", job_id=handle.job_id, chunk_id=result.chunk_id)
            self._failed(handle, result.chunk_id, f"outputs_unreadable: {exc!r}")

    def _opened(self, handle: JobHandle[Any], result: Result) -> Result:
        """A result that came inline, its outputs in clear. One sealed to no key of ours
        fails as unreadable stored outputs do while its chunk is awaited: the gateway
        has passed it on and will not redo the chunk, so a job left to wait would wait
        for ever."""
        try:
            return open_result(result, self._reply_box)
        except DecodeError as exc:
            if self._wanted(handle, result):
                self._unreadable(handle, result, exc)
            raise

    def _unreadable(self, handle: JobHandle[Any], result: Result, exc: DecodeError) -> None:
        """Outputs missing, not the bytes the car named, or sealed to no key of ours: the
        car's word failed, as a wrong number would; checked jobs redo the chunk
        elsewhere. Never hang on it.

        A job this client attached to is only followed (it is counted, by the caller):
        its submitter judges the chunk, and redoes it where its checks are on (the
        default), so failing it here would end this view of the job FAILED before the
        redo's result arrives."""
        if handle.job_id in self._attached:
            return
        if self._checks is not None:
            self._checks.unusable(handle, result, str(exc))
        else:
            handle.refused(result.chunk_id, f"outputs_unreadable: {exc}")

    def _failed(self, handle: JobHandle[Any], chunk_id: int, reason: str) -> None:
        """The chunk fails for good; its check group, if any, goes on without it."""
        if self._checks is not None and handle.job_id not in self._attached:
            self._checks.failed(handle, chunk_id, reason)
        else:
            handle.refused(chunk_id, reason)

    @contextlib.contextmanager
    def _refusing(self, job_id: str, topic: str | None) -> Iterator[None]:
        """A record of ours that cannot be read is counted and logged, never raised."""
        try:
            yield
        except DecodeError as exc:
            with self._lock:
                self.decode_errors += 1
            self.metrics.results_refused.labels(exc.reason).inc()
            log.warning("result_malformed", job_id=job_id, topic=topic, reason=str(exc))

    def _stored_outputs(self, handle: JobHandle[Any], result: Result) -> Result:
        """Outputs left in the store by the car, read back, checked by hash and opened;
        only for a chunk still awaited, so a duplicate costs no download. Outputs that
        cannot be used fail or redo the chunk, and raise DecodeError to be counted."""
        if not result.refs or not self._wanted(handle, result):
            return result
        if self._store is None:
            # This client's settings, not the car's fault: no redo would read them.
            detail = "the car stored the outputs and this client has no object store"
            self._failed(handle, result.chunk_id, f"outputs_unreadable: {detail}")
            raise DecodeError("bad_data", detail)
        try:
            return open_result(fetch_outputs(self._store, result), self._reply_box)
        except DecodeError as exc:
            self._unreadable(handle, result, exc)
            raise
        except BrokerError as exc:
            # The store failed us, not the car: the chunk fails, by name.
            self._failed(handle, result.chunk_id, f"outputs_unreadable: {exc}")
            raise DecodeError("bad_data", str(exc)) from None


def _level(value: Level | str) -> Level:
    try:
        return Level(value)
    except ValueError:
        allowed = ", ".join(level.value for level in Level)
        detail = f"verification {value!r}: one of {allowed}"
        raise ValidationError("bad_verification", detail) from None


def _gateway_key(path: Path | None) -> bytes | None:
    """The gateways' box public key, checked once here so that a bad file fails the
    client's start with its name, not every confidential submit with a crypto error."""
    if path is None:
        return None
    key = read_key_file(path, "gateway box")
    try:
        seal(key, b"", b"")
    except DecodeError as exc:
        raise ConfigError(f"gateway box key {path} is not usable: {exc.detail}") from None
    return key


@dataclass(frozen=True)
class _Rewind:
    job: bytes  # the job id, as the records' key
    starts: list[TopicPartition]
    done: threading.Event


class _ResultReader(threading.Thread):
    """Reads the reply and dead-letter topics from their current ends, for one client.

    librdkafka reconnects by itself, so a broker that is down for a moment costs nothing
    here; one that stays out of reach for ``results_unreachable_s`` fails every running
    job with a BrokerError that names it, so that no caller waits for ever.

    Fetches wait ``result_fetch_wait_ms`` at first: the last result of a job reaches
    its caller up to half a wait later on the durable embedded Kafka. The results topic
    only grows, and that Kafka must list a partition's batches within the wait, so the
    wait is doubled while a partition stays behind its high watermark (runtime.fetchwait).
    """

    def __init__(self, client: ParkpoolClient, topics: list[str]) -> None:
        super().__init__(name="parkpool-results", daemon=True)
        self.failure = ""  # why it stopped, if not by the client's close
        self.client: ParkpoolClient | None = client
        self._down_since: float | None = None  # monotonic; the broker went out of reach
        self._last_error = ""
        self._next_probe = 0.0
        self._ladder = FetchWaitLadder(client.settings.result_fetch_wait_ms)
        self._next_stall_check = 0.0
        self.consumer = self._open(client)
        # Where each partition is read next; moved back by an attach (``rewind``) and
        # for a hole (``_reread_holes``).
        try:
            ends = high_watermarks(self.consumer, topics)
        except BaseException:  # no thread will run to close it
            self.consumer.close()
            raise
        self._next = {(tp.topic, tp.partition): end for tp, end in ends.items()}
        # Which offsets were had: a record read again goes to an attached job only.
        self._ledger = OffsetLedger()
        for where, offset in self._next.items():
            self._ledger.start(where, offset)
        self.consumer.assign(self._assignment())
        # Read again for attached jobs only: (up to this offset, those jobs) per partition.
        self._replaying: dict[tuple[str, int], tuple[int, set[bytes]]] = {}
        self._rewinds: queue.SimpleQueue[_Rewind] = queue.SimpleQueue()

    def _open(self, client: ParkpoolClient) -> Consumer:
        config = reader_config(
            client.settings.kafka,
            error_cb=self._on_error,
            **{"fetch.wait.max.ms": self._ladder.wait_ms},
        )
        return Consumer(config)

    def _assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, offset) for (t, p), offset in self._next.items()]

    def _check_stalls(self, client: ParkpoolClient) -> None:
        """Wait longer per fetch once a partition has records for this reader that its
        fetches keep coming back without; the consumer is made again with the new wait,
        at the same offsets (librdkafka fixes the wait when a consumer is made)."""
        now = time.monotonic()
        if self._down_since is not None:
            # A broker out of reach answers no fetch (that is _watch's to tell); once it
            # is back, its partitions get their whole patience again.
            self._ladder.read()
            return
        if now < self._next_stall_check:
            return
        self._next_stall_check = now + 0.25
        behind = [
            where
            for where, offset in self._next.items()
            if cached_high(self.consumer, where) > offset
        ]
        if not self._ladder.due(behind, now):
            return
        if not answers(self.consumer, behind[0]):
            self._ladder.read()  # out of reach, not stalled: start over
            return
        wait = self._ladder.raise_wait()
        log.warning("result_fetch_wait_raised", wait_ms=wait, behind=len(behind))
        client.metrics.result_fetch_wait_raised.inc()
        self.consumer.close()
        self.consumer = self._open(client)
        self.consumer.assign(self._assignment())

    def rewind(self, job_id: str, starts: list[TopicPartition], timeout: float) -> None:
        """Have this reader go back to ``starts`` for ``job_id``'s records (an attach);
        returns once it has. Records read again are routed for that job alone."""
        request = _Rewind(job_id.encode(), starts, threading.Event())
        self._rewinds.put(request)
        if not request.done.wait(timeout):
            raise BrokerError(f"the result reader did not go back for job {job_id} in time")

    def _serve_rewinds(self) -> None:
        moved = False
        while not self._rewinds.empty():
            request = self._rewinds.get()
            for tp in request.starts:
                where = (tp.topic, tp.partition)
                now = self._next.get(where)
                if now is None:
                    continue  # a partition this reader does not know
                # What was had: a replay or a hole's look again may have moved the
                # reader below it, and the records up to it are read again either way.
                until, jobs = self._replaying.get(where, (now, set()))
                had = max(now, until, self._ledger.top(where) or 0)
                if tp.offset >= had:
                    continue  # not read yet: the reader will, for every job
                self._replaying[where] = (had, jobs | {request.job})
                self._next[where] = min(now, tp.offset)
                moved = True
            if moved:
                self.consumer.assign(self._assignment())
            request.done.set()

    def _routes(self, record: Message) -> bool:
        """Whether to route a record: one never had, or one of the rewound jobs'."""
        where = (record.topic() or "", record.partition() or 0)
        offset = record.offset() or 0
        self._next[where] = offset + 1
        self._ladder.read()
        new = self._ledger.admit(where, offset)
        replay = self._replaying.get(where)
        if replay is None:
            return new
        until, jobs = replay
        if offset + 1 >= until:
            del self._replaying[where]
        return new or record.key() in jobs

    def _reread_holes(self) -> None:
        """Go back for records a fetch passed over (see ``runtime.offsets``): without
        this, a result Tansu showed late never reached its job, which waited for ever."""
        due = self._ledger.due()
        for where, offset in due:
            self._next[where] = min(self._next.get(where, offset), offset)
        if due:
            self.consumer.assign(self._assignment())
        filled, lost = self._ledger.news()
        if filled or lost:
            assert self.client is not None
            self.client.metrics.offset_holes.labels("filled").inc(filled)
            self.client.metrics.offset_holes.labels("lost").inc(lost)
        if lost:
            log.error("results_never_read", records=lost, patience_s=PATIENCE_S)

    def run(self) -> None:
        client = self.client
        assert client is not None
        try:
            while not client._closed.is_set():
                # poll() returns on the first record; consume(timeout=0) then takes the
                # rest already fetched. consume() alone would wait out its whole timeout.
                self._serve_rewinds()
                self._reread_holes()
                first = self.consumer.poll(0.05)
                self._watch(client)
                if first is not None:
                    for record in [first, *self.consumer.consume(500, timeout=0)]:
                        if record.error() is None:
                            self._down_since = None
                            if self._routes(record):
                                self._route(client, record)
                        else:
                            self._ladder.read()  # a failing fetch: no stall of the listing
                self._check_stalls(client)
        except Exception as exc:
            # Every job of this client waits on this thread: tell them, never hang them.
            log.exception("result_reader_failed")
            self.failure = repr(exc)
            client._broker_lost(BrokerError(f"the result reader stopped: {exc!r}"))
        finally:
            self.consumer.close()

    def _route(self, client: ParkpoolClient, record: Message) -> None:
        """One record to its job; a failure on it fails that job, not every other."""
        try:
            client._route(record)
        except Exception as exc:
            key = (record.key() or b"").decode("utf-8", "replace")
            log.exception("result_route_failed", job_id=key, topic=record.topic())
            client.metrics.results_refused.labels("internal_error").inc()
            handle = client.handle(key)
            if handle is not None:
                handle.lost(ParkpoolError(f"reading a result of job {key} failed: {exc!r}"))

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error events (from poll, on this thread): note when the broker
        went out of reach; anything else is logged by librdkafka itself."""
        if error.code() in _UNREACHABLE and self._down_since is None:
            self._down_since = time.monotonic()
        self._last_error = error.str()

    def _watch(self, client: ParkpoolClient) -> None:
        """While the broker is out of reach, ask it for metadata now and then; past the
        limit, fail every running job with the reason."""
        if self._down_since is None:
            return
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + 1.0
            try:
                self.consumer.list_topics(timeout=0.5)
            except KafkaException:
                pass
            else:
                self._down_since = None
                return
        waited = now - self._down_since
        if waited >= client.settings.results_unreachable_s:
            bootstrap = client.settings.kafka.bootstrap
            error = BrokerError(
                f"Kafka at {bootstrap} unreachable for {waited:.0f} s while reading results "
                f"({self._last_error or 'no answer'}); the job's outcome is unknown"
            )
            client._broker_lost(error)
            self._down_since = None  # told; a later outage counts from its own start


# Error events that mean the client cannot reach the cluster (not one partition's issue).
_UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT})
