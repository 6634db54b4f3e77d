# SPDX-License-Identifier: Apache-2.0
"""One page of an S3 listing, from one folder of the embedded store, fast.

Tansu's S3 engine lists all of a partition's batch objects on every fetch, and must
finish within the fetch's wait or the fetch comes back empty (docs/DECISIONS.md). So
the listing's cost per object sets how long a wait every reader of the embedded Kafka
needs, and that wait is the latency of every hop through it. localbucket builds a
pathlib path per file and walks the whole folder again for every page of 1,000: here
the folder's names come from ``os.scandir`` as strings, sorted once per request, and a
page starts by bisection at its marker. ``to_xml`` writes the answer: ElementTree's own
serializer is Python, and cost more than the listing itself.

The rules are S3's, as localbucket applies them: keys compare as UTF-8 bytes; with a
delimiter, the keys past the prefix that contain it roll up into one common prefix; a
page holds at most ``max_keys`` entries of either kind and names the last.
"""

from __future__ import annotations

import bisect
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import localbucket

__all__ = ["Page", "page", "to_xml"]

# (contents as (key, file path), common prefixes, truncated, last entry as "K:key" or "P:prefix")
Page = tuple[list[tuple[str, str]], list[str], bool, str]


def page(
    folder: Path, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool, max_keys: int
) -> Page:
    """The entries of keys under ``folder`` (relative to it) after ``marker``."""
    keys = sorted(_files(str(folder), ""))
    names = [raw for raw, _ in keys]
    contents: list[tuple[str, str]] = []
    common: list[str] = []
    last = ""
    first = bisect.bisect_left(names, prefix.encode())
    if marker:
        first = max(first, bisect.bisect_right(names, marker.encode()))
    for raw, path in keys[first:]:
        key = raw.decode()
        if not key.startswith(prefix):
            break  # sorted: every later key is past the prefix too
        if marker and marker_is_prefix and key.startswith(marker):
            continue
        rolled = _rolled_up(key, prefix, delimiter)
        if rolled and common and common[-1] == rolled:
            continue
        if len(contents) + len(common) >= max_keys:
            return contents, common, max_keys > 0, last
        if rolled:
            common.append(rolled)
            last = "P:" + rolled
        else:
            contents.append((key, path))
            last = "K:" + key
    return contents, common, False, last


def _rolled_up(key: str, prefix: str, delimiter: str) -> str:
    if not delimiter:
        return ""
    cut = key.find(delimiter, len(prefix))
    return key[: cut + len(delimiter)] if cut >= 0 else ""


def _files(folder: str, above: str) -> Iterator[tuple[bytes, str]]:
    """(key as UTF-8, file path) of every object file under ``folder``, in no order."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return  # removed while listed: it held nothing by then
    for entry in entries:
        if entry.is_dir():  # as os.walk, which localbucket uses: a linked folder is skipped
            if not entry.is_symlink():
                yield from _files(entry.path, f"{above}{entry.name}/")
        elif not entry.name.startswith(localbucket.TEMP_PREFIX):  # a write in progress
            yield f"{above}{entry.name}".encode(), entry.path


# As ElementTree escapes an attribute's value (always in double quotes).
_ATTRIBUTE_ENTITIES = {'"': "&quot;", "\r": "&#13;", "\n": "&#10;", "\t": "&#09;"}


def to_xml(root: ET.Element) -> bytes:
    """The document as ``ET.tostring(root, "UTF-8", xml_declaration=True)`` reads it."""
    if any(not isinstance(e.tag, str) or e.tag.startswith("{") for e in root.iter()):
        # A namespaced tag needs ElementTree's prefixes (localbucket uses none today).
        written: bytes = ET.tostring(root, encoding="UTF-8", xml_declaration=True)
        return written
    out = ["<?xml version='1.0' encoding='UTF-8'?>\n"]
    _write(root, out)
    return "".join(out).encode()


def _write(element: ET.Element, out: list[str]) -> None:
    tag, text = element.tag, element.text
    if not len(element) and not element.attrib:  # a listing is mostly such leaves
        out.append(f"<{tag}>{escape(text)}</{tag}>" if text else f"<{tag} />")
    else:
        attributes = "".join(
            f' {name}="{escape(value, _ATTRIBUTE_ENTITIES)}"' for name, value in element.items()
        )
        out.append(f"<{tag}{attributes}>")
        if text:
            out.append(escape(text))
        for child in element:
            _write(child, out)
        out.append(f"</{tag}>")
    if element.tail:
        out.append(escape(element.tail))
