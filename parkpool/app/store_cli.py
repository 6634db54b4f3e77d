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
import math
from typing import Any

from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.settings import add_option, add_store_options, store_from_args
from parkpool.schemas import ConfigError

JOBS_PREFIX = "jobs/"
_TTL_HELP = "objects of jobs older than this are left over by a crashed client"
# In the lifecycle command's help and output: the rule may keep objects past the TTL.
_WHOLE_DAYS = (
    "S3 lifecycle rules count whole days and expire at the next midnight UTC, later still"
    " as the store gets to it, so objects may stay up to about two days longer"
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("store", help="object store housekeeping: sweep, lifecycle")
    commands = p.add_subparsers(dest="store_command", required=True)
    sweep = commands.add_parser("sweep", help="delete job objects older than a TTL")
    lifecycle = commands.add_parser("lifecycle", help="set the bucket's expiry rule on jobs/")
    for command, ttl_help in (
        (sweep, _TTL_HELP),
        (lifecycle, f"{_TTL_HELP}; rounded up to whole days ({_WHOLE_DAYS})"),
    ):
        add_store_options(command)
        add_option(command, "--ttl-hours", "PARKPOOL_STORE_TTL_HOURS", 48.0, ttl_help, float)
        command.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(func=run_sweep)
    lifecycle.set_defaults(func=run_lifecycle)


def _store(args: argparse.Namespace) -> BlobStore:
    if not 0 < args.ttl_hours < math.inf:  # NaN too
        raise ConfigError("--ttl-hours must be a positive number of hours")
    return BlobStore(store_from_args(args))


def run_sweep(args: argparse.Namespace) -> int:
    logs.configure()
    deleted = _store(args).sweep(JOBS_PREFIX, args.ttl_hours * 3600)
    if args.json:
        print(json.dumps({"prefix": JOBS_PREFIX, "deleted": deleted, "ttl_hours": args.ttl_hours}))
    else:
        print(f"deleted {deleted} job objects older than {args.ttl_hours:g} h")
    return 0


def expire_days(ttl_hours: float) -> int:
    """The whole days of a lifecycle rule that keeps objects at least ``ttl_hours``:
    rounded up, since expiring a live job's inputs early fails the job, while keeping a
    crashed client's leftovers up to a day longer only costs storage."""
    return max(1, math.ceil(ttl_hours / 24))


def run_lifecycle(args: argparse.Namespace) -> int:
    logs.configure()
    store = _store(args)
    days = expire_days(args.ttl_hours)
    store.expire_after(JOBS_PREFIX, days)
    if args.json:
        print(json.dumps({"prefix": JOBS_PREFIX, "expire_days": days, "ttl_hours": args.ttl_hours}))
    else:
        written = f"{days} day(s) after they were written"
        print(
            f"objects under {JOBS_PREFIX} now expire {written}, for a TTL of {args.ttl_hours:g} h"
        )
        print(f"({_WHOLE_DAYS} than asked)")
    return 0
