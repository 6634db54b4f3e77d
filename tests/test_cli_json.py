# SPDX-License-Identifier: Apache-2.0
"""Every ``parkpool`` command a script may call takes ``--json``; the long-running ones
(docs/DECISIONS.md, "The command line") are the only exceptions."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from parkpool.app.children import role_env
from parkpool.app.cli import build_parser, main
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.schemas.topics import KafkaTopics

ROOT = Path(__file__).resolve().parent.parent
# Daemons and live views: their output is logs, exports or a redrawn screen.
NO_JSON = {
    ("brokers", "up"),
    ("gateway",),
    ("worker",),
    ("sim",),
    ("top",),
    ("demo",),
}


def leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable command, by its words (``("fleet", "quarantine", "list")``)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return {path: parser}
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for group in groups:
        for name, child in group.choices.items():
            found |= leaf_commands(child, (*path, name))
    return found


COMMANDS = leaf_commands(build_parser())


class TestEveryCommandTakesJson:
    """--json is a flag of every command but the documented long-running ones."""

    def test_the_walk_finds_the_commands(self) -> None:
        # Then it found the nested ones as well as the top-level ones
        assert {("submit",), ("dlq", "replay"), ("fleet", "quarantine", "show")} <= set(COMMANDS)
        assert len(COMMANDS) > 20

    @pytest.mark.parametrize("words", sorted(set(COMMANDS) - NO_JSON), ids=" ".join)
    def test_json_is_a_flag(self, words: tuple[str, ...]) -> None:
        # Given a command a script may run
        parser = COMMANDS[words]
        # Then --json is one of its flags, and takes no value
        action = parser._option_string_actions.get("--json")
        assert action is not None, f"parkpool {' '.join(words)} has no --json"
        assert action.nargs == 0

    def test_the_exceptions_are_real_and_documented(self) -> None:
        # Given the commands without --json
        without = {w for w, p in COMMANDS.items() if "--json" not in p._option_string_actions}
        # Then they are exactly the exclusions, each named in the decisions
        assert without == NO_JSON
        decisions = (ROOT / "docs" / "DECISIONS.md").read_text()
        for words in NO_JSON:
            assert f"`parkpool {' '.join(words)}`" in decisions


class TestJsonOutput:
    """With --json a command prints one JSON object instead of its sentences."""

    def test_keys_generate(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        # When a signing key pair and a box key pair are made with --json
        assert main(["keys", "generate", str(tmp_path), "--json"]) == 0
        assert main(["keys", "generate", str(tmp_path), "--box", "--json"]) == 0
        # Then each prints one object naming its files, which exist
        signing, box = (json.loads(line) for line in capsys.readouterr().out.splitlines())
        assert signing == {
            "kind": "signing",
            "private_key": str(tmp_path / "task-signing.key"),
            "public_key": str(tmp_path / "task-signing.pub"),
        }
        assert box["kind"] == "box"
        assert Path(box["private_key"]).is_file() and Path(box["public_key"]).is_file()

    def test_fleet_enroll_gateway_revoke(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        auth = ["--auth-dir", str(tmp_path / "auth"), "--json"]
        # When a car and a gateway are enrolled, and the car revoked twice
        assert main(["fleet", "enroll", "car-1", *auth, "--car-dir", str(tmp_path / "h")]) == 0
        assert main(["fleet", "gateway", "gw-1", *auth]) == 0
        assert main(["fleet", "revoke", "car-1", *auth]) == 0
        assert main(["fleet", "revoke", "car-1", *auth]) == 1
        # Then each printed one object, and the passwords are there for the hand-over
        car, gateway, revoked, again = map(json.loads, capsys.readouterr().out.splitlines())
        assert (car["identity"], car["car_dir"]) == ("car-1", str(tmp_path / "h" / "car-1"))
        assert len(car["password"]) >= 24 and len(gateway["password"]) >= 24
        assert gateway["identity"] == "gw-1"
        assert revoked == {"identity": "car-1", "revoked": True}
        assert again == {"identity": "car-1", "revoked": False}

    @pytest.mark.integration
    def test_brokers_bootstrap_and_store_sweep(self, brokers: EmbeddedBrokers) -> None:
        namespace = "t" + uuid.uuid4().hex[:12]  # no topics yet: not the fixture's
        env = role_env(brokers, namespace)

        def run(*args: str) -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, "-m", "parkpool.app.cli", *args, "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            [line] = done.stdout.splitlines()
            parsed: dict[str, Any] = json.loads(line)
            return parsed

        # When a new namespace's topics are bootstrapped, twice
        first = run("brokers", "bootstrap", "--task-partitions", "1")
        second = run("brokers", "bootstrap", "--task-partitions", "1")
        # Then the first run lists the topics it created, and the second has none left
        assert first["namespace"] == namespace
        assert sorted(first["created_or_grown"]) == sorted(KafkaTopics(namespace).all())
        assert second == {"namespace": namespace, "created_or_grown": []}
        # And a sweep of the store says what it deleted (nothing is 48 h old in a test)
        assert run("store", "sweep") == {"prefix": "jobs/", "deleted": 0, "ttl_hours": 48.0}
