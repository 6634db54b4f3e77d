# SPDX-License-Identifier: Apache-2.0
"""Dead-letter tools: read, replay and purge the ``<ns>.deadletter`` topic.

Kafka cannot delete one record, so replay and purge append a ``DlqAction`` note (key
``dlq:action``) naming the dead letter's partition and offset, and readers fold the notes
over the topic: the latest note about an entry decides its state. A replay waits for the
task's delivery report *before* it writes its note, so a crash in between can only
enqueue a task twice (the SDK drops duplicate chunks), never lose one; a second replay
skips every entry already noted, so it is safe to run twice.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.kafka import coordinates, produce, producer_config, reader_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import (
    BrokerError,
    DeadLetter,
    DecodeError,
    DlqAction,
    DlqActionKind,
    KafkaTopics,
    TaskChunk,
    decode,
    encode,
    peek_type,
)
from parkpool.schemas.blobref import input_key
from parkpool.schemas.topics import DLQ_ACTION_KEY, REPLAY_HEADER, task_key

ACTION_KEY = DLQ_ACTION_KEY
DEFAULT_DEADLINE_S = 3600.0
DEFAULT_IDLE_S = 1.0
DELIVERY_TIMEOUT_S = 30.0
REPORT_SLACK_S = 5.0  # for the reports of records that timed out to come
NOT_CONFIRMED = "not confirmed in time"

RawRecord = tuple[int, int, bytes]  # partition, offset, value
Header = tuple[str, str | bytes | None]
Outgoing = tuple[str, bytes, str, list[Header]]  # topic, value, key, headers

log = logs.get_logger("parkpool.dlq")


class EntryState(enum.StrEnum):
    PENDING = "pending"
    REPLAYED = "replayed"
    PURGED = "purged"


class OutcomeKind(enum.StrEnum):
    REPLAYED = "replayed"
    PURGED = "purged"
    WOULD_REPLAY = "would_replay"  # --dry-run
    WOULD_PURGE = "would_purge"  # --dry-run
    SKIPPED = "skipped"  # already replayed or purged: nothing to do
    REFUSED = "refused"  # cannot be done: no such dead letter, or it does not replay
    FAILED = "failed"  # Kafka did not confirm a write


FAILURES = (OutcomeKind.REFUSED, OutcomeKind.FAILED)


@dataclass(frozen=True, order=True)
class Position:
    """Where a record sits in the dead-letter topic, written ``PARTITION:OFFSET``."""

    partition: int
    offset: int

    def __post_init__(self) -> None:
        if self.partition < 0 or self.offset < 0:
            raise ValueError(f"position {self} must not be negative")

    @classmethod
    def parse(cls, text: str) -> Position:
        partition, sep, offset = text.strip().partition(":")
        if not (sep and partition.isdigit() and offset.isdigit()):
            raise ValueError(f"{text!r} is not PARTITION:OFFSET, e.g. 0:42")
        return cls(int(partition), int(offset))

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class DeadLetterEntry:
    """One record of the dead-letter topic, decoded or not, with the notes about it."""

    partition: int
    offset: int
    letter: DeadLetter | None  # None when the record itself does not decode
    error: str = ""  # why it does not decode
    actions: tuple[DlqAction, ...] = ()  # in the order they were written

    @property
    def position(self) -> Position:
        return Position(self.partition, self.offset)

    @property
    def state(self) -> EntryState:
        """The latest note wins; an entry without notes is pending."""
        return EntryState(self.actions[-1].action.value) if self.actions else EntryState.PENDING

    def matches(self, reason: str | None = None, job: str | None = None) -> bool:
        """Whether the entry passes the --reason and --job filters (None: any)."""
        if reason is None and job is None:
            return True
        letter = self.letter
        return (
            letter is not None and reason in (None, letter.reason) and job in (None, letter.job_id)
        )


@dataclass(frozen=True)
class Outcome:
    """What replay or purge did, or would do, with one dead letter."""

    position: Position
    kind: OutcomeKind
    detail: str = ""


@dataclass(frozen=True)
class ActionReport:
    """Outcomes of one replay or purge, in the order the entries were given."""

    outcomes: tuple[Outcome, ...]

    def count(self, kind: OutcomeKind) -> int:
        return sum(1 for outcome in self.outcomes if outcome.kind is kind)

    @property
    def ok(self) -> bool:
        """True when nothing was refused and every write was confirmed."""
        return not any(outcome.kind in FAILURES for outcome in self.outcomes)

    def summary(self) -> dict[str, int]:
        return {kind.value: self.count(kind) for kind in OutcomeKind if self.count(kind)}


# ---------------------------------------------------------------- reading


def read_dead_letters(
    conn: KafkaConnection, namespace: str, idle_s: float = DEFAULT_IDLE_S, stall_s: float = 30.0
) -> list[DeadLetterEntry]:
    """Every dead letter of the namespace, with its state folded from the notes."""
    return fold(read_records(conn, KafkaTopics(namespace).dead_letter, idle_s, stall_s))


def read_records(
    conn: KafkaConnection, topic: str, idle_s: float = DEFAULT_IDLE_S, stall_s: float = 30.0
) -> list[RawRecord]:
    """Every record of ``topic``, read with assign() from the start until idle for idle_s.

    Tansu under-reports the high watermark, so it is only a floor: reading stops once
    every partition reached its floor *and* nothing came for ``idle_s``. No progress
    towards a floor for ``stall_s`` raises BrokerError.
    """
    consumer = Consumer(reader_config(conn, **{"auto.offset.reset": "earliest"}))
    try:
        bounds = {p: _bounds(consumer, topic, p) for p in _partitions(consumer, topic)}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in bounds.items()])
        return _drain(consumer, bounds, idle_s, stall_s)
    finally:
        consumer.close()


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise BrokerError(f"topic {topic} is not available: {metadata and metadata.error}")
    return sorted(metadata.partitions)


def _bounds(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """Where the partition's records begin (retention deletes from the start) and the
    floor of where they end."""
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    return max(int(low), 0), max(int(high), 0)


def _drain(
    consumer: Consumer, bounds: dict[int, tuple[int, int]], idle_s: float, stall_s: float
) -> list[RawRecord]:
    """Read until every partition reached its floor and nothing came for ``idle_s``.
    Counting starts where each partition's records begin: one whose records all expired
    is caught up at once, rather than stalled waiting for offsets that are gone."""
    records: list[RawRecord] = []
    floors = {p: high for p, (_, high) in bounds.items()}
    reached = {p: low for p, (low, _) in bounds.items()}
    progress_at = time.monotonic()
    while True:
        batch = consumer.consume(500, timeout=idle_s)
        for record in batch:
            if record.error() is not None:
                log.warning("dlq_read_error", error=str(record.error()))
                continue
            _topic, partition, offset = coordinates(record)
            records.append((partition, offset, record.value() or b""))
            reached[partition] = offset + 1
            progress_at = time.monotonic()
        caught_up = all(reached[p] >= floor for p, floor in floors.items())
        if not batch and caught_up:
            return records
        if not caught_up and time.monotonic() - progress_at > stall_s:
            raise BrokerError(f"dead-letter topic read stalled at {reached}, floors {floors}")


def fold(records: Iterable[RawRecord]) -> list[DeadLetterEntry]:
    """Dead letters by position, each with the notes about it in the order written."""
    entries: dict[Position, DeadLetterEntry] = {}
    notes: list[tuple[Position, DlqAction]] = []
    for partition, offset, value in records:
        position = Position(partition, offset)
        record = decode_record(value)
        if isinstance(record, DlqAction):
            notes.append((position, record))
        elif isinstance(record, DeadLetter):
            entries[position] = DeadLetterEntry(partition, offset, record)
        else:
            entries[position] = DeadLetterEntry(partition, offset, None, str(record))
    for _where, note in sorted(notes, key=lambda item: item[0]):
        target = entries.get(Position(note.partition, note.offset))
        if target is not None:  # a note about a record that is not an entry says nothing
            entries[target.position] = dataclasses.replace(target, actions=(*target.actions, note))
    return [entries[position] for position in sorted(entries)]


def decode_record(value: bytes) -> DeadLetter | DlqAction | DecodeError:
    """A dead-letter topic record: a dead letter, a note, or why it is neither."""
    kind: type[DeadLetter | DlqAction] = (
        DlqAction if peek_type(value) == DlqAction.TYPE else DeadLetter
    )
    try:
        return decode(value, kind)
    except DecodeError as exc:
        return exc


def decode_original(letter: DeadLetter) -> TaskChunk | DecodeError:
    """The task a dead letter holds, or why its original bytes are not one."""
    try:
        return decode(letter.original, TaskChunk)
    except DecodeError as exc:
        return exc


# ---------------------------------------------------------------- choosing


def pending(
    entries: Iterable[DeadLetterEntry], reason: str | None = None, job: str | None = None
) -> list[DeadLetterEntry]:
    """The pending entries that pass the filters: what --all-pending acts on."""
    return [e for e in entries if e.state is EntryState.PENDING and e.matches(reason, job)]


def find(
    entries: Iterable[DeadLetterEntry], positions: Iterable[Position]
) -> tuple[list[DeadLetterEntry], list[Outcome]]:
    """The entries at ``positions`` (each once), and a refusal for each that is none."""
    by_position = {entry.position: entry for entry in entries}
    found: list[DeadLetterEntry] = []
    missing: list[Outcome] = []
    for position in dict.fromkeys(positions):
        entry = by_position.get(position)
        if entry is None:
            missing.append(Outcome(position, OutcomeKind.REFUSED, "no dead letter there"))
        else:
            found.append(entry)
    return found, missing


# ---------------------------------------------------------------- replay


def rebuild_task(letter: DeadLetter, deadline_s: float, now: float) -> TaskChunk:
    """The dead letter's task, fresh: attempt 0 and deadline now + deadline_s.

    Everything else is kept, created_at included: latency is measured from the job's
    submission. Raises DecodeError when the original is not a task.
    """
    task = decode(letter.original, TaskChunk)
    return dataclasses.replace(task, attempt=0, deadline=now + deadline_s)


def replay(
    conn: KafkaConnection,
    namespace: str,
    entries: Sequence[DeadLetterEntry],
    deadline_s: float = DEFAULT_DEADLINE_S,
    dry_run: bool = False,
    note: str = "",
    store: BlobStore | None = None,
) -> ActionReport:
    """Put the pending entries' tasks back on the tasks topic, then note them replayed.

    A task whose inputs are in the object store is replayed only when every one of them
    is still there (``store`` checks): its job's end deleted them otherwise.
    """
    now = time.time()
    plans = {entry.position: _plan_replay(entry, deadline_s, now, store) for entry in entries}
    tasks = {p: plan for p, plan in plans.items() if isinstance(plan, TaskChunk)}
    if dry_run:
        done = {p: Outcome(p, OutcomeKind.WOULD_REPLAY, _task_text(t)) for p, t in tasks.items()}
    else:
        done = _replay_tasks(conn, KafkaTopics(namespace), tasks, note)
    return ActionReport(
        tuple(done[p] if isinstance(plan, TaskChunk) else plan for p, plan in plans.items())
    )


def _plan_replay(
    entry: DeadLetterEntry, deadline_s: float, now: float, store: BlobStore | None
) -> TaskChunk | Outcome:
    if entry.state is not EntryState.PENDING:
        return Outcome(entry.position, OutcomeKind.SKIPPED, f"already {entry.state}")
    if entry.letter is None:
        detail = f"the record is not a dead letter ({entry.error}); purge it instead"
        return Outcome(entry.position, OutcomeKind.REFUSED, detail)
    if not entry.letter.original_kept:
        letter = entry.letter
        detail = (
            f"the record's bytes were not kept ({letter.original_size:,} bytes, too large for "
            f"a dead letter; sha256 {letter.original_sha256}); it may still be in "
            f"{letter.source_topic} partition {letter.partition} offset {letter.offset}"
        )
        return Outcome(entry.position, OutcomeKind.REFUSED, detail)
    try:
        task = rebuild_task(entry.letter, deadline_s, now)
    except DecodeError as exc:
        detail = f"original ({entry.letter.reason}) does not decode as a task: {exc}"
        return Outcome(entry.position, OutcomeKind.REFUSED, detail)
    missing = _missing_input(task, store)
    return task if missing is None else Outcome(entry.position, OutcomeKind.REFUSED, missing)


def _missing_input(task: TaskChunk, store: BlobStore | None) -> str | None:
    """Why a task's stored inputs cannot be read any more, or None when they all can."""
    if not task.refs:
        return None
    what = _task_text(task)
    if store is None:
        return f"{what}: its inputs are in the object store; give --store-endpoint to replay it"
    for ref in task.refs:
        try:
            present = store.exists(input_key(task.job_id, ref.sha256))
        except BrokerError as exc:
            return f"{what}: cannot check its inputs in the object store: {exc}"
        if not present:
            name = ref.name or "sealed inputs"
            return (
                f"{what}: input {name!r} (sha256 {ref.sha256[:16]}) is no longer in the "
                "object store (deleted when the job ended, or by the TTL); submit the job again"
            )
    return None


