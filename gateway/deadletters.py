# SPDX-License-Identifier: Apache-2.0
"""Dead letters: how a record the gateway gives up on still ends, whatever it is.

A letter carries the record's bytes so that ``parkpool dlq replay`` can resend it. When
those bytes would make the letter larger than one Kafka record may be (a foreign record
near or over the limit), the letter goes without them, keeping their size and SHA-256
and the record's partition and offset. A letter Kafka does not take is written again
after a backoff, from the gateway's loop and never from inside its own delivery report,
so neither a refusal nor a broker outage can recurse, spin or stop the loop. The record's
offset is finished only once its letter is durable: until then the partition's commit
point stays put and a restart reads the record again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError

from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.tasks import PendingTask
from parkpool.runtime import logs
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.kafka import record_size
from parkpool.schemas import DeadLetter, encode

TP = tuple[str, int]
Delivered = Callable[[KafkaError | None], None]
Writer = Callable[[str, bytes, str | None, Delivered], None]
Call = Callable[[], None]
# Refusals that a smaller letter can cure: the broker's limit is below ours.
_SIZE_REFUSALS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
MAX_DETAIL = 2048
MAX_ATTEMPTS_KEPT = 64


@dataclass
class _Letter:
    """One letter on its way to Kafka, and how long to wait after its next failure."""

    letter: DeadLetter
    task: PendingTask | None
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))

    @property
    def key(self) -> str | None:
        return self.letter.job_id or None


class DeadLetters:
    def __init__(
        self,
        *,
        topic: str,
        gateway_id: str,
        max_record_bytes: int,
        write: Writer,
        later: DelayQueue[Call],
        finished: Callable[[TP, int], None],
        metrics: GatewayMetrics,
    ) -> None:
        self._topic = topic
        self._gateway_id = gateway_id
        self._max_record_bytes = max_record_bytes
        self._write = write
        self._later = later
        self._finished = finished
        self._metrics = metrics
        self._log = logs.get_logger("parkpool.gateway.deadletters").bind(gateway_id=gateway_id)

    def send(
        self,
        tp: TP,
        offset: int,
        raw: bytes,
        reason: str,
        detail: str,
        task: PendingTask | None = None,
        claimed: tuple[str, int] | None = None,
    ) -> None:
        """Write the letter; the record's offset is finished once Kafka has it.

        ``claimed`` is the job and chunk a record that did not decode names in its key.
        """
        if task is not None:
            claimed = (task.task.job_id, task.task.chunk_id)
        letter = self._fit(self._letter(tp, offset, raw, reason, detail, task, claimed))
        if not letter.original_kept:
            self._metrics.dead_letter_bytes_dropped.inc()
            self._log.warning(
                "dead_letter_without_bytes",
                reason=reason,
                partition=tp[1],
                offset=offset,
                size=len(raw),
                sha256=letter.original_sha256,
            )
        self._produce(_Letter(letter, task))

    def _fit(self, letter: DeadLetter) -> DeadLetter:
        """The letter, shed of what makes it too large for one record: first the record's
        bytes, then the oldest attempts (a very low limit), so that it can always be sent."""
        if self._fits(letter):
            return letter
        letter = letter.without_original()
        while not self._fits(letter) and letter.attempts:
            letter = dataclasses.replace(
                letter, attempts=letter.attempts[len(letter.attempts) // 2 + 1 :]
            )
        return letter

    def _fits(self, letter: DeadLetter) -> bool:
        return record_size(encode(letter), letter.job_id or None) <= self._max_record_bytes

    def _letter(
        self,
        tp: TP,
        offset: int,
        raw: bytes,
        reason: str,
        detail: str,
        task: PendingTask | None,
        claimed: tuple[str, int] | None,
    ) -> DeadLetter:
        job_id, chunk_id = claimed or ("", -1)
        return DeadLetter(
            reason=reason,
            detail=detail[:MAX_DETAIL],
            source_topic=tp[0],
            partition=tp[1],
            offset=offset,
            original=raw,
            dead_at=time.time(),
            gateway_id=self._gateway_id,
            job_id=job_id,
            chunk_id=chunk_id,
            attempts=tuple(task.history[-MAX_ATTEMPTS_KEPT:]) if task else (),
            original_size=len(raw),
            original_sha256=hashlib.sha256(raw).hexdigest(),
            task_created_at=task.task.created_at if task else 0.0,
        )

    def _produce(self, pending: _Letter) -> None:
        payload = encode(pending.letter)
        self._write(self._topic, payload, pending.key, lambda err: self._delivered(pending, err))

    def _delivered(self, pending: _Letter, err: KafkaError | None) -> None:
        letter = pending.letter
        if err is None:
            self._written(pending)
            return
        self._metrics.delivery_errors.labels("dead_letter").inc()
        if letter.original and err.code() in _SIZE_REFUSALS:
            # The broker allows less than we were told; the record's bytes must go.
            pending.letter = letter.without_original()
            self._metrics.dead_letter_bytes_dropped.inc()
            delay = 0.0
        else:
            delay = pending.backoff.next_delay()
        self._log.error(
            "dead_letter_not_written",
            reason=letter.reason,
            partition=letter.partition,
            offset=letter.offset,
            error=str(err),
            retry_in_s=round(delay, 3),
        )
        self._later.push(lambda: self._produce(pending), delay)

    def _written(self, pending: _Letter) -> None:
        letter, task = pending.letter, pending.task
        self._metrics.dead_lettered.labels(letter.reason).inc()
        self._metrics.tasks.labels("dead_lettered").inc()
        context = (
            task.log_context() if task else {"partition": letter.partition, "offset": letter.offset}
        )
        self._log.warning(
            "dead_lettered", reason=letter.reason, kept_bytes=letter.original_kept, **context
        )
        self._finished((letter.source_topic, letter.partition), letter.offset)
