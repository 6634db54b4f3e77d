# SPDX-License-Identifier: Apache-2.0
"""Broker child processes: start, wait until listening, stop, and clean up strays.

Each broker runs in its own session (so its own process group): stopping signals the
whole group, and a crashed parent leaves a pid record that :func:`kill_stray` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from parkpool.schemas.errors import BrokerError

__all__ = ["LOOPBACK", "PIDS_FILE", "BrokerProcess", "free_port", "is_running", "kill_stray"]

LOOPBACK = "127.0.0.1"
PIDS_FILE = "pids.json"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(eq=False)
class BrokerProcess:
    """One broker process: how to start it, where it logs, and the running Popen."""

    name: str
    argv: list[str]
    port: int
    logs: tuple[Path, ...]  # the first receives stdout and stderr
    env: dict[str, str] | None = field(default=None, repr=False)  # holds the store's keys
    stop_signal: signal.Signals = signal.SIGTERM
    # More listeners than ``port`` (Mosquitto's TLS one): each must accept before ready.
    more_ports: tuple[int, ...] = ()
    # A signal the caller will send once it is up (Mosquitto's SIGHUP reload). Until the
    # process installs its handler the default action kills it, and Mosquitto listens
    # before it installs handlers, so ready waits for the handler too.
    handles: signal.Signals | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def spawn(self) -> None:
        with self.logs[0].open("ab") as out:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # so that stop() can signal its whole group
                )
            except OSError as exc:
                raise BrokerError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc

    @property
    def running(self) -> bool:
        """Started here and not exited since."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the process ended (negative: killed by that signal); None while it runs,
        or once it is stopped or killed here."""
        return None if self.popen is None else self.popen.poll()

    def wait_ready(self, deadline: float) -> None:
        """Return once every port accepts connections and the signal it ``handles`` is
        caught; raise if the process dies or stalls."""
        while True:
            if self.popen is None or self.popen.poll() is not None:
                code = None if self.popen is None else self.popen.returncode
                raise self.failure(f"exited with status {code} before it was ready")
            if self._ready(self.popen.pid):
                return
            if time.monotonic() > deadline:
                raise self.failure("was not ready in time") from None
            time.sleep(0.05)

    def _ready(self, pid: int) -> bool:
        for port in (self.port, *self.more_ports):
            try:
                socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            except OSError:
                return False
        return self.handles is None or catches(pid, self.handles)

    def stop(self, grace: float) -> None:
        """Signal the process group to stop, then SIGKILL it if still there after grace."""
        if self.popen is None:
            return
        try:
            signal_group(self.popen.pid, self.stop_signal)
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        # Forgotten only once it is gone: a wait cut short (a second Ctrl-C, SIGTERM)
        # leaves it for the exit-time cleanup to kill.
        self.popen = None

    def failure(self, what: str) -> BrokerError:
        return BrokerError(f"{self.name} on port {self.port} {what}; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        tails = []
        for path in self.logs:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            tails.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(tails) or "(no log written)"


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: that is what we wanted
        os.killpg(pgid, sig)


def kill_stray(run_dir: str | os.PathLike[str], grace: float = 5.0) -> list[int]:
    """Kill broker processes a crashed run recorded in ``run_dir``; returns their pids.

    A pid only counts if its command line is still the recorded one, whole, so a
    recycled pid of some unrelated process is left alone: the store's binary is the
    venv's Python, which a gateway, a test run or another run's store share.
    """
    try:
        record = json.loads(Path(run_dir, PIDS_FILE).read_text())
    except (OSError, ValueError):
        return []
    stray = [pid for pid, argv in _recorded(record) if is_running(pid, argv)]
    for pid in stray:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(is_running(p) for p in stray) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in stray:
        signal_group(pid, signal.SIGKILL)
    return stray


def _recorded(record: object) -> list[tuple[int, list[str]]]:
    """The (pid, argv) entries of a pid record; anything else in it (a hand-edited or
    foreign file) is passed over: no pid of it is ever signalled."""
    entries = record.values() if isinstance(record, dict) else []
    return [
        (e["pid"], e["argv"])
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("pid"), int)
        and e["pid"] > 0
        and isinstance(e.get("argv"), list)
        and e["argv"]
        and all(isinstance(a, str) for a in e["argv"])
    ]


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether ``pid`` has installed a handler for ``sig`` (the SigCgt mask in
    /proc/PID/status); False if the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def is_running(pid: int, argv: Sequence[str] | None = None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and, if given, runs exactly ``argv``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    alive = stat.rsplit(")", 1)[1].split()[0] != "Z"
    cmdline = raw.decode(errors="replace").split("\0")[:-1]  # each argument ends in NUL
    return alive and (argv is None or cmdline == list(argv))
