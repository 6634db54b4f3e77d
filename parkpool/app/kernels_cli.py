# SPDX-License-Identifier: Apache-2.0
"""``parkpool kernels``: list installed kernel packages, pin them, sign the fleet manifest.

An operator approves kernels on a machine holding exactly the packages the cars will
get: ``pin`` writes each plugin kernel's package, version and content hash, the operator
reads it, and ``sign`` signs it with the manifest key whose public half the cars trust
(``--kernel-keys``). Nothing here imports a kernel package.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from parkpool.runtime.kernel_manifest import read_unsigned, read_verified, signed
from parkpool.runtime.plugins import InstalledKernel, canonical, content_hash, installed
from parkpool.schemas.errors import ConfigError, ValidationError
from parkpool.schemas.kernels_builtin import PACKAGE
from parkpool.schemas.plugins import KernelApproval, KernelManifest


def add_parser(subparsers: Any) -> None:
    kernels = subparsers.add_parser("kernels", help="kernel packages and the fleet manifest")
    actions = kernels.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every installed kernel, with its package")
    listing.add_argument("--manifest", type=Path, help="also say what this manifest decides")
    listing.add_argument("--keys", default="", help="public key files the manifest must verify")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    listing.set_defaults(func=run_list)
    pin = actions.add_parser("pin", help="write an unsigned manifest approving the plugins here")
    pin.add_argument("output", type=Path)
    pin.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    pin.add_argument("--json", action="store_true", help="print the manifest as JSON")
    pin.set_defaults(func=run_pin)
    sign = actions.add_parser("sign", help="sign a pinned manifest for the fleet")
    sign.add_argument("manifest", type=Path, help="as kernels pin wrote it")
    sign.add_argument("--key", type=Path, required=True, help="private key (keys generate)")
    sign.add_argument("--output", type=Path, required=True, help="the signed manifest file")
    sign.add_argument("--json", action="store_true", help="print one JSON object")
    sign.set_defaults(func=run_sign)


def run_list(args: argparse.Namespace) -> int:
    manifest = None
    if args.manifest is not None:
        keys = [Path(p) for p in args.keys.split(",") if p.strip()]
        manifest = read_verified(args.manifest, keys)
    rows = [_row(kernel, manifest) for kernel in installed()]
    if args.json:
        print(json.dumps({"kernels": rows}))
        return 0
    for row in rows:
        verdict = f"  [{row['approved']}]" if "approved" in row else ""
        broken = f"  [unreadable: {row['error']}]" if "error" in row else ""
        print(f"{row['name']:<16} {row['package']} {row['version']}{verdict}{broken}")
    return 0


def _row(kernel: InstalledKernel, manifest: KernelManifest | None) -> dict[str, Any]:
    if kernel.error:
        return {"name": "?", "package": "?", "version": "?", "error": kernel.error}
    builtin = canonical(kernel.package) == PACKAGE
    row: dict[str, Any] = {
        "name": kernel.name,
        "package": kernel.package,
        "version": kernel.version,
        "builtin": builtin,
    }
    if manifest is not None:
        row["approved"] = "built-in" if builtin else _verdict(kernel, manifest)
    return row


def _verdict(kernel: InstalledKernel, manifest: KernelManifest) -> str:
    approval = manifest.approval(kernel.name)
    if approval is None or canonical(approval.package) != canonical(kernel.package):
        return "not_allowlisted"
    if approval.version != kernel.version:
        return "version_mismatch"
    return "approved" if _hash(kernel) == approval.sha256 else "hash_mismatch"


def run_pin(args: argparse.Namespace) -> int:
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    found = installed()
    broken = [k.error for k in found if k.error]
    if broken:
        raise ConfigError(f"cannot pin: unreadable package metadata: {broken}")
    plugins = [k for k in found if canonical(k.package) != PACKAGE]
    chosen = [k for k in plugins if not wanted or k.name in wanted]
    unknown = wanted - {k.name for k in plugins}
    if unknown:
        raise ConfigError(f"--only: no installed kernel package declares {sorted(unknown)}")
    twice = sorted({k.name for k in chosen if [c.name for c in chosen].count(k.name) > 1})
    if twice:
        raise ConfigError(f"cannot pin: more than one package declares {twice}")
    try:
        approvals = tuple(KernelApproval(k.name, k.package, k.version, _hash(k)) for k in chosen)
        manifest = KernelManifest(approvals, issued_at=round(time.time(), 3))
    except ValidationError as exc:
        raise ConfigError(f"cannot pin: {exc}") from None
    args.output.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    if args.json:
        print(json.dumps(manifest.to_json()))
    else:
        for a in approvals:
            print(f"pinned {a.name}: {a.package} {a.version} sha256 {a.sha256}")
        print(f"wrote {args.output}; review it, then: parkpool kernels sign {args.output} ...")
    return 0


def _hash(kernel: InstalledKernel) -> str:
    if kernel.dist is None:
        raise ConfigError(f"{kernel.name}: no package metadata to hash")
    try:
        return content_hash(kernel.dist)
    except ValidationError as exc:
        raise ConfigError(f"{kernel.name}: {exc}") from None


def run_sign(args: argparse.Namespace) -> int:
    document = signed(read_unsigned(args.manifest), args.key)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps({"output": str(args.output), "public_key": document["public_key"]}))
    else:
        print(f"signed {args.output} with the key whose public half is {document['public_key']}")
        print("cars: --kernel-manifest with --kernel-keys naming that public key's file")
    return 0
