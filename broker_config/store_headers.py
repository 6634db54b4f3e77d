# SPDX-License-Identifier: Apache-2.0
"""The embedded store's request headers: http.server's own, looked up through a dict.

``email.message.Message.get`` scans every header and re-checks the value it finds, and
one small request to the store asks ~20 times (the signature check, localbucket's
handler, the conditional writes): under a profiler, about a tenth of the time of the
small requests Tansu sends by the thousand. The index is rebuilt whenever the header
list has changed since it was built, so every answer is the one the plain ``Message``
would give.
"""

from __future__ import annotations

import http.client
from typing import Any

__all__ = ["Headers"]


class Headers(http.client.HTTPMessage):
    """An ``http.client.HTTPMessage`` whose get/[]/in are dictionary lookups."""

    _headers: list[tuple[str, Any]]  # email.message.Message's own list, in order
    _index: dict[str, Any] | None = None
    _indexed: list[tuple[str, Any]] | None = None

    def get(self, name: str, failobj: Any = None) -> Any:
        return self._lookup().get(name.lower(), failobj)

    def __getitem__(self, name: str) -> Any:
        return self._lookup().get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def _lookup(self) -> dict[str, Any]:
        headers = self._headers
        if self._index is None or self._indexed != headers:
            index: dict[str, Any] = {}
            for key, value in headers:
                # The first of repeated headers, as Message.get answers.
                index.setdefault(key.lower(), self.policy.header_fetch_parse(key, value))
            self._index, self._indexed = index, list(headers)
        return self._index
