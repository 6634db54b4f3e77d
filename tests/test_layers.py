# SPDX-License-Identifier: Apache-2.0
"""Imports flow one way: the application above the roles, the roles above the runtime
and the wire contract, no role into another, and no circles.

Read from the source with ``ast`` (nothing is imported), so a violation fails here even
when it sits behind ``TYPE_CHECKING`` or inside a function.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "parkpool"
ROLES = ("producer", "gateway", "worker", "broker_config")
# The names the roles had before they moved under parkpool; none may be imported again.
OLD_TOP_LEVEL = {"schemas", *ROLES}
# Higher may import lower, never the other way; roles sit side by side on one level.
LEVELS = {"contract": 0, "runtime": 1, "role": 2, "app": 3}


def layer_of(module: str) -> tuple[str, str]:
    """(layer, part) of a parkpool module; the part tells roles apart."""
    parts = module.split(".")
    second = parts[1] if len(parts) > 1 else ""
    if second == "schemas":
        return "contract", second
    if second == "runtime":
        return "runtime", second
    if second in ROLES:
        return "role", second
    return "app", second  # parkpool itself, parkpool.__main__ and parkpool.app


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, through the role links."""
    found: dict[str, Path] = {}
    for path in python_files(PACKAGE):
        dotted = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(dotted[:-1] if dotted[-1] == "__init__" else dotted)
        found[name] = path
    return found


def python_files(folder: Path) -> list[Path]:
    """Every .py file below ``folder``; unlike Path.rglob on 3.11, this follows links."""
    return sorted(
        Path(directory, name)
        for directory, _dirs, names in os.walk(folder, followlinks=True)
        if "__pycache__" not in directory
        for name in names
        if name.endswith(".py")
    )


MODULES = module_files()


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``module`` imports (resolved, relative imports too) and its line."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in MODULES else base), node.lineno


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def edges() -> Iterator[tuple[str, str, int]]:
    for module, path in MODULES.items():
        for target, line in imports_of(module, path):
            if target.split(".")[0] == "parkpool":
                yield module, target, line


def _nearest_module(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


class TestLayers:
    """Each import goes down or sideways within a layer, never up, never role to role."""

    def test_every_module_is_classified(self) -> None:
        assert len(MODULES) > 80  # the link-following walk found the roles
        assert {layer_of(m)[0] for m in MODULES} == set(LEVELS)

    def test_no_import_goes_up(self) -> None:
        upward = [
            f"{MODULES[src].relative_to(ROOT)}:{line} imports {dst}"
            for src, dst, line in edges()
            if LEVELS[layer_of(dst)[0]] > LEVELS[layer_of(src)[0]]
        ]
        assert upward == []

    def test_no_role_imports_another(self) -> None:
        across = [
            f"{MODULES[src].relative_to(ROOT)}:{line} imports {dst}"
            for src, dst, line in edges()
            if layer_of(src)[0] == layer_of(dst)[0] == "role"
            and layer_of(src)[1] != layer_of(dst)[1]
        ]
        assert across == []

    def test_no_circles(self) -> None:
        graph: dict[str, set[str]] = {m: set() for m in MODULES}
        for src, dst, _line in edges():
            target = _nearest_module(dst)
            if target != src:
                graph[src].add(target)
        circles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
        assert circles == []


class TestOneNamespace:
    """Nothing, tests included, imports the roles by their old top-level names."""

    @pytest.mark.parametrize(
        "folder", [PACKAGE, ROOT / "tests"], ids=lambda p: p.relative_to(ROOT).as_posix()
    )
    def test_no_old_top_level_imports(self, folder: Path) -> None:
        old = [
            f"{path.relative_to(ROOT)}:{line} imports {target}"
            for path in python_files(folder)
            for target, line in imports_of("tests.x", path)
            if target.split(".")[0] in OLD_TOP_LEVEL
        ]
        assert old == []

    def test_role_folders_are_linked_into_the_package(self) -> None:
        for name in ("schemas", *ROLES):
            link = PACKAGE / name
            assert link.is_symlink(), f"parkpool/{name} should link to ../{name}"
            assert link.resolve() == (ROOT / name).resolve()


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so a deep import chain cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start, targets in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(targets)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found
