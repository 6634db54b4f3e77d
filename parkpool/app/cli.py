# SPDX-License-Identifier: Apache-2.0
"""``parkpool``: one command line, one subcommand per role."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from confluent_kafka import KafkaError, KafkaException

from parkpool.app import capacity, demo, kernels_cli, keys_cli, quarantine_cli, store_cli, top
from parkpool.broker_config import cli as brokers_cli
from parkpool.broker_config import fleet_cli
from parkpool.gateway import cli as gateway_cli
from parkpool.producer import cli as producer_cli
from parkpool.producer import dlq_cli
from parkpool.schemas import ParkpoolError
from parkpool.worker import cli as worker_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parkpool",
        description="Turn idle, parked electric cars into a GPU worker pool.",
        epilog="Every option can also be set through the environment variable shown.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    brokers_cli.add_parser(commands)
    gateway_cli.add_parser(commands)
    worker_cli.add_parser(commands)
    producer_cli.add_parser(commands)
    dlq_cli.add_parser(commands)
    top.add_parser(commands)
    keys_cli.add_parser(commands)
    kernels_cli.add_parser(commands)
    quarantine_cli.add_parser(fleet_cli.add_parser(commands))
    demo.add_parser(commands)
    capacity.add_parser(commands)
    store_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
    except ParkpoolError as exc:
        print(f"parkpool {args.command}: {exc}", file=sys.stderr)
        return 2
    except KafkaException as exc:
        # A Kafka client that refused its settings (--kafka-config) or got no answer
        # where no role wrapped it: one line, as a BrokerError's.
        error = exc.args[0] if exc.args else exc
        detail = error.str() if isinstance(error, KafkaError) else str(error)
        print(f"parkpool {args.command}: Kafka: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parkpool {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read our output went away (`| head`): nothing more to say, and the
        # exit-time flush of stdout must not raise again.
        with contextlib.suppress(OSError, ValueError):  # (a stdout with no descriptor)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
