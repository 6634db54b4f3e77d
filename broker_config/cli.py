# SPDX-License-Identifier: Apache-2.0
"""``parkpool brokers``: run embedded brokers, or bootstrap topics on any Kafka.

``parkpool brokers up`` prints ``export`` lines for the other commands, then holds the
brokers until Ctrl-C or SIGTERM, restarting any that dies (``broker_config.supervisor``);
``parkpool brokers bootstrap`` is safe to re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from parkpool.runtime import logs
from parkpool.runtime.settings import (
    add_kafka_options,
    add_namespace_option,
    add_option,
    boolean,
    positive_int,
)
from parkpool.runtime.signals import stop_event
from parkpool.schemas.errors import BrokerError, ParkpoolError
from parkpool.schemas.topics import KafkaTopics, check_namespace

from .launcher import EmbeddedBrokers
from .supervisor import Supervisor
from .topics import TopicSpec, bootstrap, load_specs, with_task_partitions

__all__ = ["add_parser", "run_bootstrap", "run_up"]

log = logs.get_logger("parkpool.brokers")
T = TypeVar("T")
# How long a restarted Tansu may refuse the topic check before ``brokers up`` gives up.
RESTART_PATIENCE_S = 30.0

_TOPICS_HELP = "topic specs TOML (unset: the packaged kafka_topics.toml)"
_RUN_DIR_HELP = (
    "dir for logs, pids, MQTT data and the object store, kept on exit (unset: a temp dir)"
)
_DURABLE_HELP = (
    "keep Kafka's log in the embedded object store (<run-dir>/store), so that it survives "
    "a crash; 'no' (or --memory) keeps it in memory"
)
_TASK_PARTITIONS_HELP = (
    "partitions of the tasks and results topics; at least the number of gateways that "
    "share the namespace, since a gateway beyond it reads nothing (unset: the topics file's)"
)
_Subparsers = argparse._SubParsersAction  # argparse has no public name for it


def add_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``brokers up`` and ``brokers bootstrap`` to a top-level CLI's subparsers."""
    parser = subparsers.add_parser("brokers", help="run embedded brokers or bootstrap topics")
    commands = parser.add_subparsers(dest="brokers_command", required=True, metavar="COMMAND")
    _add_up(commands)
    _add_bootstrap(commands)
    return parser


