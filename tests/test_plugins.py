# SPDX-License-Identifier: Apache-2.0
"""Kernel packages: found through entry points, pinned and signed by the operator, and
run by a car only when its signed manifest approves exactly those files.

The example package (examples/parkpool-train) is installed with pip; whatever loads a
plugin runs in a child process, so the test process's kernel registry stays the
built-ins'.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from parkpool.app.cli import main as cli_main
from parkpool.runtime.kernel_manifest import read_verified
from parkpool.runtime.plugins import content_hash, installed, resolve
from parkpool.runtime.signing import generate
from parkpool.schemas.errors import ConfigError, ValidationError
from parkpool.schemas.kernels_builtin import BUILTINS
from parkpool.schemas.plugins import KernelApproval, KernelManifest, KernelPlugin
from parkpool.worker.kernels import REGISTRY
from tests.plugin_packages import (
    EXAMPLE,
    IMPORT_MARKER,
    child_env,
    marker_package,
    pip_install,
)

# A car's start, in a child: load what the manifest approves, then run the plugin once
# on NumPy and compare it with its own reference. Prints one JSON object.
CAR = textwrap.dedent("""\
    import json, sys
    from pathlib import Path
    import numpy as np
    from parkpool.worker.backend import select_backend
    from parkpool.worker.kernel_loading import load_from_files
    from parkpool.worker.kernels import REGISTRY, execute, reference

    manifest = Path(sys.argv[1]) if sys.argv[1] else None
    load = load_from_files(manifest, [Path(p) for p in sys.argv[2:]])
    report = {
        "loaded": list(load.loaded),
        "refused": {r.name: r.reason for r in load.refused},
        "registry": sorted(REGISTRY),
    }
    if "softmax_grad" in load.loaded:
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((64, 9)), rng.standard_normal((9, 4))
        inputs = {"x": x, "y": rng.integers(0, 4, 64), "w": w}
        got = execute("softmax_grad", {}, inputs, select_backend("numpy"))
        want = reference("softmax_grad", {}, inputs)
        report["matches"] = REGISTRY["softmax_grad"].matches(got, want)
    print(json.dumps(report))
    """)


def run_car(env: dict[str, str], manifest: Path | None, *keys: Path) -> dict[str, Any]:
    argv = [sys.executable, "-c", CAR, str(manifest or ""), *map(str, keys)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


def parkpool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "parkpool", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example kernel package, installed with pip into a folder of its own."""
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("example") / "site")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fleet operator's manifest key pair."""
    return generate(tmp_path_factory.mktemp("keys"), "manifest")


