# SPDX-License-Identifier: Apache-2.0
"""The embedded object store: localbucket's S3 API over a folder, with SigV4 checked.

localbucket serves the S3 API from a plain folder but accepts any request. parkpool's
data plane leans on S3's own access control (docs/SECURITY.md, "Data plane"): cars hold no
credentials, only presigned URLs a gateway made, so a car can open exactly one object, for
exactly one method, until the URL expires. The embedded store must refuse what AWS S3
would refuse, or the tests would prove nothing, so this server verifies every request's
AWS Signature V4 (header or query form) before localbucket sees it.

The signature is recomputed with botocore's own signer (the code that made it), from the
request's method, path, query and signed headers, never hand-rolled. A signed payload
hash (``x-amz-content-sha256``), or else an ``x-amz-checksum-sha256``, is checked against
the body it covers.

Run: ``python -m parkpool.broker_config.objectstore --port P --access-key K
--secret-key S FOLDER`` (the secret may come from PARKPOOL_STORE_SECRET_KEY instead).
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

import localbucket
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from parkpool.broker_config import (
    store_deletes,
    store_etags,
    store_listing,
    store_puts,
    store_writes,
)
from parkpool.broker_config.store_headers import Headers
from parkpool.broker_config.store_locks import KeyLocks

__all__ = ["StoreKeys", "verify_request"]

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_EXPIRES_S = 7 * 24 * 3600  # S3's own ceiling for a presigned URL
MAX_SKEW_S = 15 * 60  # S3 refuses a header-signed request this far from its clock
MAX_OBJECT_BYTES = 5 * 1024**3  # S3's largest single PUT
MAX_KEY_BYTES = 1024  # S3's longest key, UTF-8
_AUTH_HEADER = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]{64})$"
)
# Objects up to this size get an ETag hashed from their bytes on every GET and
# conditional write; larger ones (the data plane's blobs) use localbucket's cache.
HASHED_BYTES = 256 * 1024
_UNSIGNED = {"UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"}
_NOT_A_NAME = frozenset({"", ".", ".."})  # key parts localbucket refuses: no way out of a bucket


@dataclass(frozen=True)
class StoreKeys:
    """The access keys the store accepts; the secrets never appear in a repr."""

    secrets: Mapping[str, str] = field(repr=False)

    def secret_for(self, access_key: str) -> str | None:
        return self.secrets.get(access_key)


class Denied(Exception):  # noqa: N818 - S3's own name for the outcome
    """Why a request was refused, as S3 would say it (not a parkpool error: it never
    leaves this server, which answers it as an S3 error document)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def verify_request(
    method: str,
    raw_path: str,
    headers: Mapping[str, str],
    keys: StoreKeys,
    now: float | None = None,
) -> str:
    """Check one request's SigV4 signature; return the payload hash it signed.

    Raises Denied for an anonymous, expired, unknown-key or mismatched request. The hash is
    what the body must hash to, or "" where the signer left the body unsigned.
    """
    now = time.time() if now is None else now
    url = urlsplit(raw_path)
    params = _query_pairs(url.query)
    lowered = {name.lower(): value for name, value in headers.items()}
    if _signed_in_query(params):
        return _verify_query(method, url.path, params, lowered, keys, now)
    if "authorization" in lowered:
        return _verify_header(method, url.path, params, lowered, keys, now)
    raise Denied("AccessDenied", "Anonymous requests are not allowed")


def _verify_query(
    method: str,
    path: str,
    params: list[tuple[str, str]],
    headers: Mapping[str, str],
    keys: StoreKeys,
    now: float,
) -> str:
    given = dict(params)
    if given.get("X-Amz-Algorithm") != ALGORITHM:
        raise Denied("AuthorizationQueryParametersError", "X-Amz-Algorithm must be SigV4")
    stamp = given.get("X-Amz-Date", "")
    signed_at = _parse_stamp(stamp)
    try:
        expires = int(given.get("X-Amz-Expires", ""))
    except ValueError:
        raise Denied("AuthorizationQueryParametersError", "X-Amz-Expires is not a number") from None
    if not 0 < expires <= MAX_EXPIRES_S:
        raise Denied("AuthorizationQueryParametersError", "X-Amz-Expires is out of range")
    if now > signed_at + expires:
        raise Denied("AccessDenied", "Request has expired")
    unsigned = [(k, v) for k, v in params if k != "X-Amz-Signature"]
    signed = given.get("X-Amz-SignedHeaders", "")
    expected = _signature(
        S3SigV4QueryAuth, method, path, unsigned, headers, signed,
        given.get("X-Amz-Credential", ""), stamp, keys,
    )  # fmt: skip
    _compare(expected, given["X-Amz-Signature"])
    return _payload_hash(headers, signed)


