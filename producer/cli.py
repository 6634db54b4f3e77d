# SPDX-License-Identifier: Apache-2.0
"""``parkpool submit``, ``status`` and ``wait``: the command line for backend services."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message

from parkpool.producer.attach import (
    CLOCK_SKEW_S,
    find_job,
    high_watermarks,
    read_until,
    seeker,
    start_offsets,
)
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobFailed, JobHandle
from parkpool.producer.splitters import PLANNERS, JobPlan
from parkpool.runtime import logs
from parkpool.runtime.settings import (
    KafkaConnection,
    add_kafka_options,
    add_namespace_option,
    add_option,
    add_store_options,
    kafka_from_args,
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
)
from parkpool.schemas.reputation import Level


def add_parser(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="submit a job and follow it to the end")
    _connection(submit)
    submit.add_argument("kernel", choices=sorted(PLANNERS))
    submit.add_argument("--size", type=int, default=1024, help="matrix side or array length")
    submit.add_argument("--tile", type=int, default=256, help="gemm tile side")
    submit.add_argument(
        "--k-tile",
        type=int,
        default=256,
        help="gemm chunk depth (256 x 256 blocks of both operands make 512 KiB chunks)",
    )
    submit.add_argument("--samples", type=int, default=10_000_000, help="monte_carlo_pi samples")
    submit.add_argument(
        "--chunk", type=int, default=0, help="elements/samples per chunk (0: the kernel's default)"
    )
    submit.add_argument("--coeffs", default="1,0,-2,1", help="poly coefficients, highest first")
    submit.add_argument("--op", default="sum", help="reduce operation")
    submit.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and exit")
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
    status.add_argument("--timeout", type=float, default=60.0, help="seconds to find the job")
    status.set_defaults(func=run_status)
    wait = subparsers.add_parser(
        "wait", help="follow a job submitted elsewhere (or earlier) by its id, to its end"
    )
    _connection(wait)
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    wait.set_defaults(func=run_wait)


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


def example_plan(args: argparse.Namespace) -> tuple[JobPlan, Any]:
    """Generated inputs for a kernel, and the NumPy answer to check against."""
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


def run_submit(args: argparse.Namespace) -> int:
    logs.configure()
    plan, expected = example_plan(args)
    settings = ProducerSettings(
        kafka_from_args(args),
        args.namespace,
        args.reply_topic,
        gateway_box_key=Path(args.gateway_box_key) if args.gateway_box_key else None,
        store=store_from_args(args),
    )
    with ParkpoolClient(settings) as client:
        started = time.monotonic()
        handle = client.submit_plan(
            plan, confidential=args.confidential, verification=args.verification
        )
        if args.no_wait:
            print(handle.job_id)
            return 0
        try:
            answer = follow(handle, args.timeout)
        except (JobFailed, TimeoutError) as exc:
            print(f"job {handle.job_id} did not complete: {exc}", file=sys.stderr)
            return 1
        summary = {
            "job_id": handle.job_id,
            "chunks": handle.n_chunks,
            "duplicates": handle.progress.duplicates,
            "wall_s": round(time.monotonic() - started, 3),
        }
        if args.verify:
            summary["verified"] = _close(answer, expected(), args.kernel)
        print(json.dumps(summary))
        return 0 if summary.get("verified", True) else 1


def _close(answer: Any, expected: Any, kernel: str) -> bool:
    if kernel == "monte_carlo_pi":
        return abs(float(answer) - float(expected)) < 0.01
    return bool(np.allclose(answer, expected, rtol=1e-4, atol=1e-3))


def follow(handle: JobHandle, timeout: float) -> Any:
    """Wait for the job, showing progress on stderr: a bar on a terminal, lines elsewhere."""
    deadline = time.monotonic() + timeout
    bar = _ProgressBar(sys.stderr.isatty())
    while True:
        try:
            answer = handle.wait(timeout=0.25)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            bar.draw(handle)
    bar.draw(handle)
    bar.close()
    return answer


class _ProgressBar:
    """A redrawn bar on a terminal; elsewhere (logs, CI) a line at every quarter."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.last_quarter = -1

    def draw(self, handle: JobHandle) -> None:
        p = handle.progress
        filled = int(30 * p.fraction)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {p.done}/{p.total} chunks"
        if p.dead_lettered:
            line += f", {p.dead_lettered} dead-lettered"
        if self.tty:
            sys.stderr.write(f"\r{line}")
        elif int(p.fraction * 4) > self.last_quarter:
            self.last_quarter = int(p.fraction * 4)
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


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
    return 0


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
    done: set[int] = set()
    dead: dict[int, str] = {}
    key = job.job_id.encode()
    for record in records:
        if record.key() != key:
            continue
        try:
            if record.topic() == job.reply_topic:
                done.add(decode(record.value() or b"", Result).chunk_id)
            else:
                letter = decode(record.value() or b"", DeadLetter)
                dead[letter.chunk_id] = letter.reason
        except DecodeError:
            continue  # not this job's record after all, or damaged: it counts as neither
    return done, dead