@pytest.fixture(scope="module")
def approved(
    example: Path, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The manifest an operator makes on a machine with the example installed: pinned,
    then signed, each with the CLI."""
    folder = tmp_path_factory.mktemp("manifest")
    env = child_env(example)
    pinned = parkpool(env, "kernels", "pin", str(folder / "pinned.json"))
    assert pinned.returncode == 0, pinned.stderr
    signed = folder / "signed.json"
    done = parkpool(
        env,
        "kernels",
        "sign",
        str(folder / "pinned.json"),
        "--key",
        str(keys[0]),
        "--output",
        str(signed),
    )
    assert done.returncode == 0, done.stderr
    return signed


@pytest.fixture
def on_path(example: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example on this process's sys.path, for reading metadata only."""
    monkeypatch.syspath_prepend(str(example))
    yield example


class TestDeclarations:
    def test_builtins_are_declared_as_entry_points_too(self) -> None:
        # Given parkpool installed, When its kernel entry points are read
        ours = {k.name: k.ref for k in installed() if k.package == "parkpool"}
        # Then each built-in is declared there, naming its declaration in kernels_builtin
        assert set(ours) == set(BUILTINS)
        assert all(ref.endswith(f":{name.upper()}") for name, ref in ours.items())
        # And the car's registry runs exactly the functions each declaration names
        for name, plugin in BUILTINS.items():
            assert REGISTRY[name].fn is resolve(plugin.device)
            assert REGISTRY[name].reference_fn is resolve(plugin.reference)

    def test_a_plugin_is_found_without_importing_it(self, on_path: Path) -> None:
        # Given the example on sys.path, When entry points are listed and its files hashed
        (found,) = [k for k in installed() if k.name == "softmax_grad"]
        assert found.dist is not None
        digest = content_hash(found.dist)
        # Then package and version come from its metadata, and nothing of it was imported
        assert (found.package, found.version) == ("parkpool-train", "0.1.0")
        assert len(digest) == 64
        assert "parkpool_train" not in sys.modules

    @pytest.mark.parametrize(
        "change",
        [{"planner": "no module"}, {"device": "x:"}, {"reference": ""}, {"cupy": "a.b"}],
    )
    def test_a_declaration_names_its_code_as_module_and_object(
        self, change: dict[str, str]
    ) -> None:
        # When a declaration names code any other way, Then it is refused at once
        names = {"planner": "a:b", "device": "a:b", "reference": "a:b"} | change
        with pytest.raises(ValidationError) as caught:
            KernelPlugin(BUILTINS["gemm"].spec, **names)
        assert caught.value.reason == "bad_plugin"


class TestContentHash:
    def test_bytecode_does_not_change_it_but_any_shipped_byte_does(
        self, on_path: Path, tmp_path: Path
    ) -> None:
        # Given the example's hash
        (found,) = [k for k in installed() if k.name == "softmax_grad"]
        assert found.dist is not None
        before = content_hash(found.dist)
        cache = on_path / "parkpool_train" / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "device.cpython-311.pyc").write_bytes(b"not shipped")
        # When bytecode appears (a car imported it), Then the hash is the same
        assert content_hash(found.dist) == before
        # When a shipped file changes by one byte, Then it is not, and restored, it is
        device = on_path / "parkpool_train" / "device.py"
        original = device.read_bytes()
        device.write_bytes(original + b"\n")
        try:
            assert content_hash(found.dist) != before
        finally:
            device.write_bytes(original)
        assert content_hash(found.dist) == before


