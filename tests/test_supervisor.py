# SPDX-License-Identifier: Apache-2.0
"""``parkpool brokers up`` keeps its brokers running: a broker that dies is started again
on its own port, and one that keeps dying makes it give up with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from parkpool.broker_config import cli as brokers_cli
from parkpool.broker_config.cli import partition_counts
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.supervisor import Supervisor
from parkpool.schemas.errors import BrokerError


class StubBrokers:
    """Brokers whose deaths the test decides; ``revive`` brings one back unless told not."""

    def __init__(self) -> None:
        self.dead: dict[str, int | None] = {}
        self.revived: list[str] = []
        self.fail_revive = False

    def exited(self) -> dict[str, int | None]:
        return dict(self.dead)

    def revive(self, name: str) -> None:
        if self.fail_revive:
            raise BrokerError(f"{name} exited with status 1 before listening")
        self.revived.append(name)
        self.dead.pop(name)

    def log_tail(self, name: str) -> str:
        return f"last words of {name}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestSupervisor:
    """Dead brokers are restarted in start order and counted; crash loops end it."""

    def test_dead_brokers_are_restarted_and_counted(self) -> None:
        # Given the store and Tansu dead, and a hook that hears of each restart
        brokers, heard = StubBrokers(), list[str]()
        brokers.dead = {"store": -9, "tansu": -9}
        supervisor = Supervisor(brokers, on_restart=heard.append)
        # When the supervisor checks
        restarted = supervisor.check()
        # Then both were started again, the store first, and counted
        assert restarted == heard == brokers.revived == ["store", "tansu"]
        assert supervisor.restarts == {"store": 1, "tansu": 1}
        # And nothing happens while they run
        assert supervisor.check() == []

    def test_repeated_fast_crashes_give_up_naming_the_broker(self) -> None:
        # Given a Tansu that dies again as soon as it is restarted
        brokers, clock = StubBrokers(), Clock()
        supervisor = Supervisor(brokers, max_crashes=3, window_s=60, clock=clock)
        for _ in range(2):
            brokers.dead = {"tansu": 1}
            supervisor.check()
            clock.now += 5
        # When it dies a third time within the window
        brokers.dead = {"tansu": 1}
        # Then the supervisor gives up with the broker's name and log
        with pytest.raises(BrokerError, match=r"tansu died 3 times within 60 s(.|\n)*last words"):
            supervisor.check()

    def test_crashes_far_apart_are_restarted_for_ever(self) -> None:
        brokers, clock = StubBrokers(), Clock()
        supervisor = Supervisor(brokers, max_crashes=3, window_s=60, clock=clock)
        for _ in range(10):
            brokers.dead = {"mosquitto": -9}
            supervisor.check()
            clock.now += 61
        assert supervisor.restarts["mosquitto"] == 10

    def test_a_failed_restart_counts_as_a_crash(self) -> None:
        # Given a store whose binary no longer starts
        brokers = StubBrokers()
        brokers.fail_revive = True
        supervisor = Supervisor(brokers, max_crashes=3)
        brokers.dead = {"store": -9}
        # When checks keep finding it dead, then it is given up on
        assert supervisor.check() == [] and supervisor.check() == []
        with pytest.raises(BrokerError, match="store died 3 times"):
            supervisor.check()
        assert supervisor.restarts["store"] == 0

    def test_restarts_that_fail_slowly_end_it_too(self) -> None:
        # Given a Tansu whose every restart fails only after its 30 s start timeout, so
        # that no two of its crashes fall in one 60 s window
        brokers, clock = StubBrokers(), Clock()
        brokers.fail_revive = True
        supervisor = Supervisor(brokers, max_crashes=3, window_s=60, clock=clock)
        brokers.dead = {"tansu": -9}
        assert supervisor.check() == []
        clock.now += 31
        assert supervisor.check() == []
        clock.now += 31
        # When a third restart in a row fails, Then the supervisor gives up, naming it
        with pytest.raises(BrokerError, match="tansu failed to restart 3 times in a row"):
            supervisor.check()

    def test_a_restart_that_works_clears_the_failures(self) -> None:
        brokers, clock = StubBrokers(), Clock()
        supervisor = Supervisor(brokers, max_crashes=3, window_s=60, clock=clock)
        for fail in (True, True, False, True, True, False):
            brokers.fail_revive = fail
            brokers.dead = {"store": -9}
            supervisor.check()
            clock.now += 61
        assert supervisor.restarts["store"] == 2

    def test_nothing_is_restarted_once_a_stop_is_asked(self) -> None:
        # Given brokers found dead just as a stop was asked (a signal to the whole group)
        brokers, stop = StubBrokers(), threading.Event()
        brokers.dead = {"store": -15, "tansu": -15}
        stop.set()
        # When the supervisor checks, Then it starts none of them again
        assert Supervisor(brokers).check(stop) == [] and brokers.revived == []


def read_pids(run_dir: Path) -> dict[str, int]:
    try:
        record = json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: entry["pid"] for name, entry in record.items()}


def restarts(run_dir: Path) -> list[str]:
    """The brokers `brokers up` logged as restarted (JSON lines on its stderr), in order."""
    lines = (run_dir / "up.err").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e["broker"] for e in events if e["event"] == "broker_restarted"]


def restarted_times(run_dir: Path, count: int) -> Callable[[], bool]:
    return lambda: len(restarts(run_dir)) == count


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float = 30.0,
    why: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}{why()}"
        time.sleep(0.1)


def events(run_dir: Path) -> str:
    """`brokers up`'s log lines, for a failure's message: this test failed once in a full
    run (the store not logged as restarted within 30 s) and never alone."""
    log = run_dir / "up.err"
    lines = log.read_text().splitlines() if log.exists() else ["(no up.err)"]
    return "\n" + "\n".join(lines[-40:])


@pytest.mark.integration
class TestBrokersUpSupervises:
    """Each kind of broker killed under ``brokers up`` comes back on the same port."""

    def test_killed_brokers_come_back(self, tmp_path: Path) -> None:
        # Given `parkpool brokers up` with a run dir
        env = {**os.environ, "PARKPOOL_LOG_JSON": "1"}
        args = ["brokers", "up", "--run-dir", str(tmp_path), "--namespace", "sup"]
        up = subprocess.Popen(
            [sys.executable, "-m", "parkpool.app.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "up.err").open("wb"),
        )
        try:
            exports = read_exports(up)
            kafka = exports["PARKPOOL_KAFKA_BOOTSTRAP"]
            counts = partition_counts(kafka, "sup")
            # When each broker is SIGKILLed in turn
            for done, name in enumerate(("tansu", "store", "mosquitto"), start=1):
                old = read_pids(tmp_path)[name]
                os.kill(old, signal.SIGKILL)
                # Then it is logged as restarted once it is back, as a new process
                wait_for(
                    f"{name} restarted",
                    restarted_times(tmp_path, done),
                    why=lambda: events(tmp_path),
                )
                assert restarts(tmp_path)[-1] == name and read_pids(tmp_path)[name] != old
            # And Kafka answers on its old address with the same partition counts
            assert partition_counts(kafka, "sup") == counts
            running = read_pids(tmp_path).values()
        finally:
            up.send_signal(signal.SIGTERM)
            assert up.wait(30) == 0
        # And Ctrl-C or SIGTERM still stops every broker, the restarted ones too
        assert not [pid for pid in running if is_alive(pid)]


def read_exports(up: subprocess.Popen[bytes]) -> dict[str, str]:
    """The export lines `brokers up` prints once its brokers are up."""
    assert up.stdout is not None
    exports = {}
    while "PARKPOOL_STORE_SECRET_KEY" not in exports:
        line = up.stdout.readline().decode()
        assert line, "brokers up exited before printing its exports"
        name, _, value = line.removeprefix("export ").strip().partition("=")
        exports[name] = value
    return exports


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("patience_s", [30.0, 0.0], ids=["patient", "out of patience"])
def test_a_refused_topic_check_after_a_restart_is_tried_again(
    patience_s: float, brokers: EmbeddedBrokers, namespace: str
) -> None:
    # Given a Kafka that refuses the first topic listing after a restart, as Tansu can
    calls: list[int] = []

    def refusing_once() -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise BrokerError("Kafka did not list its topics: Unknown broker error")
        return partition_counts(brokers.kafka_bootstrap, namespace)

    if patience_s:
        # Then `brokers up` tries again, and reads the real topics' partitions
        counts = brokers_cli._patiently(refusing_once, patience_s)
        assert len(calls) == 2 and counts == partition_counts(brokers.kafka_bootstrap, namespace)
        assert all(counts.values())
    else:
        # Then, out of patience, it says why
        with pytest.raises(BrokerError, match="Unknown broker error"):
            brokers_cli._patiently(refusing_once, patience_s)