def _add_up(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    up = commands.add_parser(
        "up",
        help="start an object store, Tansu and Mosquitto on free loopback ports until Ctrl-C",
        description="Start embedded brokers, create the namespace's topics, print the "
        "connection settings as export lines, restart any broker that dies on its own "
        "port, and stop cleanly on Ctrl-C or SIGTERM.",
    )
    add_namespace_option(up)
    add_option(up, "--run-dir", "PARKPOOL_RUN_DIR", None, _RUN_DIR_HELP)
    add_option(up, "--durable", "PARKPOOL_DURABLE", True, _DURABLE_HELP, boolean)
    up.add_argument("--memory", dest="durable", action="store_false", help="same as --durable no")
    _add_topic_options(up)
    up.set_defaults(func=run_up)


def _add_bootstrap(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    bootstrap_parser = commands.add_parser(
        "bootstrap",
        help="create or check the namespace's Kafka topics (idempotent)",
        description="Create the namespace's Kafka topics on any Kafka-compatible cluster; "
        "existing topics are kept and only ever grown to the spec's partition count.",
    )
    add_kafka_options(bootstrap_parser)
    add_namespace_option(bootstrap_parser)
    _add_topic_options(bootstrap_parser)
    bootstrap_parser.add_argument("--json", action="store_true", help="print one JSON object")
    bootstrap_parser.set_defaults(func=run_bootstrap)


def _add_topic_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--topics-file", "PARKPOOL_TOPICS_FILE", None, _TOPICS_HELP)
    add_option(
        parser,
        "--task-partitions",
        "PARKPOOL_TASK_PARTITIONS",
        None,
        _TASK_PARTITIONS_HELP,
        positive_int,
    )


def _specs(args: argparse.Namespace) -> tuple[TopicSpec, ...]:
    """The topic specs the options ask for: the file's, with the task partitions set."""
    return with_task_partitions(load_specs(args.topics_file), args.task_partitions)


def run_up(args: argparse.Namespace) -> int:
    """Start brokers, bootstrap topics, print exports, and keep the brokers running until
    Ctrl-C/SIGTERM; exits 1 if a broker keeps dying."""
    try:
        logs.configure()
        namespace = check_namespace(args.namespace)
        specs = _specs(args)
        stop = stop_event()
        with EmbeddedBrokers(args.run_dir, durable=args.durable) as brokers:
            bootstrap(brokers.kafka_bootstrap, namespace, specs=specs)
            counts = partition_counts(brokers.kafka_bootstrap, namespace)
            _print_exports(brokers, namespace)

            def after_restart(name: str) -> None:
                if name == "tansu":
                    _check_topics(brokers, namespace, specs, counts)

            Supervisor(brokers, on_restart=after_restart).run(stop)
            print("stopping brokers", file=sys.stderr)
    except (ParkpoolError, ValueError, OSError) as exc:  # OSError: the run dir, a log file
        print(f"parkpool brokers up: {exc}", file=sys.stderr)
        return 1
    return 0


def partition_counts(kafka_bootstrap: str, namespace: str) -> dict[str, int]:
    """Partitions of each of the namespace's topics (0: the topic does not exist)."""
    try:
        metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    except KafkaException as exc:
        raise BrokerError(f"Kafka at {kafka_bootstrap} did not list its topics: {exc}") from exc
    found = metadata.topics
    return {t: len(found[t].partitions) if t in found else 0 for t in KafkaTopics(namespace).all()}


def _check_topics(
    brokers: EmbeddedBrokers, namespace: str, specs: tuple[TopicSpec, ...], counts: dict[str, int]
) -> None:
    """After Tansu restarts: refuse to go on if any topic has other partitions than
    before (keys would move), before changing anything durable. A Kafka in memory comes
    back empty, so its missing topics are created again first (a client may already
    have made some of them on its own, which the same bootstrap brings to size)."""
    kafka = brokers.kafka_bootstrap
    now = _patiently(lambda: partition_counts(kafka, namespace))
    recreated = not brokers.durable and any(count == 0 for count in now.values())
    if recreated:
        _patiently(lambda: bootstrap(kafka, namespace, specs=specs))
        now = _patiently(lambda: partition_counts(kafka, namespace))
    if now != counts:
        raise BrokerError(f"partition counts changed across a Kafka restart: {counts} -> {now}")
    if recreated:
        print("Kafka restarted in memory: its records are gone, topics recreated", file=sys.stderr)


def _patiently(call: Callable[[], T], patience_s: float = RESTART_PATIENCE_S) -> T:
    """``call``'s answer, asked again for a while: a Tansu just restarted can refuse a
    request or two (seen: "Unknown broker error" on CreateTopics while its store was
    busy), and ``brokers up`` must not exit on that."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except BrokerError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("topics_check_retry", error=str(exc))
            time.sleep(1.0)


def run_bootstrap(args: argparse.Namespace) -> int:
    """Create or grow the topics of ``--namespace`` on ``--kafka-bootstrap``."""
    try:
        specs = _specs(args)
        changed = bootstrap(
            args.kafka_bootstrap,
            check_namespace(args.namespace),
            specs=specs,
            kafka_config=dict(args.kafka_config),
            max_record_bytes=args.kafka_max_record_bytes,
        )
    except (ParkpoolError, ValueError) as exc:
        print(f"parkpool brokers bootstrap: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"namespace": args.namespace, "created_or_grown": list(changed)}))
        return 0
    for topic in changed:
        print(f"created or grew {topic}")
    if not changed:
        print("all topics already in place")
    return 0


def _print_exports(brokers: EmbeddedBrokers, namespace: str) -> None:
    # stdout carries only the export lines, so it can be captured or eval'd.
    print(f"export PARKPOOL_KAFKA_BOOTSTRAP={brokers.kafka_bootstrap}")
    print(f"export PARKPOOL_MQTT_HOST={brokers.mqtt_host}")
    print(f"export PARKPOOL_MQTT_PORT={brokers.mqtt_port}")
    print(f"export PARKPOOL_NAMESPACE={namespace}")
    print(f"export PARKPOOL_STORE_ENDPOINT={brokers.store_endpoint}")
    print(f"export PARKPOOL_STORE_BUCKET={brokers.data_bucket}")
    print(f"export PARKPOOL_STORE_ACCESS_KEY={brokers.store_access_key}")
    print(f"export PARKPOOL_STORE_SECRET_KEY={brokers.store_secret_key}", flush=True)
    kafka = "durable, in <run-dir>/store" if brokers.durable else "in memory"
    print(f"brokers up (logs in {brokers.run_dir}; Kafka {kafka}); Ctrl-C to stop", file=sys.stderr)
