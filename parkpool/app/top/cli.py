# SPDX-License-Identifier: Apache-2.0
"""``parkpool top``: the live view, or one plain-text frame with ``--once``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from parkpool.app.top.build import build_view
from parkpool.app.top.render import render
from parkpool.app.top.scrape import Sample, fetch_all
from parkpool.runtime.settings import add_option
from parkpool.schemas.errors import ConfigError

__all__ = ["DEFAULT_URL", "add_parser", "resolve_urls", "run", "url_from_log"]

# The port deploy/gateway.env.example gives PARKPOOL_METRICS_PORT.
DEFAULT_URL = "http://127.0.0.1:9464"
URLS_ENV = "PARKPOOL_TOP_URLS"
# Piped output has no terminal to measure; wide enough for the gateways table.
PLAIN_WIDTH = 120

EPILOG = """\
Point it at each gateway's --metrics-port. `make demo` gives its gateway a free port and
logs it, so in a second terminal, once the demo says the gateway started:
  parkpool top --gateway-log .run/demo/gateway.log
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "top",
        help="live view of gateways: jobs in flight, queue, fleet, errors",
        description="A live view of one or more gateways' status servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        action="append",
        default=[],
        help=f"a gateway's status server, repeatable [env {URLS_ENV}, comma-separated; "
        f"default {DEFAULT_URL}]",
    )
    p.add_argument(
        "--gateway-log",
        type=Path,
        action="append",
        default=[],
        help="a gateway's JSON log: watch the status server it says it started (repeatable)",
    )
    add_option(p, "--interval", "PARKPOOL_TOP_INTERVAL", 1.0, "seconds between refreshes", _pos)
    add_option(p, "--timeout", "PARKPOOL_TOP_TIMEOUT", 1.0, "seconds to wait for a gateway", _pos)
    p.add_argument(
        "--once",
        action="store_true",
        help="print one plain-text frame (rates over one --interval) and exit",
    )
    p.set_defaults(func=run)


def _pos(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return seconds


def url_from_log(path: Path) -> str:
    """The status server a gateway's JSON log last reported starting."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {type(exc).__name__}") from exc
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "status_server_started":
            host = str(event.get("host", "127.0.0.1"))
            return f"http://{f'[{host}]' if ':' in host else host}:{event.get('port')}"
    raise ConfigError(f"{path} does not say a status server started (no --metrics-port?)")


def resolve_urls(urls: Sequence[str], logs: Sequence[Path], env: str | None = None) -> list[str]:
    """--url and --gateway-log in that order; else the environment; else the default."""
    given = [u.strip() for item in urls for u in item.split(",") if u.strip()]
    given += [url_from_log(path) for path in logs]
    if not given and env:
        given = [u.strip() for u in env.split(",") if u.strip()]
    return [u if "://" in u else f"http://{u}" for u in given] or [DEFAULT_URL]


def _frame(previous: Sequence[Sample | None], current: Sequence[Sample], interval: float) -> Any:
    view = build_view(list(zip(previous, current, strict=True)))
    return render(view, interval_s=interval, clock=time.strftime("%H:%M:%S"))


def print_once(urls: Sequence[str], interval: float, timeout: float) -> None:
    """Scrape twice, *interval* apart, and print the frame as plain text."""
    first = fetch_all(urls, timeout)
    time.sleep(interval)
    second = fetch_all(urls, timeout)
    width = shutil.get_terminal_size((PLAIN_WIDTH, 24)).columns
    console = Console(file=sys.stdout, width=width, no_color=True, highlight=False, emoji=False)
    console.print(_frame(first, second, interval))


def watch(urls: Sequence[str], interval: float, timeout: float) -> None:
    """Redraw the view every *interval* seconds until interrupted."""
    previous: list[Sample | None] = [None] * len(urls)
    with Live(auto_refresh=False, screen=True, redirect_stderr=False) as live:
        while True:
            started = time.monotonic()
            current = fetch_all(urls, timeout)
            live.update(_frame(previous, current, interval), refresh=True)
            previous = list(current)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


def run(args: argparse.Namespace) -> int:
    urls = resolve_urls(args.url, args.gateway_log, os.environ.get(URLS_ENV))
    try:
        if args.once:
            print_once(urls, args.interval, args.timeout)
        else:
            watch(urls, args.interval, args.timeout)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves a live view
    return 0
