# SPDX-License-Identifier: Apache-2.0
"""The command line's answer to bad input and to its reader going away: one line on
stderr and a meaningful exit code, never a traceback, a hang, or harm done."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NoReturn

import pytest

from parkpool.app import cli, kernels_cli, quarantine_cli
from parkpool.app.quarantine_cli import _utc
from parkpool.producer.dlq_cli import _iso
from parkpool.runtime import logs


@pytest.fixture(autouse=True)
def _logs_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A command run in this process would bind the process's logging to this test's
    # captured stderr, which is closed after it (see tests/test_dlq.py).
    monkeypatch.setattr(logs, "configure", lambda *_a, **_k: None)


def test_kafka_settings_kafka_refuses_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # When a command's Kafka client is given a setting librdkafka does not know
    code = cli.main(["dlq", "list", "--kafka-config", "no.such.setting=1"])
    # Then it says so in one line and exits as for a broker error
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("parkpool dlq: Kafka: ") and "no.such.setting" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("pid", ["-1", str(os.getpid())], ids=["every_process", "not_mosquitto"])
def test_a_broker_pid_that_is_not_a_mosquitto_changes_nothing(
    tmp_path: Path, pid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an auth store, When a car is enrolled with a --broker-pid that names no
    # Mosquitto (-1 would SIGHUP every process of the user; this test's own pid would
    # end the test run)
    auth = tmp_path / "auth"
    argv = ["fleet", "enroll", "car-1", "--auth-dir", str(auth), "--car-dir", str(tmp_path / "c")]
    code = cli.main([*argv, "--broker-pid", pid])
    # Then it is refused before any credential changes, and this process still runs
    assert code == 2
    assert "is not a running Mosquitto" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert not (auth / "passwd").exists() or "car-1" not in (auth / "passwd").read_text()


def test_a_negative_idle_time_is_refused_not_waited_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["dlq", "list", "--idle-s", "-1"])
    assert "--idle-s" in capsys.readouterr().err


def test_times_no_calendar_holds_are_shown_as_numbers() -> None:
    assert _iso(1e18) == repr(1e18) and _utc(1e18) == repr(1e18)
    assert _iso(0.0).startswith("1970-01-01T00:00:00")


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [(KeyboardInterrupt(), 130, "interrupted"), (BrokenPipeError(), 141, "")],
)
def test_an_interrupt_or_a_closed_pipe_ends_quietly(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    said: str,
) -> None:
    def run(_args: argparse.Namespace) -> NoReturn:
        raise raised

    monkeypatch.setattr(kernels_cli, "run_list", run)
    assert cli.main(["kernels", "list"]) == code
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    # `parkpool kernels list | head -1`, with a reader that closes at once
    command = [sys.executable, "-m", "parkpool", "kernels", "list"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(60)
    assert "Traceback" not in err and proc.returncode in (0, 141)


def test_a_key_pair_is_not_replaced_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the fleet's signing key pair
    assert cli.main(["keys", "generate", str(tmp_path)]) == 0
    first = (tmp_path / "task-signing.key").read_text()
    # When the command runs again, Then it refuses, naming the file, and the key stays
    assert cli.main(["keys", "generate", str(tmp_path)]) == 2
    assert "task-signing.key exists" in capsys.readouterr().err
    assert (tmp_path / "task-signing.key").read_text() == first
    # And with --force it is replaced
    assert cli.main(["keys", "generate", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "task-signing.key").read_text() != first


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "gemm", "--size", "-4"],
        ["submit", "poly", "--coeffs", "1,a"],
        ["submit", "poly", "--coeffs", "1,nan"],
        ["submit", "reduce", "--timeout", "nan"],
        ["wait", "job", "--timeout", "-1"],
        ["status", "job", "--timeout", "inf"],
    ],
)
def test_values_no_job_can_use_are_refused_by_flag(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # (a nan timeout never expires: a wait on it would hang)
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert argv[2] in err and "Traceback" not in err


class SlowReader:
    """A reputation reader that has not reached the topic's end in the time allowed."""

    def __init__(self, *_args: object) -> None:
        self.caught_up = threading.Event()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_release_is_not_decided_on_part_of_the_fleets_records(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a reputation topic not read to its end in the time allowed
    monkeypatch.setattr(quarantine_cli, "ReputationReader", SlowReader)
    monkeypatch.setattr(quarantine_cli, "READ_TIMEOUT_S", 0.1)
    # When a car is released, Then nothing is decided: not "not quarantined" (3)
    assert cli.main(["fleet", "quarantine", "release", "car-1"]) == 2
    assert "nothing was changed" in capsys.readouterr().err
