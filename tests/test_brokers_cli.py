# SPDX-License-Identifier: Apache-2.0
"""After Tansu restarts under ``parkpool brokers up``, the namespace's topics are
compared with what they were before anything is created or grown: a topic that lost
partitions, or is gone from a Kafka that keeps its log, is refused as it is found.
Only a Kafka kept in memory, whose restart loses its topics, gets them created again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from parkpool.broker_config.cli import _check_topics, partition_counts
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.schemas.errors import BrokerError
from tests.conftest import TEST_TOPIC_SPECS


def fresh_namespace() -> str:
    return "b" + uuid.uuid4().hex[:12]


def expected(namespace: str) -> dict[str, int]:
    """The counts ``brokers up`` saw before the restart: every topic as specified."""
    return {spec.topic_name(namespace): spec.partitions for spec in TEST_TOPIC_SPECS}


@pytest.mark.integration
class TestTopicsAfterARestart:
    """A restart that changed the topics is refused, and the topics are left as found."""

    def test_a_topic_gone_is_refused_not_created(self, brokers: EmbeddedBrokers) -> None:
        # Given a restarted Kafka that lists every topic of the namespace but one
        namespace = fresh_namespace()
        kept = tuple(spec for spec in TEST_TOPIC_SPECS if spec.name != "jobs")
        bootstrap(brokers.kafka_bootstrap, namespace, specs=kept)
        before = partition_counts(brokers.kafka_bootstrap, namespace)
        # When `brokers up` checks the topics
        # Then it refuses to go on
        with pytest.raises(BrokerError, match="partition counts changed"):
            _check_topics(brokers, namespace, TEST_TOPIC_SPECS, expected(namespace))
        # And the missing topic was not created behind the refusal
        assert partition_counts(brokers.kafka_bootstrap, namespace) == before

    def test_a_topic_short_of_partitions_is_refused_not_grown(
        self, brokers: EmbeddedBrokers
    ) -> None:
        # Given a restarted Kafka that lists the tasks topic with one partition, not three
        namespace = fresh_namespace()
        short = tuple(s.with_partitions(1) if s.name == "tasks" else s for s in TEST_TOPIC_SPECS)
        bootstrap(brokers.kafka_bootstrap, namespace, specs=short)
        before = partition_counts(brokers.kafka_bootstrap, namespace)
        # When `brokers up` checks the topics
        # Then it refuses to go on, naming the change, and the topic was not grown
        with pytest.raises(BrokerError, match="partition counts changed"):
            _check_topics(brokers, namespace, TEST_TOPIC_SPECS, expected(namespace))
        assert partition_counts(brokers.kafka_bootstrap, namespace) == before

    def test_topics_as_they_were_pass(self, brokers: EmbeddedBrokers) -> None:
        # Given a restarted Kafka whose topics are as they were
        namespace = fresh_namespace()
        bootstrap(brokers.kafka_bootstrap, namespace, specs=TEST_TOPIC_SPECS)
        # Then the check passes and changes nothing
        _check_topics(brokers, namespace, TEST_TOPIC_SPECS, expected(namespace))
        assert partition_counts(brokers.kafka_bootstrap, namespace) == expected(namespace)


@pytest.fixture
def emptied(tmp_path: Path) -> Iterator[tuple[EmbeddedBrokers, str, dict[str, int]]]:
    """`brokers up`'s Kafka kept in memory, with a namespace's topics (their partition
    counts given), after a crash and restart that took them with its memory."""
    namespace = fresh_namespace()
    with EmbeddedBrokers(run_dir=tmp_path, durable=False) as brokers:
        bootstrap(brokers.kafka_bootstrap, namespace, specs=TEST_TOPIC_SPECS)
        before = partition_counts(brokers.kafka_bootstrap, namespace)
        brokers.kill_kafka()
        brokers.start_kafka()
        yield brokers, namespace, before


@pytest.mark.integration
def test_a_kafka_in_memory_gets_its_topics_back(
    emptied: tuple[EmbeddedBrokers, str, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a Kafka kept in memory that crashed and came back, its topics gone
    brokers, namespace, before = emptied
    assert not any(partition_counts(brokers.kafka_bootstrap, namespace).values())
    # Then the check creates them again, as they were, and says so
    _check_topics(brokers, namespace, TEST_TOPIC_SPECS, before)
    assert partition_counts(brokers.kafka_bootstrap, namespace) == before == expected(namespace)
    assert "topics recreated" in capsys.readouterr().err


@pytest.mark.integration
def test_a_kafka_in_memory_gets_back_the_topics_no_client_made_again(
    emptied: tuple[EmbeddedBrokers, str, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a Kafka kept in memory that came back empty, where a client already made one
    # topic of the namespace again before the check
    brokers, namespace, before = emptied
    jobs = tuple(spec for spec in TEST_TOPIC_SPECS if spec.name == "jobs")
    bootstrap(brokers.kafka_bootstrap, namespace, specs=jobs)
    # When `brokers up` checks the topics
    _check_topics(brokers, namespace, TEST_TOPIC_SPECS, before)
    # Then the missing ones are created again and the check passes
    assert partition_counts(brokers.kafka_bootstrap, namespace) == before
    assert "topics recreated" in capsys.readouterr().err