def _replay_tasks(
    conn: KafkaConnection, topics: KafkaTopics, tasks: dict[Position, TaskChunk], note: str
) -> dict[Position, Outcome]:
    if not tasks:
        return {}
    producer = _producer(conn)
    sent = _send(
        producer,
        {
            p: (topics.tasks, encode(t), task_key(t.job_id, t.chunk_id), [(REPLAY_HEADER, str(p))])
            for p, t in tasks.items()
        },
    )
    enqueued = {p: t for p, t in tasks.items() if sent[p] is None}
    noted = _note(producer, topics, enqueued, DlqActionKind.REPLAYED, note)
    outcomes: dict[Position, Outcome] = {}
    for p, task in tasks.items():
        if sent[p] is not None and _unsure(sent[p]):
            # Sent, and never confirmed either way: Kafka may hold it. A second replay
            # costs a car a redo at most; the caller sees each chunk once.
            detail = f"task maybe enqueued, not confirmed ({sent[p]}): see the job before replaying"
            outcomes[p] = Outcome(p, OutcomeKind.FAILED, detail)
        elif sent[p] is not None:
            outcomes[p] = Outcome(p, OutcomeKind.FAILED, f"task not enqueued: {sent[p]}")
        elif noted[p] is not None:
            detail = f"task enqueued, but the note was not written ({noted[p]}): replays again"
            outcomes[p] = Outcome(p, OutcomeKind.FAILED, detail)
        else:
            log.info("dlq_replayed", partition=p.partition, offset=p.offset, job_id=task.job_id)
            outcomes[p] = Outcome(p, OutcomeKind.REPLAYED, _task_text(task))
    return outcomes


