# SPDX-License-Identifier: Apache-2.0
"""Presigned S3 URLs, signed by botocore's own SigV4 query signer without a client call.

A gateway hands every car three URLs per task (two inputs, one write-once output). Made
through ``client.generate_presigned_url`` each cost 0.39-0.50 CPU-ms (botocore resolves
its endpoint ruleset and fires its events per URL), so a gateway dispatching 2,000 stored
tasks/s would spend about 2.7 cores on presigning alone. Here the URL is built and handed
straight to ``S3SigV4QueryAuth``, the class ``generate_presigned_url`` ends in: 0.23-0.26
CPU-ms (both measured on the 2-core AMD EPYC VM of 2026-12-06), and the same URL
(tests/test_presign.py compares the two, character for character).

The keys come from ``store_keys.SigningKeys``: on a started gateway, a snapshot renewed
off its loop, each URL's lifetime cut to what the keys have left.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest

from parkpool.runtime.store_keys import SigningKeys
from parkpool.schemas.errors import ConfigError

__all__ = ["Presigner"]


class Presigner:
    """Path-style presigned GET and write-once PUT URLs for one bucket of one endpoint."""

    def __init__(self, endpoint: str, bucket: str, region: str, credentials: Any) -> None:
        # ``credentials`` is botocore's, or SigningKeys made of them (to choose how
        # they are refreshed). None fails here, at start, rather than at the first task
        # given to a car.
        if credentials is None:
            raise ConfigError(f"no credentials to presign URLs of {endpoint} with")
        self._base = f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}"
        self._region = region
        keys = credentials if isinstance(credentials, SigningKeys) else SigningKeys(credentials)
        self.keys = keys

    def __repr__(self) -> str:
        return f"Presigner({self._base!r}, region={self._region!r})"

    def get(self, key: str, expires_s: int) -> str:
        return self._sign("GET", key, expires_s, {})

    def put_once(self, key: str, expires_s: int) -> str:
        """A PUT that must carry ``If-None-Match: *``: the header is signed, so the URL
        cannot replace an object, not even one its own holder wrote."""
        return self._sign("PUT", key, expires_s, {"If-None-Match": "*"})

    def _sign(self, method: str, key: str, expires_s: int, headers: dict[str, str]) -> str:
        # S3 keys are URI-encoded once, slashes kept, as botocore encodes a {Key+} label.
        request = AWSRequest(method, f"{self._base}/{quote(key, safe='/~')}", headers)
        frozen, lifetime = self.keys.for_url(expires_s)
        S3SigV4QueryAuth(frozen, "s3", self._region, expires=lifetime).add_auth(request)
        url: str = request.prepare().url
        return url
