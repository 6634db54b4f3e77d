# SPDX-License-Identifier: Apache-2.0
"""``parkpool submit KERNEL --input NAME=PATH --param NAME=VALUE --output PATH``: the
user's own data in, the answer out, and every mistake a one-line error before anything
connects. Also the progress display ``submit`` and ``wait`` share."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text

from parkpool.producer import cli
from parkpool.producer.cli_inputs import (
    check_output,
    load_array,
    own_plan,
    parse_value,
    save_answer,
)
from parkpool.producer.jobs import JobState, Progress
from parkpool.producer.splitters import KMeansStep
from parkpool.schemas.errors import ConfigError

# Nothing listens here: a command that tried to reach Kafka would hang or fail on it.
NO_KAFKA = "127.0.0.1:9"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parkpool.app.cli", *args],
        env=env or {**os.environ, "PARKPOOL_KAFKA_BOOTSTRAP": NO_KAFKA},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class TestParamValues:
    """A --param value is an int, then a float, true/false, a number list, else a string."""

    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("512", 512),
            ("-3", -3),
            ("0.25", 0.25),
            ("1e-3", 0.001),
            ("true", True),
            ("false", False),
            ("1,0,-2.5", [1, 0, -2.5]),
            ("3,", [3]),
            ("sum", "sum"),
            ("1,a", "1,a"),
            ("call", "call"),
        ],
    )
    def test_parsed_in_order(self, text: str, value: Any) -> None:
        # When the value is parsed, Then it has the first type it fits, exactly
        parsed = parse_value(text)
        assert parsed == value
        assert type(parsed) is type(value)


class TestInputFiles:
    """--input reads plain arrays from .npy and .npz files, and never unpickles."""

    def test_npy_and_npz_members_load(self, tmp_path: Path) -> None:
        # Given an array saved as .npy, and in a .npz with two and with one member
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.save(tmp_path / "x.npy", x)
        np.savez(tmp_path / "two.npz", a=x, b=x * 2)
        np.savez(tmp_path / "one.npz", only=x + 1)
        # When each is read, Then it is the array that was saved
        assert np.array_equal(load_array("x", str(tmp_path / "x.npy")), x)
        assert np.array_equal(load_array("x", f"{tmp_path / 'two.npz'}:b"), x * 2)
        assert np.array_equal(load_array("x", str(tmp_path / "one.npz")), x + 1)

    @pytest.mark.parametrize(
        ("make", "spec", "said"),
        [
            (None, "missing.npy", "no such file"),
            ("pickle", "obj.npy", "holds Python objects (a pickle)"),
            ("text", "notes.npy", "not a .npy or .npz file"),
            ("two", "two.npz", "name one of its arrays as FILE.npz:KEY (it holds a, b)"),
            ("two", "two.npz:c", "it holds a, b"),
            ("short", "cut.npy", "not a valid .npy array"),
        ],
    )
    def test_bad_files_are_refused_by_flag_and_file(
        self, tmp_path: Path, make: str | None, spec: str, said: str
    ) -> None:
        # Given a file that is no plain array (or no file at all)
        if make == "pickle":
            objects = np.array([{"a": 1}], dtype=object)
            np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
        elif make == "text":
            (tmp_path / "notes.npy").write_text("hello")
        elif make == "two":
            np.savez(tmp_path / "two.npz", a=np.ones(2), b=np.ones(3))
        elif make == "short":
            (tmp_path / "cut.npy").write_bytes(np.lib.format.MAGIC_PREFIX)
        # When it is read, Then the error names the flag, the file and what is wrong
        with pytest.raises(ConfigError) as caught:
            load_array("x", str(tmp_path / spec))
        message = str(caught.value)
        assert message.startswith(f"--input x={tmp_path / spec}: ")
        assert said in message
        assert "\n" not in message


class TestOwnPlan:
    """The flags become the planner's keyword arguments, checked against its signature."""

    def test_inputs_and_params_make_the_plan(self, tmp_path: Path) -> None:
        # Given an array file
        x = np.linspace(-1, 1, 2500)
        np.save(tmp_path / "x.npy", x)
        # When a reduce is planned from it with two params
        plan = own_plan("reduce", [f"x={tmp_path / 'x.npy'}"], ["op=max", "chunk_elems=1000"])
        # Then the chunks hold the file's data, split as asked
        assert plan.kernel == "reduce"
        assert [c.params for c in plan.chunks] == [{"op": "max"}] * 3
        assert np.array_equal(np.concatenate([c.inputs["x"] for c in plan.chunks]), x)

    def test_a_list_argument_takes_one_input_per_item(self, tmp_path: Path) -> None:
        # Given one layer's weights and bias (mlp takes lists of them)
        rng = np.random.default_rng(1)
        np.save(tmp_path / "x.npy", rng.standard_normal((8, 4)).astype(np.float32))
        np.save(tmp_path / "w.npy", rng.standard_normal((4, 3)).astype(np.float32))
        np.save(tmp_path / "b.npy", rng.standard_normal(3).astype(np.float32))
        files = [f"{name}={tmp_path / file}" for name, file in
                 (("x", "x.npy"), ("weights", "w.npy"), ("biases", "b.npy"))]  # fmt: skip
        # When it is planned with a single --input for each list
        plan = own_plan("mlp", files, [])
        # Then the planner got a list of one layer
        assert plan.kernel == "mlp"
        assert set(plan.chunks[0].inputs) == {"x", "w0", "b0"}

    @pytest.mark.parametrize(
        ("inputs", "params", "said"),
        [
            (["y=x.npy"], [], "--input y: reduce has no 'y'; it takes x, op, chunk_elems"),
            (["x=x.npy"], ["tile=4"], "--param tile: reduce has no 'tile'"),
            ([], ["op=sum"], "reduce needs x: give --input NAME=FILE.npy"),
            (["x=x.npy"], ["op=sum", "op=max"], "--param op: op is given more than once"),
            (["x=x.npy"], ["op"], "--param 'op': expected NAME=VALUE"),
            (["x=x.npy"], ["op=median"], "reduce refused the --input/--param values: unknown_op"),
            (["x=x.npy"], ["chunk_elems=0"], "reduce refused the --input/--param values: bad"),
        ],
    )
    def test_mistakes_are_usage_errors(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        inputs: list[str],
        params: list[str],
        said: str,
    ) -> None:
        # Given an array file in the working folder
        monkeypatch.chdir(tmp_path)
        np.save("x.npy", np.ones(10))
        # When the flags name the wrong things, Then a one-line ConfigError says which
        with pytest.raises(ConfigError, match="^" + re.escape(said)):
            own_plan("reduce", inputs, params)