def _unsure(error: str | None) -> bool:
    """A delivery that timed out (or whose report never came) may still have been
    written; any other failure was refused."""
    return error is not None and (error == NOT_CONFIRMED or "_MSG_TIMED_OUT" in error)


def _task_text(task: TaskChunk) -> str:
    return f"job {task.job_id} chunk {task.chunk_id} ({task.kernel})"


# ---------------------------------------------------------------- purge


def purge(
    conn: KafkaConnection,
    namespace: str,
    entries: Sequence[DeadLetterEntry],
    dry_run: bool = False,
    note: str = "",
) -> ActionReport:
    """Note the pending entries purged: list hides them and replay skips them."""
    plans = {entry.position: _plan_purge(entry) for entry in entries}
    chosen = {p: entry for p, entry in plans.items() if isinstance(entry, DeadLetterEntry)}
    if dry_run or not chosen:
        done = {p: Outcome(p, OutcomeKind.WOULD_PURGE) for p in chosen}
    else:
        producer = _producer(conn)
        noted = _note(producer, KafkaTopics(namespace), chosen, DlqActionKind.PURGED, note)
        done = {p: _purged(p, error) for p, error in noted.items()}
    return ActionReport(
        tuple(done[p] if isinstance(plan, DeadLetterEntry) else plan for p, plan in plans.items())
    )


