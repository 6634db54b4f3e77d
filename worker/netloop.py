# SPDX-License-Identifier: Apache-2.0
"""One thread driving the MQTT sockets of many simulated vehicles.

paho's own ``loop_start`` costs a thread per client; a fleet of thousands of vehicles
in one process needs one selector instead. paho supports this through its socket
callbacks; they may fire on any thread, so they only queue an operation and wake the
loop, which alone touches the selector and calls ``loop_read``/``loop_write``.
Clients that lose their connection are reconnected here, as ``loop_start`` would, but
after a capped exponential backoff with full jitter per client (``reconnect``): when a
broker restarts, its cars come back spread over the backoff window instead of all in
the same second.

paho's write-registration flag is not guarded against publishes from other threads, so
the register/unregister callbacks can arrive out of order. They are therefore only
hints: the loop watches a socket for writing exactly while paho has bytes queued for it,
and re-checks every client once a second, so no queued packet waits longer than that.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.runtime import logs
from parkpool.runtime.backoff import Backoff

log = logs.get_logger("parkpool.worker.netloop")
Op = tuple[str, mqtt.Client, Any]
MISC_EVERY_S = 1.0  # keepalive pings and retries; paho wants this about once a second
# The first retry comes within a second; each failure doubles the window, up to a minute.
RECONNECT_BASE_S = 1.0
RECONNECT_CAP_S = 60.0
# A connection that lived this long was a success: the next loss starts the backoff over.
STABLE_AFTER_S = 30.0


def jittered_reconnects() -> Backoff:
    return Backoff(base=RECONNECT_BASE_S, cap=RECONNECT_CAP_S)


class NetworkLoop:
    """``reconnect`` makes each client's backoff. ``retry_log_level``: a car alone on its
    loop logs every lost connection and failed attempt with the wait before the next
    (warning); a simulated fleet of thousands keeps them at debug."""

    def __init__(
        self,
        reconnect: Callable[[], Backoff] = jittered_reconnects,
        retry_log_level: int = logging.DEBUG,
    ) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Never block on a wake: a full buffer already means the loop will wake, and the
        # loop thread blocking on its own wake socket would freeze every vehicle.
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: collections.deque[Op] = collections.deque()
        self._clients: dict[int, mqtt.Client] = {}
        self._fds: dict[int, int] = {}  # id(client) -> registered fd
        self._writing: set[int] = set()  # ids of clients whose socket is watched for writes
        self._lost: dict[int, float] = {}  # id(client) -> when to try reconnecting
        # The same, ordered; checked every turn, so a jittered retry is not held back to
        # the once-a-second chores (which would bunch the cars up again).
        self._due: list[tuple[float, int]] = []
        self._closing: set[int] = set()  # ids of clients leaving on purpose
        self._reconnect = reconnect
        self._retry_log_level = retry_log_level
        self._backoffs: dict[int, Backoff] = {}  # id(client) -> its reconnect schedule
        self._opened: dict[int, float] = {}  # id(client) -> when its socket last opened
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-netloop", daemon=True)

    def start(self) -> NetworkLoop:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(10)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- clients

    def attach(self, client: mqtt.Client) -> None:
        self._clients[id(client)] = client
        self._backoffs[id(client)] = self._reconnect()
        opened = client.on_socket_open  # new_client's TCP_NODELAY hook: keep it

        def on_open(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            if opened is not None:
                opened(c, userdata, sock)
            self._queue("open", c, sock)

        client.on_socket_open = on_open
        client.on_socket_close = lambda c, _u, s: self._queue("close", c, s)
        client.on_socket_register_write = lambda c, _u, s: self._queue("write", c, s)
        client.on_socket_unregister_write = lambda c, _u, s: self._queue("unwrite", c, s)

    def has(self, client: mqtt.Client) -> bool:
        """Whether the loop still serves this client (a detached one leaves on close)."""
        return id(client) in self._clients

    def detach(self, client: mqtt.Client) -> None:
        """Forget a client once its socket closes (after a clean DISCONNECT): no reconnect."""
        self._closing.add(id(client))

    def kill(self, client: mqtt.Client) -> None:
        """Drop a client's connection without DISCONNECT, as a car leaving coverage would."""
        self._queue("kill", client, None)

    def _queue(self, op: str, client: mqtt.Client, sock: Any) -> None:
        self._ops.append((op, client, sock))
        self._wake()

    def _wake(self) -> None:
        if threading.current_thread() is self._thread:
            return  # the loop applies queued operations before it next waits
        # A full buffer means the loop is already due to wake; a closed one that it closed.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._stop.is_set():
            self._apply_ops()
            for key, mask in self._selector.select(timeout=0.05):
                try:
                    self._ready(key, mask)
                except (OSError, ValueError) as exc:
                    log.debug("socket_io_failed", error=str(exc))
                except Exception:
                    # A bug in one car's callback must not stop the loop serving the others.
                    log.exception("client_callback_failed")
            self._reconnect_due()
            if time.monotonic() >= next_misc:
                self._misc()
                next_misc = time.monotonic() + MISC_EVERY_S

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        client = key.data
        if client is None:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(65536)
            return
        if mask & selectors.EVENT_READ:
            client.loop_read()
            # TLS decrypts whole records: bytes it already holds will never wake select.
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                client.loop_read()
                sock = client.socket()
        if mask & selectors.EVENT_WRITE:
            client.loop_write()
            self._sync_write(client)

    def _apply_ops(self) -> None:
        while self._ops:
            op, client, sock = self._ops.popleft()
            handler = getattr(self, f"_op_{op}")
            # Operations are applied after the fact: the socket may be closed by now, and
            # one vehicle's stale socket must not stop the loop that serves all the others.
            try:
                handler(client, sock)
            except (OSError, KeyError, ValueError) as exc:
                log.debug("socket_op_skipped", op=op, error=str(exc))

    def _op_open(self, client: mqtt.Client, sock: Any) -> None:
        if id(client) not in self._clients:
            return
        fd = sock.fileno()
        self._fds[id(client)] = fd
        self._writing.discard(id(client))
        self._selector.register(fd, selectors.EVENT_READ, client)
        self._lost.pop(id(client), None)
        self._opened[id(client)] = time.monotonic()
        self._sync_write(client)

    def _op_close(self, client: mqtt.Client, _sock: Any) -> None:
        self._forget_fd(client)
        if id(client) in self._closing:
            self._closing.discard(id(client))
            self._forget(client)
        elif id(client) in self._clients:
            delay = self._retry_later(id(client))
            self._log_retry("mqtt_connection_lost", id(client), delay)

    def _retry_later(self, key: int) -> float:
        delay = self._retry_delay(key)
        due = time.monotonic() + delay
        self._lost[key] = due
        heapq.heappush(self._due, (due, key))
        return delay

    def _retry_delay(self, key: int) -> float:
        """The wait before this client's next connection attempt (its own backoff)."""
        backoff = self._backoffs.get(key)
        if backoff is None:
            backoff = self._backoffs[key] = self._reconnect()
        opened = self._opened.pop(key, None)
        if opened is not None and time.monotonic() - opened >= STABLE_AFTER_S:
            backoff.reset()
        return backoff.next_delay()

    def _forget(self, client: mqtt.Client) -> None:
        for book in (self._clients, self._backoffs, self._opened, self._lost):
            book.pop(id(client), None)

    def _op_write(self, client: mqtt.Client, _sock: Any) -> None:
        self._sync_write(client)

    def _op_unwrite(self, client: mqtt.Client, _sock: Any) -> None:
        self._sync_write(client)

    def _sync_write(self, client: mqtt.Client) -> None:
        """Watch the socket for writing exactly while paho has something to send."""
        fd = self._fds.get(id(client))
        if fd is None:
            return
        want = client.want_write()
        if want == (id(client) in self._writing):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        self._selector.modify(fd, events, client)
        if want:
            self._writing.add(id(client))
        else:
            self._writing.discard(id(client))

    def _op_kill(self, client: mqtt.Client, _sock: Any) -> None:
        self._forget(client)
        self._forget_fd(client)
        sock = client.socket()
        if sock is not None:
            sock.close()

    def _forget_fd(self, client: mqtt.Client) -> None:
        self._writing.discard(id(client))
        fd = self._fds.pop(id(client), None)
        # A failed modify() already unregistered it, and a closed fd may be gone too.
        if fd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)

    def _misc(self) -> None:
        for client in list(self._clients.values()):
            client.loop_misc()
            try:
                self._sync_write(client)
            except (OSError, KeyError, ValueError) as exc:
                log.debug("socket_sync_skipped", error=str(exc))

    def _reconnect_due(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            due, key = heapq.heappop(self._due)
            lost = self._clients.get(key)
            if lost is None or self._lost.get(key) != due:
                continue  # reconnected, forgotten, or rescheduled since
            try:
                lost.reconnect()
            except OSError as exc:
                delay = self._retry_later(key)
                self._log_retry("mqtt_reconnect_failed", key, delay, error=str(exc))

    def _log_retry(self, event: str, key: int, delay: float, **context: str) -> None:
        attempt = self._backoffs[key].failures if key in self._backoffs else 0
        log.log(
            self._retry_log_level, event, attempt=attempt, retry_in_s=round(delay, 2), **context
        )
