# SPDX-License-Identifier: Apache-2.0
"""Following a job by its id alone: find its JobSubmitted record, then read its results
from its submit time on (``offsets_for_times``), never from the topics' start.

A results topic holds a week of every caller's results (millions of records); a reader
that starts at offset 0 pays for all of them before it sees the job's first chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from parkpool.producer.jobids import id_time
from parkpool.runtime.kafka import GROWING_FETCH_WAIT_MS, reader_config
from parkpool.runtime.offsets import Where
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, DecodeError, JobSubmitted
from parkpool.schemas.codec import decode

# How far a gateway's clock may run behind the submitter's: a result stamped by such a
# gateway is still read. Results are written after their job, so this is the only slack.
CLOCK_SKEW_S = 60.0
# A JobSubmitted is stamped by the client that minted the id, one clock: a second covers
# Kafka's millisecond stamps and the gap between minting the id and producing the record.
ID_SLACK_S = 1.0

# With every partition read to its watermark, how long nothing more must come before a
# read is complete (see ``read_until``): two fetch waits.
IDLE_S = 2 * GROWING_FETCH_WAIT_MS / 1000


def seeker(conn: KafkaConnection) -> Consumer:
    """A reader for looking a job up (assign(), never a group)."""
    return Consumer(reader_config(conn, **{"fetch.wait.max.ms": GROWING_FETCH_WAIT_MS}))


def find_job(conn: KafkaConnection, topic: str, job_id: str, timeout_s: float) -> JobSubmitted:
    """The job's JobSubmitted record, read from the time in its id (or, for an id that
    carries none, from the topic's start); BrokerError when it is not found in time. An
    id submitted more than once has a record per submission: the latest is returned."""
    deadline = time.monotonic() + timeout_s
    minted = id_time(job_id)
    since = None if minted is None else minted - ID_SLACK_S
    key = job_id.encode()
    consumer = seeker(conn)
    try:
        ends = high_watermarks(consumer, [topic])
        starts = start_offsets(consumer, ends, since)
        records = read_until(consumer, starts, ends, timeout_s)
        found = next((r for r in records if r.key() == key), None)
        if found is not None:
            found = _latest(consumer, found, ends, deadline)
            try:
                return decode(found.value() or b"", JobSubmitted)
            except DecodeError as exc:
                detail = f"job {job_id}'s record on {topic} is unreadable: {exc}"
                raise BrokerError(detail) from None
    finally:
        consumer.close()
    where = "the topic's start" if since is None else f"its id's time ({since:.0f})"
    raise BrokerError(f"job {job_id} is not on {topic} (read from {where}); wrong id or namespace?")


def _latest(
    consumer: Consumer, first: Message, ends: dict[TopicPartition, int], deadline: float
) -> Message:
    """The last record up to the watermarks read at the start with ``first``'s key: a
    job id submitted again (a retry, or after its client was lost) has a record per
    submission, all in one partition (one key). Only the rest of that partition is read,
    and only to where it ended when the lookup began: a busy topic never goes quiet.
    BrokerError if that is not reached by the deadline."""
    topic, partition, offset = first.topic(), first.partition(), first.offset()
    assert topic is not None and partition is not None and offset is not None  # as read
    last = ends[TopicPartition(topic, partition)] - 1  # Tansu's may be its last batch's first
    latest = first
    if offset >= last:
        return latest
    tp = TopicPartition(topic, partition, offset + 1)
    consumer.assign([tp])
    while time.monotonic() < deadline:
        records = [r for r in _take(consumer, IDLE_S) if r.error() is None]
        for record in records:
            if record.key() == first.key() and (record.offset() or 0) > (latest.offset() or 0):
                latest = record
        if any((r.offset() or 0) >= last for r in records) or _past(consumer, tp, last):
            return latest
    # An older submission's record must not be taken for the latest: its reader would
    # skip every result of the submission that runs.
    detail = f"{topic} [{partition}] not read to offset {last} in time"
    raise BrokerError(f"cannot tell whether {first.key()!r} was submitted again: {detail}")


def _past(consumer: Consumer, tp: TopicPartition, last: int) -> bool:
    """Whether the reader's position is past ``last`` (records compacted or deleted on
    the way leave nothing to see at that offset)."""
    try:
        [where] = consumer.position([TopicPartition(tp.topic, tp.partition)])
    except KafkaException:
        return False
    return bool(where.offset > last)


def job_starts(conn: KafkaConnection, topics: list[str], since: float) -> list[TopicPartition]:
    """Where a job's records begin in each partition of ``topics``: read from ``since``."""
    consumer = seeker(conn)
    try:
        return start_offsets(consumer, high_watermarks(consumer, topics), since)
    finally:
        consumer.close()


