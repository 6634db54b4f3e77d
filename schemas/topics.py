# SPDX-License-Identifier: Apache-2.0
"""Every Kafka topic name and MQTT topic pattern parkpool uses.

A *namespace* separates deployments (and tests) sharing one broker pair: Kafka topics
are ``<namespace>.<name>``, MQTT topics start with ``<namespace>/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_NAMESPACE = "parkpool"
# Key of the DlqAction notes on the dead-letter topic. Dead letters are keyed by job id,
# and a job id can never contain ":", so the two cannot be confused.
DLQ_ACTION_KEY = b"dlq:action"
# Kafka header on a task re-enqueued by `parkpool dlq replay`: "<partition>:<offset>".
REPLAY_HEADER = "parkpool-replay-of"
_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Kinds with a gateway level: a car speaks only to the K gateways it chose (pull, status)
# or to the lease holder (result, nack, heartbeat), never to every gateway.
_TO_GATEWAY = frozenset({"pull", "status", "result", "nack", "heartbeat"})


def task_key(job_id: str, chunk_id: int) -> str:
    """A task record's Kafka key: by chunk, not job, so one big job spreads over partitions."""
    return f"{job_id}:{chunk_id}"


def parse_task_key(key: bytes | None) -> tuple[str, int] | None:
    """The (job id, chunk id) a task record's key names, or None when it names none.

    Lets a record whose value does not decode still be blamed on its job, so the job's
    caller hears of it instead of waiting for a chunk that will never come.
    """
    job_id, sep, chunk = (key or b"").decode("ascii", "replace").partition(":")
    if not (sep and _ID_RE.fullmatch(job_id) and chunk.isdigit() and len(chunk) <= 6):
        return None
    return job_id, int(chunk)


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r} must match {_NAMESPACE_RE.pattern}")
    return namespace


def check_id(kind: str, value: str) -> str:
    """Vehicle and gateway ids become MQTT topic levels, so no '/', '+', '#' or spaces."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must match {_ID_RE.pattern}")
    return value


@dataclass(frozen=True)
class KafkaTopics:
    """Names of the Kafka topics of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    @property
    def tasks(self) -> str:
        """Task chunks (keyed ``job:chunk``) and job cancels; from the SDK to the gateways."""
        return f"{self.namespace}.tasks"

    @property
    def results(self) -> str:
        """Default reply topic: results keyed by job id; produced by gateways."""
        return f"{self.namespace}.results"

    @property
    def dead_letter(self) -> str:
        """Tasks and records that could not be completed, with reason and history."""
        return f"{self.namespace}.deadletter"

    @property
    def reputation(self) -> str:
        """Each car's verification record and quarantine state; compacted, read by all."""
        return f"{self.namespace}.reputation"

    @property
    def jobs(self) -> str:
        """One JobSubmitted per job, keyed by job id: how a job is followed by id alone."""
        return f"{self.namespace}.jobs"

    def all(self) -> tuple[str, ...]:
        return (self.tasks, self.results, self.dead_letter, self.reputation, self.jobs)


@dataclass(frozen=True)
class MqttTopics:
    """MQTT topics of one namespace.

    Vehicle-scoped topics put the vehicle id at a fixed level so that broker ACLs can pin
    each vehicle to its own topics (``%c``/``%u`` pattern substitution).
    """

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    # vehicle -> one of the K gateways it talks to (its rendezvous set)
    def pull(self, vehicle_id: str, gateway_id: str) -> str:
        return self._to_gateway(vehicle_id, "pull", gateway_id)

    def status(self, vehicle_id: str, gateway_id: str) -> str:
        return self._to_gateway(vehicle_id, "status", gateway_id)

    # vehicle -> every gateway of its cell, by the broker only: the last will, published
    # when a car drops without DISCONNECT (one will per connection, so it cannot name K).
    def will(self, vehicle_id: str) -> str:
        return f"{self.namespace}/v/{check_id('vehicle id', vehicle_id)}/status"

    # vehicle -> the gateway that holds the lease (one level more: that gateway's id)
    def result(self, vehicle_id: str, gateway_id: str) -> str:
        return self._to_gateway(vehicle_id, "result", gateway_id)

    def nack(self, vehicle_id: str, gateway_id: str) -> str:
        return self._to_gateway(vehicle_id, "nack", gateway_id)

    def heartbeat(self, vehicle_id: str, gateway_id: str) -> str:
        return self._to_gateway(vehicle_id, "heartbeat", gateway_id)

    def _to_gateway(self, vehicle_id: str, kind: str, gateway_id: str) -> str:
        vehicle = check_id("vehicle id", vehicle_id)
        return f"{self.namespace}/v/{vehicle}/{kind}/{check_id('gateway id', gateway_id)}"

    # gateway -> vehicle (assignments and revocations)
    def task(self, vehicle_id: str) -> str:
        return f"{self.namespace}/v/{check_id('vehicle id', vehicle_id)}/task"

    def gateway_status(self, gateway_id: str) -> str:
        """Retained online/offline state: the cell's roster, from which each car picks its
        K gateways. Published on a change of state only, never as a periodic rebroadcast."""
        return f"{self.namespace}/gw/{check_id('gateway id', gateway_id)}/status"

    # subscriptions (wildcards)
    def pulls_for(self, gateway_id: str) -> str:
        return f"{self.namespace}/v/+/pull/{check_id('gateway id', gateway_id)}"

    def statuses_for(self, gateway_id: str) -> str:
        return f"{self.namespace}/v/+/status/{check_id('gateway id', gateway_id)}"

    @property
    def all_wills(self) -> str:
        return f"{self.namespace}/v/+/status"

    def results_for(self, gateway_id: str) -> str:
        return f"{self.namespace}/v/+/result/{check_id('gateway id', gateway_id)}"

    def nacks_for(self, gateway_id: str) -> str:
        return f"{self.namespace}/v/+/nack/{check_id('gateway id', gateway_id)}"

    def heartbeats_for(self, gateway_id: str) -> str:
        return f"{self.namespace}/v/+/heartbeat/{check_id('gateway id', gateway_id)}"

    @property
    def all_gateway_statuses(self) -> str:
        return f"{self.namespace}/gw/+/status"

    def vehicle_of(self, topic: str) -> str | None:
        """The vehicle id in a vehicle-scoped topic, or None if the topic is not one."""
        parts = topic.split("/")
        # A fifth level exists only on topics to one gateway, and must be its id.
        to_gateway = len(parts) == 5 and parts[3] in _TO_GATEWAY and _ID_RE.fullmatch(parts[4])
        if (len(parts) == 4 or to_gateway) and parts[0] == self.namespace and parts[1] == "v":
            return parts[2] if _ID_RE.fullmatch(parts[2]) else None
        return None

    def kind_of(self, topic: str) -> str | None:
        """The kind level (pull, status, result, nack, heartbeat, task) of a vehicle topic;
        ``will`` for the four-level status topic that only last wills use."""
        if not self.vehicle_of(topic):
            return None
        parts = topic.split("/")
        return "will" if len(parts) == 4 and parts[3] == "status" else parts[3]
