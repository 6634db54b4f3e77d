# SPDX-License-Identifier: Apache-2.0
"""DeleteObjects for the embedded store: up to 1,000 keys in one request, as S3 takes them.

A job's end deletes every object it stored, and a TTL sweep deletes what crashed clients
left: with one DeleteObject per key that is a request per block and per tile, which the
SDK spends on every job (parkpool.runtime.blobstore). localbucket has no DeleteObjects;
this module is the request's parsing and answer, and the handler (broker_config.objectstore)
does the unlinking.

S3's rules kept here: at most 1,000 keys, a body that names its own digest (Content-MD5
or an ``x-amz-checksum-*`` header, since a corrupted list would delete the wrong objects),
a key that is not there counts as deleted, and Quiet answers only the failures.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from xml.etree import ElementTree as ET

import localbucket

__all__ = ["MAX_BODY_BYTES", "MAX_KEYS", "DeleteList", "Failure", "answer", "check_digest", "parse"]

MAX_KEYS = 1000
# 1,000 keys of S3's 1,024 bytes each, with the XML around them.
MAX_BODY_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class DeleteList:
    keys: tuple[str, ...]
    quiet: bool


@dataclass(frozen=True)
class Failure:
    key: str
    code: str
    message: str


def check_digest(body: bytes, headers: Mapping[str, str]) -> None:
    """S3 refuses a DeleteObjects body that does not carry its digest, or whose digest
    differs. Content-MD5 and the CRC32, SHA-1 and SHA-256 checksums are checked here;
    CRC32C and CRC64NVME (no standard-library code) are taken as present only, on a
    request whose signature already binds its headers to a credential holder."""
    lowered = {name.lower(): value for name, value in headers.items()}
    given = {
        "content-md5": lambda: hashlib.md5(body).digest(),
        "x-amz-checksum-crc32": lambda: zlib.crc32(body).to_bytes(4, "big"),
        "x-amz-checksum-sha1": lambda: hashlib.sha1(body).digest(),
        "x-amz-checksum-sha256": lambda: hashlib.sha256(body).digest(),
    }
    named = [name for name in given if name in lowered]
    others = [n for n in lowered if n.startswith("x-amz-checksum-") and n not in given]
    if not named and not others:
        raise localbucket.S3Error(
            HTTPStatus.BAD_REQUEST,
            "InvalidRequest",
            "Missing required header for this request: Content-MD5 or x-amz-checksum-*",
        )
    for name in named:
        if lowered[name].strip() != base64.b64encode(given[name]()).decode():
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST,
                "BadDigest",
                f"The {name} you specified did not match what we received",
            )


def parse(body: bytes) -> DeleteList:
    """The keys a DeleteObjects body names; MalformedXML for anything else."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise _malformed("the body is not XML") from None
    if _local(root.tag) != "Delete":
        raise _malformed("the root element is not Delete")
    keys = []
    for item in root.findall("{*}Object"):  # {*}: in S3's namespace or in none
        key = item.findtext("{*}Key")
        if not key:
            raise _malformed("an Object has no Key")
        keys.append(key)
    if not keys:
        raise _malformed("no Object to delete")
    if len(keys) > MAX_KEYS:
        raise _malformed(f"more than {MAX_KEYS} objects in one request")
    quiet = (root.findtext("{*}Quiet") or "").strip().lower()
    return DeleteList(tuple(keys), quiet == "true")


def answer(wanted: DeleteList, failures: Sequence[Failure]) -> ET.Element:
    """The DeleteResult: every key deleted (unless quiet), then every failure."""
    root = ET.Element("DeleteResult", xmlns=localbucket.S3_NAMESPACE)
    failed = {f.key for f in failures}
    if not wanted.quiet:
        for key in wanted.keys:
            if key not in failed:
                ET.SubElement(ET.SubElement(root, "Deleted"), "Key").text = key
    for failure in failures:
        item = ET.SubElement(root, "Error")
        ET.SubElement(item, "Key").text = failure.key
        ET.SubElement(item, "Code").text = failure.code
        ET.SubElement(item, "Message").text = failure.message
    return root


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _malformed(why: str) -> localbucket.S3Error:
    return localbucket.S3Error(
        HTTPStatus.BAD_REQUEST,
        "MalformedXML",
        f"The XML you provided was not well-formed or did not validate: {why}",
    )
