# SPDX-License-Identifier: Apache-2.0
"""The SDK's and gateways' side of the object store: upload once, presign, delete.

boto3 is the reference S3 client and speaks to AWS S3, MinIO, Ceph RGW and GCS interop
alike (docs/DECISIONS.md, "Claim check"). Presigning is local HMAC, so a gateway signs
URLs without any round trip, and never moves bulk bytes itself. Cars do not import
this module: they hold no credentials and fetch with the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from parkpool.runtime.settings import StoreConnection
from parkpool.schemas.errors import BrokerError, ConfigError

__all__ = ["BlobStore", "ObjectMissing", "s3_client", "sha256_hex", "with_expiry_rule"]

LIFECYCLE_RULE_ID = "parkpool-job-ttl"  # the one rule parkpool writes, and replaces
DELETE_BATCH = 1000  # S3's most keys in one DeleteObjects request
CONFLICT_TRIES = 3  # a write S3 answers 409 ConditionalRequestConflict is tried again
CONFLICT_PAUSE_S = 0.25  # then 0.5: a retried upload of the same block may still land
# What a store without DeleteObjects answers it with (GCS's XML API among them).
_NO_BATCH_DELETE = frozenset({"NotImplemented", "MethodNotAllowed", "501", "405"})
# How long key-by-key deletes follow such an answer before DeleteObjects is asked again:
# a proxy or a store mid-upgrade can give it once, and a client that believed it for
# good would spend a request per key for the rest of its life.
BATCH_PROBE_S = 600.0
_clock = time.monotonic  # the probe's clock; tests move it


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """One bucket of one S3 endpoint. Thread-safe (boto3 clients are)."""

    def __init__(self, conn: StoreConnection) -> None:
        if not conn.enabled:
            raise ConfigError("no object store configured (--store-endpoint)")
        self.conn = conn
        self.bucket = conn.bucket
        from parkpool.runtime.presign import Presigner  # botocore: ~0.17 s, when first used

        session = _session(conn)
        self._client = _client(session, conn.endpoint)
        # URLs name the endpoint cars reach; SigV4 signs the host, so sign for that one.
        public = conn.public_endpoint or conn.endpoint
        credentials = _credentials(conn, session)
        self._presigner = Presigner(public, self.bucket, conn.region, credentials)
        self._lock = threading.Lock()
        self.puts = 0  # objects written by this client (content addressing: once each)
        self.put_bytes = 0
        self.delete_requests = 0  # DeleteObject and DeleteObjects requests sent
        self._batch_again_at = 0.0  # monotonic; later while the store said it has none
        # botocore sends DeleteObjects a CRC32 only; S3 takes it, but MinIO and Ceph
        # releases before flexible checksums answer MissingContentMD5 without an MD5.
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)

    def __repr__(self) -> str:
        return f"BlobStore(endpoint={self.conn.endpoint!r}, bucket={self.bucket!r})"

    # ---------------------------------------------------------------- writing

    def ensure_bucket(self) -> None:
        """Create the bucket unless it is there. A bucket that exists but answers
        otherwise (another account's, or these credentials may not read it) is named as
        such: creating it could not help."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) not in _NO_BUCKET:
                raise BrokerError(
                    f"object store cannot use bucket {self.bucket}: {_why(exc)}"
                ) from None
            self._call("create bucket", self._client.create_bucket, **self._bucket_config())

    def _bucket_config(self) -> dict[str, Any]:
        # S3 creates a bucket in us-east-1 unless the request names the region, and
        # refuses one sent to another region's endpoint without it.
        if self.conn.region in ("", "us-east-1"):
            return {"Bucket": self.bucket}
        where = {"LocationConstraint": self.conn.region}
        return {"Bucket": self.bucket, "CreateBucketConfiguration": where}

    def put_if_absent(self, key: str, data: bytes | memoryview, sha256: str) -> bool:
        """Write ``key`` unless it exists; True when this call wrote it.

        ``If-None-Match: *`` makes the write atomic on S3 and on the embedded store, so two
        writers of the same content race harmlessly and nothing is ever overwritten.
        ``data`` may be any buffer (an array's memory): it is sent from where it lies.
        """
        for attempt in range(CONFLICT_TRIES):
            if attempt:  # the conflicting write may still be landing
                time.sleep(CONFLICT_PAUSE_S * 2 ** (attempt - 1))
            body = data if isinstance(data, bytes) else BufferReader(data)
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    IfNoneMatch="*",
                    ChecksumSHA256=_b64(sha256),
                )
                break
            except Exception as exc:
                if _code(exc) == "PreconditionFailed":
                    return False
                # S3's 409: a write of the key was in flight (boto3's own retry of a
                # timed-out attempt, say), and it may not land: only a stored object
                # means someone wrote it; otherwise the write is tried again.
                if _code(exc) == "ConditionalRequestConflict":
                    if self.exists(key):
                        return False
                    continue
                raise BrokerError(f"object store refused to write {key}: {_why(exc)}") from None
        else:
            raise BrokerError(f"object store refused to write {key}: ConditionalRequestConflict")
        with self._lock:
            self.puts += 1
            self.put_bytes += memoryview(data).nbytes
        return True

    # ---------------------------------------------------------------- reading

    def get(self, key: str, most: int | None = None) -> bytes:
        """The object's bytes, or only its first ``most`` (a reader that knows the size
        asks one more, to see a longer body without holding all of it). BrokerError for
        any failure, one while the body streams included."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in _MISSING:
                raise ObjectMissing(f"{key} is not in the object store") from None
            raise BrokerError(f"object store cannot read {key}: {_why(exc)}") from None
        stream = response["Body"]
        try:
            body: bytes = stream.read(most)
        except Exception as exc:
            raise BrokerError(f"object store failed while sending {key}: {_why(exc)}") from None
        finally:
            stream.close()
        return body

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in _MISSING:
                return False
            raise BrokerError(f"object store cannot check {key}: {_why(exc)}") from None
        return True

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified unix time) of every object under ``prefix``."""
        pages = self._client.get_paginator("list_objects_v2")
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"], item["LastModified"].timestamp()
        except Exception as exc:
            raise BrokerError(f"object store cannot list {prefix}: {_why(exc)}") from None

    # ---------------------------------------------------------------- deleting

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; how many there were."""
        keys = [key for key, _ in self.keys(prefix)]
        self.delete(keys)
        return len(keys)

    def sweep(self, prefix: str, older_than_s: float, now: float | None = None) -> int:
        """Delete objects under ``prefix`` older than ``older_than_s``: what a crashed SDK
        left behind, where the store has no lifecycle rule of its own."""
        cutoff = (time.time() if now is None else now) - older_than_s
        old = [key for key, modified in self.keys(prefix) if modified < cutoff]
        self.delete(old)
        return len(old)

    def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``: up to DELETE_BATCH in one DeleteObjects request, or one request
        per key on a store without it. A job's end deletes every block and every tile it
        stored, so per-key requests would cost a round trip each. Every batch is tried
        whatever the others did; BrokerError then says how many stayed, and why the
        first one did."""
        refused: list[str] = []  # "key: why", per object not deleted
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            batches = _clock() >= self._batch_again_at
            answer = self._delete_batch(batch) if batches else None
            refused += self._delete_each(batch) if answer is None else answer
        if refused:
            raise BrokerError(
                f"object store did not delete {len(refused)} of {len(keys)} objects: {refused[0]}"
            )

    def _delete_batch(self, keys: Sequence[str]) -> list[str] | None:
        """What one DeleteObjects request did not delete ([]: all of ``keys`` went); None
        where the store has no DeleteObjects (remembered for BATCH_PROBE_S: batches go
        key by key until then)."""
        self._count_delete()
        try:
            answer = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        except Exception as exc:
            if _code(exc) in _NO_BATCH_DELETE:
                self._batch_again_at = _clock() + BATCH_PROBE_S
                return None
            return [f"{key}: {_why(exc)}" for key in keys]
        # S3 answers 200 and lists, per key, what it would not delete (AccessDenied, ...).
        return [
            f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".rstrip()
            for e in answer.get("Errors") or []
        ]

    def _delete_each(self, keys: Sequence[str]) -> list[str]:
        refused = []
        for key in keys:
            self._count_delete()
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                refused.append(f"{key}: {_why(exc)}")
        return refused

    def _count_delete(self) -> None:
        with self._lock:
            self.delete_requests += 1

    def expire_after(self, prefix: str, days: int) -> None:
        """A bucket lifecycle rule: objects under ``prefix`` expire ``days`` after they
        were written (AWS S3, MinIO, Ceph RGW; the embedded store has none: sweep).
        The bucket's other rules are kept: S3 replaces the whole configuration."""
        current = self._lifecycle()
        config: dict[str, Any] = {"Rules": with_expiry_rule(current.get("Rules", []), prefix, days)}
        if "TransitionDefaultMinimumObjectSize" in current:  # the bucket's, not ours to reset
            config["TransitionDefaultMinimumObjectSize"] = current[
                "TransitionDefaultMinimumObjectSize"
            ]
        self._call(
            "set the lifecycle rule",
            self._client.put_bucket_lifecycle_configuration,
            Bucket=self.bucket,
            LifecycleConfiguration=config,
        )

    def _lifecycle(self) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = self._client.get_bucket_lifecycle_configuration(
                Bucket=self.bucket
            )
        except Exception as exc:
            if _code(exc) == "NoSuchLifecycleConfiguration":
                return {}
            raise BrokerError(
                f"object store cannot read the lifecycle rules: {_why(exc)}"
            ) from None
        return answer

    # ---------------------------------------------------------------- presigning

    def start(self, on_refresh: Callable[[str], None] | None = None) -> None:
        """Renew the presigning credentials ahead of expiry on a thread of their own, so
        that a presign never waits for a refresh (a gateway's loop); ``stop`` ends it.
        ``on_refresh`` hears each refresh's outcome: renewed, kept or failed."""
        self._presigner.keys.start(on_refresh)

    def stop(self) -> None:
        self._presigner.keys.stop()

    @property
    def credentials_error(self) -> str:
        """Why the presigning credentials' latest refresh failed; "" when it did not."""
        return self._presigner.keys.last_error

    def presign_get(self, key: str, expires_s: float) -> str:
        return self._presign(self._presigner.get, key, expires_s)

    def presign_put(self, key: str, expires_s: float) -> str:
        """A write-once URL: the car must send ``If-None-Match: *`` (it is signed), so
        nothing, not even the same car, can replace what was written under it."""
        return self._presign(self._presigner.put_once, key, expires_s)

    def _presign(self, sign: Callable[[str, int], str], key: str, expires_s: float) -> str:
        """BrokerError when it fails: local HMAC, but rotating credentials (an instance
        role's, IRSA's) can fail to refresh (after ``start``: refused at once)."""
        try:
            return sign(key, _url_lifetime(expires_s))
        except Exception as exc:
            # Our own refusal (store_keys) already says why; anything else is named.
            why = str(exc) if isinstance(exc, BrokerError) else _why(exc)
            raise BrokerError(f"object store cannot presign {key}: {why}") from None

    def _call(self, what: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except Exception as exc:
            raise BrokerError(f"object store cannot {what}: {_why(exc)}") from None


class ObjectMissing(BrokerError):  # noqa: N818 - reads as what happened
    """The store answered: no such object. Not an outage, so a caller may blame whoever
    named the key (a car's result) rather than the store."""


# The codes S3 and its look-alikes give a GET or HEAD of a key that is not there.
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})  # HEAD answers with no code


