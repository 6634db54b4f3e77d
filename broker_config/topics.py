# SPDX-License-Identifier: Apache-2.0
"""Kafka topic specs and the idempotent bootstrap that creates them.

The specs live in ``kafka_topics.toml`` keyed by the short names of
:class:`schemas.topics.KafkaTopics`; :func:`bootstrap` turns them into the topics of
one namespace on any Kafka-compatible cluster and is safe to run any number of times.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from parkpool.runtime.settings import DEFAULT_MAX_RECORD_BYTES
from parkpool.schemas.errors import BrokerError, ConfigError
from parkpool.schemas.topics import KafkaTopics

__all__ = [
    "SHORT_NAMES",
    "TASK_SIZED",
    "TopicLimitError",
    "TopicSpec",
    "bootstrap",
    "load_specs",
    "with_task_partitions",
]

SHORT_NAMES = ("tasks", "results", "dead_letter", "reputation", "jobs")
# The topics whose partitions follow the number of gateways (see kafka_topics.toml).
TASK_SIZED = ("tasks", "results")
_SPEC_KEYS = {"partitions", "replication_factor", "config"}


class TopicLimitError(BrokerError):
    """A topic accepts smaller records than parkpool writes: producing would fail later."""


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    """How one topic of a namespace is created: its short name, size and topic config."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.name not in SHORT_NAMES:
            raise ConfigError(f"topic {self.name!r} is not one of {SHORT_NAMES}")
        if self.partitions < 1 or self.replication_factor < 1:
            raise ConfigError(f"topic {self.name!r}: partitions and replication must be >= 1")
        # Frozen all the way down, so a shared spec cannot be mutated by one caller.
        object.__setattr__(self, "config", MappingProxyType({**self.config}))

    def topic_name(self, namespace: str) -> str:
        """The full Kafka topic name of this spec in ``namespace``."""
        name: str = getattr(KafkaTopics(namespace), self.name)
        return name

    def with_partitions(self, partitions: int) -> TopicSpec:
        """A copy with another partition count (tests use fewer, for speed)."""
        return dataclasses.replace(self, partitions=partitions)


def with_task_partitions(
    specs: Iterable[TopicSpec], partitions: int | None
) -> tuple[TopicSpec, ...]:
    """``specs`` with the tasks and results topics at ``partitions`` (None: as they are).

    Every gateway of a namespace reads the one tasks topic in one consumer group, so a
    gateway beyond the partition count gets none and idles: size it for the gateways.
    """
    return tuple(
        spec.with_partitions(partitions)
        if partitions is not None and spec.name in TASK_SIZED
        else spec
        for spec in specs
    )


def load_specs(path: str | Path | None = None) -> tuple[TopicSpec, ...]:
    """Read topic specs from ``path``, or from the packaged ``kafka_topics.toml``."""
    try:
        if path is None:
            text = (
                resources.files("parkpool.broker_config").joinpath("kafka_topics.toml").read_text()
            )
        else:
            text = Path(path).read_text()
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read topic specs from {path or 'package'}: {exc}") from exc
    return _specs_from_table(data.get("topics", {}))


def _specs_from_table(table: Mapping[str, Any]) -> tuple[TopicSpec, ...]:
    missing = set(SHORT_NAMES) - set(table)
    if missing:
        raise ConfigError(f"topic specs lack {sorted(missing)}")
    return tuple(_spec_from_entry(name, entry) for name, entry in table.items())


