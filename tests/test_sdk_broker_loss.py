# SPDX-License-Identifier: Apache-2.0
"""When Kafka goes away for good, a caller waiting on a job is told, by name, in bounded
time (``ProducerSettings.results_unreachable_s``), not left waiting for ever."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobState
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError
from parkpool.schemas.reputation import Level

pytestmark = pytest.mark.integration


class TestResultsUnreachable:
    """A job whose results cannot be read any more fails with a BrokerError naming Kafka."""

    def test_wait_raises_within_the_limit(self, tmp_path: Path) -> None:
        # Given a client reading results from its own Kafka, and a job nobody will run
        with EmbeddedBrokers(run_dir=tmp_path) as brokers:
            bootstrap(brokers.kafka_bootstrap, "lost")
            kafka = KafkaConnection(brokers.kafka_bootstrap)
            settings = ProducerSettings(
                kafka, "lost", results_unreachable_s=3.0, verification=Level.UNCHECKED
            )
            with ParkpoolClient(settings) as client:
                handle = client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)
                # When Kafka dies and stays dead
                brokers.stop()
                started = time.monotonic()
                # Then wait() raises, naming the broker, well before its own timeout
                with pytest.raises(BrokerError, match=brokers_address(kafka)):
                    handle.wait(timeout=60)
                assert time.monotonic() - started < 30
                assert handle.state is JobState.FAILED


def brokers_address(kafka: KafkaConnection) -> str:
    return kafka.bootstrap.replace(".", r"\.")