class BufferReader(io.RawIOBase):
    """A seekable file over a buffer, read without copying it whole: boto3 takes bytes
    or a file, and ``tobytes()`` of an 8 MiB block costs 8 MiB of new memory per upload
    (first-touch pages are most of an upload's CPU on a VM)."""

    def __init__(self, buffer: bytes | memoryview) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer: Any) -> int:
        part = self._view[self._at : self._at + len(buffer)]
        buffer[: len(part)] = part
        self._at += len(part)
        return len(part)


def with_expiry_rule(rules: list[dict[str, Any]], prefix: str, days: int) -> list[dict[str, Any]]:
    """``rules`` with parkpool's expiry rule in place of any earlier one of its ID.

    Noncurrent versions expire after a day too: on a versioned bucket a delete only adds
    a marker, and the bytes (a confidential job's ciphertext included) would stay. A kept
    rule in S3's first form (``Prefix`` on the rule) is rewritten as a ``Filter`` of the
    same prefix: S3 refuses a configuration that mixes the two forms.
    """
    rule = {
        "ID": LIFECYCLE_RULE_ID,
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "Expiration": {"Days": days},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    }
    kept = [_filtered(r) for r in rules if r.get("ID") != LIFECYCLE_RULE_ID]
    return [*kept, rule]