def high_watermarks(consumer: Consumer, topics: Iterable[str]) -> dict[TopicPartition, int]:
    """Each partition of ``topics`` and its end now (the offset the next record gets)."""
    try:
        metadata = consumer.list_topics(timeout=10)
    except KafkaException as exc:
        raise BrokerError(f"Kafka did not answer: {exc}") from None
    ends: dict[TopicPartition, int] = {}
    for topic in topics:
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise BrokerError(f"topic {topic} does not exist; run `parkpool brokers bootstrap`")
        for partition in found.partitions:
            tp = TopicPartition(topic, partition)
            ends[tp] = consumer.get_watermark_offsets(tp, timeout=10)[1]
    return ends


def start_offsets(
    consumer: Consumer, ends: dict[TopicPartition, int], since: float | None
) -> list[TopicPartition]:
    """Where to read each partition from: the first record stamped at or after ``since``
    (None: the start), as Kafka's ``offsets_for_times`` answers, checked.

    Kafka answers -1 for a partition with nothing that recent: its end. Tansu 0.6 answers
    0 instead, so a 0 for a non-empty partition is believed only if the record there is
    recent enough; else the partition is read from its end, not from its start.
    """
    if since is None:
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in ends]
    ms = int(since * 1000)
    asked = [TopicPartition(tp.topic, tp.partition, ms) for tp in ends]
    try:
        found = consumer.offsets_for_times(asked, timeout=10)
    except KafkaException as exc:
        raise BrokerError(f"Kafka did not answer offsets_for_times: {exc}") from None
    ambiguous = [tp for tp in found if tp.offset == 0 and ends[tp] > 0]
    latest = _last_stamps(consumer, ambiguous, ends)
    starts = []
    for tp in found:
        end = ends[tp]
        offset = tp.offset
        # Kafka's -1, or Tansu's 0 where the last record is older: nothing that recent
        # there. An answer past the end is kept: Tansu's end can lag its log.
        stamp = latest.get((tp.topic, tp.partition))
        if offset < 0 or (stamp is not None and stamp < ms):
            offset = end
        starts.append(TopicPartition(tp.topic, tp.partition, offset))
    return starts


def _last_stamps(
    consumer: Consumer, partitions: list[TopicPartition], ends: dict[TopicPartition, int]
) -> dict[Where, int]:
    """The timestamp (ms) of the record before each partition's end, read in one go
    with ``consumer`` before it is assigned its real partitions; none for one not read
    in time (its 0 is then believed: reading too much is slow, too little is wrong).

    Kafka answers ``offsets_for_times`` with -1 for a partition with nothing that
    recent; Tansu 0.6 answers 0, so a 0 is believed only if the last record is recent.
    The last record costs one small fetch; the first would cost Tansu a read from the
    partition's start. (Tansu's end is its last batch's first offset + 1, so there this
    reads that batch's first record, and reading "from the end" re-reads the rest.)
    """
    stamps: dict[Where, int] = {}
    if not partitions:
        return stamps
    consumer.assign([TopicPartition(tp.topic, tp.partition, ends[tp] - 1) for tp in partitions])
    try:
        left = {(tp.topic, tp.partition) for tp in partitions}
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            for record in _take(consumer, 0.5):
                where = (record.topic() or "", record.partition() or 0)
                if record.error() is None and where in left:
                    stamps[where] = int(record.timestamp()[1])
                    left.discard(where)
        return stamps
    finally:
        consumer.unassign()


def read_until(
    consumer: Consumer,
    starts: list[TopicPartition],
    ends: dict[TopicPartition, int],
    timeout_s: float,
) -> Iterator[Message]:
    """Every record from ``starts`` (assigned here) to the partitions' ends; BrokerError
    when they are not reached in ``timeout_s``.

    A partition is done once a record at its high watermark or past it came, then one
    more fetch wait brought nothing: Tansu 0.6 reports a batch's base offset + 1 as the
    watermark, so records of a partition's last batch may lie past the one it gave.
    """
    # An empty partition adds nothing but a wait: Tansu holds a fetch that names one
    # for the whole fetch wait. (Its end is never 0 once it holds a record, even where
    # it lags.)
    consumer.assign([tp for tp in starts if ends[tp] > 0 or tp.offset > 0])
    left = {
        (tp.topic, tp.partition): end
        for tp in starts
        if tp.offset < (end := ends[TopicPartition(tp.topic, tp.partition)])
    }
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None  # every watermark reached; nothing came since then
    while True:
        if time.monotonic() > deadline:
            detail = f"{len(left)} partitions not read to their end in {timeout_s:.0f} s"
            raise BrokerError(f"Kafka gave back too little: {detail}")
        records = [r for r in _take(consumer, 0.25) if r.error() is None]
        for record in records:
            where = (record.topic() or "", record.partition() or 0)
            if where in left and (record.offset() or 0) + 1 >= left[where]:
                del left[where]
            yield record
        if left:
            continue
        if records or quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= IDLE_S:
            return


def _take(consumer: Consumer, timeout: float) -> list[Message]:
    """What has arrived, waiting up to ``timeout`` for the first record only:
    ``consume(n, timeout)`` alone waits out its whole timeout unless n records come."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(500, timeout=0)]
