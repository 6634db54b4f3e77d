# SPDX-License-Identifier: Apache-2.0
"""``parkpool keys generate DIR``: a task-signing key pair (Ed25519) for gateways and
vehicles, or with ``--box`` the gateways' box key pair (X25519) for confidential jobs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from parkpool.runtime.sealing import generate_box_key
from parkpool.runtime.signing import generate
from parkpool.schemas.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="task-signing and confidential-job keys")
    actions = keys.add_subparsers(dest="action", required=True)
    gen = actions.add_parser("generate", help="write NAME.key (private, 0600) and NAME.pub")
    gen.add_argument("directory", type=Path)
    gen.add_argument("--name", default="", help="default: task-signing, or gateway-box")
    gen.add_argument(
        "--box",
        action="store_true",
        help="an X25519 box key for confidential jobs instead of a signing key",
    )
    gen.add_argument(
        "--force",
        action="store_true",
        help="replace a key pair already there (every holder of the old one must get the new)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    name = args.name or ("gateway-box" if args.box else "task-signing")
    try:
        _refuse_to_replace(args.directory, name, args.force)
        if args.box:
            private, public = generate_box_key(args.directory, name)
            uses = ("gateways: --box-key", "producers: --gateway-box-key")
        else:
            private, public = generate(args.directory, name)
            uses = ("gateways: --signing-key", "vehicles: --trusted-keys")
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair in {args.directory}: {exc}") from None
    if args.json:
        kind = "box" if args.box else "signing"
        print(json.dumps({"kind": kind, "private_key": str(private), "public_key": str(public)}))
    else:
        print(f"private key ({uses[0]}): {private}")
        print(f"public key ({uses[1]}): {public}")
    return 0


def _refuse_to_replace(directory: Path, name: str, force: bool) -> None:
    """A fleet's key pair is not replaced by a command run twice: cars would refuse the
    gateways' signatures, or sealed jobs no longer open."""
    there = [p for p in (directory / f"{name}.key", directory / f"{name}.pub") if p.exists()]
    if there and not force:
        raise ConfigError(
            f"{there[0]} exists; a new key pair would replace it for every holder: "
            "pass --force to replace it, or --name for another pair"
        )
