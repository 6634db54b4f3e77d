# SPDX-License-Identifier: Apache-2.0
"""deploy/systemd/parkpool-worker.service: the in-car agent as systemd runs it.

Read as systemd reads it (``systemd-analyze verify`` and ``security --offline``, from
the Debian systemd package that ``make setup`` installs), and checked for what the car
owner is promised: restarts for ever, secrets only through credentials, both safeguards
on, and a small exposure.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from parkpool.app.cli import build_parser

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "parkpool-worker.service"
# systemd's own scale: 0 is locked down, 10 is fully exposed; below 2 it says "OK".
MAX_EXPOSURE = 2.0


def settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line; systemd allows a key more than once."""
    found, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


SETTINGS = settings(UNIT.read_text())


def values(key: str) -> list[str]:
    return [value for section, name, value in SETTINGS if section == "Service" and name == key]


def environment() -> dict[str, str]:
    pairs = (item.split("=", 1) for item in values("Environment"))
    return {name: value for name, value in pairs}


class TestPromises:
    """What the unit promises the car owner and the operator."""

    def test_restarts_for_ever(self) -> None:
        assert values("Restart") == ["always"]
        assert ("Unit", "StartLimitIntervalSec", "0") in SETTINGS
        # After a pause: a crash loop must not keep the car's processor busy
        (pause,) = values("RestartSec")
        assert 1 <= int(pause) <= 60

    def test_the_gpu_is_the_only_device(self) -> None:
        assert values("DevicePolicy") == ["closed"]
        allowed = [item.split()[0] for item in values("DeviceAllow")]
        assert allowed and all(node.startswith("/dev/nvidia") for node in allowed)

    def test_secrets_come_only_through_credentials(self) -> None:
        loaded = {item.split(":", 1)[0] for item in values("LoadCredential")}
        assert loaded == {"mqtt-password", "result.key"}
        env = environment()
        assert env["PARKPOOL_MQTT_PASSWORD_FILE"] == "%d/mqtt-password"
        assert env["PARKPOOL_RESULT_KEY"] == "%d/result.key"
        assert "PARKPOOL_MQTT_PASSWORD" not in env

    def test_both_safeguards_are_on_and_dev_is_not(self) -> None:
        env = environment()
        assert env["PARKPOOL_CAR_FEED"] and env["PARKPOOL_TRUSTED_KEYS"]
        assert "PARKPOOL_DEV" not in env and "--dev" not in values("ExecStart")[0]

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("DynamicUser", "yes"),
            ("CapabilityBoundingSet", ""),
            ("DevicePolicy", "closed"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ],
    )
    def test_hardening(self, key: str, value: str) -> None:
        assert values(key) == [value]

    def test_every_parkpool_variable_is_one_the_worker_reads(self) -> None:
        worker = build_parser()._subparsers._group_actions[0].choices["worker"]  # type: ignore[union-attr]
        help_text = worker.format_help().replace("\n", " ")
        ours = [name for name in environment() if name.startswith("PARKPOOL_")]
        assert ours and [name for name in ours if name not in help_text] == []


class TestSystemdReadsIt:
    """systemd itself accepts the unit and rates its exposure low."""

    @pytest.fixture
    def installed(self, tmp_path: Path) -> Path:
        # As installed: ExecStart must name an executable that exists.
        parkpool = Path(sys.executable).parent / "parkpool"
        unit = tmp_path / UNIT.name
        unit.write_text(UNIT.read_text().replace("/opt/parkpool/.venv/bin/parkpool", str(parkpool)))
        return unit

    def test_verify(self, installed: Path) -> None:
        done = subprocess.run(
            ["systemd-analyze", "verify", installed.name],
            cwd=installed.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr

    def test_exposure(self, installed: Path) -> None:
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", installed.name],
            cwd=installed.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
        assert level is not None, done.stdout + done.stderr
        assert float(level.group(1)) <= MAX_EXPOSURE
