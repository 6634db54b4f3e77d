# SPDX-License-Identifier: Apache-2.0
"""``parkpool top``: a live terminal view of one or more gateways, for the SRE on call.

Reads each gateway's status server (``/metrics``, ``/readyz``, ``/status``) every
``--interval`` seconds and shows jobs in flight, the queue, the fleet and errors.

- ``series``: one parsed ``/metrics`` page.
- ``scrape``: reading a gateway; an unreachable one becomes a DOWN sample, never an error.
- ``status``: reading the ``/status`` JSON tolerantly.
- ``rates``: rates and quantiles between two scrapes.
- ``model`` and ``build``: the view model, and how scrapes become one.
- ``render``: the view model drawn with rich.
- ``cli``: the ``top`` subcommand.
"""

from parkpool.app.top.cli import add_parser

__all__ = ["add_parser"]
