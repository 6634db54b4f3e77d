# SPDX-License-Identifier: Apache-2.0
"""``parkpool fleet quarantine list|show|release``: cars caught returning wrong results.

Reads the reputation topic from its beginning (schemas.reputation). ``release`` gives a
car work again as a new car (its record starts over, so it is checked closely until it
earns trust again); to take a car out for good, revoke its credentials with
``parkpool fleet revoke`` as well (docs/OPERATIONS.md, "A quarantined car").
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from parkpool.runtime.reputation import CarRecord, ReputationBook, ReputationReader, release
from parkpool.runtime.settings import add_kafka_options, add_namespace_option, kafka_from_args
from parkpool.schemas.errors import BrokerError
from parkpool.schemas.topics import KafkaTopics

NOT_FOUND = 3
READ_TIMEOUT_S = 30.0


def add_parser(fleet_actions: Any) -> None:
    quarantine = fleet_actions.add_parser("quarantine", help="cars caught returning wrong results")
    actions = quarantine.add_subparsers(dest="quarantine_action", required=True)
    listing = _action(actions, "list", "the quarantined cars", run_list)
    listing.add_argument("--all", action="store_true", help="every car with a record")
    show = _action(actions, "show", "one car's record and the evidence against it", run_show)
    show.add_argument("vehicle_id")
    freed = _action(actions, "release", "give a car work again, as a new car", run_release)
    freed.add_argument("vehicle_id")
    freed.add_argument("--note", default="", help="why, recorded with the release")


def _action(actions: Any, name: str, what: str, func: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=what, description=what)
    add_kafka_options(parser)
    add_namespace_option(parser)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
    parser.set_defaults(func=func)
    return parser


def _book(args: argparse.Namespace, *, whole: bool = False) -> ReputationBook:
    """The fleet's records as read from the topic; ``whole``: refuse to go on with less
    than all of it (a release decided on part of it would answer "not quarantined"
    wrongly, or write an old generation)."""
    book = ReputationBook()
    topic = KafkaTopics(args.namespace).reputation
    reader = ReputationReader(kafka_from_args(args), topic, book)
    reader.start()
    try:
        if not reader.caught_up.wait(READ_TIMEOUT_S):
            partial = f"{topic} not read to its end in {READ_TIMEOUT_S:.0f} s"
            if whole:
                raise BrokerError(f"{partial}; nothing was changed")
            print(f"warning: {partial}", file=sys.stderr)
    finally:
        reader.stop()
    return book


def as_dict(record: CarRecord) -> dict[str, Any]:
    notice = record.quarantine
    return {
        "vehicle_id": record.vehicle_id,
        "state": "quarantined" if record.quarantined else ("trusted" if record.trusted else "new"),
        "generation": record.generation,
        "valid": record.valid,
        "invalid": record.invalid,
        "unchecked": record.unchecked,
        "since": notice.at if notice is not None else None,
        "by": notice.by if notice is not None else None,
        "evidence": [
            {
                "job_id": e.job_id,
                "chunk_id": e.chunk_id,
                "check": e.check.value,
                "detail": e.detail,
                "at": e.at,
            }
            for e in (notice.evidence if notice is not None and record.quarantined else ())
        ],
    }


def _line(row: dict[str, Any]) -> str:
    since = _utc(row["since"]) if row["since"] else "-"
    counts = f"valid {row['valid']}, invalid {row['invalid']}, unchecked {row['unchecked']}"
    return f"{row['vehicle_id']:<24} {row['state']:<12} since {since}  {counts}"


def run_list(args: argparse.Namespace) -> int:
    book = _book(args)
    cars = book.cars() if args.all else book.quarantined_cars()
    rows = [as_dict(book.record(car)) for car in cars]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print("\n".join(_line(row) for row in rows) or "no car is quarantined")
    return 0


def run_show(args: argparse.Namespace) -> int:
    book = _book(args)
    if args.vehicle_id not in book.cars():
        print(f"{args.vehicle_id}: no record on the reputation topic", file=sys.stderr)
        return NOT_FOUND
    row = as_dict(book.record(args.vehicle_id))
    if args.json:
        print(json.dumps(row))
        return 0
    print(_line(row))
    if row["by"]:
        print(f"  by: {row['by']}")
    for item in row["evidence"]:
        where = f"job {item['job_id']} chunk {item['chunk_id']}"
        print(f"  evidence: {where}, {item['check']} check: {item['detail']}")
    return 0


def _user() -> str:
    """Who released the car, for the record; containers often have no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_release(args: argparse.Namespace) -> int:
    book = _book(args, whole=True)
    if not book.record(args.vehicle_id).quarantined:
        print(f"{args.vehicle_id} is not quarantined", file=sys.stderr)
        return NOT_FOUND
    topic = KafkaTopics(args.namespace).reputation
    who = f"operator {_user()}"
    notice = release(kafka_from_args(args), topic, book, args.vehicle_id, who, args.note)
    if args.json:
        print(json.dumps({"vehicle_id": notice.vehicle_id, "generation": notice.generation}))
    else:
        print(
            f"{args.vehicle_id} released; it starts again as a new car (generation "
            f"{notice.generation}) and is checked closely until it earns trust"
        )
    return 0


def _utc(unix: float) -> str:
    """A notice's time; one no calendar holds (a broken clock's) is shown as its number."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))
    except (OverflowError, OSError, ValueError):
        return repr(unix)
