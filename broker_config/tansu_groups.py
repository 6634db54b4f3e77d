# SPDX-License-Identifier: Apache-2.0
"""Unstick Tansu consumer groups whose leader has left (a Tansu 0.6 bug).

Tansu 0.6.0 handles a LeaveGroup while a group is forming by removing the member but
keeping it as the leader. Nothing replaces it: the rebalance timeout is stored, not
enforced, and every member that joins afterwards is told to follow a leader that never
syncs, so the group never forms and its partitions are read by no one (``make chaos``
stalled on exactly that). Apache Kafka elects a new leader among the members that
rejoined, so this only concerns the embedded broker.

A durable Tansu keeps each group as a JSON object in the store and writes it with an
If-Match on every group request; when the object changed underneath, Tansu reloads it.
So a :class:`GroupWatch` reads the group objects through the store's S3 API and, for a
group that shows a departed leader on two checks in a row, writes it back without the
leader (If-Match the copy it read). Tansu's next group request finds the object changed,
reloads it, and elects the next member that joins: no restart, no lost offset.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from parkpool.runtime import logs

__all__ = ["GROUPS_PREFIX", "GroupWatch", "departed_leader", "without_leader"]

log = logs.get_logger("parkpool.brokers")

# Tansu's default cluster id (the launcher does not set one) and its group layout.
GROUPS_PREFIX = "clusters/tansu_cluster/groups/consumers/"


def departed_leader(group: object) -> str | None:
    """The leader of a forming group that is no longer one of its members, else None
    (also for anything not shaped like a Tansu 0.6 group, which is left alone)."""
    if not isinstance(group, dict) or not isinstance(state := group.get("state"), dict):
        return None
    forming, members = state.get("Forming"), group.get("members")
    if not isinstance(forming, dict) or not isinstance(members, dict):
        return None
    leader = forming.get("leader")
    return leader if isinstance(leader, str) and leader not in members else None


def without_leader(group: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a forming group with no leader, so that the next member to join leads."""
    state = dict(group["state"])
    state["Forming"] = {**state["Forming"], "leader": None}
    return {**group, "state": state}


class GroupWatch:
    """Checks the durable Tansu's groups every ``interval_s`` on a daemon thread;
    ``cleared`` counts the departed leaders it removed, ``unreadable`` the group objects
    it could not parse (logged, and left alone)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        bucket: str,
        *,
        prefix: str = GROUPS_PREFIX,
        interval_s: float = 2.0,
    ) -> None:
        self._connect = connect  # makes a boto3 S3 client for the store, on first use
        self._s3: Any = None
        self._bucket = bucket
        self._prefix = prefix
        self.interval_s = interval_s
        self.cleared = 0
        self.unreadable = 0
        self._etags: dict[str, str] = {}  # groups found sound, by the version read
        self._suspects: dict[str, str] = {}  # group key -> leader seen departed last check
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tansu-group-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> list[str]:
        """One pass over the groups; returns the keys of those whose leader it removed."""
        if self._s3 is None:
            self._s3 = self._connect()
        return [key for key in self._changed_groups() if self._clear_if_stuck(key)]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except (BotoCoreError, ClientError) as exc:
                # The store restarts in chaos runs and at a supervisor's hand: try again.
                log.debug("tansu_group_watch_unreachable", error=str(exc))
            except Exception:  # a dead watch would let the next stuck group stall for good
                log.exception("tansu_group_watch_failed")

    def _changed_groups(self) -> list[str]:
        # A group that no one touches keeps its ETag: finished jobs' groups cost a listing
        # entry, not a read. A stuck one changes at every rejoin, so it is always read.
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self._prefix
        )
        listed = {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", ())}
        self._etags = {k: e for k, e in self._etags.items() if listed.get(k) == e}
        self._suspects = {k: v for k, v in self._suspects.items() if k in listed}
        return [k for k in listed if k not in self._etags]

    def _clear_if_stuck(self, key: str) -> bool:
        try:
            got = self._s3.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            # Deleted since the listing, or refused: the next pass tries it again.
            log.debug("tansu_group_unread", key=key, error=str(exc))
            return False
        etag = got["ETag"]
        try:
            group = json.loads(got["Body"].read())
        except ValueError as exc:
            self.unreadable += 1
            log.warning("tansu_group_unreadable", key=key, error=str(exc))
            self._etags[key] = etag  # not read again until Tansu rewrites it
            return False
        leader = departed_leader(group)
        if leader is None:
            self._suspects.pop(key, None)
            self._etags[key] = etag
            return False
        if self._suspects.get(key) != leader:
            # Seen once: read again next pass, changed or not; two in a row is stuck.
            self._suspects[key] = leader
            return False
        return self._rewrite(key, etag, group, leader)

    def _rewrite(self, key: str, etag: str, group: Mapping[str, Any], leader: str) -> bool:
        body = json.dumps(without_leader(group), separators=(",", ":")).encode()
        try:
            self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, IfMatch=etag)
        except ClientError:
            return False  # Tansu wrote it first; the next pass looks again
        self._suspects.pop(key, None)
        self.cleared += 1
        group_name = key.removeprefix(self._prefix).removesuffix(".json")
        log.warning("tansu_group_leader_cleared", group=group_name, departed=leader)
        return True