class TestOutputFile:
    """--output is checked before the job, and holds exactly the answer."""

    def test_a_number_is_a_0d_array_and_parts_go_to_a_npz(self, tmp_path: Path) -> None:
        # When a float answer and an answer with parts are saved
        save_answer(tmp_path / "sum.npy", 12.5)
        step = KMeansStep(np.ones((2, 3)), np.array([4, 6]), 1.5)
        save_answer(tmp_path / "step.npz", step)
        # Then the float reads back as a 0-d array, and the parts by name
        total = np.load(tmp_path / "sum.npy", allow_pickle=False)
        assert (total.shape, float(total)) == ((), 12.5)
        with np.load(tmp_path / "step.npz", allow_pickle=False) as parts:
            assert sorted(parts.files) == ["centroids", "counts", "inertia"]
            assert np.array_equal(parts["counts"], [4, 6])

    def test_paths_that_cannot_hold_the_answer_are_refused(self, tmp_path: Path) -> None:
        # Then a missing folder, a folder, and a .npy for an answer with parts are refused
        with pytest.raises(ConfigError, match="no folder"):
            check_output(tmp_path / "nowhere" / "c.npy", "reduce")
        with pytest.raises(ConfigError, match="is a folder"):
            check_output(tmp_path, "reduce")
        with pytest.raises(ConfigError, match=r"answer has parts .*give a \.npz"):
            check_output(tmp_path / "c.npy", "kmeans_step")
        check_output(tmp_path / "c.npz", "kmeans_step")


