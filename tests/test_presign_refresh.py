# SPDX-License-Identifier: Apache-2.0
"""Presigning never waits for a credentials refresh once the keys are started.

The unit tests use botocore's own RefreshableCredentials with a scripted refresh (its
advisory and mandatory windows shortened, so that a refresh falls due within a second);
the integration tests run a real gateway whose store credentials come from a container
endpoint (ECS, EKS Pod Identity) that hangs or fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import CredentialRetrievalError

from parkpool.broker_config.process import BrokerProcess
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.presign import Presigner
from parkpool.runtime.settings import Secret, StoreConnection
from parkpool.runtime.store_keys import MIN_LEFT_S, SigningKeys, Snapshot
from parkpool.schemas.errors import BrokerError

ENDPOINT = "http://127.0.0.1:9000"
KEY = "jobs/0123abcd/in/" + "f" * 64
THREAD = "parkpool-store-credentials"
FAST = 0.5  # a signature that waited for a refresh would take seconds


def metadata(access_key: str, lifetime_s: float) -> dict[str, str]:
    expiry = time.gmtime(time.time() + lifetime_s)
    return {
        "access_key": access_key,
        "secret_key": "s",
        "token": "",
        "expiry_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", expiry),
    }


class Source:
    """A scripted credentials source: it records which thread asked, hands out
    AKIDSECOND for an hour, fails while ``failing``, and blocks while ``held``."""

    def __init__(self) -> None:
        self.callers: list[str] = []
        self.failing = False
        self.entered = threading.Event()
        self.released = threading.Event()
        self.released.set()

    def hold(self) -> None:
        self.released.clear()

    def __call__(self) -> dict[str, str]:
        self.callers.append(threading.current_thread().name)
        self.entered.set()
        self.released.wait(10)
        if self.failing:
            raise CredentialRetrievalError(provider="container-role", error_msg="no answer")
        return metadata("AKIDSECOND", 3600)


class Outcomes:
    """What the refresh thread reported, to wait on rather than sleep."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, outcome: str) -> None:
        with self._changed:
            self.seen.append(outcome)
            self._changed.notify_all()

    def wait(self, outcome: str, count: int = 1, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.seen.count(outcome) >= count, timeout)


def refreshable(
    source: Source, lifetime_s: float, advisory_s: float | None, mandatory_s: float | None
) -> RefreshableCredentials:
    """AKIDFIRST for ``lifetime_s``, then whatever ``source`` hands out."""
    return RefreshableCredentials.create_from_metadata(
        metadata("AKIDFIRST", lifetime_s),
        source,
        "container-role",
        advisory_timeout=advisory_s,
        mandatory_timeout=mandatory_s,
    )


@pytest.fixture
def started() -> Iterator[Callable[..., SigningKeys]]:
    """Started keys, stopped (and any held refresh let go) after the test."""
    made: list[tuple[SigningKeys, Any]] = []

    def start(credentials: Any, **options: Any) -> SigningKeys:
        # These keys live a minute or two; the floor of what a URL may be signed with
        # has a test of its own (TestLifetime).
        options.setdefault("min_left_s", 1.0)
        keys = SigningKeys(credentials, **options)
        made.append((keys, getattr(credentials, "_refresh_using", None)))
        keys.start()
        return keys

    yield start
    for keys, source in made:
        if isinstance(source, Source):
            source.released.set()
        keys.stop()


def timed(sign: Callable[[], str]) -> tuple[str, float]:
    began = time.perf_counter()
    url = sign()
    return url, time.perf_counter() - began


