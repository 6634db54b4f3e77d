# SPDX-License-Identifier: Apache-2.0
"""``make demo``, small: the whole path runs secured by default, and checks its answer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
class TestDemo:
    """The demo's job completes over TLS, with logins, signed work and sealed data."""

    def test_small_demo_passes_with_every_control_on(self, tmp_path: Path) -> None:
        # Given a fresh directory (the demo keeps its brokers' files under .run/demo)
        argv = [sys.executable, "-m", "parkpool.app.demo", "--size", "256", "--tile", "128"]
        # When the demo runs with four cars
        done = subprocess.run(
            [*argv, "--vehicles", "4", "--timeout", "120"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        # Then it passes its own check, on a confidential job
        assert done.returncode == 0, done.stdout + done.stderr
        assert "CHECK PASSED" in done.stdout
        assert "confidential job" in done.stdout and "inputs and results sealed" in done.stdout
        # And every chunk was checked against its inputs before it was accepted
        chunks = re.search(r"in (\d+) chunks", done.stdout)
        assert chunks is not None
        assert f"(Freivalds): {chunks.group(1)} chunks" in done.stdout
        # And every car and the gateway came in through the TLS listener, with a login
        run = tmp_path / ".run" / "demo"
        conf = (run / "mosquitto.conf").read_text()
        tls_port = re.search(r"listener (\d+) 127\.0\.0\.1\ncafile", conf)
        assert tls_port is not None and "allow_anonymous false" in conf
        broker_log = (run / "mosquitto.log").read_text()
        logins = re.findall(r"New client connected from \S+ as \S+ \(.*u'([^']+)'\)", broker_log)
        cars = [f"car-{n:05d}" for n in range(1, 5)]
        assert sorted(set(logins)) == [*cars, "demo-gw"]
        # Each login is matched to its connection by source address: on a loaded machine
        # a connection can time out before its login and be tried again
        port_of = dict(re.findall(r"New connection from (\S+) on port (\d+)\.", broker_log))
        came_from = re.findall(r"New client connected from (\S+) as ", broker_log)
        assert len(came_from) == len(logins)
        assert {port_of[source] for source in came_from} == {tls_port.group(1)}
