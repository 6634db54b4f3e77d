# SPDX-License-Identifier: Apache-2.0
"""A Tansu group whose leader left mid-rebalance forms again (broker_config.tansu_groups)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from parkpool.broker_config.launcher import STORE_BUCKET, STORE_REGION, EmbeddedBrokers
from parkpool.broker_config.tansu_groups import (
    GROUPS_PREFIX,
    GroupWatch,
    departed_leader,
    without_leader,
)
from parkpool.runtime.blobstore import s3_client
from parkpool.runtime.settings import Secret, StoreConnection
from tests.helpers import wait_for

PARTITIONS = 4


def group(leader: str | None, members: list[str], state: str = "Forming") -> dict[str, Any]:
    """A group object as Tansu 0.6 stores it, trimmed to the fields that matter here."""
    detail: dict[str, Any] = {"protocol_type": "consumer", "protocol_name": "cooperative-sticky"}
    detail["leader"] = leader
    return {
        "session_timeout_ms": 6000,
        "members": {m: {"join_response": {"member_id": m}} for m in members},
        "generation_id": 3,
        "state": {state: detail},
    }


class TestDepartedLeader:
    """Only a forming group whose leader is not a member counts as stuck."""

    def test_leader_not_among_members_is_departed(self) -> None:
        assert departed_leader(group("a", ["b"])) == "a"

    def test_leader_among_members_is_not(self) -> None:
        assert departed_leader(group("a", ["a", "b"])) is None

    def test_no_leader_yet_is_not(self) -> None:
        assert departed_leader(group(None, ["b"])) is None

    def test_formed_group_is_not(self) -> None:
        # Tansu's Formed state handles a leaving leader itself
        assert departed_leader(group("a", ["b"], state="Formed")) is None

    def test_objects_of_another_shape_are_not(self) -> None:
        assert departed_leader({}) is None
        assert departed_leader({"state": "Forming", "members": []}) is None
        assert departed_leader({"state": {"Forming": {"leader": "a"}}, "members": ["b"]}) is None
        assert departed_leader(["not", "a", "group"]) is None

    def test_without_leader_keeps_everything_else(self) -> None:
        before = group("a", ["b"])
        after = without_leader(before)
        assert after["state"]["Forming"]["leader"] is None
        assert after["members"] == before["members"]
        assert after["state"]["Forming"]["protocol_name"] == "cooperative-sticky"
        assert before["state"]["Forming"]["leader"] == "a"  # the input is not changed


def store_client(brokers: EmbeddedBrokers) -> Any:
    conn = StoreConnection(
        brokers.store_endpoint,
        STORE_BUCKET,
        brokers.store_access_key,
        Secret(brokers.store_secret_key),
        STORE_REGION,
    )
    return s3_client(conn, attempts=1, connect_timeout_s=2, read_timeout_s=5)


@pytest.fixture
def store(brokers: EmbeddedBrokers) -> Any:
    return store_client(brokers)


@pytest.fixture
def durable(brokers: EmbeddedBrokers, tmp_path: Path) -> Iterator[EmbeddedBrokers]:
    """The session's brokers, or durable ones of this test's own when the session keeps
    Kafka in memory (PARKPOOL_DURABLE=0): only a durable Tansu keeps groups in the store."""
    if brokers.durable:
        yield brokers
        return
    with EmbeddedBrokers(run_dir=tmp_path / "brokers", durable=True) as own:
        yield own


@pytest.fixture
def watch(store: Any) -> GroupWatch:
    """A watch over a private prefix, so that the brokers' own watch never sees it."""
    return GroupWatch(lambda: store, STORE_BUCKET, prefix=f"watch-test/{uuid.uuid4().hex}/")


def put(store: Any, watch: GroupWatch, name: str, body: bytes) -> str:
    key = f"{watch._prefix}{name}.json"
    store.put_object(Bucket=STORE_BUCKET, Key=key, Body=body)
    return key


