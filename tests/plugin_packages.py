# SPDX-License-Identifier: Apache-2.0
"""Kernel packages for the plugin tests, installed with pip as a car or a user would.

Each is installed into its own folder (``pip install --target``), so a test puts it on a
child process's PYTHONPATH and nothing leaks into the test process or the virtualenv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "parkpool-train"
# What a package that runs code on import leaves behind: proof it was imported.
IMPORT_MARKER = "imported.marker"


def pip_install(source: Path, target: Path) -> Path:
    """Build and install ``source`` into ``target`` (no network: its only build
    requirement, setuptools, is in the virtualenv), from a copy so the source tree
    gets no build folders."""
    build = target.parent / f"{target.name}-src"
    shutil.copytree(source, build, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    argv += ["--no-build-isolation", "--target", str(target), str(build)]
    subprocess.run(argv, check=True, capture_output=True, timeout=180)
    return target


def marker_package(root: Path, *, name: str, kernel: str, version: str = "1.0") -> Path:
    """The source of a kernel package whose import writes IMPORT_MARKER beside it."""
    module = name.replace("-", "_")
    source = root / f"{name}-src-tree"
    (source / module).mkdir(parents=True)
    (source / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"

        [project.entry-points."parkpool.kernels"]
        {kernel} = "{module}:PLUGIN"

        [tool.setuptools]
        packages = ["{module}"]
        """)
    )
    (source / module / "__init__.py").write_text(
        textwrap.dedent(f"""\
        from pathlib import Path

        Path(__file__).with_name("{IMPORT_MARKER}").write_text("ran")
        PLUGIN = None  # not a KernelPlugin: loading it must fail, if it is ever imported
        """)
    )
    return source


def child_env(*paths: Path) -> dict[str, str]:
    """The environment of a child that sees the packages installed at ``paths``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, paths))
    return env
