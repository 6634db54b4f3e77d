# SPDX-License-Identifier: Apache-2.0
"""``parkpool brokers``: run embedded brokers, or bootstrap topics on any Kafka.

``parkpool brokers up`` prints ``export`` lines for the other commands, then holds the
brokers until Ctrl-C or SIGTERM; ``parkpool brokers bootstrap`` is safe to re-run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from schemas.errors import ParkpoolError
from schemas.topics import DEFAULT_NAMESPACE, check_namespace

from .launcher import EmbeddedBrokers
from .topics import bootstrap, load_specs

__all__ = ["add_parser", "main", "run_bootstrap", "run_up"]

_TOPICS_HELP = "topic specs TOML (unset: the packaged kafka_topics.toml)"
_RUN_DIR_HELP = "dir for logs, pids and MQTT data, kept on exit (unset: a temp dir)"
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
        help="start Tansu and Mosquitto on free loopback ports until Ctrl-C",
        description="Start embedded brokers, create the namespace's topics, print the "
        "connection settings as export lines, and stop cleanly on Ctrl-C or SIGTERM.",
    )
    _option(up, "--namespace", "PARKPOOL_NAMESPACE", DEFAULT_NAMESPACE, "topic namespace")
    _option(up, "--run-dir", "PARKPOOL_RUN_DIR", None, _RUN_DIR_HELP)
    _option(up, "--topics-file", "PARKPOOL_TOPICS_FILE", None, _TOPICS_HELP)
    up.set_defaults(func=run_up)


def _add_bootstrap(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    bootstrap_parser = commands.add_parser(
        "bootstrap",
        help="create or grow the namespace's Kafka topics (idempotent)",
        description="Create the namespace's Kafka topics on any Kafka-compatible cluster; "
        "existing topics are kept and only ever grown to the spec's partition count.",
    )
    _option(
        bootstrap_parser,
        "--kafka-bootstrap",
        "PARKPOOL_KAFKA_BOOTSTRAP",
        None,
        "Kafka bootstrap servers, host:port[,...]",
        required=True,
    )
    _option(
        bootstrap_parser, "--namespace", "PARKPOOL_NAMESPACE", DEFAULT_NAMESPACE, "topic namespace"
    )
    _option(bootstrap_parser, "--topics-file", "PARKPOOL_TOPICS_FILE", None, _TOPICS_HELP)
    bootstrap_parser.set_defaults(func=run_bootstrap)


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: str | None,
    what: str,
    *,
    required: bool = False,
) -> None:
    """An option whose default comes from ``env``; --help shows both."""
    value = os.environ.get(env, default)
    shown = "required" if required else f"default: {default}" if default else ""
    suffix = f"; {shown}" if shown else ""
    # Required only when the environment does not supply it either.
    parser.add_argument(
        flag, default=value, required=required and value is None, help=f"{what} (env {env}{suffix})"
    )


def run_up(args: argparse.Namespace) -> int:
    """Start brokers, bootstrap topics, print exports, and wait for Ctrl-C/SIGTERM."""
    try:
        namespace = check_namespace(args.namespace)
        specs = load_specs(args.topics_file)
        with EmbeddedBrokers(args.run_dir) as brokers:
            bootstrap(brokers.kafka_bootstrap, namespace, specs=specs)
            _print_exports(brokers, namespace)
            _wait_for_stop_signal()
            print("stopping brokers", file=sys.stderr)
    except (ParkpoolError, ValueError) as exc:
        print(f"parkpool brokers up: {exc}", file=sys.stderr)
        return 1
    return 0


def run_bootstrap(args: argparse.Namespace) -> int:
    """Create or grow the topics of ``--namespace`` on ``--kafka-bootstrap``."""
    try:
        specs = load_specs(args.topics_file)
        changed = bootstrap(args.kafka_bootstrap, check_namespace(args.namespace), specs=specs)
    except (ParkpoolError, ValueError) as exc:
        print(f"parkpool brokers bootstrap: {exc}", file=sys.stderr)
        return 1
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
    print(f"export PARKPOOL_NAMESPACE={namespace}", flush=True)
    print(f"brokers up (logs in {brokers.run_dir}); Ctrl-C to stop", file=sys.stderr)


def _wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM; turning both into an event keeps shutdown orderly."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {
        sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        stop.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m broker_config.cli brokers up``)."""
    parser = argparse.ArgumentParser(prog="parkpool")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
