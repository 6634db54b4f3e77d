# SPDX-License-Identifier: Apache-2.0
"""``parkpool submit``, ``status`` and ``wait``: the command line for backend services."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import Message
from rich import progress as rich_progress
from rich.console import Console

from parkpool.producer import kernel_catalog
from parkpool.producer.attach import (
    CLOCK_SKEW_S,
    find_job,
    high_watermarks,
    read_until,
    seeker,
    start_offsets,
)
from parkpool.producer.cli_inputs import close_enough, save_answer, submitted_job
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobFailed, JobHandle, JobState, Progress
from parkpool.producer.splitters import JobPlan
from parkpool.runtime import logs
from parkpool.runtime.settings import (
    KafkaConnection,
    add_kafka_options,
    add_namespace_option,
    add_option,
    add_store_options,
    kafka_from_args,
    positive_int,
    positive_seconds,
    store_from_args,
)
from parkpool.schemas import (
    BrokerError,
    ConfigError,
    DeadLetter,
    DecodeError,
    JobSubmitted,
    KafkaTopics,
    Result,
    decode,
    same_submission,
)
from parkpool.schemas.reputation import Level


def _coefficients(text: str) -> str:
    try:
        values = [float(c) for c in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers")
    return text


def add_parser(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="submit a job and follow it to the end")
    _connection(submit)
    submit.add_argument("kernel", choices=kernel_catalog.names())
    submit.add_argument(
        "--size", type=positive_int, default=1024, help="matrix side or array length"
    )
    submit.add_argument("--tile", type=positive_int, default=256, help="gemm tile side")
    submit.add_argument(
        "--k-tile",
        type=positive_int,
        default=256,
        help="gemm chunk depth (256 x 256 blocks of both operands make 512 KiB chunks)",
    )
    submit.add_argument(
        "--samples", type=positive_int, default=10_000_000, help="monte_carlo_pi samples"
    )
    submit.add_argument(
        "--chunk", type=int, default=0, help="elements/samples per chunk (0: the kernel's default)"
    )
    submit.add_argument(
        "--coeffs", type=_coefficients, default="1,0,-2,1", help="poly coefficients, highest first"
    )
    submit.add_argument("--op", default="sum", help="reduce operation")
    submit.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    _own_data(submit)
    submit.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds to wait")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    submit.add_argument(
        "--json",
        action="store_true",
        help='the summary is JSON already; with --no-wait, {"job_id": ...} for the bare id',
    )
    submit.add_argument(
        "--verify",
        action="store_true",
        help="also recompute the whole answer with NumPy here (a demo; --verification is "
        "how the fleet's results are checked)",
    )
    add_option(
        submit,
        "--verification",
        "PARKPOOL_VERIFICATION",
        Level.RINGER_TRUSTED.value,
        "least check each chunk must pass before it is accepted: unchecked, ringer_trusted, "
        "quorum or algebraic (docs/KERNELS.md)",
    )
    submit.add_argument(
        "--confidential",
        action="store_true",
        help="seal inputs and results: brokers and logs never see them (needs a gateway box key)",
    )
    add_option(
        submit,
        "--gateway-box-key",
        "PARKPOOL_GATEWAY_BOX_KEY",
        "",
        "the gateways' box public key file, for --confidential",
    )
    submit.set_defaults(func=run_submit)
    status = subparsers.add_parser("status", help="report a job's progress from the topics")
    _connection(status)
    status.add_argument("job_id")
    status.add_argument(
        "--timeout", type=positive_seconds, default=60.0, help="seconds to find the job"
    )
    status.set_defaults(func=run_status)
    wait = subparsers.add_parser(
        "wait", help="follow a job submitted elsewhere (or earlier) by its id, to its end"
    )
    _connection(wait)
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds to wait")
    wait.set_defaults(func=run_wait)
    for command in (status, wait):
        command.add_argument(
            "--json", action="store_true", help="accepted for scripts: the output is JSON already"
        )


def _own_data(submit: argparse.ArgumentParser) -> None:
    own = submit.add_argument_group(
        "your own data",
        "With --input or --param the job is these, not generated inputs: the kernel's "
        "arguments come from them alone (--size, --tile, --op and the like are ignored). "
        "docs/KERNELS.md names each kernel's arguments.",
    )
    own.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an array argument from a .npy file (or PATH.npz:KEY); repeat a NAME for a list",
    )
    own.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option: an int, a float, true/false, a comma list of numbers, or a string",
    )
    own.add_argument(
        "--output", type=Path, metavar="PATH", help="write the answer here (np.save; .npz: parts)"
    )


def _connection(p: argparse.ArgumentParser) -> None:
    add_kafka_options(p)
    add_store_options(p)
    add_namespace_option(p)
    add_option(
        p,
        "--reply-topic",
        "PARKPOOL_REPLY_TOPIC",
        "",
        "Kafka topic for results (default <namespace>.results)",
    )


def run_submit(args: argparse.Namespace) -> int:
    """Submit generated inputs, or the user's own (--input/--param); follow the job to its
    end and print its summary. A usage error raises ConfigError (exit 2, from main)."""
    logs.configure()
    plan, expected = submitted_job(args)
    settings = ProducerSettings(
        kafka_from_args(args),
        args.namespace,
        args.reply_topic,
        gateway_box_key=Path(args.gateway_box_key) if args.gateway_box_key else None,
        store=store_from_args(args),
    )
    try:
        with ParkpoolClient(settings) as client:
            return _submit_and_follow(args, client, plan, expected)
    except BrokerError as exc:
        print(f"parkpool submit: {exc}", file=sys.stderr)
        return 1


def _submit_and_follow(
    args: argparse.Namespace,
    client: ParkpoolClient,
    plan: JobPlan[Any],
    expected: Callable[[], Any] | None,
) -> int:
    started = time.monotonic()
    handle = client.submit_plan(
        plan, confidential=args.confidential, verification=args.verification
    )
    if args.no_wait:
        print(json.dumps({"job_id": handle.job_id}) if args.json else handle.job_id)
        return 0
    try:
        answer = follow(handle, args.timeout)
    except (JobFailed, TimeoutError) as exc:
        print(f"job {handle.job_id} did not complete: {exc}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = {
        "job_id": handle.job_id,
        "chunks": handle.n_chunks,
        "duplicates": handle.progress.duplicates,
        "wall_s": round(time.monotonic() - started, 3),
    }
    if args.verify and expected is not None:
        summary["verified"] = close_enough(answer, expected(), args.kernel)
    if args.output is not None:
        try:
            save_answer(args.output, answer)
        except (OSError, ValueError) as exc:  # ValueError: no array to save (np.save)
            print(f"parkpool submit: --output {args.output}: {exc}", file=sys.stderr)
            return 1
        summary["output"] = str(args.output)
    print(json.dumps(summary))
    return 0 if summary.get("verified", True) else 1


def follow(handle: JobHandle[Any], timeout: float) -> Any:
    """Wait for the job, showing progress on stderr: a rich bar on a terminal, a line at
    every quarter elsewhere."""
    deadline = time.monotonic() + timeout
    bar = _RichBar(Console(stderr=True)) if sys.stderr.isatty() else _QuarterLines(sys.stderr)
    try:
        while True:
            try:
                answer = handle.wait(timeout=0.25)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                bar.draw(handle.progress)
        bar.draw(handle.progress)
    finally:
        bar.close()
    return answer


class _RichBar:
    """On a terminal: a bar redrawn in place, with the chunk count and time taken."""

    def __init__(self, console: Console) -> None:
        self._bar = rich_progress.Progress(
            rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TextColumn("chunks{task.fields[dead]}"),
            rich_progress.TimeElapsedColumn(),
            console=console,
        )
        self._task = self._bar.add_task("job", total=None, dead="")
        self._bar.start()

    def draw(self, p: Progress) -> None:
        dead = f", [red]{p.dead_lettered} dead-lettered[/]" if p.dead_lettered else ""
        self._bar.update(self._task, completed=p.done, total=p.total, dead=dead)

    def close(self) -> None:
        self._bar.stop()


class _QuarterLines:
    """Off a terminal (logs, CI): a line at every quarter of the chunks."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last_quarter = -1

    def draw(self, p: Progress) -> None:
        if int(p.fraction * 4) <= self._last_quarter:
            return
        self._last_quarter = int(p.fraction * 4)
        filled = int(30 * p.fraction)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {p.done}/{p.total} chunks"
        if p.dead_lettered:
            line += f", {p.dead_lettered} dead-lettered"
        self._stream.write(f"{line}\n")
        self._stream.flush()

    def close(self) -> None:
        return None