def _filtered(rule: dict[str, Any]) -> dict[str, Any]:
    if "Prefix" not in rule or "Filter" in rule:
        return rule
    rest = {k: v for k, v in rule.items() if k != "Prefix"}
    return {**rest, "Filter": {"Prefix": rule["Prefix"]}}


def _url_lifetime(expires_s: float) -> int:
    # SigV4 signs the time truncated to the second, so one second more makes the URL
    # live at least as long as asked, never up to a second less; S3 allows 7 days.
    return max(1, min(math.ceil(expires_s) + 1, 7 * 24 * 3600))


def _credentials(conn: StoreConnection, session: Any) -> Any:
    """The session's credentials; ConfigError, at start, when there are none: every
    request and every URL is signed, so a store without them can do nothing at all."""
    if bool(conn.access_key) != bool(conn.secret_key.value):
        raise ConfigError("set both --store-access-key and --store-secret-key, or neither")
    credentials = session.get_credentials()
    if credentials is None:
        raise ConfigError(
            f"no credentials for the object store at {conn.endpoint}: set "
            "--store-access-key and --store-secret-key (PARKPOOL_STORE_ACCESS_KEY, "
            "PARKPOOL_STORE_SECRET_KEY), or give boto3 its own (AWS_* variables, a "
            "credentials file, an instance role)"
        )
    return credentials


