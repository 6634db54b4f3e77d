# SPDX-License-Identifier: Apache-2.0
"""``parkpool keys generate DIR``: a task-signing key pair for gateways and vehicles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parkpool.signing import generate


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="task-signing keys")
    actions = keys.add_subparsers(dest="action", required=True)
    gen = actions.add_parser("generate", help="write NAME.key (private, 0600) and NAME.pub")
    gen.add_argument("directory", type=Path)
    gen.add_argument("--name", default="task-signing")
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    private, public = generate(args.directory, args.name)
    print(f"private key (gateways: --signing-key): {private}")
    print(f"public key (vehicles: --trusted-keys): {public}")
    return 0
