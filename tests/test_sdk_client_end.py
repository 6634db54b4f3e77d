# SPDX-License-Identifier: Apache-2.0
"""A caller waiting on a job is never left blocked by the client itself: not when the
client closes, nor when its result reader meets an error it did not expect."""

from __future__ import annotations

import gc
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from parkpool.producer import client as client_module
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobState
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, ParkpoolError
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import wait_for

READER_THREADS = {"parkpool-results", "parkpool-reputation"}

pytestmark = pytest.mark.integration


def _client(kafka_conn: KafkaConnection, namespace: str) -> ParkpoolClient:
    return ParkpoolClient(ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED))


def test_closing_the_client_tells_those_waiting_on_its_jobs(
    kafka_conn: KafkaConnection, namespace: str
) -> None:
    # Given a job no car will run, and a thread waiting on it without a timeout
    client = _client(kafka_conn, namespace)
    handle = client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            handle.wait()
        except BaseException as exc:  # the test looks at what it was
            raised.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    # When the client closes
    client.close()
    waiter.join(timeout=15)
    # Then the waiter is told, by name, and the job is no longer running
    assert not waiter.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], ParkpoolError)
    assert "closed before job" in str(raised[0]) and handle.job_id in str(raised[0])
    assert handle.state is JobState.FAILED


def test_a_result_reader_that_fails_fails_the_jobs_instead_of_hanging_them(
    kafka_conn: KafkaConnection, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job no car will run yet
    with _client(kafka_conn, namespace) as client:
        handle = client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)

        # When the result reader meets an error nobody expected (a bug, injected here)
        def broken(_self: object, _client: object) -> None:
            raise RuntimeError("an unexpected bug")

        monkeypatch.setattr(client_module._ResultReader, "_check_stalls", broken)
        started = time.monotonic()
        # Then the waiter is told, naming what stopped, well before its own timeout
        with pytest.raises(BrokerError, match="result reader stopped"):
            handle.wait(timeout=60)
        assert time.monotonic() - started < 10
        # And a job submitted after is refused by name, not left to wait for ever
        with pytest.raises(BrokerError, match="result reader stopped"):
            client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)


def test_a_job_submitted_as_the_reader_stops_is_refused_not_left_waiting(
    kafka_conn: KafkaConnection, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(kafka_conn, namespace) as client:
        # Given a submit that passed the check that results can be read, and whose
        # result reader then meets an error nobody expected while the job is prepared
        # (hashing and uploading take seconds for a large one)
        def broken(_self: object, _client: object) -> None:
            raise RuntimeError("an unexpected bug")

        prepare = client_module.ParkpoolClient._tasks

        def reader_dies_meanwhile(self: Any, *args: Any) -> Any:
            monkeypatch.setattr(client_module._ResultReader, "_check_stalls", broken)
            wait_for(lambda: bool(self._reader.failure), 10, "the reader to stop")
            return prepare(self, *args)

        monkeypatch.setattr(client_module.ParkpoolClient, "_tasks", reader_dies_meanwhile)
        # When the job is registered, Then it is refused by name, rather than left with
        # nobody to read its results
        with pytest.raises(BrokerError, match="result reader stopped"):
            client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)
        assert client.metrics.value("parkpool_sdk_jobs_total", status="submitted") == 0


def test_a_client_that_fails_to_start_leaves_no_thread_behind(
    kafka_conn: KafkaConnection, namespace: str
) -> None:
    before = _reader_threads()
    # Given a metrics port another process holds
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ProducerSettings(
            kafka_conn, namespace, metrics_port=port, metrics_addr="127.0.0.1"
        )
        # When a client is made that would serve its metrics there, five times (a
        # service retrying), Then each attempt fails, by the port
        for _ in range(5):
            with pytest.raises(OSError):
                ParkpoolClient(settings)
    # And none leaves its result or reputation reader running
    assert _reader_threads() == before


def _reader_threads() -> int:
    return sum(t.name in READER_THREADS for t in threading.enumerate())


def test_a_long_lived_client_keeps_no_ended_job(
    gateway_factory: Callable[..., RunningGateway],
    fleet_factory: Callable[..., Fleet],
    kafka_conn: KafkaConnection,
    namespace: str,
) -> None:
    # Given a client that runs jobs one after another, as a service's does
    gateway_factory()
    fleet_factory(2)
    with _client(kafka_conn, namespace) as client:
        ended = []
        for _ in range(3):
            handle = client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)
            assert handle.wait(timeout=60) is not None
            ended.append(weakref.ref(handle))
            del handle
        # When the caller lets go of the handles
        gc.collect()
        # Then the client does not keep them (nor the answers they hold) alive
        assert [ref() for ref in ended] == [None, None, None]
        # While one a caller still holds is still the client's to give back
        held = client.submit("reduce", {"x": np.ones(8), "op": "sum"}, chunk_elems=4)
        held.wait(timeout=60)
        assert client.handle(held.job_id) is held