def _spec_from_entry(name: str, entry: Mapping[str, Any]) -> TopicSpec:
    unknown = set(entry) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"topic {name!r}: unknown keys {sorted(unknown)}")
    try:
        return TopicSpec(
            name=name,
            partitions=int(entry["partitions"]),
            replication_factor=int(entry.get("replication_factor", 1)),
            config={str(k): str(v) for k, v in entry.get("config", {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"topic {name!r}: invalid spec: {exc!r}") from exc


def bootstrap(
    bootstrap_servers: str,
    namespace: str,
    *,
    specs: Iterable[TopicSpec] | None = None,
    kafka_config: Mapping[str, str] | None = None,
    timeout: float = 30,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> list[str]:
    """Create the namespace's topics, or grow existing ones to the spec's partitions.

    Existing topics count as success and are never shrunk; their config is left as is,
    but each topic must accept records of ``max_record_bytes`` (what parkpool writes):
    :class:`TopicLimitError` names every one that does not. Returns the full names of
    the topics that were created or grown (empty when everything was already in place).
    Raises :class:`BrokerError` on any other failure.
    """
    by_topic = {s.topic_name(namespace): s for s in (load_specs() if specs is None else specs)}
    admin = _admin(bootstrap_servers, kafka_config)
    created, existing = _create(admin, by_topic, timeout)
    grown = _grow(admin, {t: by_topic[t] for t in existing}, timeout)
    too_small = _too_small(admin, list(by_topic), max_record_bytes, timeout)
    if too_small:
        raise TopicLimitError(
            "; ".join(too_small) + f". parkpool writes records of up to {max_record_bytes} "
            "bytes (PARKPOOL_KAFKA_MAX_RECORD_BYTES): raise the topics' max.message.bytes, "
            "or lower that setting on every producer and gateway"
        )
    return created + grown


def _too_small(admin: AdminClient, topics: list[str], limit: int, timeout: float) -> list[str]:
    """Each topic whose max.message.bytes is below ``limit``, as a sentence."""
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(f"cannot describe topic configs: {exc}") from exc
    problems = []
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=timeout)
        except (KafkaException, concurrent.futures.TimeoutError) as exc:
            raise BrokerError(f"cannot describe topic {resource.name}: {exc}") from None
        entry = entries.get("max.message.bytes")
        allowed = int(entry.value) if entry is not None and entry.value else None
        if allowed is not None and allowed < limit:
            problems.append(f"topic {resource.name} accepts records of {allowed} bytes at most")
    return problems


def _admin(bootstrap_servers: str, kafka_config: Mapping[str, str] | None) -> AdminClient:
    try:
        return AdminClient({**(kafka_config or {}), "bootstrap.servers": bootstrap_servers})
    except KafkaException as exc:
        raise ConfigError(f"invalid Kafka admin config: {exc}") from exc


def _create(
    admin: AdminClient, by_topic: Mapping[str, TopicSpec], timeout: float
) -> tuple[list[str], list[str]]:
    """Create every topic; returns (created, already existing)."""
    new = [
        NewTopic(topic, s.partitions, s.replication_factor, config=dict(s.config))
        for topic, s in by_topic.items()
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    created: list[str] = []
    existing: list[str] = []
    for topic, future in futures.items():
        error = _error_of(future, timeout)
        if error is None:
            created.append(topic)
        elif error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            existing.append(topic)
        else:
            raise BrokerError(f"cannot create topic {topic}: {error.str()}")
    return created, existing


def _grow(admin: AdminClient, by_topic: Mapping[str, TopicSpec], timeout: float) -> list[str]:
    """Add partitions to topics that have fewer than their spec asks for."""
    short = [
        NewPartitions(topic, spec.partitions)
        for topic, spec in by_topic.items()
        if _partition_count(admin, topic, timeout) < spec.partitions
    ]
    if not short:
        return []
    try:
        futures = admin.create_partitions(short, operation_timeout=timeout, request_timeout=timeout)
    except KafkaException as exc:  # Tansu 0.6 refuses CreatePartitions up front
        raise BrokerError(f"cannot grow topics {[p.topic for p in short]}: {exc}") from exc
    for topic, future in futures.items():
        error = _error_of(future, timeout)
        if error is not None:
            raise BrokerError(f"cannot grow topic {topic}: {error.str()}")
    return list(futures)


def _partition_count(admin: AdminClient, topic: str, timeout: float) -> int:
    try:
        metadata = admin.list_topics(topic=topic, timeout=timeout).topics[topic]
    except KafkaException as exc:
        raise BrokerError(f"cannot describe topic {topic}: {exc}") from exc
    if metadata.error is not None:
        raise BrokerError(f"cannot describe topic {topic}: {metadata.error.str()}")
    return len(metadata.partitions)


def _error_of(future: concurrent.futures.Future[Any], timeout: float) -> KafkaError | None:
    """The KafkaError an admin future failed with, or None if it succeeded.

    exception() rather than result(): a raised exception's traceback would tie the
    AdminClient into a reference cycle and keep its connection open until the next GC.
    """
    try:
        exc = future.exception(timeout=timeout)
    except concurrent.futures.TimeoutError as timeout_exc:
        raise BrokerError(f"Kafka admin request timed out after {timeout}s") from timeout_exc
    if exc is None:
        return None
    if isinstance(exc, KafkaException):
        error: KafkaError = exc.args[0]
        return error
    raise BrokerError(f"Kafka admin request failed: {exc!r}") from exc
