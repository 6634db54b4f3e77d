# SPDX-License-Identifier: Apache-2.0
"""The store's signing keys as a gateway's loop uses them: never a refresh on the loop.

Rotating credentials (an instance role's, IRSA's, an assumed role's) are refreshed by
botocore when asked for near their expiry, and that refresh is a network call that may
block for seconds and fail. A gateway presigns on its one loop thread, so once started
(``SigningKeys.start``) it signs with a frozen snapshot that a thread of its own renews
ahead of expiry; the loop never waits for a refresh, and when there is no usable
snapshot it is refused at once. Not started (the SDK, a test), the caller's thread
refreshes, as botocore does everywhere else. Static keys never expire: no thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.credentials import RefreshableCredentials

from parkpool.runtime import logs
from parkpool.runtime.backoff import Backoff
from parkpool.schemas.errors import BrokerError

__all__ = ["SigningKeys", "Snapshot"]

log = logs.get_logger("parkpool.store")

# After a failed refresh the thread tries again after RETRY_S, doubling up to
# RETRY_CAP_S; a refused signature (a car waiting) makes it try at once.
RETRY_S = 1.0
RETRY_CAP_S = 60.0
# The least time between two renewals: credentials shorter-lived than botocore's
# advisory window (15 min) are due again as soon as renewed, and botocore would fetch
# them at every signature.
RENEW_GAP_S = 5.0
# The longest sleep between two looks: a suspended VM or a stepped clock must not make
# the thread sleep through the renewal. A look when nothing is due costs no fetch.
MAX_SLEEP_S = 60.0
FIRST_WAIT_S = 10.0  # start() waits this long for the first snapshot, then goes on
# Keys with less left than this sign no URL: it would reach a car all but dead, and the
# car, not the credentials, would be blamed for the failed fetch.
MIN_LEFT_S = 60.0
STOP_WAIT_S = 2.0  # a thread stuck in a refresh is a daemon: the process does not wait


@dataclass(frozen=True)
class Snapshot:
    """Frozen keys and when they expire (UNIX seconds; None: never, static keys)."""

    credentials: Any = field(repr=False)  # botocore's ReadOnlyCredentials: its repr shows them
    expires_at: float | None

    def left_s(self, now: float) -> float:
        return math.inf if self.expires_at is None else self.expires_at - now

    def lifetime(self, asked_s: int, now: float) -> int:
        """``asked_s``, cut to what is left of the keys' own life: S3 refuses a URL once
        the keys that signed it expired, whatever its X-Amz-Expires says, so a longer
        one would only claim a life it does not have."""
        left = self.left_s(now)
        return asked_s if math.isinf(left) else max(1, min(asked_s, math.floor(left)))

    def same_keys(self, other: Snapshot) -> bool:
        """Whether both sign as the same access key, secret and token, whatever their
        expiries: an instance role's source extends the expiry of the keys it has."""
        return _keys(self.credentials) == _keys(other.credentials)


def _keys(frozen: Any) -> tuple[str, str, str | None]:
    return frozen.access_key, frozen.secret_key, frozen.token