def run_status(args: argparse.Namespace) -> int:
    """Read one job's results and dead letters from its submit time on; print its
    progress as JSON."""
    conn, topics = kafka_from_args(args), KafkaTopics(args.namespace)
    try:
        job = find_job(conn, topics.jobs, args.job_id, args.timeout)
        status = job_status(conn, job, topics.dead_letter, args.timeout)
    except BrokerError as exc:
        print(f"parkpool status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status))
    return 0


def run_wait(args: argparse.Namespace) -> int:
    """Attach to a job by id and follow it to its end, with the submit's progress."""
    logs.configure()
    settings = ProducerSettings(
        kafka_from_args(args),
        args.namespace,
        args.reply_topic,
        store=store_from_args(args),
    )
    started = time.monotonic()
    try:
        with ParkpoolClient(settings) as client:
            handle = client.attach(args.job_id, timeout=args.timeout)
            follow(handle, args.timeout)
    except (JobFailed, TimeoutError, BrokerError, ConfigError) as exc:
        print(f"job {args.job_id} did not complete: {exc}", file=sys.stderr)
        return 1
    p = handle.progress
    summary = {
        "job_id": args.job_id,
        "state": p.state.value,
        "done": p.done,
        "total": p.total,
        "duplicates": p.duplicates,
        "wall_s": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary))
    return 0 if p.state is JobState.DONE else 1


