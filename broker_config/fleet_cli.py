# SPDX-License-Identifier: Apache-2.0
"""``parkpool fleet enroll|revoke|gateway``: per-vehicle MQTT identities.

``enroll`` creates a vehicle's credentials: it prints the password once, writes the
password and the car's private result-signing key to ``--car-dir`` for the hand-over to
the car's secure storage, and keeps only the password's hash and the public key.
``revoke`` removes them, so its next connection is refused. Both make Mosquitto re-read
its files when ``--broker-pid`` is given (SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from parkpool.broker_config.auth import AuthStore
from parkpool.runtime.settings import add_option
from parkpool.schemas.errors import BrokerError, ConfigError


def add_parser(subparsers: Any) -> Any:
    """The ``fleet`` command; returns its actions, for commands other layers add."""
    fleet = subparsers.add_parser("fleet", help="per-vehicle identities and quarantine")
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
        if name == "enroll":
            add_option(
                action,
                "--car-dir",
                "PARKPOOL_CAR_DIR",
                "",
                "where the car's password and private result key are written (0600), one "
                "folder per car, for the hand-over; move them to the car, then delete them",
            )
        action.add_argument("--json", action="store_true", help="print one JSON object")
        action.set_defaults(func=func)
    return actions


def _store(args: argparse.Namespace) -> AuthStore:
    if not args.auth_dir:
        raise ConfigError("--auth-dir (or PARKPOOL_AUTH_DIR) is required")
    _check_broker(args.broker_pid)  # before any credential changes
    store = AuthStore(Path(args.auth_dir)).init()
    if store.legacy_secrets is not None:
        print(
            f"warning: {store.legacy_secrets} holds plaintext passwords and keys from an "
            "older parkpool; hand them to their cars, then delete the folder",
            file=sys.stderr,
        )
    return store


def _check_broker(pid: int) -> None:
    """A ``--broker-pid`` must name a running Mosquitto: SIGHUP's default action ends a
    process, and -1 would signal every process of the user (a pid left from before a
    supervisor restart may belong to anything now)."""
    if not pid:
        return
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip() if pid > 0 else ""
    except OSError:
        comm = ""
    if not comm.startswith("mosquitto"):
        raise ConfigError(f"--broker-pid {pid} is not a running Mosquitto; nothing was changed")


def _reload(args: argparse.Namespace) -> None:
    if args.broker_pid:
        try:
            os.kill(args.broker_pid, signal.SIGHUP)
        except OSError as exc:
            raise BrokerError(
                f"the credentials changed, but Mosquitto (pid {args.broker_pid}) was not "
                f"told to reload: {exc}; send it SIGHUP"
            ) from None


def run_enroll(args: argparse.Namespace) -> int:
    if not args.car_dir:
        raise ConfigError("--car-dir (or PARKPOOL_CAR_DIR) is required: the car's secrets go there")
    car = _store(args).enroll_vehicle(args.identity, Path(args.car_dir))
    # Printed before the reload: the password is shown this once, even if that fails.
    if args.json:
        identity = {"identity": args.identity, "password": car.password()}
        print(json.dumps(identity | {"car_dir": str(car.directory)}), flush=True)
    else:
        print(car.password(), flush=True)
        print(f"the car's credentials, for its secure storage: {car.directory}", file=sys.stderr)
    _reload(args)
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    password = _store(args).add_gateway(args.identity)
    print(json.dumps({"identity": args.identity, "password": password}) if args.json else password)
    _reload(args)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    existed = _store(args).revoke(args.identity)
    # Said before the reload, as enroll does: the revocation stands even if that fails.
    if args.json:
        print(json.dumps({"identity": args.identity, "revoked": existed}), flush=True)
    elif not existed:
        print(f"{args.identity} was not enrolled", flush=True)
    _reload(args)
    return 0 if existed else 1
