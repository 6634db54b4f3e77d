# SPDX-License-Identifier: Apache-2.0
"""The wheel, as a systemd unit or a container installs it: built from the tracked tree,
installed without ``-e`` into a clean virtualenv, and run with no repository on sys.path.

Everything else in the suite runs from the editable install, which would hide a module
the wheel leaves out or a top-level name it installs besides ``parkpool``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD_NAMES = ("schemas", "producer", "gateway", "worker", "broker_config")

pytestmark = pytest.mark.integration


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run outside the repository, with nothing from this process's environment that
    could put the repository on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


def tracked_tree(target: Path) -> Path:
    """The files git tracks (or would: new, not ignored), links kept as links, and no
    build/ left over from an earlier build to smuggle deleted modules into the wheel."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source, copy = ROOT / name, target / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted in the working tree, not yet in the index
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy, follow_symlinks=False)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tracked_tree(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(tree)],
        cwd=out,
    )  # fmt: skip
    (built,) = out.glob("parkpool-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel (with the embedded Kafka) and its dependencies."""
    home = tmp_path_factory.mktemp("venv")
    # Without a pip of its own (ensurepip takes seconds): this pip installs into it.
    venv.EnvBuilder(with_pip=False, clear=True).create(home)
    python = str(home / "bin" / "python")
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", f"{wheel}[embedded]"],
        home,
    )
    return home


class TestWheelContents:
    """The wheel holds one top-level name, every subpackage, and its data files."""

    def test_one_top_level_name(self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
            assert archive.read(top_level).decode().split() == ["parkpool"]
        assert {n.split("/")[0] for n in names} == {
            "parkpool",
            wheel.name.split("-py3")[0] + ".dist-info",
        }

    def test_every_package_and_data_file(self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
        packages = {
            Path(directory).relative_to(ROOT).as_posix()
            for directory, _dirs, files in os.walk(ROOT / "parkpool", followlinks=True)
            if "__init__.py" in files
        }
        assert {f"parkpool/{name}" for name in OLD_NAMES} <= packages
        for package in packages:
            assert f"{package}/__init__.py" in names, package
        for data in (
            "parkpool/py.typed",
            "parkpool/schemas/asyncapi.yaml",
            "parkpool/broker_config/mosquitto.conf",
            "parkpool/broker_config/kafka_topics.toml",
            "parkpool/worker/owner_policy.toml",
            "parkpool/app/capacity_inputs.json",
        ):
            assert data in names


class TestInstalledWheel:
    """Installed alone, parkpool imports, helps, and runs a secured job end to end."""

    def test_imports_only_under_parkpool(self, installed: Path, tmp_path: Path) -> None:
        code = (
            "import parkpool, sys\n"
            "import parkpool.app.cli, parkpool.gateway.gateway, parkpool.worker.worker\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(OLD_NAMES)!r}))\n"
            "print(parkpool.__file__)\n"
            "print(parkpool.Client.__module__, parkpool.__version__)"
        )
        done = run([str(installed / "bin" / "python"), "-I", "-c", code], tmp_path)
        leaked, where, api = done.stdout.splitlines()
        assert leaked == "[]"
        assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(ROOT)
        assert api == "parkpool.producer.client 0.1.0"

    def test_help(self, installed: Path, tmp_path: Path) -> None:
        done = run([str(installed / "bin" / "parkpool"), "--help"], tmp_path)
        assert "usage: parkpool" in done.stdout and "demo" in done.stdout

    def test_capacity_reads_its_measured_inputs(self, installed: Path, tmp_path: Path) -> None:
        argv = [str(installed / "bin" / "parkpool"), "capacity", "--vehicles", "7000000"]
        done = run([*argv, "--json"], tmp_path)
        report = json.loads(done.stdout)
        assert report["new"]["cells"] > 1 and report["inputs"]["gateway_msgs_per_s"]["value"] > 0

    def test_demo_runs_a_job_end_to_end(self, installed: Path, tmp_path: Path) -> None:
        # Given only the installed package (the demo starts Tansu from the wheel's
        # embedded extra and the machine's Mosquitto, on free ports)
        argv = [str(installed / "bin" / "parkpool"), "demo", "--size", "128", "--tile", "64"]
        # When its demo runs a small confidential job on two cars
        done = run([*argv, "--vehicles", "2", "--timeout", "120"], tmp_path, timeout=300)
        # Then the answer checks out
        assert "CHECK PASSED" in done.stdout, done.stdout
