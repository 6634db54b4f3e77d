# SPDX-License-Identifier: Apache-2.0
"""An object's new bytes staged in a temporary file beside it, for the embedded store.

A write streams its body into the temporary file first, with no lock held; only what
follows (a conditional write's check, then the rename or link into place) holds the
object's lock (broker_config.objectstore). A lock held while the body streamed let one
slow client, a car on a weak link uploading its outputs say, hold up every other writer
of that key, and Tansu's watermark updates behind it, for up to the store's 60 s timeout.

The folder the file goes in may vanish while it is being made: a delete removes the
folders it leaves empty, as S3's flat namespace has none to keep, and another request
may empty one between this write's ``mkdir`` and its ``mkstemp``. That is retried here
rather than answered as an internal error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import localbucket

__all__ = ["ATTEMPTS", "staged", "temp_beside"]

# Each lost attempt needs another request to empty the folder in the instant between two
# system calls; eight in a row is a store being torn down, and is answered as an error.
ATTEMPTS = 8


def temp_beside(target: Path) -> tuple[int, str]:
    """A new temporary file in ``target``'s folder, made if missing: (fd, path). The
    name's prefix hides it from listings while it is being written."""
    for attempt in range(ATTEMPTS):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=target.parent, prefix=localbucket.TEMP_PREFIX)
        # A delete removed a folder on the way, just emptied: under mkstemp, or between
        # mkdir's failed create and its check that the folder is there (FileExistsError).
        except (FileNotFoundError, FileExistsError):
            if attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


@contextlib.contextmanager
def staged(target: Path, write: Callable[[BinaryIO], str]) -> Iterator[tuple[str, str]]:
    """``write`` run into a temporary file beside ``target``; yields (its path, the
    ETag ``write`` returned) for the caller to move into place. A file left unmoved
    (refused, or the caller raised) is removed."""
    fd, temp = temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as file:
            etag = write(file)
        yield temp, etag
    finally:
        Path(temp).unlink(missing_ok=True)
