# SPDX-License-Identifier: Apache-2.0
"""Dead-letter tooling: list, show, replay and purge against a real Tansu.

Dead letters are written straight to the dead-letter topic, so each test knows exactly
what is there; the last test makes a real gateway dead-letter a task and replays it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import structlog
from confluent_kafka import KafkaError, Message, Producer

from parkpool.app import cli
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer import dlq, dlq_cli
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.dlq import EntryState, OutcomeKind, Position, _drain
from parkpool.runtime import logs
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.sealing import BoxKey, seal_task
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import (
    AttemptRecord,
    DeadLetter,
    KafkaTopics,
    Priority,
    Result,
    TaskChunk,
    decode,
    encode,
)
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY, Kernel, Tolerance, register
from tests.conftest import RunningGateway
from tests.helpers import produce_raw_task, read_topic, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
GARBAGE = b"\xc1 not msgpack at all"
FLAKY = "test_dlq_flaky"


# ---------------------------------------------------------------- seeding the topic


def _task(job_id: str, chunk_id: int, seed: int) -> TaskChunk:
    x = np.random.default_rng(seed).standard_normal(17)
    return TaskChunk(
        job_id=job_id,
        chunk_id=chunk_id,
        n_chunks=2,
        kernel="reduce",
        params={"op": "sum"},
        inputs={"x": x},
        reply_topic="elsewhere.results",
        deadline=time.time() - 60,  # long past: a replay must set a fresh one
        created_at=time.time() - 120,
        attempt=3,
        priority=Priority.HIGH,
    )


def _letter(original: bytes, reason: str, job_id: str = "", chunk_id: int = -1) -> DeadLetter:
    attempts = tuple(
        AttemptRecord(f"car-{i}", "kernel_error", time.time() - 10 + i, f"boom {i}")
        for i in range(2)
    )
    return DeadLetter(
        reason=reason,
        detail=f"{reason} twice",
        source_topic="t.tasks",
        partition=1,
        offset=7,
        original=original,
        dead_at=time.time(),
        gateway_id="gw1",
        job_id=job_id,
        chunk_id=chunk_id,
        attempts=attempts if job_id else (),
    )


def _write(
    conn: KafkaConnection, topic: str, records: list[tuple[str | None, bytes]]
) -> list[Position]:
    """Produce records in order; their positions, from the delivery reports."""
    positions: list[Position] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        positions.append(Position(msg.partition() or 0, msg.offset() or 0))

    producer = Producer(producer_config(conn))
    for key, value in records:
        producer.produce(topic, value, key=key, on_delivery=report)
    assert producer.flush(10) == 0
    return positions


@dataclass(frozen=True)
class Seeded:
    """Two replayable dead letters, one whose original is garbage, one garbage record."""

    tasks: dict[Position, TaskChunk]
    bad_original: Position
    bad_record: Position

    @property
    def replayable(self) -> list[Position]:
        return sorted(self.tasks)


@pytest.fixture
def seeded(kafka_conn: KafkaConnection, namespace: str) -> Seeded:
    tasks = [_task("job-a", 0, 1), _task("job-a", 1, 2)]
    records: list[tuple[str | None, bytes]] = [
        (t.job_id, encode(_letter(encode(t), "kernel_error", t.job_id, t.chunk_id))) for t in tasks
    ]
    records += [(None, encode(_letter(GARBAGE, "decode_malformed"))), (None, GARBAGE)]
    positions = _write(kafka_conn, KafkaTopics(namespace).dead_letter, records)
    return Seeded(dict(zip(positions[:2], tasks, strict=True)), positions[2], positions[3])


def _read(conn: KafkaConnection, namespace: str) -> dict[Position, dlq.DeadLetterEntry]:
    return {e.position: e for e in dlq.read_dead_letters(conn, namespace, idle_s=0.5)}


def _task_count(conn: KafkaConnection, namespace: str) -> int:
    return len(dlq.read_records(conn, KafkaTopics(namespace).tasks, idle_s=0.5))


def _dlq_count(conn: KafkaConnection, namespace: str) -> int:
    return len(dlq.read_records(conn, KafkaTopics(namespace).dead_letter, idle_s=0.5))


@dataclass(frozen=True)
class CliRun:
    """What one in-process `parkpool dlq` run returned, printed and logged."""

    code: int
    out: str
    err: str
    events: list[MutableMapping[str, Any]]

    @property
    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


RunCli = Callable[..., CliRun]


@pytest.fixture
def run_cli(
    brokers: EmbeddedBrokers,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> RunCli:
    """`parkpool dlq ACTION ... --json` in this process, against the test's namespace.

    Global logging is left alone (configuring it here would bind it to this test's
    captured stderr, closed after the test); the command's log events are captured.
    """
    monkeypatch.setattr(logs, "configure", lambda *_a, **_k: None)
    connection = ["--kafka-bootstrap", brokers.kafka_bootstrap, "--namespace", namespace]

    def run(action: str, *argv: str) -> CliRun:
        capsys.readouterr()  # drop what the test printed before the command
        with structlog.testing.capture_logs() as events:
            try:
                code = cli.main(["dlq", action, *connection, "--idle-s", "0.5", *argv, "--json"])
            except SystemExit as exc:  # argparse's own refusals
                code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return CliRun(code, out, err, events)

    return run


# ---------------------------------------------------------------- list and show


class TestList:
    """Listing folds the topic: every dead letter with its state; garbage never crashes it."""

    def test_lists_every_dead_letter_pending(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given the seeded dead-letter topic
        # When it is read
        entries = _read(kafka_conn, namespace)
        # Then there are four entries, all pending
        assert set(entries) == {*seeded.tasks, seeded.bad_original, seeded.bad_record}
        assert {e.state for e in entries.values()} == {EntryState.PENDING}
        # And the dead letters carry their job, chunk and reason
        for position, task in seeded.tasks.items():
            letter = entries[position].letter
            assert letter is not None
            assert (letter.job_id, letter.chunk_id, letter.reason) == (
                task.job_id,
                task.chunk_id,
                "kernel_error",
            )
        # And the garbage record is an entry that says why it does not decode
        garbage = entries[seeded.bad_record]
        assert garbage.letter is None
        assert "malformed" in garbage.error

    def test_cli_rows_filter_by_job_and_show_states(
        self,
        seeded: Seeded,
        namespace: str,
        kafka_conn: KafkaConnection,
        run_cli: RunCli,
    ) -> None:
        # Given one dead letter purged
        first = seeded.replayable[0]
        dlq.purge(kafka_conn, namespace, [_read(kafka_conn, namespace)[first]])
        # When listing pending ones of job-a, then all of job-a
        pending_run = run_cli("list", "--job", "job-a")
        all_run = run_cli("list", "--all", "--job", "job-a")
        # Then the purged one only shows with --all, with its state
        assert (pending_run.code, all_run.code) == (0, 0)
        rows, rows_all = pending_run.lines, all_run.lines
        assert [r["position"] for r in rows] == [str(seeded.replayable[1])]
        assert {r["position"]: r["state"] for r in rows_all} == {
            str(first): "purged",
            str(seeded.replayable[1]): "pending",
        }
        assert rows[0]["attempts"] == 2
        assert rows[0]["reason"] == "kernel_error"
        assert rows[0]["dead_at"].endswith("+00:00")


class TestShow:
    """`show` gives the whole record: attempts, source and what the original holds."""

    def test_show_returns_attempts_and_the_task(
        self,
        seeded: Seeded,
        run_cli: RunCli,
    ) -> None:
        # Given the seeded topic
        position = seeded.replayable[1]
        # When one replayable dead letter is shown
        run = run_cli("show", str(position))
        # Then it has each attempt, the source, and the task its original holds
        assert run.code == 0
        [shown] = run.lines
        assert [(a["vehicle_id"], a["detail"]) for a in shown["attempt_history"]] == [
            ("car-0", "boom 0"),
            ("car-1", "boom 1"),
        ]
        assert shown["source"] == {"topic": "t.tasks", "partition": 1, "offset": 7}
        assert shown["original"]["is_task"] is True
        assert shown["original"]["kernel"] == "reduce"
        assert shown["original"]["inputs"] == {"x": "float64[17]"}

    def test_show_keeps_a_confidential_task_sealed(self) -> None:
        # Given a dead letter whose original is a confidential task
        box = BoxKey.generate()
        sealed = seal_task(_task("secretjob", 0, 3), box.public, box.public)
        letter = _letter(encode(sealed), "unsealable", "secretjob", 0)
        # When it is described for `dlq show`
        info = dlq_cli.original(letter)
        # Then only the size of its inputs shows, in the JSON and in the text
        assert info["inputs"] == {} and info["sealed_inputs_bytes"] == len(sealed.sealed_inputs)
        assert f"inputs sealed ({len(sealed.sealed_inputs)} bytes)" in dlq_cli._original_text(info)

    def test_show_undecodable_original_and_missing_position(
        self,
        seeded: Seeded,
        run_cli: RunCli,
    ) -> None:
        # Given the seeded topic
        # When the dead letter with a garbage original, then a position past the end, are shown
        run = run_cli("show", str(seeded.bad_original))
        missing = run_cli("show", "0:999")
        # Then the first says its original is not a task, the second is refused
        assert run.code == 0
        [shown] = run.lines
        assert shown["original"]["is_task"] is False
        assert shown["original"]["bytes"] == len(GARBAGE)
        assert (missing.code, missing.out) == (1, "")
        assert "no dead letter" in missing.err


# ---------------------------------------------------------------- replay


def _replay_all(conn: KafkaConnection, namespace: str, **options: Any) -> dlq.ActionReport:
    return dlq.replay(conn, namespace, dlq.pending(_read(conn, namespace).values()), **options)


class TestReplay:
    """Replay puts exactly the chosen tasks back, fresh, once; what cannot replay is counted."""

    def test_replay_enqueues_fresh_identical_tasks(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given the seeded topic
        entries = _read(kafka_conn, namespace)
        chosen = [entries[p] for p in seeded.replayable]
        # When the two replayable dead letters are replayed
        before = time.time()
        report = dlq.replay(kafka_conn, namespace, chosen, deadline_s=600)
        # Then both are reported replayed
        assert report.ok
        assert report.count(OutcomeKind.REPLAYED) == 2
        # And exactly those tasks are on the tasks topic, fresh but otherwise identical
        records = read_topic(kafka_conn, KafkaTopics(namespace).tasks, 2)
        assert _task_count(kafka_conn, namespace) == 2
        for record in records:
            header = dict(record.headers() or [])[dlq.REPLAY_HEADER]
            assert isinstance(header, bytes)
            origin = Position.parse(header.decode())
            task, was = decode(record.value() or b"", TaskChunk), seeded.tasks[origin]
            assert record.key() == f"{was.job_id}:{was.chunk_id}".encode()
            assert task.attempt == 0
            assert before + 600 <= task.deadline <= time.time() + 600
            assert (task.job_id, task.chunk_id, task.n_chunks) == (*was.key, was.n_chunks)
            assert (task.kernel, dict(task.params), task.reply_topic, task.priority) == (
                was.kernel,
                dict(was.params),
                was.reply_topic,
                was.priority,
            )
            assert np.array_equal(task.inputs["x"], was.inputs["x"])
            assert task.inputs["x"].dtype == was.inputs["x"].dtype
        # And both are noted replayed
        after = _read(kafka_conn, namespace)
        assert [after[p].state for p in seeded.replayable] == [EntryState.REPLAYED] * 2

    def test_replay_twice_enqueues_nothing_the_second_time(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given every replayable dead letter replayed once
        entries = _read(kafka_conn, namespace)
        dlq.replay(kafka_conn, namespace, [entries[p] for p in seeded.replayable])
        # When they are replayed again, from a fresh read
        entries = _read(kafka_conn, namespace)
        again = dlq.replay(kafka_conn, namespace, [entries[p] for p in seeded.replayable])
        # Then both are skipped as already replayed, and nothing more is enqueued
        assert [o.kind for o in again.outcomes] == [OutcomeKind.SKIPPED] * 2
        assert all("already replayed" in o.detail for o in again.outcomes)
        assert again.ok
        assert _task_count(kafka_conn, namespace) == 2

    def test_undecodable_original_is_refused_and_the_rest_replayed(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given the seeded topic
        # When every pending entry is replayed
        report = _replay_all(kafka_conn, namespace)
        # Then the two tasks are replayed and the two undecodable entries refused, with why
        outcomes = {o.position: o for o in report.outcomes}
        assert report.count(OutcomeKind.REPLAYED) == 2
        assert report.count(OutcomeKind.REFUSED) == 2
        assert not report.ok
        assert "does not decode as a task" in outcomes[seeded.bad_original].detail
        assert "not a dead letter" in outcomes[seeded.bad_record].detail
        assert _task_count(kafka_conn, namespace) == 2
        # And the refused ones stay pending
        after = _read(kafka_conn, namespace)
        assert after[seeded.bad_original].state is EntryState.PENDING

    def test_cli_replay_exits_1_when_something_was_refused(
        self,
        seeded: Seeded,
        namespace: str,
        kafka_conn: KafkaConnection,
        run_cli: RunCli,
    ) -> None:
        # Given the seeded topic
        # When one good and one undecodable dead letter are replayed from the command line
        positions = [str(seeded.replayable[0]), str(seeded.bad_original)]
        run = run_cli("replay", *positions)
        # Then the good one is replayed, the other refused, and the exit code says so
        assert run.code == 1
        lines = run.lines
        assert [line.get("outcome") for line in lines[:2]] == ["replayed", "refused"]
        assert lines[-1] == {"summary": {"replayed": 1, "refused": 1}}
        assert _task_count(kafka_conn, namespace) == 1


# ---------------------------------------------------------------- purge and dry runs


class TestPurge:
    """A purged dead letter leaves the list and can no longer be replayed."""

    def test_purge_hides_from_list_and_replay_skips_it(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given one dead letter purged
        target = seeded.replayable[0]
        report = dlq.purge(kafka_conn, namespace, [_read(kafka_conn, namespace)[target]])
        assert [o.kind for o in report.outcomes] == [OutcomeKind.PURGED]
        # When the pending dead letters are listed and it is replayed by position
        entries = _read(kafka_conn, namespace)
        replayed = dlq.replay(kafka_conn, namespace, [entries[target]])
        # Then it is not pending, the replay skipped it and nothing was enqueued
        assert target not in {e.position for e in dlq.pending(entries.values())}
        assert entries[target].state is EntryState.PURGED
        assert [(o.kind, o.detail) for o in replayed.outcomes] == [
            (OutcomeKind.SKIPPED, "already purged")
        ]
        assert _task_count(kafka_conn, namespace) == 0

    def test_cli_purges_garbage_by_reason(
        self,
        seeded: Seeded,
        namespace: str,
        kafka_conn: KafkaConnection,
        run_cli: RunCli,
    ) -> None:
        # Given the seeded topic
        # When every pending decode_malformed dead letter is purged from the command line
        run = run_cli("purge", "--all-pending", "--reason", "decode_malformed")
        # Then exactly that one is purged, and the command logged it
        assert run.code == 0
        assert [e["event"] for e in run.events] == ["dlq_purged"]
        assert run.lines == [
            {"position": str(seeded.bad_original), "outcome": "purged", "detail": ""},
            {"summary": {"purged": 1}},
        ]
        assert _read(kafka_conn, namespace)[seeded.bad_original].state is EntryState.PURGED


class TestDryRun:
    """--dry-run says what would happen and writes nothing anywhere."""

    def test_dry_runs_change_nothing(
        self, seeded: Seeded, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given the seeded topic
        records_before = _dlq_count(kafka_conn, namespace)
        # When every pending entry is replayed, then purged, as dry runs
        replayed = _replay_all(kafka_conn, namespace, dry_run=True)
        purged = dlq.purge(
            kafka_conn, namespace, list(_read(kafka_conn, namespace).values()), dry_run=True
        )
        # Then they say what they would do, refusals included
        assert replayed.summary() == {"would_replay": 2, "refused": 2}
        assert purged.summary() == {"would_purge": 4}
        # And no task was enqueued, no note written, every entry still pending
        assert _task_count(kafka_conn, namespace) == 0
        assert _dlq_count(kafka_conn, namespace) == records_before
        assert {e.state for e in _read(kafka_conn, namespace).values()} == {EntryState.PENDING}


# ---------------------------------------------------------------- command line


class TestCommandLine:
    """`parkpool dlq` runs as its own process and refuses bad arguments with exit code 2."""

    def test_list_json_in_a_process(
        self, seeded: Seeded, brokers: EmbeddedBrokers, namespace: str
    ) -> None:
        # Given the seeded topic and an environment that points at it
        env = {
            **os.environ,
            "PARKPOOL_KAFKA_BOOTSTRAP": brokers.kafka_bootstrap,
            "PARKPOOL_NAMESPACE": namespace,
        }
        # When `parkpool dlq list --json` runs
        listed = subprocess.run(
            [sys.executable, "-m", "parkpool.app.cli", "dlq", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Then it exits 0 with one JSON line per pending entry, garbage included
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["position"]: r["decodes"] for r in rows} == {
            **{str(p): True for p in seeded.tasks},
            str(seeded.bad_original): True,
            str(seeded.bad_record): False,
        }

    @pytest.mark.parametrize(
        "argv",
        [
            ["replay"],
            ["replay", "0:1", "--all-pending"],
            ["replay", "0:1", "--reason", "kernel_error"],
            ["purge", "zero:one"],
            ["replay", "--all-pending", "--deadline-s", "-5"],
            ["list", "--namespace", "Not A Namespace"],
        ],
    )
    def test_bad_arguments_exit_2(self, argv: list[str], run_cli: RunCli) -> None:
        # Given bad arguments
        # When the command runs
        run = run_cli(*argv)
        # Then it exits 2 with a reason on stderr, and prints nothing else
        assert run.code == 2
        assert run.err
        assert not run.out


# ---------------------------------------------------------------- end to end


class _Flaky:
    failing = True


def _flaky(xp: Any, _params: Any, inputs: Any) -> dict[str, Any]:
    if _Flaky.failing:
        raise RuntimeError("fails until the fix is deployed")
    return {"y": xp.asarray(inputs["x"]) * 2}


@pytest.fixture
def flaky_kernel() -> Iterator[str]:
    """A kernel that fails until the test flips ``_Flaky.failing``."""
    if FLAKY not in REGISTRY:
        register(
            Kernel(
                FLAKY,
                _flaky,
                Tolerance(0, 0),
                ("x",),
                lambda _p, _i: None,
                lambda _p, i: {"y": i["x"] * 2},
            )
        )
    _Flaky.failing = True
    yield FLAKY
    _Flaky.failing = True


class TestEndToEnd:
    """A task dead-lettered by a real gateway completes once the fault is fixed and replayed."""

    def test_dead_lettered_task_completes_after_replay(
        self,
        flaky_kernel: str,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a gateway that allows 2 attempts, a fleet, and a kernel that fails
        gateway_factory(max_attempts=2)
        fleet_factory(2)
        x = np.arange(8, dtype=np.float64)
        # (written raw: the SDK sends only built-in kernels, and this one lives on the cars)
        task = produce_raw_task(
            kafka_conn, client.topics.tasks, flaky_kernel, {}, {"x": x}, client.reply_topic
        )
        # When the task is dead-lettered after its attempts, for the kernel's error
        entries = wait_for(
            lambda: dlq.pending(dlq.read_dead_letters(kafka_conn, namespace), job=task.job_id),
            60,
            "the dead letter",
        )
        assert entries[0].letter is not None
        assert entries[0].letter.reason == "kernel_error"
        assert len(entries[0].letter.attempts) == 2
        # And the kernel is fixed and the dead letter replayed
        _Flaky.failing = False
        report = dlq.replay(kafka_conn, namespace, entries)
        assert report.summary() == {"replayed": 1}
        # Then the chunk's result arrives on the results topic
        [record] = read_topic(kafka_conn, client.topics.results, 1, timeout=60)
        result = decode(record.value() or b"", Result)
        assert (result.job_id, result.chunk_id) == (task.job_id, 0)
        assert np.array_equal(result.outputs["y"], x * 2)
        # And the dead letter is no longer pending
        assert not dlq.pending(dlq.read_dead_letters(kafka_conn, namespace), job=task.job_id)


class TestExpiredRecords:
    """A partition whose letters all expired under retention (pure logic)."""

    class Empty:
        """A consumer with nothing more to give."""

        def consume(self, _n: int, timeout: float) -> list[object]:
            return []

    def test_a_partition_whose_records_all_expired_is_caught_up(self) -> None:
        # Given partition 0 holding nothing from offset 7 on (its first 7 deleted), and
        # partition 1 empty
        bounds = {0: (7, 7), 1: (0, 0)}
        # When the topic is read, Then it is read to its end at once, not stalled
        assert _drain(self.Empty(), bounds, idle_s=0.01, stall_s=0.2) == []  # type: ignore[arg-type]


class TestUnsureDeliveries:
    """Which failed replays may still have reached Kafka (pure logic)."""

    def test_a_timed_out_or_unreported_delivery_is_called_unsure(self) -> None:
        timed_out = 'KafkaError{code=_MSG_TIMED_OUT,val=-192,str="Local: Message timed out"}'
        assert dlq._unsure(timed_out) and dlq._unsure(dlq.NOT_CONFIRMED)
        refused = 'KafkaError{code=MSG_SIZE_TOO_LARGE,val=10,str="Broker: Message too large"}'
        assert not dlq._unsure(refused) and not dlq._unsure(None)
