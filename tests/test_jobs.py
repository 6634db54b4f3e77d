# SPDX-License-Identifier: Apache-2.0
"""A job handle counts each chunk once, assembles the answer, and ends exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from parkpool.producer.jobs import JobFailed, JobHandle, JobState, Progress
from parkpool.producer.splitters import plan_map, plan_reduce
from parkpool.schemas import DeadLetter, Result, ValidationError

JOB = "job-7"
X = np.arange(10, dtype=np.float64)
CHUNK_ELEMS = 4  # chunks [0:4], [4:8], [8:10]
N_CHUNKS = 3
CREATED_AT = 1_000.0


def result(
    chunk_id: int,
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    n_chunks: int = N_CHUNKS,
    vehicle_id: str = "car1",
) -> Result:
    """A result for chunk ``chunk_id`` of a sum over X, correct unless outputs are given."""
    if outputs is None:
        start = chunk_id * CHUNK_ELEMS
        outputs = {"value": np.array(X[start : start + CHUNK_ELEMS].sum())}
    return Result(
        job_id=JOB,
        chunk_id=chunk_id,
        n_chunks=n_chunks,
        vehicle_id=vehicle_id,
        gateway_id="gw1",
        epoch=1 + chunk_id,
        attempt=1,
        outputs=outputs,
        exec_seconds=0.01,
        finished_at=CREATED_AT + 1,
        task_created_at=CREATED_AT,
    )


def dead_letter(chunk_id: int, reason: str = "max_attempts") -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail="kernel failed on three cars",
        source_topic="parkpool.tasks",
        partition=0,
        offset=max(chunk_id, 0),
        original=b"raw",
        dead_at=CREATED_AT + 2,
        gateway_id="gw1",
        job_id=JOB,
        chunk_id=chunk_id,
    )


def sum_job() -> JobHandle:
    plan = plan_reduce(X, "sum", chunk_elems=CHUNK_ELEMS)
    assert len(plan.chunks) == N_CHUNKS
    return JobHandle(JOB, N_CHUNKS, plan.make_assembler())


class TestAssembly:
    """wait() returns the assembled answer once every chunk has arrived."""

    def test_all_chunks_in_any_order_assemble_the_answer(self) -> None:
        job = sum_job()
        for chunk_id in (2, 0, 1):
            assert job.deliver(result(chunk_id), received_at=CREATED_AT + 3)
        assert job.state is JobState.DONE
        assert job.wait(timeout=1) == X.sum()
        progress = job.progress
        assert (progress.done, progress.total, progress.fraction) == (3, 3, 1.0)
        assert job.latencies == [3.0, 3.0, 3.0]

    def test_map_job_assembles_the_array(self) -> None:
        x = np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1)
        plan = plan_map(x, [2.0, 1.0], chunk_elems=3)
        job = JobHandle("job-map", len(plan.chunks), plan.make_assembler())
        for chunk_id, spec in enumerate(plan.chunks):
            y = 2.0 * spec.inputs["x"] + 1.0
            res = Result(
                "job-map", chunk_id, len(plan.chunks), "car1", "gw1", 1, 1, {"y": y}, 0.0, 1.0, 0.0
            )
            assert job.deliver(res, received_at=1.0)
        np.testing.assert_allclose(job.wait(timeout=1), 2.0 * x + 1.0)

    def test_wait_wakes_when_the_last_chunk_arrives_from_another_thread(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        job.deliver(result(1), received_at=CREATED_AT)
        timer = threading.Timer(0.05, job.deliver, (result(2), CREATED_AT))
        timer.start()
        try:
            assert job.wait(timeout=5) == X.sum()
        finally:
            timer.join()

    def test_wait_times_out_while_chunks_are_missing(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="1/3"):
            job.wait(timeout=0.05)
        assert time.monotonic() - started < 1
        assert job.state is JobState.RUNNING

    def test_without_assembler_wait_returns_none(self) -> None:
        job = JobHandle(JOB, 1, None)
        assert job.deliver(result(0, {"anything": np.zeros(3)}, n_chunks=1), CREATED_AT)
        assert job.wait(timeout=1) is None
        assert job.state is JobState.DONE

    def test_latency_is_never_negative(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT - 5)  # clocks of two machines differ
        assert job.latencies == [0.0]


class TestDuplicates:
    """A chunk's result counts once; duplicates are counted and dropped."""

    def test_duplicate_result_is_dropped_and_counted(self) -> None:
        job = sum_job()
        assert job.deliver(result(0), received_at=CREATED_AT)
        # When the same chunk arrives again (at-least-once delivery)
        assert not job.deliver(result(0, vehicle_id="car2"), received_at=CREATED_AT)
        # Then it is counted as a duplicate, not as progress
        progress = job.progress
        assert (progress.done, progress.duplicates, progress.rejected) == (1, 1, 0)
        job.deliver(result(1), received_at=CREATED_AT)
        job.deliver(result(2), received_at=CREATED_AT)
        # And the sum counts chunk 0 once
        assert job.wait(timeout=1) == X.sum()

    def test_chunks_yields_each_chunk_once_then_ends(self) -> None:
        job = sum_job()
        accepted = [job.deliver(result(c), received_at=CREATED_AT) for c in (1, 1, 0, 0, 2)]
        assert accepted == [True, False, True, False, True]
        chunks = list(job.chunks(timeout=1))
        assert [c.chunk_id for c in chunks] == [1, 0, 2]
        assert all(c.vehicle_id == "car1" for c in chunks)
        assert float(chunks[0].outputs["value"]) == X[4:8].sum()
        assert job.progress.duplicates == 2

    def test_result_after_the_job_ended_is_refused_silently(self) -> None:
        job = sum_job()
        for chunk_id in range(N_CHUNKS):
            job.deliver(result(chunk_id), received_at=CREATED_AT)
        # When a late duplicate arrives after the job is DONE
        assert not job.deliver(result(0), received_at=CREATED_AT)
        # Then it changes nothing: the job no longer counts anything
        assert job.progress == Progress(JobState.DONE, 3, 3, 0, 0, 0)

    def test_result_with_wrong_chunk_count_is_refused(self) -> None:
        job = sum_job()
        assert not job.deliver(result(0, n_chunks=4), received_at=CREATED_AT)
        assert job.progress == Progress(JobState.RUNNING, 0, 3, 0, 0, 0)

    def test_result_that_does_not_fit_is_rejected_not_done(self) -> None:
        job = sum_job()
        # When a result has the wrong output name, then a wrong shape
        # Then each raises the assembler's error, for the caller to redo or fail the chunk
        with pytest.raises(ValidationError, match="missing_output"):
            job.deliver(result(0, {"y": np.zeros(4)}), received_at=CREATED_AT)
        with pytest.raises(ValidationError, match="bad_shape"):
            job.deliver(result(0, {"value": np.zeros(4)}), received_at=CREATED_AT)
        # And both are counted as rejected, and the chunk is still missing
        progress = job.progress
        assert (progress.done, progress.rejected, progress.duplicates) == (0, 2, 0)
        # And a correct result for that chunk is still taken
        assert job.deliver(result(0), received_at=CREATED_AT)
        assert job.progress.done == 1