class SigningKeys:
    """botocore credentials as a gateway's loop signs with them: a snapshot that never
    makes the loop wait, renewed on a daemon thread ahead of expiry.

    The thread renews when botocore would (its advisory window, 15 minutes before
    expiry), so botocore's rules and lock decide every refresh. A snapshot is refused
    when there is none yet, when it has expired, and when the latest refresh raised:
    botocore raises only in its mandatory window (10 minutes before expiry), where it
    would have refused to sign too. Only while a refresh hangs in that window (botocore
    would block the caller) are the old keys still used, as long as they are valid, with
    each URL's lifetime cut to theirs.
    """

    def __init__(
        self,
        credentials: Any,
        *,
        clock: Callable[[], float] = time.time,
        retry_s: float = RETRY_S,
        renew_gap_s: float = RENEW_GAP_S,
        min_left_s: float = MIN_LEFT_S,
        on_refresh: Callable[[str], None] | None = None,
    ) -> None:
        # ``on_refresh`` hears each refresh's outcome on the thread: "renewed" (new
        # keys, whoever refreshed them), "kept" (due, but the same keys) or "failed"
        # (it raised).
        self._credentials = credentials
        self._clock = clock
        self._retry_s = retry_s
        self._renew_gap_s = renew_gap_s
        self._min_left_s = min_left_s
        self._on_refresh = on_refresh
        self._backoff = Backoff(base=retry_s, cap=max(retry_s, RETRY_CAP_S))
        # One tuple, replaced whole by the thread and read whole by the loop: a
        # reference assignment is atomic, so neither side takes a lock.
        self._state: tuple[Snapshot | None, str] = (None, "")
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._first = threading.Event()
        self._stopping = False

    @property
    def refreshable(self) -> bool:
        return isinstance(self._credentials, RefreshableCredentials)

    @property
    def last_error(self) -> str:
        """Why the latest refresh failed; "" when it did not."""
        return self._state[1]

    def start(self, on_refresh: Callable[[str], None] | None = None) -> None:
        """Renew on a thread of its own from now on, after waiting up to FIRST_WAIT_S
        for the first snapshot (a gateway's start, before any task is read);
        ``on_refresh``, if given, replaces the one the keys were made with."""
        if self._thread is not None or not self.refreshable:
            return
        self._on_refresh = on_refresh or self._on_refresh
        self._thread = threading.Thread(
            target=self._run, name="parkpool-store-credentials", daemon=True
        )
        self._thread.start()
        self._first.wait(FIRST_WAIT_S)

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def for_url(self, asked_s: int) -> tuple[Any, int]:
        """The frozen keys to sign a URL with, and its lifetime (capped by theirs).

        Started, this never blocks: BrokerError at once when no snapshot is usable.
        """
        # Not started (the SDK, a test, static keys): the caller's own thread takes them,
        # refreshing first if they are due, as botocore does everywhere else.
        snapshot = self._take() if self._thread is None else self._usable()
        return snapshot.credentials, snapshot.lifetime(asked_s, self._clock())

    def _usable(self) -> Snapshot:
        snapshot, error = self._state
        if (
            snapshot is not None
            and not error
            and snapshot.left_s(self._clock()) >= self._min_left_s
        ):
            return snapshot
        self._wake.set()  # a car is waiting: try again now, not after the backoff
        if snapshot is None:
            raise BrokerError(f"no store credentials yet: {error or 'still fetching them'}")
        left = snapshot.left_s(self._clock())
        if error:
            raise BrokerError(f"store credentials expire in {left:.0f} s, refresh failed: {error}")
        if left > 0:
            raise BrokerError(f"store credentials expire in {left:.0f} s, still refreshing")
        raise BrokerError(f"store credentials expired {-left:.0f} s ago, still refreshing")

    def _take(self) -> Snapshot:
        """Frozen keys and their expiry, refreshing first if botocore says they are due
        (blocking: on the thread, or on a caller that did not start it)."""
        credentials = self._credentials
        # The keys are read once: each read may refresh them (a second fetch), and two
        # reads may straddle a refresh.
        frozen = credentials.get_frozen_credentials()
        lock = getattr(credentials, "_refresh_lock", None)
        if lock is None:  # static keys: nothing refreshes them
            expiry = getattr(credentials, "_expiry_time", None)
        else:
            # botocore publishes a refresh's keys and expiry under this lock, in an
            # order that differs between its versions, and the store's S3 client
            # refreshes these same credentials: read outside it, the expiry may be a
            # later refresh's, giving the old keys the new ones' life. Inside, it waits
            # out a refresh in flight; one that landed since the read gives newer keys.
            with lock:
                if credentials._frozen_credentials is not frozen:
                    frozen = credentials._frozen_credentials
                expiry = credentials._expiry_time
        return Snapshot(frozen, None if expiry is None else expiry.timestamp())

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            wait = self._attempt_safely()
        finally:
            self._first.set()  # start() must not wait out FIRST_WAIT_S for a bug
        while not self._stopping:
            self._wake.wait(wait)
            self._wake.clear()
            if self._stopping:
                return
            wait = self._attempt_safely()

    def _attempt_safely(self) -> float:
        try:
            return self._attempt()
        except Exception:  # a bug here (a callback, botocore's own check) must not end
            # the renewals silently, leaving presigns refused for good
            log.exception("store_credentials_thread_error")
            return max(self._retry_s, self._backoff.next_delay())

    def _attempt(self) -> float:
        """One refresh, if due; the seconds until the next look."""
        before = self._state[0]
        due = before is None or self._credentials.refresh_needed()
        try:
            snapshot = self._take()
        except Exception as exc:  # whatever the provider raised: the thread lives on
            return self._failed(before, f"{type(exc).__name__}: {exc}")
        self._state = (snapshot, "")
        # Told by the keys, not by their expiry: an instance role's source hands the
        # same keys out again with a later expiry near the old one (botocore extends
        # it), and new keys may come with the same expiry. Not due, new keys are another
        # user's refresh (the S3 client's), which still renewed what is signed with.
        renewed = before is not None and not snapshot.same_keys(before)
        if due and before is not None and not renewed:
            return self._kept(snapshot)
        self._backoff.reset()
        if renewed:
            log.debug("store_credentials_renewed", expires_in_s=self._left(snapshot))
            self._report("renewed")
        return self._next_look(snapshot)

    def _failed(self, snapshot: Snapshot | None, error: str) -> float:
        self._state = (snapshot, error)
        delay = max(self._retry_s, self._backoff.next_delay())
        expires_in = None if snapshot is None else self._left(snapshot)
        log.warning(
            "store_credentials_refresh_failed",
            error=error,
            expires_in_s=expires_in,
            retry_in_s=round(delay, 1),
        )
        self._report("failed")
        return delay

    def _kept(self, snapshot: Snapshot) -> float:
        """Due, yet the same keys: botocore swallowed a failed refresh (before its
        mandatory window it logs and keeps them), or the source handed them out again
        (an instance role's does until 5 minutes before expiry, its expiry perhaps
        extended). Still usable."""
        delay = max(self._renew_gap_s, self._backoff.next_delay())
        log.warning(
            "store_credentials_not_renewed",
            expires_in_s=self._left(snapshot),
            retry_in_s=round(delay, 1),
        )
        self._report("kept")
        return delay

    def _next_look(self, snapshot: Snapshot) -> float:
        advisory_s = float(getattr(self._credentials, "_advisory_refresh_timeout", 0))
        due_in = snapshot.left_s(self._clock()) - advisory_s
        return min(MAX_SLEEP_S, max(self._renew_gap_s, due_in))

    def _left(self, snapshot: Snapshot) -> float:
        return round(snapshot.left_s(self._clock()), 1)

    def _report(self, outcome: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(outcome)
