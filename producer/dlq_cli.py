# SPDX-License-Identifier: Apache-2.0
"""``parkpool dlq list | show | replay | purge``: the dead-letter topic for SREs.

A thin layer over ``producer.dlq``: parse, call, print. Text by default, JSON lines with
``--json``. Exit 0 on success, 1 when something was refused or not confirmed, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from parkpool.producer import dlq
from parkpool.producer.dlq import ActionReport, DeadLetterEntry, EntryState, Position
from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.settings import (
    add_kafka_options,
    add_namespace_option,
    add_option,
    add_store_options,
    kafka_from_args,
    positive_seconds,
    store_from_args,
)
from parkpool.schemas import DeadLetter, TaskChunk
from parkpool.schemas.topics import check_namespace

USAGE_ERROR = 2
REFUSED = 1


def add_parser(subparsers: Any) -> None:
    command = subparsers.add_parser("dlq", help="list, show, replay or purge dead letters")
    actions = command.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = _action(actions, "list", "one line per pending dead letter", run_list)
    listing.add_argument("--all", action="store_true", help="also replayed and purged ones")
    _filters(listing)
    show = _action(actions, "show", "the full record of one dead letter", run_show)
    show.add_argument("position", type=_position, help="PARTITION:OFFSET, as `list` prints")
    for name, run, what in (
        ("replay", run_replay, "put dead letters' tasks back on the tasks topic"),
        ("purge", run_purge, "mark dead letters as dealt with, without running them"),
    ):
        act = _action(actions, name, what, run)
        act.add_argument(
            "positions", nargs="*", type=_position, metavar="PARTITION:OFFSET", help="as `list`"
        )
        act.add_argument("--all-pending", action="store_true", help="every pending one")
        _filters(act, " (with --all-pending)")
        act.add_argument("--dry-run", action="store_true", help="say what would happen only")
        act.add_argument("--note", default="", help="why, recorded with the action")
    replay_parser = actions.choices["replay"]
    replay_parser.add_argument(
        "--deadline-s",
        type=positive_seconds,
        default=dlq.DEFAULT_DEADLINE_S,
        help="new deadline from now",
    )


def _action(
    actions: Any, name: str, what: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=what, description=what)
    add_kafka_options(parser)
    add_store_options(parser)
    add_namespace_option(parser)
    add_option(
        parser,
        "--idle-s",
        "PARKPOOL_DLQ_IDLE_S",
        dlq.DEFAULT_IDLE_S,
        "the topic is read to its end once nothing arrives for this long",
        positive_seconds,
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
    parser.set_defaults(func=run)
    return parser


def _filters(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    parser.add_argument("--reason", help=f"only this reason{suffix}")
    parser.add_argument("--job", help=f"only this job id{suffix}")


def _position(text: str) -> Position:
    try:
        return Position.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- commands


def run_list(args: argparse.Namespace) -> int:
    entries = _read(args)
    if entries is None:
        return USAGE_ERROR
    shown = [e for e in entries if (args.all or e.state is EntryState.PENDING)]
    shown = [e for e in shown if e.matches(args.reason, args.job)]
    if args.json:
        _print_json(row(entry) for entry in shown)
    else:
        print("\n".join(_row_text(entry) for entry in shown) or "no dead letters to show")
    return 0


def run_show(args: argparse.Namespace) -> int:
    entries = _read(args)
    if entries is None:
        return USAGE_ERROR
    found, missing = dlq.find(entries, [args.position])
    if missing:
        print(f"{args.position}: no dead letter there", file=sys.stderr)
        return REFUSED
    details = record(found[0])
    if args.json:
        _print_json([details])
    else:
        print(_record_text(details))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda entries: dlq.replay(
            kafka_from_args(args),
            args.namespace,
            entries,
            args.deadline_s,
            args.dry_run,
            args.note,
            _store(args),
        ),
    )


def _store(args: argparse.Namespace) -> BlobStore | None:
    conn = store_from_args(args)
    return BlobStore(conn) if conn.enabled else None


def run_purge(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda entries: dlq.purge(
            kafka_from_args(args), args.namespace, entries, args.dry_run, args.note
        ),
    )


def _act(args: argparse.Namespace, act: Callable[[list[DeadLetterEntry]], ActionReport]) -> int:
    problem = _selection_problem(args)
    if problem:
        print(f"parkpool dlq {args.dlq_command}: {problem}", file=sys.stderr)
        return USAGE_ERROR
    entries = _read(args)
    if entries is None:
        return USAGE_ERROR
    missing: list[dlq.Outcome] = []
    if args.all_pending:
        chosen = dlq.pending(entries, args.reason, args.job)
    else:
        chosen, missing = dlq.find(entries, args.positions)
    done = act(chosen).outcomes
    order = {position: i for i, position in enumerate(args.positions)}  # as the user gave them
    report = ActionReport(tuple(sorted((*missing, *done), key=lambda o: order.get(o.position, 0))))
    _print_report(report, args.json, args.dlq_command)
    return 0 if report.ok else REFUSED


def _selection_problem(args: argparse.Namespace) -> str:
    if args.all_pending and args.positions:
        return "give PARTITION:OFFSET positions or --all-pending, not both"
    if not args.all_pending and not args.positions:
        return "give PARTITION:OFFSET positions or --all-pending"
    if not args.all_pending and (args.reason or args.job):
        return "--reason and --job select among --all-pending"
    return ""


def _read(args: argparse.Namespace) -> list[DeadLetterEntry] | None:
    logs.configure()
    try:
        check_namespace(args.namespace)
    except ValueError as exc:
        print(f"parkpool dlq: {exc}", file=sys.stderr)
        return None
    return dlq.read_dead_letters(kafka_from_args(args), args.namespace, args.idle_s)


# ---------------------------------------------------------------- shapes


def row(entry: DeadLetterEntry) -> dict[str, Any]:
    """What `list` says about one entry."""
    head: dict[str, Any] = {"position": str(entry.position), "state": entry.state.value}
    letter = entry.letter
    if letter is None:
        return {**head, "decodes": False, "error": entry.error}
    return {
        **head,
        "decodes": True,
        "job_id": letter.job_id,
        "chunk_id": letter.chunk_id,
        "reason": letter.reason,
        "attempts": len(letter.attempts),
        "dead_at": _iso(letter.dead_at),
    }


def record(entry: DeadLetterEntry) -> dict[str, Any]:
    """What `show` says about one entry: everything."""
    actions = [{"action": a.action.value, "at": _iso(a.at), "note": a.note} for a in entry.actions]
    base = {**row(entry), "actions": actions}
    letter = entry.letter
    if letter is None:
        return base
    return {
        **base,
        "detail": letter.detail,
        "source": {
            "topic": letter.source_topic,
            "partition": letter.partition,
            "offset": letter.offset,
        },
        "gateway_id": letter.gateway_id,
        "attempt_history": [
            {"vehicle_id": a.vehicle_id, "reason": a.reason, "at": _iso(a.at), "detail": a.detail}
            for a in letter.attempts
        ],
        "original": original(letter),
    }


def original(letter: DeadLetter) -> dict[str, Any]:
    """Size of the original bytes, and the task they hold when they decode as one."""
    size = letter.original_size if letter.original_size >= 0 else len(letter.original)
    if not letter.original_kept:
        return {"bytes": size, "kept": False, "sha256": letter.original_sha256, "is_task": False}
    task = dlq.decode_original(letter)
    if not isinstance(task, TaskChunk):
        return {"bytes": size, "kept": True, "is_task": False, "error": str(task)}
    return {
        "bytes": size,
        "kept": True,
        "is_task": True,
        "kernel": task.kernel,
        "params": dict(task.params),
        "inputs": {name: f"{a.dtype}{list(a.shape)}" for name, a in task.inputs.items()},
        # A confidential task's inputs are ciphertext here: their size is all anyone sees.
        "sealed_inputs_bytes": len(task.sealed_inputs),
        "chunk": f"{task.chunk_id + 1} of {task.n_chunks}",
        "priority": task.priority.value,
        "reply_topic": task.reply_topic,
        "deadline": _iso(task.deadline),
    }


def _iso(unix: float) -> str:
    """A record's time; one no calendar holds (a letter stamped by a broken clock, or
    forged) is shown as the number it is, rather than ending the listing."""
    try:
        return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return repr(unix)


# ---------------------------------------------------------------- text


def _print_json(items: Iterable[dict[str, Any]]) -> None:
    for item in items:
        print(json.dumps(item, default=str))


def _row_text(entry: DeadLetterEntry) -> str:
    r = row(entry)
    head = f"{r['position']:<9} {r['state']:<8}"
    if not r["decodes"]:
        return f"{head} undecodable record: {r['error']}"
    job, chunk = r["job_id"] or "-", r["chunk_id"] if r["chunk_id"] >= 0 else "-"
    return (
        f"{head} job={job} chunk={chunk} reason={r['reason']} "
        f"attempts={r['attempts']} dead_at={r['dead_at']}"
    )


def _record_text(details: dict[str, Any]) -> str:
    lines = [f"dead letter {details['position']} ({details['state']})"]
    if not details["decodes"]:
        lines.append(f"  undecodable record: {details['error']}")
    else:
        source = details["source"]
        lines += [
            f"  reason:    {details['reason']}",
            f"  detail:    {details['detail']}",
            f"  job:       {details['job_id'] or '-'} chunk {max(details['chunk_id'], 0)}"
            if details["job_id"]
            else "  job:       - (the original did not decode at the gateway)",
            f"  source:    {source['topic']} partition {source['partition']} "
            f"offset {source['offset']}",
            f"  gateway:   {details['gateway_id']}",
            f"  dead at:   {details['dead_at']}",
            f"  attempts:  {details['attempts']}",
        ]
        lines += [
            f"    {i}. {a['at']} {a['vehicle_id']} {a['reason']}: {a['detail']}"
            for i, a in enumerate(details["attempt_history"], 1)
        ]
        lines.append(f"  original:  {_original_text(details['original'])}")
    lines += [f"  {a['action']} at {a['at']} {a['note']}".rstrip() for a in details["actions"]]
    return "\n".join(lines)


def _original_text(info: dict[str, Any]) -> str:
    if not info["kept"]:
        size, digest = info["bytes"], info["sha256"]
        return f"{size} bytes, not kept (too large for a dead letter), sha256 {digest}"
    if not info["is_task"]:
        return f"{info['bytes']} bytes, not a task: {info['error']}"
    inputs = ", ".join(f"{k}={v}" for k, v in info["inputs"].items())
    if info["sealed_inputs_bytes"]:
        inputs = f"sealed ({info['sealed_inputs_bytes']} bytes)"
    return (
        f"{info['bytes']} bytes, task {info['kernel']} chunk {info['chunk']}, "
        f"params {json.dumps(info['params'], default=str)}, inputs {inputs or '-'}, "
        f"priority {info['priority']}, reply to {info['reply_topic']}"
    )


def _print_report(report: ActionReport, as_json: bool, command: str) -> None:
    summary = report.summary()
    if as_json:
        _print_json(
            {"position": str(o.position), "outcome": o.kind.value, "detail": o.detail}
            for o in report.outcomes
        )
        _print_json([{"summary": summary}])
        return
    for outcome in report.outcomes:
        print(f"{outcome.position!s:<9} {outcome.kind.value:<12} {outcome.detail}".rstrip())
    counts = ", ".join(f"{n} {kind}" for kind, n in summary.items()) or "nothing selected"
    print(f"{command}: {counts}")
