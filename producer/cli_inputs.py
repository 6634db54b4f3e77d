# SPDX-License-Identifier: Apache-2.0
"""The job ``parkpool submit`` sends: generated inputs (with NumPy's answer, for
``--verify``), or the user's own ``--input NAME=PATH`` arrays and ``--param NAME=VALUE``
options; and the ``--output`` file its answer goes to.

Everything here runs before the client connects, so a typo costs no broker, and every
mistake is a ConfigError whose one-line message names the flag and the file.
"""

from __future__ import annotations

import argparse
import inspect
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parkpool.producer import kernel_catalog
from parkpool.producer.plans import Array, JobPlan
from parkpool.producer.splitters import PLANNERS, KMeansStep, OptionPrice
from parkpool.schemas.errors import ConfigError, ValidationError

__all__ = [
    "check_output",
    "close_enough",
    "example_plan",
    "load_array",
    "own_plan",
    "parse_value",
    "save_answer",
    "submitted_job",
]

NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = b"PK\x03\x04"  # a .npz is a zip of .npy files
# A planner argument annotated so takes a list of arrays: one --input per item, in order.
ARRAY_LIST = "Sequence[Array]"
# Answers with several parts, which only a .npz holds.
PARTED_ANSWERS: Mapping[str, type] = {"kmeans_step": KMeansStep, "option_mc": OptionPrice}

# The kernels whose inputs submit can generate, with NumPy's answer for --verify.
EXAMPLES = ("gemm", "monte_carlo_pi", "poly", "reduce")

Number = int | float
Value = Number | bool | str | list[Number]


def submitted_job(args: argparse.Namespace) -> tuple[JobPlan[Any], Callable[[], Any] | None]:
    """The job's plan, and the NumPy answer for --verify (None: the user's own data).
    Read and checked before anything connects."""
    if args.output is not None:
        if args.no_wait:
            raise ConfigError("--output needs the answer: leave out --no-wait")
        check_output(args.output, args.kernel)
    if not (args.input or args.param):
        return example_plan(args)
    if args.verify:
        raise ConfigError("--verify checks generated inputs; leave it out with --input/--param")
    return own_plan(args.kernel, args.input, args.param), None


def example_plan(args: argparse.Namespace) -> tuple[JobPlan[Any], Any]:
    """Generated inputs for a kernel, and the NumPy answer to check against."""
    if args.kernel not in EXAMPLES:
        raise ConfigError(
            f"{args.kernel} has no generated example: give its arrays and options as "
            "--input NAME=FILE.npy and --param NAME=VALUE"
        )
    rng = np.random.default_rng(args.seed)
    if args.kernel == "gemm":
        a = rng.standard_normal((args.size, args.size), dtype=np.float32)
        b = rng.standard_normal((args.size, args.size), dtype=np.float32)
        plan = PLANNERS["gemm"](a, b, tile=args.tile, k_tile=args.k_tile)
        return plan, lambda: a @ b
    if args.kernel == "monte_carlo_pi":
        chunking = _chunking(args, "chunk_samples")
        plan = PLANNERS["monte_carlo_pi"](args.samples, seed=args.seed, **chunking)
        return plan, lambda: np.pi
    x = rng.standard_normal(args.size)
    if args.kernel == "poly":
        coeffs = [float(c) for c in args.coeffs.split(",")]
        plan = PLANNERS["poly"](x, coeffs, **_chunking(args, "chunk_elems"))
        return plan, lambda: np.polyval(coeffs, x)
    ops: dict[str, Callable[[Any], Any]] = {
        "sum": np.sum,
        "sumsq": lambda v: np.sum(v * v),
        "min": np.min,
        "max": np.max,
    }
    plan = PLANNERS["reduce"](x, args.op, **_chunking(args, "chunk_elems"))
    return plan, lambda: ops[args.op](x)


def _chunking(args: argparse.Namespace, option: str) -> dict[str, int]:
    """The chunk size asked for, or nothing, so the planner's default (which fits one
    Kafka record) applies."""
    return {option: args.chunk} if args.chunk else {}


def close_enough(answer: Any, expected: Any, kernel: str) -> bool:
    """Whether --verify's answer matches NumPy's."""
    if kernel == "monte_carlo_pi":
        return abs(float(answer) - float(expected)) < 0.01
    return bool(np.allclose(answer, expected, rtol=1e-4, atol=1e-3))


def own_plan(kernel: str, inputs: Sequence[str], params: Sequence[str]) -> JobPlan[Any]:
    """The kernel's plan for the arrays and options given as ``NAME=...`` flags."""
    try:
        planner = kernel_catalog.planner(kernel)
    except ValidationError as exc:
        raise ConfigError(f"kernel {kernel}: {exc}") from None
    files = [_assignment("--input", text) for text in inputs]
    values = [_assignment("--param", text) for text in params]
    accepted = inspect.signature(planner).parameters
    _check_names(kernel, accepted, files, values)
    arguments = _arrays(files, accepted) | {name: parse_value(text) for name, text in values}
    return _planned(kernel, planner, arguments)


