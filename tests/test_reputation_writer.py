# SPDX-License-Identifier: Apache-2.0
"""The reputation writer outlives a fatal producer error, on real Kafka."""

from __future__ import annotations

from confluent_kafka import KafkaError

from parkpool.runtime.reputation import ReputationBook, ReputationReader, ReputationWriter
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.topics import KafkaTopics
from tests.helpers import wait_for


class TestFatalProducerError:
    def test_the_next_record_goes_out_on_a_new_producer(
        self, namespace: str, kafka_conn: KafkaConnection
    ) -> None:
        # Given a writer whose producer librdkafka declared dead, through its error
        # callback, as when a broker lost the producer's sequence numbers
        topic = KafkaTopics(namespace).reputation
        writer = ReputationWriter(kafka_conn, topic, "sdk-1", ReputationBook())
        first = writer._producer
        fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "desynchronised", fatal=True)
        writer._on_error(fatal)
        # When it writes the next tally, and closes
        writer.judge("car-7", [True, True, False])
        renewed = writer._producer
        writer.close()
        # Then the tally went out on a new producer, and reached Kafka
        assert renewed is not first
        assert writer._renew is False and writer.failed == 0
        book = ReputationBook()
        reader = ReputationReader(kafka_conn, topic, book)
        reader.start()
        try:
            wait_for(reader.caught_up.is_set, 30, "the reputation topic to be read")
            wait_for(lambda: book.record("car-7").invalid == 1, 30, "car-7's tally")
            assert book.record("car-7").valid == 2
        finally:
            reader.stop()
