# SPDX-License-Identifier: Apache-2.0
"""Vendor the OpenAPI schemas of the custom resources deploy/kubernetes uses.

kubernetes-validate knows only Kubernetes' own kinds, so the Strimzi, Prometheus
Operator and EMQX resources are checked against their operators' CRD schemas, kept in
deploy/kubernetes/crd-schemas/ (descriptions dropped: they are most of the bytes).

    python -m deploy.gen.crds CRD.yaml [CRD.yaml ...]

writes one ``<kind>.<group>.<version>.json`` per served version of each CRD given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parent.parent / "kubernetes" / "crd-schemas"


def schema_path(api_version: str, kind: str) -> Path:
    """Where the schema of ``kind`` in ``group/version`` is kept."""
    group, _, version = api_version.rpartition("/")
    return SCHEMAS / f"{kind.lower()}.{group}.{version}.json"


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def vendor(crd_file: Path) -> list[Path]:
    """Write the schema of every served version in ``crd_file``; the paths written."""
    crd = yaml.safe_load(crd_file.read_text())
    spec = crd["spec"]
    written = []
    for version in spec["versions"]:
        if not version.get("served"):
            continue
        schema = _without_descriptions(version["schema"]["openAPIV3Schema"])
        path = schema_path(f"{spec['group']}/{version['name']}", spec["names"]["kind"])
        path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    SCHEMAS.mkdir(parents=True, exist_ok=True)
    for name in argv:
        for path in vendor(Path(name)):
            print(path.relative_to(SCHEMAS.parent.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