class TestUsageErrorsOffline:
    """Bad input exits 2 with one line on stderr, before any broker is reached."""

    @pytest.mark.parametrize(
        ("flags", "said"),
        [
            (["--input", "x=missing.npy"], "parkpool submit: --input x=missing.npy: no such file"),
            (["--input", "x=obj.npy"], "parkpool submit: --input x=obj.npy: holds Python objects"),
            (["--input", "x=x.npy", "--param", "chunk_elems"], "--param 'chunk_elems': expected"),
            (["--input", "x=x.npy", "--param", "op=avg"], "reduce refused the --input/--param"),
            (["--input", "x=x.npy", "--verify"], "--verify checks generated inputs"),
            (["--input", "x=x.npy", "--output", "no/c.npy"], "--output no/c.npy: no folder no"),
        ],
    )
    def test_exit_2_and_one_line(self, tmp_path: Path, flags: list[str], said: str) -> None:
        # Given an array and a pickled object array, and no Kafka to reach
        np.save(tmp_path / "x.npy", np.ones(4))
        np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
        # When submit is given them
        done = subprocess.run(
            [sys.executable, "-m", "parkpool.app.cli", "submit", "reduce", *flags],
            env={**os.environ, "PARKPOOL_KAFKA_BOOTSTRAP": NO_KAFKA},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Then it is a usage error: one line naming the flag, no traceback, no output
        assert done.returncode == 2, done.stderr
        assert said in done.stderr
        assert done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr
        assert done.stdout == ""


class _Handle:
    """A job handle that completes after a few polls, one more chunk each."""

    def __init__(self, total: int, answer: Any) -> None:
        self.total, self.answer, self.done = total, answer, 0
        self.lock = threading.Lock()

    @property
    def progress(self) -> Progress:
        state = JobState.DONE if self.done == self.total else JobState.RUNNING
        return Progress(state, self.done, self.total, 0, 1 if self.done else 0, 0)

    def wait(self, timeout: float) -> Any:
        if self.done == self.total:
            return self.answer
        self.done += 1
        raise TimeoutError


class TestProgress:
    """A rich bar on a terminal; a line at each quarter anywhere else."""

    def test_off_a_terminal_a_line_per_quarter(self, capsys: pytest.CaptureFixture[str]) -> None:
        # Given a job of 8 chunks, followed with stderr not a terminal
        handle = _Handle(8, "the answer")
        # When it is followed to its end
        answer = cli.follow(handle, timeout=30)  # type: ignore[arg-type]
        # Then the answer comes back, and stderr has one line per quarter reached
        assert answer == "the answer"
        lines = capsys.readouterr().err.splitlines()
        assert [line.split("] ")[1] for line in lines] == [
            "1/8 chunks, 1 dead-lettered",
            "2/8 chunks, 1 dead-lettered",
            "4/8 chunks, 1 dead-lettered",
            "6/8 chunks, 1 dead-lettered",
            "8/8 chunks, 1 dead-lettered",
        ]

    def test_on_a_terminal_a_rich_bar(self) -> None:
        # Given a rich bar on a terminal console
        out = io.StringIO()
        bar = cli._RichBar(Console(file=out, force_terminal=True, width=100))
        # When it is drawn at 3 of 4 chunks with a dead letter, and closed
        bar.draw(Progress(JobState.RUNNING, 3, 4, 0, 1, 0))
        bar.close()
        # Then the terminal shows the count and the dead letter, and the cursor again
        drawn = out.getvalue()
        shown = Text.from_ansi(drawn).plain
        assert "3/4 chunks, 1 dead-lettered" in shown
        assert drawn.endswith("\x1b[?25h")  # the cursor rich hid while drawing is back


def _env(brokers: Any, namespace: str) -> dict[str, str]:
    return {
        **os.environ,
        "PARKPOOL_KAFKA_BOOTSTRAP": brokers.kafka_bootstrap,
        "PARKPOOL_NAMESPACE": namespace,
    }


@pytest.mark.integration
class TestOwnDataOnBrokers:
    """The user's arrays go through the fleet and the answer saved is NumPy's."""

    def test_reduce_and_poly_from_files(
        self,
        gateway_factory: Any,
        fleet_factory: Any,
        brokers: Any,
        namespace: str,
        tmp_path: Path,
    ) -> None:
        # Given a gateway, two cars, and an array in a .npy file
        gateway_factory()
        fleet_factory(2)
        x = np.random.default_rng(7).standard_normal(5000)
        np.save(tmp_path / "x.npy", x)
        env = _env(brokers, namespace)
        # When a reduce of it is submitted with params and an output file
        reduce = run_cli(
            "submit", "reduce", "--input", f"x={tmp_path / 'x.npy'}",
            "--param", "op=sumsq", "--param", "chunk_elems=1000",
            "--output", str(tmp_path / "sumsq.npy"), "--json",
            env=env,
        )  # fmt: skip
        # Then it completes in the asked chunks, and the saved answer is NumPy's
        assert reduce.returncode == 0, reduce.stderr
        summary = json.loads(reduce.stdout)
        assert (summary["chunks"], summary["output"]) == (5, str(tmp_path / "sumsq.npy"))
        saved = np.load(tmp_path / "sumsq.npy", allow_pickle=False)
        assert saved.shape == ()
        assert float(saved) == pytest.approx(float(np.sum(x * x)), rel=1e-12)
        # When a polynomial over the same file is submitted, from a .npz member this time
        np.savez(tmp_path / "in.npz", points=x, other=np.ones(2))
        poly = run_cli(
            "submit", "poly", "--input", f"x={tmp_path / 'in.npz'}:points",
            "--param", "coeffs=0.5,-1,2", "--param", "chunk_elems=2500",
            "--output", str(tmp_path / "y.npy"),
            env=env,
        )  # fmt: skip
        # Then every element is NumPy's value of the polynomial there
        assert poly.returncode == 0, poly.stderr
        assert json.loads(poly.stdout)["chunks"] == 2
        y = np.load(tmp_path / "y.npy", allow_pickle=False)
        np.testing.assert_allclose(y, np.polyval([0.5, -1, 2], x), rtol=1e-12)

    def test_no_wait_json_then_wait_json(
        self,
        gateway_factory: Any,
        fleet_factory: Any,
        brokers: Any,
        namespace: str,
        tmp_path: Path,
    ) -> None:
        # Given a gateway, a car, and an array file
        gateway_factory()
        fleet_factory(1)
        np.save(tmp_path / "x.npy", np.arange(3000, dtype=np.float64))
        env = _env(brokers, namespace)
        # When it is submitted without waiting, for a script
        submitted = run_cli(
            "submit", "reduce", "--input", f"x={tmp_path / 'x.npy'}",
            "--param", "chunk_elems=1000", "--no-wait", "--json",
            env=env,
        )  # fmt: skip
        # Then the job id comes as JSON
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        # And `wait --json` follows it by that id to its end
        waited = run_cli("wait", job_id, "--json", env=env)
        assert waited.returncode == 0, waited.stderr
        summary = json.loads(waited.stdout)
        assert (summary["job_id"], summary["state"], summary["done"]) == (job_id, "done", 3)
