# SPDX-License-Identifier: Apache-2.0
"""``parkpool fleet quarantine``: the operator's view of the reputation topic, on real Kafka."""

from __future__ import annotations

import json
import subprocess
import sys

from parkpool.app.children import role_env
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.reputation import ReputationBook, ReputationReader, ReputationWriter
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.reputation import Evidence, Level
from parkpool.schemas.topics import KafkaTopics
from tests.helpers import wait_for


def cli(brokers: EmbeddedBrokers, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parkpool.app.cli", "fleet", "quarantine", *args],
        env=role_env(brokers, namespace),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestQuarantineCommand:
    """A client's quarantine shows with its evidence; a release gives the car a new start."""

    def test_list_show_release(
        self, brokers: EmbeddedBrokers, namespace: str, kafka_conn: KafkaConnection
    ) -> None:
        # Given a client that judged two cars and caught one of them lying
        topic = KafkaTopics(namespace).reputation
        writer = ReputationWriter(kafka_conn, topic, "sdk-1", ReputationBook())
        writer.judge("good-car", [True] * 12)
        writer.judge("bad-car", [True, True, False])
        evidence = Evidence("job-9", 4, Level.ALGEBRAIC, "Freivalds residual 3 over 0.1", 1.0)
        writer.quarantine("bad-car", (evidence,), "wrong_result")
        writer.close()
        # When the operator lists the quarantined cars
        listed = cli(brokers, namespace, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        # Then only the liar is there, with its record and the evidence
        assert [row["vehicle_id"] for row in rows] == ["bad-car"]
        assert (rows[0]["valid"], rows[0]["invalid"], rows[0]["state"]) == (2, 1, "quarantined")
        shown = cli(brokers, namespace, "show", "bad-car")
        assert "job job-9 chunk 4, algebraic check: Freivalds residual 3 over 0.1" in shown.stdout
        everyone = cli(brokers, namespace, "list", "--all", "--json").stdout.splitlines()
        assert {json.loads(line)["state"] for line in everyone} == {"quarantined", "trusted"}
        # When it is released
        freed = cli(brokers, namespace, "release", "bad-car", "--note", "GPU replaced")
        assert freed.returncode == 0, freed.stderr
        # Then it is no longer quarantined, and starts again as a new car
        assert cli(brokers, namespace, "list").stdout.strip() == "no car is quarantined"
        row = json.loads(cli(brokers, namespace, "show", "bad-car", "--json").stdout)
        assert (row["state"], row["generation"], row["valid"], row["invalid"]) == ("new", 1, 0, 0)
        # And a gateway or client reading the topic sees the same
        book = ReputationBook()
        reader = ReputationReader(kafka_conn, topic, book)
        reader.start()
        try:
            wait_for(reader.caught_up.is_set, 30, "the reputation topic to be read")
            assert not book.quarantined("bad-car") and book.record("good-car").trusted
        finally:
            reader.stop()

    def test_unknown_and_not_quarantined_cars_are_refused(
        self, brokers: EmbeddedBrokers, namespace: str
    ) -> None:
        shown = cli(brokers, namespace, "show", "nobody")
        assert shown.returncode == 3 and "no record" in shown.stderr
        freed = cli(brokers, namespace, "release", "nobody")
        assert freed.returncode == 3 and "is not quarantined" in freed.stderr