def read(store: Any, key: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(store.get_object(Bucket=STORE_BUCKET, Key=key)["Body"].read())
    return body


@pytest.mark.integration
class TestGroupWatch:
    """Against the real store: the watch rewrites a stuck group, and nothing else."""

    def test_stuck_group_loses_its_leader_on_the_second_pass(
        self, store: Any, watch: GroupWatch
    ) -> None:
        # Given a group object that shows a departed leader
        key = put(store, watch, "stuck", json.dumps(group("gone", ["here"])).encode())
        # When the watch looks once, then again
        first = watch.check()
        second = watch.check()
        # Then it waited for the second sighting, and then removed the leader only
        assert (first, second) == ([], [key])
        assert read(store, key) == without_leader(group("gone", ["here"]))
        assert watch.cleared == 1

    def test_sound_group_is_left_alone(self, store: Any, watch: GroupWatch) -> None:
        # Given a forming group whose leader is a member
        body = json.dumps(group("here", ["here", "other"])).encode()
        key = put(store, watch, "sound", body)
        etag = store.head_object(Bucket=STORE_BUCKET, Key=key)["ETag"]
        # When the watch looks three times
        results = [watch.check() for _ in range(3)]
        # Then it wrote nothing
        assert results == [[], [], []]
        assert store.head_object(Bucket=STORE_BUCKET, Key=key)["ETag"] == etag
        assert watch.cleared == 0

    def test_group_rewritten_by_tansu_in_between_is_not_overwritten(
        self, store: Any, watch: GroupWatch
    ) -> None:
        # Given a stuck group the watch has seen once
        key = put(store, watch, "racing", json.dumps(group("gone", ["here"])).encode())
        assert watch.check() == []
        # When Tansu writes a new leader just as the watch reads it a second time
        fresh = json.dumps(group("here", ["here"])).encode()
        original = store.get_object

        def get_then_tansu_writes(**kwargs: Any) -> Any:
            got = original(**kwargs)
            store.put_object(Bucket=STORE_BUCKET, Key=key, Body=fresh)
            return got

        store.get_object = get_then_tansu_writes
        try:
            cleared = watch.check()
        finally:
            store.get_object = original
        # Then the store refused the watch's stale write (If-Match), and Tansu's stands
        assert cleared == []
        assert read(store, key) == group("here", ["here"])
        assert watch.cleared == 0

    def test_unreadable_object_is_counted_and_kept(self, store: Any, watch: GroupWatch) -> None:
        # Given an object under the prefix that is not JSON, beside a stuck group
        bad = put(store, watch, "garbled", b"\x00not json")
        stuck = put(store, watch, "stuck", json.dumps(group("gone", ["here"])).encode())
        # When the watch looks twice
        cleared = [watch.check(), watch.check()]
        # Then the garbled one is counted once and left as it was; the stuck one is fixed
        assert cleared == [[], [stuck]]
        assert watch.unreadable == 1
        assert store.get_object(Bucket=STORE_BUCKET, Key=bad)["Body"].read() == b"\x00not json"


def consumer(brokers: EmbeddedBrokers, group_id: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": brokers.kafka_bootstrap,
            "group.id": group_id,
            "partition.assignment.strategy": "cooperative-sticky",  # as gateways use
            # Long heartbeats: the leader must not rejoin between the second member's join
            # and its own leaving, or the group forms before it leaves.
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 4000,
            "auto.offset.reset": "earliest",
        }
    )


def poll_until(member: Consumer, condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        member.poll(0.2)


@pytest.mark.integration
def test_group_whose_leader_leaves_mid_rebalance_forms_again(durable: EmbeddedBrokers) -> None:
    brokers, store = durable, store_client(durable)
    name = f"leader-leaves-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": brokers.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(name, PARTITIONS, 1)]).values():
        future.result(30)
    key = f"{GROUPS_PREFIX}{name}.json"
    before = brokers.group_leaders_cleared
    # Given a group led by A, which B has just joined (so the group is forming again)
    leader = consumer(brokers, name)
    leader.subscribe([name])
    poll_until(leader, lambda: len(leader.assignment()) == PARTITIONS, 30, "A's assignment")
    # Right after one of A's heartbeats, so that A cannot learn of B's join and rejoin
    # before it leaves: that would form the group, which Tansu then handles well.
    joined = read(store, key)
    (member_a,) = joined["members"]
    contact = joined["members"][member_a]["last_contact"]
    wait_for(
        lambda: read(store, key)["members"][member_a]["last_contact"] != contact, 10, "a heartbeat"
    )
    follower = consumer(brokers, name)
    follower.subscribe([name])
    poll_until(follower, lambda: len(read(store, key)["members"]) == 2, 30, "B's join")
    # When A leaves before it rejoins, which Tansu 0.6 answers by keeping A as the leader
    leader.close()
    try:
        # Then B gets every partition all the same, because the watch removed A as leader
        poll_until(follower, lambda: len(follower.assignment()) == PARTITIONS, 30, "B's assignment")
        assert brokers.group_leaders_cleared > before
        formed = read(store, key)["state"]["Formed"]
        assert list(read(store, key)["members"]) == [formed["leader"]]
    finally:
        follower.close()
