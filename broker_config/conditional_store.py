# SPDX-License-Identifier: Apache-2.0
"""The embedded object store with S3's conditional update (``If-Match`` on PutObject).

Tansu keeps each partition's watermark and its producers' sequences in small JSON objects
that it updates optimistically: read, change, ``PUT`` with ``If-Match: <etag>``, and on
412 read again and retry. localbucket (under ``broker_config.objectstore``) honours
``If-None-Match`` but ignores ``If-Match``, so two produces to one partition could both
"win": the second overwrote the first's watermark, offsets were handed out twice, and
acknowledged records were hidden from every reader (measured: 4 producers x 200 records
to one partition read back 200). This runs that store with the check made, per object,
atomically with the write.

Run: ``python -m parkpool.broker_config.conditional_store`` with objectstore's arguments.
Once objectstore checks ``If-Match`` itself, the launcher can run it directly.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from typing import Any

import localbucket

from parkpool.broker_config import objectstore

__all__ = ["main"]

_locks: collections.defaultdict[tuple[str, str], threading.Lock] = collections.defaultdict(
    threading.Lock
)
_locks_guard = threading.Lock()


class ConditionalHandler(objectstore.VerifyingHandler):
    """objectstore's handler; a conditional PutObject checks and writes under one lock."""

    def _write_object(self, bucket: str, key: str, write: Callable[[Any], str]) -> str:
        expected = self.headers.get("If-Match")
        if expected is None and "If-None-Match" not in self.headers:
            return str(super()._write_object(bucket, key, write))
        with _locks_guard:
            lock = _locks[(bucket, key)]
        with lock:
            if expected is not None:
                target = self._object_path(bucket, key)
                current = localbucket.object_etag(target) if target.is_file() else None
                if current is None or not localbucket.etag_matches(expected, current):
                    raise self._precondition_failed_error()
            return str(super()._write_object(bucket, key, write))


def main(argv: list[str] | None = None) -> None:
    # objectstore.main serves whatever its module calls VerifyingHandler.
    objectstore.VerifyingHandler = ConditionalHandler  # type: ignore[misc]
    objectstore.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