def job_status(
    conn: KafkaConnection, job: JobSubmitted, dead_letter: str, timeout_s: float
) -> dict[str, Any]:
    """A job's progress from the records on its topics now, read from its submit time."""
    consumer = seeker(conn)
    try:
        ends = high_watermarks(consumer, [job.reply_topic, dead_letter])
        starts = start_offsets(consumer, ends, job.submitted_at - CLOCK_SKEW_S)
        done, dead = _collect(read_until(consumer, starts, ends, timeout_s), job)
    finally:
        consumer.close()
    left = dead.keys() - done
    state = "done" if len(done) == job.n_chunks else "running"
    if left and len(done) + len(left) == job.n_chunks:
        state = "failed"
    return {
        "job_id": job.job_id,
        "kernel": job.kernel,
        "state": state,
        "done": len(done),
        "total": job.n_chunks,
        "dead_lettered": len(left),
    }


def _collect(records: Iterable[Message], job: JobSubmitted) -> tuple[set[int], dict[int, str]]:
    """The job's chunks done and dead-lettered, by its latest submission's records only
    (another submission under the id stamps its own created_at; 0: from an older writer,
    counted)."""
    done: set[int] = set()
    dead: dict[int, str] = {}
    key = job.job_id.encode()
    for record in records:
        if record.key() != key:
            continue
        try:
            if record.topic() == job.reply_topic:
                result = decode(record.value() or b"", Result)
                if (
                    same_submission(job.created_at, result.task_created_at)
                    and result.chunk_id < job.n_chunks
                ):
                    done.add(result.chunk_id)
            else:
                letter = decode(record.value() or b"", DeadLetter)
                if (
                    same_submission(job.created_at, letter.task_created_at)
                    and letter.chunk_id < job.n_chunks
                ):
                    dead[letter.chunk_id] = letter.reason
        except DecodeError:
            continue  # not this job's record after all, or damaged: it counts as neither
    return done, dead