class TestTheLoopNeverRefreshes:
    """A started presigner signs from its snapshot; only its own thread refreshes."""

    def test_a_slow_refresh_does_not_hold_up_a_signature(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys due for a refresh a second after start, whose refresh then hangs
        source, outcomes = Source(), Outcomes()
        source.hold()
        creds = refreshable(source, 60, advisory_s=59, mandatory_s=1)
        keys = started(creds, retry_s=0.05, renew_gap_s=0.05, on_refresh=outcomes)
        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        assert source.entered.wait(5), "the refresh never started"
        # When a URL is signed while that refresh hangs
        url, took = timed(lambda: signer.get(KEY, 30))
        # Then it is signed at once, with the keys of the snapshot, and the refresh
        # (still hanging) ran on the thread, not on the signer's
        assert took < FAST
        assert "X-Amz-Credential=AKIDFIRST%2F" in url
        assert outcomes.seen == []  # the first snapshot renews nothing
        assert source.callers == [THREAD]

    def test_a_refresh_done_in_the_background_is_signed_with(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys renewed in the background a second after start
        source, outcomes = Source(), Outcomes()
        creds = refreshable(source, 60, advisory_s=59, mandatory_s=1)
        keys = started(creds, retry_s=0.05, renew_gap_s=0.05, on_refresh=outcomes)
        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        first = signer.get(KEY, 30)
        # When the thread has renewed them
        assert outcomes.wait("renewed")
        # Then the next URL names the new key, with no error on record
        assert "X-Amz-Credential=AKIDFIRST%2F" in first
        assert "X-Amz-Credential=AKIDSECOND%2F" in signer.get(KEY, 30)
        assert keys.last_error == ""
        assert source.callers == [THREAD]

    def test_static_keys_need_no_thread(self, started: Callable[..., SigningKeys]) -> None:
        # Given static keys (no expiry), started
        before = set(threading.enumerate())
        keys = started(Credentials("AKIDSTATIC", "s"))
        # Then no thread runs for them, and they sign uncapped
        assert not set(threading.enumerate()) - before
        url = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys).get(KEY, 7 * 24 * 3600)
        assert "X-Amz-Credential=AKIDSTATIC%2F" in url
        assert "X-Amz-Expires=604800&" in url

    def test_stop_ends_the_thread(self) -> None:
        # Given started refreshable keys
        keys = SigningKeys(refreshable(Source(), 3600, None, None))
        before = set(threading.enumerate())
        keys.start()
        [thread] = set(threading.enumerate()) - before
        assert thread.name == THREAD and thread.daemon
        # When they are stopped, Then their thread ends
        keys.stop()
        assert not thread.is_alive()


class TestRefusedAtOnce:
    """No usable snapshot: the signature fails fast with the error a gateway catches."""

    def test_an_expired_snapshot_is_refused_without_a_refresh(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given started keys, valid for an hour, and then a clock an hour later
        source = Source()
        now = [time.time()]
        keys = started(refreshable(source, 3600, None, None), clock=lambda: now[0])
        store = BlobStore(StoreConnection(ENDPOINT, access_key="AKID", secret_key=Secret("s")))
        store._presigner = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        now[0] += 3600
        # When a URL is signed, Then the store refuses at once, with the BrokerError the
        # gateway's dispatch catches, and nothing was refreshed to try
        began = time.perf_counter()
        with pytest.raises(BrokerError, match=f"cannot presign {KEY}: store credentials expired"):
            store.presign_get(KEY, 30)
        assert time.perf_counter() - began < FAST
        assert source.callers == []

    def test_a_failed_refresh_is_refused_until_one_succeeds(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys that fall into botocore's mandatory window a second after start,
        # whose source then fails, and a long retry: only a refused signature makes the
        # thread try again soon
        source, outcomes = Source(), Outcomes()
        source.failing = True
        creds = refreshable(source, 60, advisory_s=59, mandatory_s=59)
        keys = started(creds, retry_s=30, renew_gap_s=0.05, on_refresh=outcomes)
        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        assert outcomes.wait("failed")
        # When a URL is signed, Then it is refused at once, naming the source's error
        message, took = timed(lambda: _refused(lambda: signer.get(KEY, 30)))
        assert took < FAST
        assert "refresh failed: CredentialRetrievalError" in message
        assert outcomes.wait("failed", count=2)  # the refusal's own try, which fails
        # When the source answers again, Then the next refusal has the thread renew at
        # once, and the signature after that names the new key
        source.failing = False
        assert "CredentialRetrievalError" in _refused(lambda: signer.get(KEY, 30))
        assert outcomes.wait("renewed")  # the first snapshot renewed nothing
        assert "X-Amz-Credential=AKIDSECOND%2F" in signer.get(KEY, 30)
        assert set(source.callers) == {THREAD}

    def test_nothing_fetched_yet_is_refused(self, started: Callable[..., SigningKeys]) -> None:
        # Given keys whose first fetch failed (botocore refreshes AKIDFIRST at once: it
        # is inside the 10-minute mandatory window)
        source = Source()
        source.failing = True
        creds = refreshable(source, 60, None, None)
        keys = started(creds, retry_s=30)
        # Then a signature is refused at once, and says why
        message, took = timed(
            lambda: _refused(lambda: Presigner(ENDPOINT, "b", "eu-west-1", keys).get(KEY, 1))
        )
        assert took < FAST
        assert message.startswith("no store credentials yet: CredentialRetrievalError")


class TestLifetime:
    """A URL claims no more life than the keys that signed it have left."""

    def test_a_url_is_capped_at_what_is_left_of_its_keys(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys with two minutes left (and windows that do not make them due)
        keys = started(refreshable(Source(), 120, advisory_s=10, mandatory_s=5))
        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        # When URLs are asked for longer and for shorter than that
        long_url, short_url = signer.put_once(KEY, 900), signer.get(KEY, 30)
        # Then the longer one is cut to what the keys have left, the shorter one is not
        expires = int(long_url.split("X-Amz-Expires=")[1].split("&")[0])
        assert 110 <= expires <= 120
        assert "X-Amz-Expires=30&" in short_url

    def test_keys_about_to_expire_sign_nothing_while_their_refresh_hangs(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys due a second after start, with under a minute left, whose refresh
        # then hangs (botocore records no error while it hangs)
        source = Source()
        source.hold()
        creds = refreshable(source, 50, advisory_s=49, mandatory_s=1)
        keys = started(creds, retry_s=30, renew_gap_s=0.05, min_left_s=MIN_LEFT_S)
        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", keys)
        assert source.entered.wait(5), "the refresh never started"
        # When a URL is asked for, Then it is refused at once (the gateway's presign
        # failure, which blames no car), not signed to reach a car all but dead
        message, took = timed(lambda: _refused(lambda: signer.get(KEY, 30)))
        assert took < FAST
        assert "store credentials expire in" in message


class Counted(RefreshableCredentials):
    """botocore's refreshable credentials, counting the reads of their keys; ``straddle``
    has another user of them (the store's S3 client) refresh them right after the
    next read, before that read's caller looks at anything else."""

    reads = 0
    straddle = False

    def get_frozen_credentials(self) -> Any:
        self.reads += 1
        frozen = super().get_frozen_credentials()
        if self.straddle:
            self.straddle = False
            refreshed_elsewhere(self)
        return frozen


def counted(source: Callable[[], dict[str, str]], lifetime_s: float) -> Counted:
    """AKIDFIRST for ``lifetime_s``, then whatever ``source`` hands out."""
    creds = Counted.create_from_metadata(metadata("AKIDFIRST", lifetime_s), source, "test")
    assert isinstance(creds, Counted)
    return creds


def refreshed_elsewhere(creds: RefreshableCredentials) -> None:
    """A refresh by another user of the same credentials, as botocore runs one."""
    with creds._refresh_lock:
        creds._protected_refresh(is_mandatory=True)


class TestOneRead:
    """A snapshot reads the keys once: every read may refresh them."""

    def test_static_keys_are_read_once_per_url(self) -> None:
        # Given static keys, counting the reads of their keys
        reads: list[str] = []

        class Static(Credentials):
            def get_frozen_credentials(self) -> Any:
                reads.append(self.access_key)
                return super().get_frozen_credentials()

        signer = Presigner(ENDPOINT, "parkpool", "eu-west-1", Static("AKIDSTATIC", "s"))
        # When a URL is signed, Then they were read once
        assert "X-Amz-Credential=AKIDSTATIC%2F" in signer.get(KEY, 30)
        assert reads == ["AKIDSTATIC"]

    def test_a_renewal_reads_the_keys_once(self) -> None:
        # Given refreshable keys that are due (inside botocore's mandatory window)
        source = Source()
        creds = counted(source, 60)
        keys = SigningKeys(creds)
        # When a snapshot is taken, Then it refreshed and read the keys once, and holds
        # the new keys with their own expiry
        frozen, lifetime = keys.for_url(7200)
        assert (creds.reads, source.callers) == (1, ["MainThread"])
        assert frozen.access_key == "AKIDSECOND"
        assert 3590 <= lifetime <= 3600

    def test_a_refresh_elsewhere_between_reads_pairs_keys_with_their_expiry(self) -> None:
        # Given keys with an hour left, refreshed by another user of them (the S3
        # client) right after the snapshot read them, to keys with two hours left
        creds = counted(lambda: metadata("AKIDSECOND", 7200), 3600)
        creds.straddle = True
        # When a snapshot is taken, Then its keys and expiry come from one refresh: the
        # old keys never claim the new keys' life
        frozen, lifetime = SigningKeys(creds).for_url(3 * 3600)
        assert creds.reads == 1
        if frozen.access_key == "AKIDFIRST":
            assert lifetime <= 3600
        else:
            assert frozen.access_key == "AKIDSECOND" and lifetime > 3600


class TestRefreshOutcome:
    """A refresh is reported renewed when it brought new keys, whatever their expiry."""

    def test_an_instance_roles_extended_expiry_is_not_a_renewal(
        self, started: Callable[..., SigningKeys]
    ) -> None:
        # Given keys due a second after start, whose source hands the same keys back
        # with a later expiry (botocore's instance-metadata fetcher extends the expiry of
        # keys near it, and the service hands out the same keys until 5 minutes before)
        outcomes = Outcomes()
        creds = RefreshableCredentials.create_from_metadata(
            metadata("AKIDFIRST", 60),
            lambda: metadata("AKIDFIRST", 3600),
            "iam-role",
            advisory_timeout=59,
            mandatory_timeout=1,
        )
        keys = started(creds, retry_s=0.05, renew_gap_s=0.05, on_refresh=outcomes)
        # When the thread has refreshed them, Then it reports the keys kept, not renewed,
        # and signs with the later expiry
        assert outcomes.wait("kept")
        assert "renewed" not in outcomes.seen
        frozen, lifetime = keys.for_url(7200)
        assert frozen.access_key == "AKIDFIRST"
        assert 3590 <= lifetime <= 3600

    def test_new_keys_with_the_same_expiry_are_a_renewal(self) -> None:
        # Given a first snapshot of keys, then a source that hands out new keys with the
        # same expiry
        outcomes = Outcomes()
        first = metadata("AKIDFIRST", 3600)
        creds = RefreshableCredentials.create_from_metadata(
            first, lambda: {**first, "access_key": "AKIDSECOND"}, "test"
        )
        keys = SigningKeys(creds, on_refresh=outcomes)
        keys._attempt()
        creds._advisory_refresh_timeout = 7200  # now due
        # When the next refresh is due and taken, Then the new keys are reported renewed
        keys._attempt()
        assert keys.for_url(30)[0].access_key == "AKIDSECOND"
        assert outcomes.seen == ["renewed"]

    def test_keys_renewed_by_another_user_are_a_renewal(self) -> None:
        # Given a first snapshot of keys with an hour left, then refreshed by another user
        # of them (the S3 client signing a request) before the thread found them due
        outcomes = Outcomes()
        creds = refreshable(Source(), 3600, None, None)
        keys = SigningKeys(creds, on_refresh=outcomes)
        keys._attempt()
        refreshed_elsewhere(creds)
        # When the thread next looks (nothing due), Then it took the new keys and
        # reports them renewed; a look that finds the same keys reports nothing
        keys._attempt()
        keys._attempt()
        assert keys.for_url(30)[0].access_key == "AKIDSECOND"
        assert outcomes.seen == ["renewed"]


def _refused(sign: Callable[[], str]) -> str:
    with pytest.raises(BrokerError) as caught:
        sign()
    return str(caught.value)


class TestNothingShowsTheKeys:
    def test_a_snapshots_repr_hides_its_credentials(self) -> None:
        keys = Credentials(
            "AKIDEXAMPLE", "wJalrXUtnFEMI-secret", "session-token"
        ).get_frozen_credentials()
        shown = repr(Snapshot(keys, None))
        assert "wJalrXUtnFEMI-secret" not in shown and "session-token" not in shown

    def test_a_broker_process_repr_hides_its_environment(self, tmp_path: Path) -> None:
        env = {"PARKPOOL_STORE_SECRET_KEY": "store-secret", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
        process = BrokerProcess("store", ["store"], 1, (tmp_path / "log",), env=env)
        assert "store-secret" not in repr(process) and "aws-secret" not in repr(process)