def _plan_purge(entry: DeadLetterEntry) -> DeadLetterEntry | Outcome:
    if entry.state is not EntryState.PENDING:
        return Outcome(entry.position, OutcomeKind.SKIPPED, f"already {entry.state}")
    return entry


def _purged(position: Position, error: str | None) -> Outcome:
    if error is not None:
        return Outcome(position, OutcomeKind.FAILED, f"note not written: {error}")
    log.info("dlq_purged", partition=position.partition, offset=position.offset)
    return Outcome(position, OutcomeKind.PURGED)


# ---------------------------------------------------------------- writing


def _note(
    producer: Producer,
    topics: KafkaTopics,
    positions: Iterable[Position],
    action: DlqActionKind,
    note: str,
) -> dict[Position, str | None]:
    key = ACTION_KEY.decode()
    return _send(
        producer,
        {p: (topics.dead_letter, encode(_action(action, p, note)), key, []) for p in positions},
    )


def _action(action: DlqActionKind, position: Position, note: str) -> DlqAction:
    return DlqAction(action, position.partition, position.offset, time.time(), note)


def _producer(conn: KafkaConnection) -> Producer:
    """A producer that gives up on a record when ``_send`` stops waiting for it: by
    librdkafka's default it would go on retrying for 5 minutes, and a replay reported
    "not enqueued" could still land after it, unnoted, to be replayed again."""
    return Producer(producer_config(conn, **{"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)}))


def _send(producer: Producer, outgoing: dict[Position, Outgoing]) -> dict[Position, str | None]:
    """Produce each record and wait for its delivery report: None, or the error."""
    errors: dict[Position, str | None] = dict.fromkeys(outgoing, NOT_CONFIRMED)

    def reporter(position: Position) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, _msg: Message) -> None:
            errors[position] = None if err is None else str(err)

        return report

    for position, (topic, value, key, headers) in outgoing.items():
        refused = produce(producer, topic, value, key, reporter(position), headers)
        if refused is not None:  # too large, say: that entry fails, the others go on
            errors[position] = str(refused)
    # Past its message timeout every record has its report: delivered, or failed.
    producer.flush(DELIVERY_TIMEOUT_S + REPORT_SLACK_S)
    return errors
