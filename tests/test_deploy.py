# SPDX-License-Identifier: Apache-2.0
"""The production files in deploy/ stay consistent with the embedded defaults."""

from __future__ import annotations

from pathlib import Path

from parkpool.broker_config.topics import load_specs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class TestProductionTopics:
    """The production topic spec differs from the embedded one only in durability."""

    def test_same_topics_and_partitions_with_three_replicas(self) -> None:
        embedded = {s.name: s for s in load_specs()}
        production = {s.name: s for s in load_specs(DEPLOY / "kafka_topics.production.toml")}
        assert production.keys() == embedded.keys()
        for name, spec in production.items():
            assert spec.partitions == embedded[name].partitions
            assert spec.replication_factor == 3
            assert spec.config["min.insync.replicas"] == "2"
            assert spec.config.get("retention.ms") == embedded[name].config.get("retention.ms")
            assert spec.config["cleanup.policy"] == embedded[name].config["cleanup.policy"]


class TestGatewayEnvExample:
    """Every variable in the example env file is one the gateway CLI reads."""

    def test_variables_are_documented_options(self) -> None:
        from parkpool.app.cli import build_parser

        help_text = build_parser()._subparsers._group_actions[0].choices["gateway"].format_help()  # type: ignore[union-attr]
        names = [
            line.split("=", 1)[0]
            for line in (DEPLOY / "gateway.env.example").read_text().splitlines()
            # PARKPOOL_LOG_* configure logging for every role; parkpool/runtime/logs.py reads them.
            if line and not line.startswith(("#", "PARKPOOL_LOG_"))
        ]
        assert names
        assert [n for n in names if n not in help_text.replace("\n", " ")] == []