def _assignment(flag: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or not value:
        raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE")
    return name, value


def _check_names(
    kernel: str,
    accepted: Mapping[str, inspect.Parameter],
    files: Sequence[tuple[str, str]],
    values: Sequence[tuple[str, str]],
) -> None:
    takes = ", ".join(accepted)
    for flag, pairs in (("--input", files), ("--param", values)):
        for name, _ in pairs:
            if name not in accepted:
                raise ConfigError(f"{flag} {name}: {kernel} has no {name!r}; it takes {takes}")
    seen: set[str] = set()
    for name, _ in values:
        if name in seen or any(name == given for given, _ in files):
            raise ConfigError(f"--param {name}: {name} is given more than once")
        seen.add(name)
    given = seen | {name for name, _ in files}
    missing = [n for n, p in accepted.items() if p.default is p.empty and n not in given]
    if missing:
        raise ConfigError(
            f"{kernel} needs {', '.join(missing)}: give --input NAME=FILE.npy "
            "or --param NAME=VALUE for each"
        )


def _arrays(
    files: Sequence[tuple[str, str]], accepted: Mapping[str, inspect.Parameter]
) -> dict[str, Any]:
    """Each --input's array; a name given twice, or a list argument, gets a list."""
    loaded: dict[str, list[Array]] = {}
    for name, spec in files:
        loaded.setdefault(name, []).append(load_array(name, spec))
    return {
        name: arrays if len(arrays) > 1 or accepted[name].annotation == ARRAY_LIST else arrays[0]
        for name, arrays in loaded.items()
    }


def _planned(
    kernel: str, planner: Callable[..., JobPlan[Any]], arguments: dict[str, Any]
) -> JobPlan[Any]:
    try:
        return planner(**arguments)
    except ValidationError as exc:
        raise ConfigError(f"{kernel} refused the --input/--param values: {exc}") from None
    except (TypeError, ValueError, IndexError) as exc:
        # The values have the right names but the wrong kind (a string for a count...).
        raise ConfigError(f"{kernel} cannot use the --input/--param values: {exc}") from None


def parse_value(text: str) -> Value:
    """A --param value: an int, a float, true or false, a comma list of numbers ("3," is
    a list of one), or else the string itself."""
    number = _number(text)
    if number is not None:
        return number
    if text in ("true", "false"):
        return text == "true"
    parts = text.removesuffix(",").split(",") if "," in text else []
    items = [_number(part) for part in parts]
    numbers = [item for item in items if item is not None]
    if items and len(numbers) == len(items):
        return numbers
    return text


def _number(text: str) -> Number | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def load_array(name: str, spec: str) -> Array:
    """The array of ``--input NAME=PATH`` (a .npy) or ``NAME=PATH.npz:KEY``; never a pickle."""
    flag = f"--input {name}={spec}"
    path, key = _npz_key(spec)
    try:
        with Path(path).open("rb") as stream:
            magic = stream.read(len(NPY_MAGIC))
            stream.seek(0)
            if magic == NPY_MAGIC and key is None:
                return np.asarray(np.load(stream, allow_pickle=False))
            if magic.startswith(NPZ_MAGIC):
                with np.load(stream, allow_pickle=False) as archive:
                    return _member(flag, archive, key)
    except FileNotFoundError:
        raise ConfigError(f"{flag}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ConfigError(f"{flag}: holds Python objects (a pickle), not numbers") from None
        raise ConfigError(f"{flag}: not a valid .npy array: {exc}") from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{flag}: the file is cut short or damaged: {exc}") from None
    kind = ".npy file (a :KEY names an array in a .npz)" if key else ".npy or .npz file"
    raise ConfigError(f"{flag}: not a {kind}")


def _npz_key(spec: str) -> tuple[str, str | None]:
    """PATH.npz:KEY -> (PATH.npz, KEY); anything else is a path as it stands."""
    path, sep, key = spec.rpartition(":")
    if sep and key and path.endswith(".npz"):
        return path, key
    return spec, None


def _member(flag: str, archive: Any, key: str | None) -> Array:
    names = list(archive.files)
    if key is None and len(names) == 1:
        key = names[0]
    if key not in names:
        held = ", ".join(names) or "nothing"
        raise ConfigError(f"{flag}: name one of its arrays as FILE.npz:KEY (it holds {held})")
    return np.asarray(archive[key])


def check_output(path: Path, kernel: str) -> None:
    """Refuse an --output the answer could not be written to, before the job runs."""
    if path.is_dir():
        raise ConfigError(f"--output {path}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: no folder {path.parent}")
    parted = PARTED_ANSWERS.get(kernel)
    if parted is not None and path.suffix != ".npz":
        parts = ", ".join(f.name for f in fields(parted))
        raise ConfigError(f"--output {path}: {kernel}'s answer has parts ({parts}); give a .npz")


def save_answer(path: Path, answer: Any) -> None:
    """The answer as a .npy (a number as a 0-d array), or, to a .npz, its parts by name
    (the one array of an unparted answer is ``answer``). The path is used as given."""
    with path.open("wb") as stream:
        if is_dataclass(answer) and not isinstance(answer, type):
            parts: dict[str, Any] = {
                f.name: np.asarray(getattr(answer, f.name)) for f in fields(answer)
            }
            np.savez(stream, **parts)
        elif path.suffix == ".npz":
            np.savez(stream, answer=np.asarray(answer))
        else:
            np.save(stream, np.asarray(answer), allow_pickle=False)
