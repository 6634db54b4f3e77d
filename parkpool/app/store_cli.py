# SPDX-License-Identifier: Apache-2.0
"""``parkpool store``: the object store's housekeeping.

A job's objects are deleted by its SDK client when the job ends. A client that crashed
first leaves them behind; on AWS S3, MinIO or Ceph a lifecycle rule on ``jobs/`` expires
them (``parkpool store lifecycle`` sets one), and where the store has none (the embedded
one) ``parkpool store sweep``, run from a timer, does the same.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.settings import add_option, add_store_options, store_from_args
from parkpool.schemas import ConfigError

JOBS_PREFIX = "jobs/"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("store", help="object store housekeeping: sweep, lifecycle")
    commands = p.add_subparsers(dest="store_command", required=True)
    sweep = commands.add_parser("sweep", help="delete job objects older than a TTL")
    lifecycle = commands.add_parser("lifecycle", help="set the bucket's expiry rule on jobs/")
    for command in (sweep, lifecycle):
        add_store_options(command)
        add_option(
            command,
            "--ttl-hours",
            "PARKPOOL_STORE_TTL_HOURS",
            48.0,
            "objects of jobs older than this are left over by a crashed client",
            float,
        )
        command.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(func=run_sweep)
    lifecycle.set_defaults(func=run_lifecycle)


def _store(args: argparse.Namespace) -> BlobStore:
    if args.ttl_hours <= 0:
        raise ConfigError("--ttl-hours must be positive")
    return BlobStore(store_from_args(args))


def run_sweep(args: argparse.Namespace) -> int:
    logs.configure()
    deleted = _store(args).sweep(JOBS_PREFIX, args.ttl_hours * 3600)
    if args.json:
        print(json.dumps({"prefix": JOBS_PREFIX, "deleted": deleted, "ttl_hours": args.ttl_hours}))
    else:
        print(f"deleted {deleted} job objects older than {args.ttl_hours:g} h")
    return 0


def run_lifecycle(args: argparse.Namespace) -> int:
    logs.configure()
    days = max(1, round(args.ttl_hours / 24))  # S3 expiry counts whole days
    _store(args).expire_after(JOBS_PREFIX, days)
    if args.json:
        print(json.dumps({"prefix": JOBS_PREFIX, "expire_days": days}))
    else:
        print(f"objects under {JOBS_PREFIX} now expire {days} day(s) after they were written")
    return 0