class TestManifest:
    def test_pin_sign_and_verify(self, approved: Path, keys: tuple[Path, Path]) -> None:
        # Given the manifest the CLI pinned and signed, When a car reads it with the key
        manifest = read_verified(approved, [keys[1]])
        # Then it approves exactly the example, by package, version and hash
        (entry,) = manifest.approvals
        assert (entry.name, entry.package, entry.version) == (
            "softmax_grad",
            "parkpool-train",
            "0.1.0",
        )

    def test_another_key_or_a_changed_body_does_not_verify(
        self, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given a key that did not sign it, Then the manifest does not verify with it
        _, stranger = generate(tmp_path, "stranger")
        with pytest.raises(ConfigError, match="does not verify"):
            read_verified(approved, [stranger])
        # Given a copy whose body was edited after signing (another hash approved)
        document = json.loads(approved.read_text())
        document["manifest"]["kernels"][0]["sha256"] = "0" * 64
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps(document))
        # Then it does not verify with the key that signed the original
        with pytest.raises(ConfigError, match="does not verify"):
            read_verified(edited, [keys[1]])

    @pytest.mark.parametrize(
        ("content", "why"),
        [
            ("{", "not JSON"),
            ("[]", "not a signed manifest"),
            ('{"signature": "zz", "manifest": {"kernels": []}}', "not hex"),
            ('{"signature": "00", "manifest": {"kernels": [{"name": "x"}]}}', "malformed"),
            ('{"signature": "00", "manifest": {"kernels": 3}}', "kernels list"),
        ],
    )
    def test_a_malformed_file_is_a_clear_error(
        self, content: str, why: str, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # When a car is given a file that is not a signed manifest, Then it says why
        path = tmp_path / "manifest.json"
        path.write_text(content)
        with pytest.raises(ConfigError, match=why):
            read_verified(path, [keys[1]])

    def test_a_manifest_needs_a_key_to_check_it(self, approved: Path) -> None:
        with pytest.raises(ConfigError, match="no --kernel-keys"):
            read_verified(approved, [])

    def test_approvals_are_checked_when_made(self) -> None:
        # When an approval has a bad hash or a name is approved twice, Then it is refused
        with pytest.raises(ValidationError, match="64 hex"):
            KernelApproval("k", "p", "1", "abc")
        twice = KernelApproval("k", "p", "1", "a" * 64)
        with pytest.raises(ValidationError, match="twice"):
            KernelManifest((twice, twice))


class TestCarLoading:
    def test_an_approved_package_runs_and_matches_its_reference(
        self, example: Path, approved: Path, keys: tuple[Path, Path]
    ) -> None:
        # When a car starts with the signed manifest and its key
        report = run_car(child_env(example), approved, keys[1])
        # Then the plugin is registered beside the built-ins and computes its reference
        assert report["loaded"] == ["softmax_grad"] and report["refused"] == {}
        assert set(report["registry"]) == {*BUILTINS, "softmax_grad"}
        assert report["matches"] is True

    def test_without_a_manifest_only_builtins_run(self, example: Path) -> None:
        report = run_car(child_env(example), None)
        assert report["loaded"] == []
        assert report["refused"] == {"softmax_grad": "not_allowlisted"}
        assert set(report["registry"]) == set(BUILTINS)

    def test_an_altered_package_is_refused_and_never_imported(
        self, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given the approved example installed again, with one file changed afterwards
        site = pip_install(EXAMPLE, tmp_path / "site")
        init = site / "parkpool_train" / "__init__.py"
        init.write_text(
            f'open(__file__ + ".{IMPORT_MARKER}", "w").write("ran")\n' + init.read_text()
        )
        # When a car starts with the manifest
        report = run_car(child_env(site), approved, keys[1])
        # Then it refuses the package by its hash, and none of its code ran
        assert report["refused"] == {"softmax_grad": "hash_mismatch"}
        assert not list(site.rglob(f"*{IMPORT_MARKER}"))

    def test_a_missing_file_unapproved_or_builtin_name_are_refused(
        self, example: Path, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given the example with a file deleted, a package the manifest does not name,
        # and one that claims a built-in's name (both would leave a marker on import)
        broken = pip_install(EXAMPLE, tmp_path / "broken")
        (broken / "parkpool_train" / "planner.py").unlink()
        stranger = pip_install(
            marker_package(tmp_path, name="stranger-kernels", kernel="stranger"),
            tmp_path / "stranger",
        )
        usurper = pip_install(
            marker_package(tmp_path, name="usurper-kernels", kernel="gemm"),
            tmp_path / "usurper",
        )
        # When cars start with the manifest
        missing = run_car(child_env(broken), approved, keys[1])
        others = run_car(child_env(example, stranger, usurper), approved, keys[1])
        # Then each is refused with its own reason, and no unapproved code was imported
        assert missing["refused"] == {"softmax_grad": "files_missing"}
        assert others["loaded"] == ["softmax_grad"]
        assert others["refused"] == {"stranger": "not_allowlisted", "gemm": "name_taken"}
        assert not list(tmp_path.rglob(IMPORT_MARKER))

    def test_another_version_is_refused(self, keys: tuple[Path, Path], tmp_path: Path) -> None:
        # Given a manifest approving version 1.0 of a package, and 2.0 installed
        site = pip_install(
            marker_package(tmp_path, name="versioned", kernel="versioned", version="2.0"),
            tmp_path / "site",
        )
        manifest = KernelManifest((KernelApproval("versioned", "versioned", "1.0", "a" * 64),))
        pinned = tmp_path / "pinned.json"
        pinned.write_text(json.dumps(manifest.to_json()))
        signed = tmp_path / "signed.json"
        assert (
            cli_main(
                ["kernels", "sign", str(pinned), "--key", str(keys[0]), "--output", str(signed)]
            )
            == 0
        )
        # When a car starts, Then it refuses the other version without importing it
        report = run_car(child_env(site), signed, keys[1])
        assert report["refused"] == {"versioned": "version_mismatch"}
        assert not list(site.rglob(IMPORT_MARKER))

    def test_a_manifest_that_does_not_verify_stops_the_car(
        self, example: Path, approved: Path, tmp_path: Path
    ) -> None:
        # Given a key that did not sign the manifest
        _, stranger = generate(tmp_path, "stranger")
        # When a car starts, Then it exits with the reason instead of running without it
        argv = ["sim", "--vehicles", "1", "--kernel-manifest", str(approved)]
        done = parkpool(child_env(example), *argv, "--kernel-keys", str(stranger))
        assert done.returncode == 2
        assert "does not verify" in done.stderr


class TestOnlyApprovedFilesAreImported:
    """Ways to run other code under an approved package's name, each refused before
    anything of it runs (every planted module would leave a marker when imported)."""

    PLANTED = f'open(__file__ + ".{IMPORT_MARKER}", "w").write("ran")\n'

    def test_a_module_added_inside_the_package(
        self, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given the approved package with a folder added that would shadow device.py
        site = pip_install(EXAMPLE, tmp_path / "site")
        planted = site / "parkpool_train" / "device"
        planted.mkdir()
        (planted / "__init__.py").write_text(self.PLANTED)
        # When a car starts, Then the files on disk no longer hash as approved
        report = run_car(child_env(site), approved, keys[1])
        assert report["refused"] == {"softmax_grad": "hash_mismatch"}
        assert not list(tmp_path.rglob(f"*{IMPORT_MARKER}"))

    def test_a_package_of_the_same_name_earlier_on_the_path(
        self, example: Path, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given a bare parkpool_train folder, no metadata, before the approved install
        shadow = tmp_path / "shadow" / "parkpool_train"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(self.PLANTED)
        # When a car starts, Then the declaration would come from elsewhere: refused
        report = run_car(child_env(tmp_path / "shadow", example), approved, keys[1])
        assert report["refused"] == {"softmax_grad": "shadowed"}
        assert not list(tmp_path.rglob(f"*{IMPORT_MARKER}"))

    def test_a_forged_second_copy_of_the_package_metadata(
        self, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given beside the approved install a forged metadata folder: same name, version
        # and RECORD, but an entry point naming another module
        site = pip_install(EXAMPLE, tmp_path / "site")
        real = next(site.glob("parkpool_train-*.dist-info"))
        forged = site / "aaa-0.dist-info"
        forged.mkdir()
        for name in ("METADATA", "RECORD"):
            (forged / name).write_bytes((real / name).read_bytes())
        (forged / "entry_points.txt").write_text(
            "[parkpool.kernels]\nsoftmax_grad = evil_kernels:PLUGIN\n"
        )
        (site / "evil_kernels.py").write_text(self.PLANTED)
        # When a car starts, Then the name is declared twice and neither is loaded
        report = run_car(child_env(site), approved, keys[1])
        assert report["refused"] == {"softmax_grad": "name_taken"}
        assert report["loaded"] == []
        assert not list(tmp_path.rglob(f"*{IMPORT_MARKER}"))

    def test_unreadable_metadata_is_refused_and_commands_still_work(
        self, example: Path, approved: Path, keys: tuple[Path, Path], tmp_path: Path
    ) -> None:
        # Given a half-installed kernel package: entry points, but METADATA without a name
        broken = tmp_path / "broken" / "half-1.0.dist-info"
        broken.mkdir(parents=True)
        (broken / "METADATA").write_text("Metadata-Version: 2.1\n")
        (broken / "entry_points.txt").write_text("[parkpool.kernels]\nhalf = half:PLUGIN\n")
        env = child_env(tmp_path / "broken", example)
        # When a car starts, Then it is refused by name and the approved one still runs
        report = run_car(env, approved, keys[1])
        assert report["loaded"] == ["softmax_grad"]
        assert list(report["refused"].values()) == ["bad_metadata"]
        # And every command still starts: the list names the unreadable package
        listing = parkpool(env, "kernels", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        errors = [k["error"] for k in json.loads(listing.stdout)["kernels"] if "error" in k]
        assert len(errors) == 1 and "half-1.0.dist-info" in errors[0]
        assert parkpool(env, "submit", "--help").returncode == 0


def test_a_folder_on_the_path_twice_is_one_package(
    example: Path, approved: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    # Given the approved install reached through two sys.path entries: the folder, and
    # a link to it (Python drops only entries spelled the same)
    link = tmp_path / "link"
    link.symlink_to(example, target_is_directory=True)
    # When a car starts, Then it is one declaration, approved and loaded
    report = run_car(child_env(example, link), approved, keys[1])
    assert report["loaded"] == ["softmax_grad"] and report["refused"] == {}
