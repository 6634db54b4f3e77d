# SPDX-License-Identifier: Apache-2.0
"""A task the car lets go takes its input download with it, at once.

The gateway revoking the lease, the owner taking the car back, the car stopping: each
used to leave the task's download running to its end or its time limit (a minute and
more), on the owner's bandwidth. Now the download's socket is shut on the spot, nothing
more is said for the task than before (nothing for a revoke, one ``released`` nack for a
hand-back), and it is no fault of the car's. A download another held task still waits
for goes on, for that task.

The store is a real HTTP server on loopback that sends half of each input and then
waits (tests.car_downloads); the car is a real one of a fleet on the session's brokers,
and the revoke reaches it through Mosquitto, as a gateway's would.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from parkpool.broker_config.certs import make_certs
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import NackReason, Preempted
from parkpool.worker.cancel import Cancel
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.dataplane import fetch
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import VehicleWorker, WorkerSettings
from tests.car_downloads import BODY, REF, GatedStore, GatewayVoice, Said, X, readers, stored_task
from tests.helpers import wait_for

PROMPT_S = 0.5  # what "at once" must beat; measured on loopback: 0.1 to 2 ms


@pytest.fixture
def store() -> Iterator[GatedStore]:
    gated = GatedStore(BODY)
    yield gated
    gated.close()


@pytest.fixture
def gateway(mqtt_conn: MqttConnection, namespace: str) -> Iterator[Callable[..., GatewayVoice]]:
    made: list[GatewayVoice] = []

    def make(car: VehicleWorker) -> GatewayVoice:
        made.append(GatewayVoice(mqtt_conn, namespace, car))
        return made[-1]

    yield make
    for peer in made:
        peer.peer.close()


def abandoned(entries: list[dict[str, Any]], epoch: int) -> bool:
    return any(e["event"] == "task_inputs_abandoned" and e["epoch"] == epoch for e in entries)


def faults(entries: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in entries if e["event"] in ("task_crashed", "task_failed")]


class TestTransfer:
    """A download's cancel shuts its socket from the cancelling thread."""

    @pytest.fixture(params=["http", "https"])
    def gated(
        self, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[GatedStore]:
        context = None
        if request.param == "https":  # TLS detaches the socket it wraps: the cut must reach it
            certs = make_certs(tmp_path / "certs", [])
            monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
            context = ssl_server_context(certs)
        gated = GatedStore(BODY, context)
        yield gated
        gated.close()

    def test_a_cancel_cuts_a_download_in_flight(self, gated: GatedStore) -> None:
        # Given a car half-way through a 1 MiB input (a minute's time limit)
        cancel = Cancel()
        outcome: list[BaseException] = []
        ended: list[float] = []

        def download() -> None:
            try:
                fetch(gated.url("x"), REF, 60, cancel)
            except BaseException as exc:
                outcome.append(exc)
            ended.append(time.monotonic())

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        assert gated.requested.wait(10)
        # When its task's cancel is set
        started = time.monotonic()
        cancel.set()
        thread.join(10)
        # Then the fetch ends at once, as abandoned, not as a store error; and the store
        # saw the car hang up
        assert len(outcome) == 1 and isinstance(outcome[0], Preempted), outcome
        assert ended[0] - started < PROMPT_S, f"took {ended[0] - started:.3f} s"
        assert gated.hung_up.wait(PROMPT_S)
        assert gated.requests == ["/x"]  # an abandoned transfer is not tried again

    def test_a_download_cancelled_before_it_began_makes_no_request(self, gated: GatedStore) -> None:
        cancel = Cancel()
        cancel.set()
        with pytest.raises(Preempted):
            fetch(gated.url("x"), REF, 60, cancel)
        assert gated.requests == []


def ssl_server_context(certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    return context


@pytest.mark.integration
class TestLetGo:
    """Revoked, handed back or stopped: the task's download ends at once, and the car
    says no more than it did before."""

    def test_a_revoke_cuts_the_download_and_sends_nothing(
        self,
        store: GatedStore,
        fleet_factory: Callable[..., Fleet],
        gateway: Callable[..., GatewayVoice],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given a car half-way through the input of the one task it holds
        (car,) = fleet_factory(1, prefix="rv").vehicles.values()
        said, gw = Said(car, monkeypatch), gateway(car)
        with capture_logs() as entries:
            gw.assign(stored_task(store, car, 1))
            assert store.requested.wait(10)
            # When the gateway revokes the lease
            revoked_at = time.monotonic()
            gw.revoke(1)
            # Then the car hangs up on the store at once, through the broker and all
            assert store.hung_up.wait(5), "the download went on after the revoke"
            took = store.hung_up_at - revoked_at
            assert took < PROMPT_S, f"the car hung up {took:.3f} s after the revoke"
            wait_for(lambda: abandoned(entries, 1), 5, "the task thread to let go")
        # And it said nothing for the task (a revoke is answered by nothing, as before),
        # counted no fault of its own, and holds nothing
        assert said.nacks == [] and said.results == []
        assert faults(entries) == [] and car.held == 0

    def test_the_owner_taking_the_car_back_cuts_the_download(
        self,
        store: GatedStore,
        namespace: str,
        mqtt_conn: MqttConnection,
        gateway: Callable[..., GatewayVoice],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given an owned car half-way through the input of the one task it holds
        bus = SimulatedBus()
        template = WorkerSettings("template", mqtt_conn, namespace, backend="numpy")
        policy = PolicyConfig(owner_away_s=0.5, resume_after_stop_s=0.5)
        fleet = Fleet(template, prefix="own", car=lambda _: bus, policy=policy)
        try:
            (car,) = fleet.add(1)
            wait_for(lambda: car.eligible, 10, "the car to be let run")
            said, gw = Said(car, monkeypatch), gateway(car)
            with capture_logs() as entries:
                gw.assign(stored_task(store, car, 1))
                assert store.requested.wait(10)
                # When the owner unlocks it
                unlocked_at = time.monotonic()
                bus.set(locked=False)
                # Then the car hangs up on the store at once
                assert store.hung_up.wait(5), "the download went on after the owner came"
                took = store.hung_up_at - unlocked_at
                assert took < PROMPT_S, f"the car hung up {took:.3f} s after the unlock"
                wait_for(lambda: abandoned(entries, 1), 5, "the task thread to let go")
            # And the task went back with one released nack, as every hand-back does
            assert [(n.epoch, n.reason) for n in said.nacks] == [(1, NackReason.RELEASED)]
            assert said.results == [] and faults(entries) == []
        finally:
            fleet.stop_all()

    @pytest.mark.parametrize(
        ("end", "nacked"), [("stop", [(1, NackReason.RELEASED)]), ("kill", [])]
    )
    def test_a_car_that_stops_or_vanishes_cuts_the_download(
        self,
        end: str,
        nacked: list[tuple[int, NackReason]],
        store: GatedStore,
        fleet_factory: Callable[..., Fleet],
        gateway: Callable[..., GatewayVoice],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given a car half-way through the input of the one task it holds
        fleet = fleet_factory(1, prefix="st")
        (car,) = fleet.vehicles.values()
        said, gw = Said(car, monkeypatch), gateway(car)
        with capture_logs() as entries:
            gw.assign(stored_task(store, car, 1))
            assert store.requested.wait(10)
            # When it stops (or vanishes, as out of coverage: no goodbye)
            ended_at = time.monotonic()
            if end == "stop":
                fleet.stop(car.vehicle_id)
            else:
                fleet.kill(car.vehicle_id)
            # Then it hung up on the store at once
            assert store.hung_up.wait(5), f"the download went on after the {end}"
            took = store.hung_up_at - ended_at
            assert took < PROMPT_S, f"the car hung up {took:.3f} s after the {end}"
            wait_for(lambda: abandoned(entries, 1), 5, "the task thread to let go")
        # And said what it always did: the task handed back once on a stop, nothing on
        # a kill (its lease runs out at the gateway)
        assert [(n.epoch, n.reason) for n in said.nacks] == nacked
        assert said.results == [] and faults(entries) == []


@pytest.mark.integration
class TestSharedDownload:
    """A download two held tasks wait for is cut only when neither wants it."""

    def test_a_revoke_leaves_the_block_to_the_task_still_held(
        self,
        store: GatedStore,
        fleet_factory: Callable[..., Fleet],
        gateway: Callable[..., GatewayVoice],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given a car that keeps nothing (each block is larger than its cache) and holds
        # two tasks on one block: the first fetching it, the second waiting for that fetch
        (car,) = fleet_factory(1, prefix="sh", cache_bytes=0).vehicles.values()
        said, gw = Said(car, monkeypatch), gateway(car)
        gw.assign(stored_task(store, car, 1))
        assert store.requested.wait(10)
        gw.assign(stored_task(store, car, 2))
        wait_for(lambda: readers(car.data.cache, REF.sha256) == 2, 10, "the second to wait")
        fetcher = int(store.requests[0].rsplit("=", 1)[1])
        # When the fetching task's lease is revoked, and the rest of the block arrives
        gw.revoke(fetcher)
        wait_for(lambda: car.held == 1, 5, "the revoke")
        store.gate.set()
        # Then the other task got the block from that one download and ran
        assert said.result_sent.wait(10), said.nacks
        (result,) = said.results
        assert result.epoch == 3 - fetcher and float(result.outputs["value"]) == float(X.sum())
        assert len(store.requests) == 1 and not store.hung_up.is_set()
        # And nothing was said for the revoked task
        assert said.nacks == []
