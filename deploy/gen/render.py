# SPDX-License-Identifier: Apache-2.0
"""Deterministic YAML: keys in the order written, multi-line strings as blocks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no types
    """A SafeDumper that writes strings with newlines as ``|`` blocks, and a value used
    twice twice (no anchors: kustomize and readers alike expect plain manifests)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(document: Any) -> str:
    return str(yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True))


def documents(head: str, docs: Iterable[Any]) -> str:
    """``head`` then every document, separated by ``---``."""
    return head + "".join(f"---\n{to_yaml(d)}" for d in docs)


def meta(name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A resource's metadata: its name and the labels every parkpool resource carries."""
    made: dict[str, Any] = {"name": name, "labels": {**PART_OF, **(labels or {})}}
    return {**made, **extra}


PART_OF = {"app.kubernetes.io/part-of": "parkpool"}
# What a cell's pods are labelled with, and the name Kubernetes service discovery gives
# that pod label (characters other than letters, digits and `_` become `_`).
CELL_LABEL = "parkpool.io/cell"
CELL_META = "__meta_kubernetes_pod_label_parkpool_io_cell"