def _session(conn: StoreConnection) -> Any:
    """One boto3 session for the client and the presigner: the same credentials, from
    the settings or else boto3's own chain (environment, instance role, IRSA)."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id=conn.access_key or None,
        aws_secret_access_key=conn.secret_key.value or None,
        region_name=conn.region,
    )


def s3_client(
    conn: StoreConnection,
    *,
    attempts: int = 4,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
) -> Any:
    """A boto3 S3 client for ``conn``'s endpoint, set up as every part of the project
    talks to S3, on its own session (boto3's default one is not thread-safe). A caller
    that tries again on its own (the embedded Kafka's group watch) asks for one attempt
    and short timeouts."""
    return _client(_session(conn), conn.endpoint, attempts, connect_timeout_s, read_timeout_s)


def _client(
    session: Any,
    endpoint: str,
    attempts: int = 4,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
) -> Any:
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",  # boto3 presigns SigV2 in us-east-1 by default
        # The body is not hashed again to sign it: the signed ChecksumSHA256 header binds
        # it, and the store checks it (as S3 does over TLS by default).
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        # The body's SHA-256 is sent (ChecksumSHA256); no extra CRC trailer per upload.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=16,
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _add_content_md5(request: Any, **_: Any) -> None:
    body = request.body or b""
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode()


def _b64(sha256: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _why(exc: Exception) -> str:
    return _code(exc) or f"{type(exc).__name__}: {exc}"