def _verify_header(
    method: str,
    path: str,
    params: list[tuple[str, str]],
    headers: Mapping[str, str],
    keys: StoreKeys,
    now: float,
) -> str:
    match = _AUTH_HEADER.match(headers["authorization"].strip())
    if match is None:
        raise Denied("AccessDenied", "Only AWS Signature V4 is accepted")
    stamp = headers.get("x-amz-date", "")
    if abs(now - _parse_stamp(stamp)) > MAX_SKEW_S:
        raise Denied("RequestTimeTooSkewed", "The request time is too far from the store's")
    if "x-amz-content-sha256" not in headers:
        raise Denied("InvalidRequest", "Missing x-amz-content-sha256")
    signed = match["signed"]
    expected = _signature(
        S3SigV4Auth, method, path, params, headers, signed, match["cred"], stamp, keys
    )
    _compare(expected, match["sig"])
    return _payload_hash(headers, signed)


def _signature(
    signer_type: type[S3SigV4Auth],
    method: str,
    path: str,
    params: list[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: str,
    credential: str,
    stamp: str,
    keys: StoreKeys,
) -> str:
    access_key, date, region, service, terminal = (credential.split("/") + [""] * 5)[:5]
    if service != "s3" or terminal != "aws4_request" or date != stamp[:8]:
        raise Denied("AuthorizationHeaderMalformed", "The credential scope is malformed")
    secret = keys.secret_for(access_key)
    if secret is None:
        raise Denied("InvalidAccessKeyId", "The access key id is not known to this store")
    names = [name for name in signed_headers.split(";") if name]
    if "host" not in names or any(name not in headers for name in names):
        raise Denied("AccessDenied", "A signed header is missing")
    # An x-amz-* header changes what a request does (x-amz-copy-source turns a car's
    # write-once PUT into a copy of any object), so S3 refuses one the signer did not sign.
    unsigned = sorted(n for n in headers if n.startswith("x-amz-") and n not in names)
    if unsigned:
        raise Denied(
            "AccessDenied",
            f"There were headers present in the request which were not signed: {unsigned[0]}",
        )
    request = AWSRequest(
        method=method.upper(),
        # S3 signs each path segment URI-encoded once; a client's own escaping may differ.
        url="http://" + headers["host"] + quote(unquote(path), safe="/-_.~"),
        headers={name: headers[name] for name in names},
        params=params,
    )
    request.context["timestamp"] = stamp
    signer = signer_type(Credentials(access_key, secret), "s3", region)
    canonical = signer.canonical_request(request)
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


def presigned(raw_path: str) -> bool:
    """Whether a request is signed in its URL (a car's), as ``verify_request`` decides
    it: on the query's decoded names, so that ``X-Amz-Signatur%65`` counts as well."""
    return _signed_in_query(_query_pairs(urlsplit(raw_path).query))


def _signed_in_query(params: list[tuple[str, str]]) -> bool:
    return any(name == "X-Amz-Signature" for name, _ in params)


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _parse_stamp(stamp: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise Denied(
            "AccessDenied", f"X-Amz-Date {stamp[:32]!r} is not a SigV4 timestamp"
        ) from None


def _compare(expected: str, given: str) -> None:
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise Denied("SignatureDoesNotMatch", "The request signature does not match")


def _payload_hash(headers: Mapping[str, str], signed_headers: str) -> str:
    signed = signed_headers.split(";")
    value = headers.get("x-amz-content-sha256", "") if "x-amz-content-sha256" in signed else ""
    if value and value not in _UNSIGNED and not value.startswith("STREAMING-"):
        return value
    # An unsigned body with a SHA-256 checksum (the SDK's uploads: it knows the hash
    # already, so the body is not hashed a second time to sign it) must match that, as
    # on S3. The SDK signs the header, so the body is bound to the signature all the same.
    if "x-amz-checksum-sha256" in headers:
        try:
            return base64.b64decode(headers.get("x-amz-checksum-sha256", ""), validate=True).hex()
        except ValueError:
            raise Denied("InvalidRequest", "x-amz-checksum-sha256 is not base64") from None
    return ""


def etag_of(file: BinaryIO, target: Path) -> str:
    """The ETag of the bytes an open object file holds, whatever its path names now.

    localbucket replaces an object by renaming a new file over it, so an open file never
    changes, but the path may name a newer one a moment after it was opened. Tansu reads
    a watermark (GET) and writes it back with the ETag it got (PUT If-Match): old bytes
    under the new ETag made that write succeed on stale data, and two producers were
    given the same offsets. Objects up to HASHED_BYTES (all of Tansu's state, and its
    batches) are hashed from the open file itself; a larger one takes localbucket's
    cached ETag only while its path still names this very file, which, being open,
    cannot be freed and its inode number reused.
    """
    opened = os.fstat(file.fileno())
    if opened.st_size > HASHED_BYTES and _names(target, opened):
        try:
            etag = store_etags.object_etag(target)
        except FileNotFoundError:  # deleted since: hash the bytes still open, below
            etag = ""
        if etag and _names(target, opened):
            return etag
    return store_etags.etag_of_fd(file.fileno())


def _current_etag(target: Path) -> str | None:
    """The ETag of the object a path names now, or None where there is none."""
    try:
        with target.open("rb") as file:
            return etag_of(file, target)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _names(target: Path, opened: os.stat_result) -> bool:
    try:
        current = target.stat()
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


_locks = KeyLocks()


class VerifyingHandler(localbucket.S3Handler):  # type: ignore[misc]
    """localbucket's handler behind a SigV4 check, with S3's conditional writes made
    atomic per object; keys are set on the class at start."""

    keys: StoreKeys = StoreKeys({})
    _payload: str = ""
    _target: Path = Path()
    _stats: dict[str, os.stat_result]  # the current listing's objects, by path
    # Small responses (HEAD, errors, ListObjects) otherwise wait ~40 ms for the client's
    # delayed ACK; S3 clients (Tansu's, boto3) pay that on every request.
    disable_nagle_algorithm = True
    # A client that stops sending (a car whose link died mid-upload) would hold its
    # thread, and a conditional write its object's lock, for good. S3 closes such
    # connections too, and kept-alive clients reconnect.
    timeout = 60
    MessageClass = Headers  # header lookups by dict: see store_headers

    def _dispatch(self, action: object) -> None:
        # Decided as the signature check decides it: a test on the raw text was passed by
        # a car that percent-encoded the name, and sent a chunked body read whole into
        # memory, past every size limit.
        framing = _framing_error(self.headers, presigned=presigned(self.path))
        if framing is not None:
            self.close_connection = True  # the body's end is unknown: nothing more is read
            self._send_error(framing)
            return
        try:
            self._payload = verify_request(self.command, self.path, dict(self.headers), self.keys)
        except Denied as denied:
            self._drain()
            status = HTTPStatus.BAD_REQUEST if denied.code.startswith("Author") else None
            self._send_error(
                localbucket.S3Error(status or HTTPStatus.FORBIDDEN, denied.code, denied.message)
            )
            return
        try:
            super()._dispatch(action)
        finally:
            # A checked body that was never written (a 412 on If-None-Match, common when
            # two writers race for one content-addressed block) must not stay pinned to
            # this connection's thread until its next PUT.
            store_etags.forget_verified()

    def _write_object(self, bucket: str, key: str, write: Callable[[Any], str]) -> str:
        # Tansu keeps each partition's watermark and its producers' sequences in small
        # objects it updates optimistically (PUT with If-Match, retry on 412). localbucket
        # ignores If-Match, and checks If-None-Match apart from the write: two produces
        # to one partition could both win, hand out offsets twice and hide acknowledged
        # records. Here the check and the move into place happen under one lock per
        # object; the body is staged before it (broker_config.store_writes).
        target = self._object_path(bucket, key)
        expected = self.headers.get("If-Match")
        create_only = self.headers.get("If-None-Match", "").strip() == "*"  # S3's only form
        conditional = expected is not None or create_only
        # An object that is there (If-None-Match) or is not (If-Match) refuses the write
        # before its body is staged: no file, and no folder for a key that does not
        # exist. Only a stat: Tansu's every produce is an If-Match write, and its ETag
        # is compared once, under the lock, where the answer holds.
        if conditional and target.exists() == create_only:
            raise self._precondition_failed_error()
        lock = _locks.hold((bucket, key)) if conditional else contextlib.nullcontext()
        with store_writes.staged(target, write) as (temp, etag), lock:  # staged, then locked
            if expected is not None:
                current = _current_etag(target)
                if current is None or not localbucket.etag_matches(expected, current):
                    raise self._precondition_failed_error()
            # The staged file's identity, size and time survive the move: the ETag is
            # cached against them, not against whatever the path names a moment later.
            staged = os.stat(temp)
            if create_only:
                try:
                    os.link(temp, target)  # fails where a racing write got there first
                except FileExistsError:
                    raise self._precondition_failed_error() from None
            else:
                os.replace(temp, target)
            store_etags.remember_etag(target, etag, store_etags.signature(staged))
        return etag

    def _put(self, bucket: str, key: str) -> None:
        length = self._streamed_length(key)
        if length is None:
            super()._put(bucket, key)
            return
        self._check_query("PutObject")
        body = store_puts.Body(self.rfile, length, self._payload)
        try:
            etag = self._write_object(bucket, key, body.write_to)
        finally:
            body.discard()
        self._send(HTTPStatus.OK, headers={"ETag": f'"{etag}"'})

    def _post_request(self, bucket: str, key: str) -> None:
        if key or "delete" not in self.query:
            super()._post_request(bucket, key)
            return
        self._check_query("DeleteObjects", {"delete"})
        bucket_dir = self._bucket_dir(bucket)
        if int(self.headers.get("Content-Length") or 0) > store_deletes.MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST, "MaxMessageLengthExceeded", "Your request was too big."
            )
        body = self._read_body()  # checked against a signed SHA-256, where there is one
        store_deletes.check_digest(body, self.headers)
        wanted = store_deletes.parse(body)
        failures = [f for k in wanted.keys if (f := self._delete_one(bucket_dir, bucket, k))]
        self._send_xml(store_deletes.answer(wanted, failures))

    def _delete_one(self, bucket_dir: Path, bucket: str, key: str) -> store_deletes.Failure | None:
        """One key of a DeleteObjects: gone, or why not. An absent key counts as deleted,
        as on S3; folders left empty go too, as localbucket's DeleteObject does."""
        try:
            target = self._object_path(bucket, key)
        except localbucket.S3Error as error:
            return store_deletes.Failure(key, error.code, error.message)
        try:
            with _locks.hold((bucket, key)):  # not between a conditional write's check and write
                target.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):  # no object by this name
            return None
        except OSError as exc:
            return store_deletes.Failure(key, "InternalError", f"not deleted: {exc.strerror}")
        store_etags.forget(target)
        parent = target.parent
        while parent != bucket_dir:
            try:
                parent.rmdir()
            except OSError:  # not empty, or another request's
                break
            parent = parent.parent
        return None

    def _delete_object(self, bucket: str, key: str) -> None:
        target = self._object_path(bucket, key)
        with _locks.hold((bucket, key)):  # not between a conditional write's check and write
            super()._delete_object(bucket, key)
        store_etags.forget(target)

    def _streamed_length(self, key: str) -> int | None:
        """The length of a plain PutObject's body large enough to stream to its file
        (broker_config.store_puts); None for anything else, which localbucket takes."""
        headers = self.headers
        if (
            not key
            or "x-amz-copy-source" in headers
            or "uploadId" in self.query
            or "partNumber" in self.query
            or _framed(headers)
        ):
            return None
        try:
            length = int(headers.get("Content-Length") or 0)
        except ValueError:
            return None
        return length if length >= store_puts.STREAMED_BYTES else None

    def _object_path(self, bucket: str, key: str) -> Path:
        # localbucket resolves each key with realpath, an lstat per folder of the key, on
        # each of the small requests Tansu makes by the thousand. A key with an empty,
        # "." or ".." part is refused before the join, and nothing the S3 API writes is a
        # link, so the joined path cannot leave the bucket (data_root is resolved at start).
        bucket_dir = self._bucket_dir(bucket)
        if len(key.encode()) > MAX_KEY_BYTES:
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST, "KeyTooLongError", "Your key is too long"
            )
        parts = key.split("/")
        # A part longer than a file name can be would fail in the file system, unanswered.
        if key.endswith("/") or any(p in _NOT_A_NAME or len(p.encode()) > 255 for p in parts):
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST, "InvalidArgument", "This server does not support this key."
            )
        return Path(f"{bucket_dir}/{key}")

    def _get(self, bucket: str, key: str, include_body: bool) -> None:
        self._target = self._object_path(bucket, key)  # for _send_file's ETag
        super()._get(bucket, key, include_body)

    def _list_entries(
        self,
        bucket_dir: Path,
        prefix: str,
        delimiter: str,
        marker: str,
        marker_is_prefix: bool,
        max_keys: int,
    ) -> store_listing.Page:
        # localbucket walks the whole bucket for every list. Tansu lists a partition's
        # folder on every fetch, so each fetch cost a walk over every topic's history and
        # every job's blobs. Every key under a prefix lies under the prefix's folder part,
        # so walking only that folder gives the same page.
        folder, _, rest = prefix.rpartition("/")
        parts = folder.split("/") if folder else []
        if any(part in _NOT_A_NAME for part in parts):
            contents, common, truncated, last = super()._list_entries(
                bucket_dir, prefix, delimiter, marker, marker_is_prefix, max_keys
            )
            return self._stat([(key, str(path)) for key, path in contents]), common, truncated, last
        start = f"{folder}/" if folder else ""
        if marker and not marker.startswith(start):
            skipped = start.startswith(marker) if marker_is_prefix else False
            if skipped or marker.encode() > start.encode():
                return [], [], False, ""  # the folder's keys all come before the marker
            marker, marker_is_prefix = "", False  # or all after it
        below = bucket_dir.joinpath(*parts)
        if not below.is_dir():
            return [], [], False, ""
        contents, common, truncated, last = store_listing.page(
            below, rest, delimiter, marker[len(start) :], marker_is_prefix, max_keys
        )
        contents = self._stat([(start + key, path) for key, path in contents])
        last = f"{last[:2]}{start}{last[2:]}" if last else ""  # "K:" or "P:", then the key
        return contents, [start + c for c in common], truncated, last

    def _stat(self, contents: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The listed objects that still exist, each stat'ed once (for its date, size and
        ETag): one deleted since the scan is left out before localbucket counts KeyCount."""
        self._stats = {}
        kept = []
        for key, path in contents:
            try:
                self._stats[path] = os.stat(path)
            except FileNotFoundError:
                continue
            kept.append((key, path))
        return kept

    def _add_list_entries(
        self,
        root: ET.Element,
        contents: list[tuple[str, str]],
        common_prefixes: list[str],
        encode: Callable[[str], str],
    ) -> None:
        # As localbucket's, with one stat per object (_stat's) instead of two: a
        # listing's cost per object bounds the fetch wait of every embedded-Kafka reader.
        for key, path in contents:
            stat = self._stats[path]
            item = ET.SubElement(root, "Contents")
            ET.SubElement(item, "Key").text = encode(key)
            ET.SubElement(item, "LastModified").text = _iso_timestamp(stat.st_mtime)
            ET.SubElement(item, "ETag").text = f'"{store_etags.object_etag(path, stat)}"'
            ET.SubElement(item, "Size").text = str(stat.st_size)
            ET.SubElement(item, "StorageClass").text = "STANDARD"
        for common in common_prefixes:
            item = ET.SubElement(root, "CommonPrefixes")
            localbucket.sub_element(item, "Prefix", encode(common))

    def _send_xml(self, root: ET.Element) -> None:
        self._send(HTTPStatus.OK, store_listing.to_xml(root), {"Content-Type": "application/xml"})

    def _read_body(self) -> bytes:
        body: bytes = super()._read_body()
        announced = self.headers.get("Content-Length")
        if announced is not None and not _framed(self.headers) and len(body) < int(announced):
            # The client went away mid-body: what came is not what it meant to store.
            self.close_connection = True
            raise localbucket.S3Error(
                HTTPStatus.BAD_REQUEST,
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length",
            )
        if self._payload:
            if hashlib.sha256(body).hexdigest() != self._payload:
                raise localbucket.S3Error(
                    HTTPStatus.BAD_REQUEST,
                    "XAmzContentSHA256Mismatch",
                    "The body does not hash to the SHA-256 its request signed",
                )
            store_etags.note_verified(body, self._payload)  # its ETag needs no second pass
        return body

    def _send_file(
        self,
        status: HTTPStatus,
        file: BinaryIO,
        start: int,
        length: int,
        headers: Mapping[str, str],
        include_body: bool,
    ) -> None:
        # localbucket opens the file, then takes the ETag of whatever the path names by
        # then: a write in between gave the old bytes under the new ETag (see etag_of).
        headers = {**headers, "ETag": f'"{etag_of(file, self._target)}"'}
        # Zero-copy from the page cache: the data plane's bulk GETs otherwise cost this
        # server a read and a write in Python per MiB, on the cores the cars need.
        self._send_headers(status, length, headers)
        if include_body and length:
            sent = self.connection.sendfile(file, start, length)
            if sent < length:
                self.close_connection = True

    def _drain(self) -> None:
        # The connection closes after an error, but an unread body must not be left for
        # the client to block on writing.
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= 64 * 1024 * 1024:
            self.rfile.read(length)


def _framing_error(headers: Mapping[str, str], presigned: bool) -> localbucket.S3Error | None:
    """What S3 would refuse about how a request's body is framed, before any of it is
    read: a Content-Length that is not a number (read as -1, it would read to EOF), one
    past S3's 5 GiB, and from a presigned URL (a car's) a chunked body, which has no
    length and which the server would otherwise hold in memory whole."""
    length = headers.get("Content-Length")
    if length is not None:
        length = length.strip(" \t")  # HTTP allows it around a value
    if length is not None and not (length.isascii() and length.isdigit()):
        return localbucket.S3Error(
            HTTPStatus.BAD_REQUEST, "InvalidArgument", "Content-Length is not a number"
        )
    if length is not None and int(length) > MAX_OBJECT_BYTES:
        return localbucket.S3Error(
            HTTPStatus.BAD_REQUEST,
            "EntityTooLarge",
            "Your proposed upload exceeds the maximum allowed object size",
        )
    if presigned and _framed(headers):
        return localbucket.S3Error(
            HTTPStatus.NOT_IMPLEMENTED,
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
        )
    return None


def _framed(headers: Mapping[str, str]) -> bool:
    """Whether the body comes in chunks (HTTP's or aws-chunked), not as Content-Length
    plain bytes."""
    return (
        "chunked" in headers.get("Transfer-Encoding", "").lower()
        or "aws-chunked" in headers.get("Content-Encoding", "")
        or headers.get("x-amz-content-sha256", "").startswith("STREAMING-")
    )


def _iso_timestamp(epoch: float) -> str:
    """As localbucket.iso_timestamp (S3's XML dates), without a datetime per object."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 resets connections when a fleet of cars, the
    # SDK and Tansu connect at once; a real S3 endpoint never does that.
    request_queue_size = 1024
    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parkpool-objectstore", description=__doc__)
    parser.add_argument("data_root", type=Path, help="folder that holds the buckets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-key", default=os.environ.get("PARKPOOL_STORE_ACCESS_KEY"))
    parser.add_argument("--secret-key", default=os.environ.get("PARKPOOL_STORE_SECRET_KEY"))
    args = parser.parse_args(argv)
    if not args.access_key or not args.secret_key:
        parser.error("--access-key and --secret-key (or PARKPOOL_STORE_*) are required")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    root = args.data_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    VerifyingHandler.data_root = root
    store_etags.install()
    VerifyingHandler.keys = StoreKeys({args.access_key: args.secret_key})
    server = _Server((args.host, args.port), VerifyingHandler)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