class TestDeadLetters:
    """A dead-lettered chunk fails the job once every other chunk is accounted for."""

    def test_job_fails_after_the_other_chunks_arrive(self) -> None:
        job = sum_job()
        # Given chunk 1 dead-lettered
        job.dead_lettered(dead_letter(1, "max_attempts"))
        # Then the job keeps running while other chunks are outstanding
        assert job.state is JobState.RUNNING
        job.deliver(result(0), received_at=CREATED_AT)
        assert job.progress.state is JobState.RUNNING
        # When the last other chunk arrives
        job.deliver(result(2), received_at=CREATED_AT)
        # Then the job has failed, and wait() says why
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=1)
        assert failed.value.reasons == {1: "max_attempts"}
        assert failed.value.job_id == JOB
        assert "chunk 1: max_attempts" in str(failed.value)
        progress = job.progress
        assert (progress.state, progress.done, progress.dead_lettered) == (JobState.FAILED, 2, 1)

    def test_job_fails_when_the_dead_letter_comes_last(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        job.deliver(result(1), received_at=CREATED_AT)
        job.dead_lettered(dead_letter(2, "deadline_passed"))
        with pytest.raises(JobFailed, match="deadline_passed"):
            job.wait(timeout=1)
        assert [c.chunk_id for c in job.chunks(timeout=1)] == [0, 1]

    def test_dead_letter_after_the_result_is_ignored(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        # When a dead letter for chunk 0 arrives after its result
        job.dead_lettered(dead_letter(0))
        # Then the result counts and the job completes normally
        assert job.progress.dead_lettered == 0
        job.deliver(result(1), received_at=CREATED_AT)
        job.deliver(result(2), received_at=CREATED_AT)
        assert job.wait(timeout=1) == X.sum()

    def test_repeated_and_foreign_dead_letters_count_once(self) -> None:
        job = sum_job()
        job.dead_lettered(dead_letter(1))
        job.dead_lettered(dead_letter(1, "other"))
        job.dead_lettered(dead_letter(-1))  # a malformed record with no chunk id
        progress = job.progress
        assert progress.dead_lettered == 1
        assert progress.state is JobState.RUNNING

    def test_late_result_of_a_dead_lettered_chunk_does_not_end_the_job_early(self) -> None:
        # Given chunk 0 dead-lettered (say by a gateway that crashed before committing)
        job = sum_job()
        job.dead_lettered(dead_letter(0))
        # When a result for chunk 0 still arrives (the redelivered task succeeded), then chunk 1
        job.deliver(result(0), received_at=CREATED_AT)
        job.deliver(result(1), received_at=CREATED_AT)
        # Then the job is not over: chunk 2 has not come back at all
        assert job.state is JobState.RUNNING


class TestCancel:
    """cancel() ends a running job as CANCELLED and reports how far it got."""

    def test_cancel_reports_progress_and_ends_the_job(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        job.deliver(result(0), received_at=CREATED_AT)
        progress = job.cancel()
        assert progress == Progress(JobState.CANCELLED, 1, 3, 1, 0, 0)
        # And nothing more is taken, the stream of chunks ends, and wait() returns at once
        assert not job.deliver(result(1), received_at=CREATED_AT)
        assert [c.chunk_id for c in job.chunks(timeout=1)] == [0]
        assert job.wait(timeout=1) is None

    def test_cancel_after_done_keeps_done(self) -> None:
        job = sum_job()
        for chunk_id in range(N_CHUNKS):
            job.deliver(result(chunk_id), received_at=CREATED_AT)
        assert job.cancel().state is JobState.DONE
        assert job.wait(timeout=1) == X.sum()

    def test_cancel_wakes_a_waiter(self) -> None:
        job = sum_job()
        timer = threading.Timer(0.05, job.cancel)
        timer.start()
        try:
            assert job.wait(timeout=5) is None
        finally:
            timer.join()
        assert job.state is JobState.CANCELLED


class TestFuture:
    """A handle's answer is a concurrent.futures.Future that ends with the job."""

    def test_the_future_holds_the_answer_once_the_last_chunk_arrives(self) -> None:
        job = sum_job()
        assert not job.future.done()
        for chunk_id in range(N_CHUNKS):
            job.deliver(result(chunk_id), received_at=CREATED_AT)
        assert job.future.result(timeout=0) == X.sum()

    def test_a_failed_job_raises_through_its_future(self) -> None:
        job = sum_job()
        job.dead_lettered(dead_letter(0))
        job.deliver(result(1), received_at=CREATED_AT)
        job.deliver(result(2), received_at=CREATED_AT)
        with pytest.raises(JobFailed) as caught:
            job.future.result(timeout=0)
        assert caught.value.reasons == {0: "max_attempts"}

    def test_cancelling_the_future_cancels_the_job(self) -> None:
        cancelled: list[str] = []
        plan = plan_reduce(X, "sum", chunk_elems=CHUNK_ELEMS)
        job = JobHandle(JOB, N_CHUNKS, plan.make_assembler(), canceller=cancelled.append)
        assert job.future.cancel()
        assert job.state is JobState.CANCELLED and cancelled == [JOB]
        assert job.wait(timeout=0) is None

    def test_a_future_cancelled_while_its_answer_is_assembled_keeps_the_answer(self) -> None:
        # Given a job whose answer takes a while to assemble
        assembling, go_on = threading.Event(), threading.Event()
        assembler = plan_reduce(X, "sum", chunk_elems=CHUNK_ELEMS).make_assembler()
        finish = assembler.result

        def slow_result() -> float:
            assembling.set()
            go_on.wait(10)
            return finish()

        assembler.result = slow_result  # type: ignore[method-assign]
        job = JobHandle(JOB, N_CHUNKS, assembler)
        for chunk_id in range(N_CHUNKS - 1):
            job.deliver(result(chunk_id), received_at=CREATED_AT)
        last = threading.Thread(target=job.deliver, args=(result(N_CHUNKS - 1), CREATED_AT))
        last.start()
        assert assembling.wait(10)
        # When its caller cancels the future meanwhile (after wait(FIRST_COMPLETED), say)
        # Then, as for a call that already ran, the cancel is refused
        assert not job.future.cancel()
        go_on.set()
        last.join(10)
        # And the answer is there
        assert job.future.result(timeout=10) == X.sum()
        assert job.state is JobState.DONE

    def test_wait_times_out_with_a_timeout_error_naming_the_progress(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        with pytest.raises(TimeoutError, match="1/3 chunks"):
            job.wait(timeout=0.01)


class TestStreams:
    """Chunks and progress can be read again, from several readers, without hanging."""

    def test_every_reader_sees_every_chunk_from_the_first(self) -> None:
        job = sum_job()
        job.deliver(result(1), received_at=CREATED_AT)
        seen: list[list[int]] = [[], []]

        def read(into: list[int]) -> None:
            into.extend(c.chunk_id for c in job.chunks(timeout=5))

        readers = [threading.Thread(target=read, args=(ids,)) for ids in seen]
        for reader in readers:
            reader.start()
        job.deliver(result(0), received_at=CREATED_AT)
        job.deliver(result(2), received_at=CREATED_AT)
        for reader in readers:
            reader.join(5)
        assert seen == [[1, 0, 2], [1, 0, 2]]
        assert [c.chunk_id for c in job.chunks(timeout=1)] == [1, 0, 2]  # and again later

    def test_a_reader_with_nothing_coming_times_out(self) -> None:
        job = sum_job()
        job.deliver(result(0), received_at=CREATED_AT)
        chunks = job.chunks(timeout=0.05)
        assert next(chunks).chunk_id == 0
        with pytest.raises(TimeoutError, match="no chunk"):
            next(chunks)

    def test_progress_arrives_as_snapshots_and_through_a_callback(self) -> None:
        job = sum_job()
        heard: list[Progress] = []
        job.on_progress(heard.append)
        updates = job.progress_updates(timeout=1)
        assert next(updates).done == 0
        job.deliver(result(0), received_at=CREATED_AT)
        assert next(updates).done == 1
        job.deliver(result(1), received_at=CREATED_AT)
        job.deliver(result(2), received_at=CREATED_AT)
        rest = list(updates)  # changes may merge; the last is always the final state
        assert rest[-1].state is JobState.DONE and rest[-1].done == 3
        assert [p.done for p in heard] == [0, 1, 2, 3]
        assert heard[-1].state is JobState.DONE

    def test_a_callback_that_raises_does_not_stop_the_job_or_its_answer(self) -> None:
        # Given a progress callback that always raises (the caller's bug)
        job = sum_job()
        calls: list[int] = []

        def broken(progress: Progress) -> None:
            calls.append(progress.done)
            raise RuntimeError("the caller's bug")

        with pytest.raises(RuntimeError):  # called once now, on the caller's own thread
            job.on_progress(broken)
        # When every chunk arrives, on what would be the result reader's thread
        for chunk in range(3):
            job.deliver(result(chunk), received_at=CREATED_AT)
        # Then every change was still reported, and the job's answer is there
        assert calls == [0, 1, 2, 3]
        assert job.state is JobState.DONE and job.wait(timeout=1) is not None


class TestAsyncio:
    """A handle is awaitable and its chunks async-iterable, fed from another thread."""

    def test_await_and_async_for_under_a_running_loop(self) -> None:
        job = sum_job()

        async def main() -> tuple[float, list[int]]:
            feeder = threading.Timer(
                0.02,
                lambda: [job.deliver(result(i), received_at=CREATED_AT) for i in range(N_CHUNKS)],
            )
            feeder.start()
            ids = [chunk.chunk_id async for chunk in job.chunks(timeout=5)]
            answer = await job
            feeder.join()
            return answer, ids

        answer, ids = asyncio.run(main())
        assert answer == X.sum() and ids == [0, 1, 2]

    def test_a_task_that_stops_waiting_leaves_the_job_running(self) -> None:
        job = sum_job()

        async def main() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.ensure_future(job._result()), 0.02)

        asyncio.run(main())
        assert job.state is JobState.RUNNING and not job.future.done()

    def test_awaiting_a_cancelled_job_gives_none(self) -> None:
        job = sum_job()

        async def main() -> object:
            asyncio.get_running_loop().call_later(0.02, job.cancel)
            return await job

        assert asyncio.run(main()) is None
