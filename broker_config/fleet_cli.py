# SPDX-License-Identifier: Apache-2.0
"""``parkpool fleet enroll|revoke|gateway``: per-vehicle MQTT identities.

``enroll`` creates a vehicle's credentials and prints its password once, for the car's
secure storage; ``revoke`` removes them, so its next connection is refused. Both make
Mosquitto re-read its files when ``--broker-pid`` is given (SIGHUP).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from parkpool.broker_config.auth import AuthStore
from parkpool.runtime.settings import add_option


def add_parser(subparsers: Any) -> None:
    fleet = subparsers.add_parser("fleet", help="per-vehicle MQTT identities")
    actions = fleet.add_subparsers(dest="action", required=True)
    for name, helptext, func in (
        ("enroll", "create a vehicle's credentials; prints its password", run_enroll),
        ("revoke", "remove a vehicle's credentials; its next connection is refused", run_revoke),
        ("gateway", "create a gateway identity (may use every topic)", run_gateway),
    ):
        action = actions.add_parser(name, help=helptext)
        action.add_argument("identity", help="the vehicle id (or gateway user name)")
        add_option(action, "--auth-dir", "PARKPOOL_AUTH_DIR", "", "the auth store directory")
        add_option(
            action, "--broker-pid", "PARKPOOL_BROKER_PID", 0, "Mosquitto to reload (SIGHUP)", int
        )
        action.set_defaults(func=func)


def _store(args: argparse.Namespace) -> AuthStore:
    if not args.auth_dir:
        raise SystemExit("parkpool fleet: --auth-dir (or PARKPOOL_AUTH_DIR) is required")
    return AuthStore(Path(args.auth_dir)).init()


def _reload(args: argparse.Namespace) -> None:
    if args.broker_pid:
        os.kill(args.broker_pid, signal.SIGHUP)


def run_enroll(args: argparse.Namespace) -> int:
    store = _store(args)
    print(store.enroll_vehicle(args.identity))
    print(f"result-signing key: {store.signing_key(args.identity)}", file=sys.stderr)
    _reload(args)
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    print(_store(args).add_gateway(args.identity))
    _reload(args)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    existed = _store(args).revoke(args.identity)
    _reload(args)
    if not existed:
        print(f"{args.identity} was not enrolled")
        return 1
    return 0
