# SPDX-License-Identifier: Apache-2.0
"""The stateless vehicle worker: pull work when there is room, run it, publish the result.

Nothing here survives a restart, and nothing needs to: a task the worker loses is
redone elsewhere when its lease ends, so the worker can always just stop.

What becomes of each task it is given is ``worker.tasks``: what the car lets in,
``worker.admission``; what it holds, ``worker.held``; running a kernel under the owner's
guard, ``worker.runner``. What it says back is ``worker.replies``, and how that is sent,
``worker.outbox``; how it splits its credits between gateways, ``worker.grants``, and
when it asks them for work, ``worker.pulls``. What it hears, and what that does, is
``worker.inbox``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.runtime import logs
from parkpool.runtime.mqtt import Will, connect_and_wait, new_client, wait_until
from parkpool.runtime.signing import ResultSigner
from parkpool.schemas import (
    Capabilities,
    MqttTopics,
    NackReason,
    PullRequest,
    VehicleState,
    VehicleStatus,
    encode,
)
from parkpool.worker.admission import Admission
from parkpool.worker.backend import Backend, select_backend
from parkpool.worker.blobcache import BlobCache
from parkpool.worker.carstate import CarSignals, CarState
from parkpool.worker.dataplane import CarData
from parkpool.worker.grants import GatewayBook
from parkpool.worker.guard import REAL_TIME, OwnerGuard, TimeBase
from parkpool.worker.held import WorkerSettings, task_context
from parkpool.worker.inbox import Inbox
from parkpool.worker.kernels import REGISTRY
from parkpool.worker.netloop import NetworkLoop
from parkpool.worker.outbox import Outbox
from parkpool.worker.policy import RUN, Decision, Mode, OwnerPolicy
from parkpool.worker.pulls import PullSchedule
from parkpool.worker.replies import heartbeat_of, status_of
from parkpool.worker.runner import TaskRunner
from parkpool.worker.tasks import TaskLine

__all__ = ["VehicleWorker", "WorkerSettings"]

log = logs.get_logger("parkpool.worker")
# How long a suspension's status waits for hand-backs another thread is still sending.
HAND_BACK_WAIT_S = 1.0


_STATE_OF_MODE = {
    Mode.RUN: VehicleState.ONLINE,
    Mode.DRAIN: VehicleState.DRAINING,
    Mode.SUSPEND: VehicleState.SUSPENDED,
}


class VehicleWorker:
    """One vehicle. Standalone it runs its own network loop, ticker and kernel pool; in a
    simulated fleet the fleet passes a shared ``network`` loop and ``pool`` and calls
    ``tick()`` itself, so thousands of vehicles fit in one process. Either way its MQTT
    connection is driven by a ``NetworkLoop``, so a real car and a simulated one reconnect
    by the same jittered backoff.

    With ``car`` signals, an owner policy guards it: the owner taking the car back stops
    its kernels between launches and hands every task back at once."""

    def __init__(
        self,
        settings: WorkerSettings,
        backend: Backend | None = None,
        *,
        network: NetworkLoop | None = None,
        pool: Executor | None = None,
        car: CarSignals | None = None,
        policy: OwnerPolicy | None = None,
        timebase: TimeBase = REAL_TIME,
    ) -> None:
        self.settings = settings
        self.vehicle_id = settings.vehicle_id
        self.topics = MqttTopics(settings.namespace)
        self.backend = backend or select_backend(settings.backend)
        self.connected_at: float | None = None  # monotonic time of the latest CONNACK
        self.connections = 0  # CONNACKs so far: the first connection, then reconnections
        self.guard = (
            OwnerGuard(car, policy or OwnerPolicy(), self._on_policy, timebase) if car else None
        )
        self._stopping = threading.Event()
        self.runner = TaskRunner(
            self.backend,
            self.guard,
            self._stopping,
            settings.gflops_per_s,
            settings.simulated_delay_s,
        )
        self.gateways = GatewayBook(self.vehicle_id, settings.gateways_per_vehicle)
        self.admission = Admission(settings.trusted_keys, self.vehicle_id)
        self.rejected = self.admission.rejected  # assignments refused: bad_signature, replayed
        signer = ResultSigner.load(settings.result_key) if settings.result_key else None
        self._departure: float | None = None  # the last next_departure a pull reported
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._announced_to: tuple[str, ...] = ()  # the K gateways our last status went to
        self.schedule = PullSchedule(settings, self.gateways)
        self._next_heartbeat = 0.0
        self._owns_network = network is None
        self._network = network or NetworkLoop(retry_log_level=logging.WARNING).start()
        self._owns_pool = pool is None
        # A thread for every task held, not only for every kernel: a prefetched task's
        # inputs download while the kernel before it runs, and it then waits for a slot.
        self._pool = pool or ThreadPoolExecutor(settings.capacity, f"veh-{self.vehicle_id}")
        self._log = log.bind(vehicle_id=self.vehicle_id)
        will = VehicleStatus(self.vehicle_id, VehicleState.OFFLINE, time.time(), "connection_lost")
        self._client = new_client(
            f"veh-{settings.namespace}-{self.vehicle_id}",
            settings.mqtt,
            will=Will(self.topics.will(self.vehicle_id), encode(will)),
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self.data = CarData(
            BlobCache(settings.cache_bytes), result_inline_bytes=settings.result_inline_bytes
        )
        self.outbox = Outbox(self._client, self.topics, self.vehicle_id, settings.mqtt, signer)
        self.tasks = TaskLine(
            self.vehicle_id,
            capacity=settings.capacity,
            concurrency=settings.concurrency,
            admission=self.admission,
            gateways=self.gateways,
            runner=self.runner,
            data=self.data,
            outbox=self.outbox,
            pool=self._pool,
            stopping=self._stopping,
            decision=lambda: self.decision,
            on_room=lambda: self.pull(force=True),
            on_preempted=self._after_preemption,
        )
        self.inbox = Inbox(
            self.topics,
            self.vehicle_id,
            self.gateways,
            self.tasks,
            pull=lambda: self.pull(force=True),
            pull_soon=self.schedule.soon,
            log=self._log,
        )
        # Messages whose handling raised, by kind: counted and dropped, never fatal.
        self.handler_errors = self.inbox.errors
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True)

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout: float = 15.0, abort: threading.Event | None = None) -> None:
        """Connect, subscribe and announce; raises BrokerError or TimeoutError when the
        broker does not answer in ``timeout`` (or ``abort`` is set, a stop meanwhile)."""
        self._network.attach(self._client)
        connect_and_wait(
            self._client,
            self.settings.mqtt,
            connected=self._connected,
            timeout=timeout,
            start_loop=False,
            abort=abort,
        )
        if not wait_until(self._subscribed, timeout, abort):
            raise TimeoutError(f"vehicle {self.vehicle_id}: task subscription not acknowledged")
        if self.guard is not None:
            self.guard.start()
            self.guard.car.subscribe(self._on_car_signals)
        self._announce()
        self._next_heartbeat = time.monotonic() + self.settings.heartbeat_s
        self.pull(force=True)
        if self._owns_network:
            self._ticker.start()

    def stop(self, reason: str = "stopped") -> None:
        """Owner-first stop: hand every held task back at once, then leave cleanly."""
        self._stopping.set()
        for item in self.tasks.held.take_all():
            self.tasks.nack(item.assignment, NackReason.RELEASED, reason, item.task)
        # Not connected (the broker is restarting, say): the gateway learns it from the
        # last will or the missing heartbeats instead, and the nacks wait in paho's queue.
        with contextlib.suppress(RuntimeError, ValueError):
            for info in self._status(VehicleState.OFFLINE, reason):
                info.wait_for_publish(timeout=5)
        self._network.detach(self._client)
        self._client.disconnect()
        if self._owns_network:
            self._close_own_network()
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.free_memory()
        # Now, not when the garbage collector reaches the worker's reference cycles: a
        # stopped car's cache (up to cache_bytes) would otherwise outlive it, and a fleet
        # whose cars come and go would hold every departed car's blocks.
        self.data.cache.clear()

    def kill(self) -> None:
        """Vanish without a DISCONNECT, as a car driving out of coverage does.

        The broker then publishes our last will, which is what the gateway must handle.
        """
        self._stopping.set()
        self.tasks.held.cancel_all()  # no download outlives the car
        if not self._owns_network:
            self._network.kill(self._client)
            return
        self._network.close()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _close_own_network(self, timeout: float = 2.0) -> None:
        """Let the DISCONNECT go out (the loop forgets the client once it is sent), then
        stop the loop: a clean leave, so the broker does not publish our last will."""
        deadline = time.monotonic() + timeout
        while self._network.has(self._client) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._network.close()

    @property
    def capabilities(self) -> Capabilities:
        rate = self.runner.gflops_per_s
        box_key = self.admission.box_key
        return Capabilities(self.backend.name, tuple(REGISTRY), gflops_per_s=rate, box_key=box_key)

    @property
    def decision(self) -> Decision:
        return self.guard.decision if self.guard else RUN

    @property
    def eligible(self) -> bool:
        return self.decision.runs

    @property
    def held(self) -> int:
        return len(self.tasks.held)

    @property
    def released(self) -> int:
        """Tasks handed back because the owner's policy stopped the car."""
        return self.tasks.held.released

    @property
    def completed(self) -> int:
        return self.tasks.completed

    @property
    def results_too_large(self) -> int:
        """Results not sent because they were over the MQTT limit (each task nacked)."""
        return self.outbox.too_large

    # ---------------------------------------------------------------- pulling

    def pull(self, *, force: bool = False, refresh: bool = False) -> None:
        """Tell the car's gateways what each may send it; absolute, so repeating is safe.

        ``force`` (room freed, a backlog changed): send what changed, often nothing, as a
        gateway refills a slot by itself when its lease ends. ``refresh`` (a new dwell,
        the owner's policy letting the car run again): every K gateway hears it again.
        Every ``pull_refresh_s`` while there is room, a gateway that has not answered
        the last pull hears it again: a QoS 0 pull may have been lost.
        """
        if self._stopping.is_set() or not self.eligible:
            return
        pulls = self.schedule.due(self.tasks.held, force=force, refresh=refresh)
        if not pulls:
            return
        capabilities = self.capabilities
        dwell = self.guard.dwell_s() if self.guard else 0.0
        for p in pulls:
            seen, grant = {p.gateway_id: p.seen}, {p.gateway_id: p.grant}
            pull = PullRequest(self.vehicle_id, p.grant, capabilities, seen, grant, dwell)
            self.outbox.pull(p.gateway_id, pull)

    def _tick_loop(self) -> None:
        while not self._stopping.wait(0.5):
            self.tick()

    def tick(self) -> None:
        """Periodic duties: refresh the pull, keep leases alive, send the heartbeat."""
        if self._stopping.is_set():
            return
        if self.guard is not None:
            self.guard.reconsider()  # rules that move with time: departure, dwell, budget
        self.pull(force=self.schedule.take_jittered())
        self._beat_leases()
        # A gateway that just became one of ours (or first) hears how we stand at once,
        # not a heartbeat later: it counts us in its fleet series from now on.
        mine = self.gateways.mine()
        if time.monotonic() >= self._next_heartbeat or mine != self._announced_to:
            self._announced_to = mine
            self._announce()
            self._next_heartbeat = time.monotonic() + self.settings.heartbeat_s

    def _beat_leases(self) -> None:
        """Keep the leases of running tasks alive, however long the kernel takes; hand
        back, uncounted, a prefetched task that could not start before its lease ran out.
        Kept, its lease would expire at the gateway as a failed attempt, and the car
        would run it for a result nobody takes."""
        now = time.time()
        for held in self.tasks.held.due_beats(now):
            self.outbox.heartbeat(heartbeat_of(held, self.vehicle_id, now))
        for held in self.tasks.held.unstarted_past(now):
            detail = "its lease ran out before a kernel slot freed"
            self.tasks.nack(held.assignment, NackReason.EXPIRED, detail, held.task)

    # ---------------------------------------------------------------- receiving

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._log.error("mqtt_connect_refused", reason=str(rc))
            return
        self.connected_at = time.monotonic()
        self.connections += 1
        self._connected.set()
        client.subscribe(
            [(self.topics.task(self.vehicle_id), 1), (self.topics.all_gateway_statuses, 1)]
        )
        if self._subscribed.is_set():  # a reconnect: say we are here again
            self.gateways.reset()
            self._announce()
            self.schedule.soon()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _m: int, codes: Any, _p: Any) -> None:
        if not any(code.is_failure for code in codes):
            self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.inbox.receive(msg)

    def _after_preemption(self) -> None:
        """A kernel stopped by the guard. The guard's stop hands every task back, then
        says so; a task held after it looked (one racing the owner's return) is handed
        back here, or it would stay held for good. If that is done, say at once how long
        the stop took (its status could not know yet); if not, its status will, and
        announcing before its nacks would make them look stale."""
        if self.guard is None:
            return
        decision = self.guard.decision
        if not decision.runs:
            self._release_all(decision.reason)  # whatever the guard's stop did not find
        if self.guard.running == 0 and self.tasks.held.handed_back():
            self._announce()

    # ---------------------------------------------------------------- the owner's policy

    def _on_policy(self, previous: Decision, decision: Decision) -> None:
        """The guard changed its mind: hand work back, say so, or ask for work again."""
        if self._stopping.is_set() or not self._subscribed.is_set():
            return  # start() announces the first decision itself
        if decision.mode is Mode.SUSPEND:
            self._release_all(decision.reason)
            self._await_hand_backs()
        self._announce()
        if decision.runs:
            self.pull(refresh=True)

    def _on_car_signals(self, state: CarState) -> None:
        """A new departure time changes the dwell gateways plan with: tell them now."""
        if state.next_departure != self._departure:
            self._departure = state.next_departure
            self.pull(refresh=True)

    def _await_hand_backs(self) -> None:
        """A stopped kernel's thread may be sending the nacks of tasks it took first:
        the status waits for them (briefly), or the gateway would hear the car is
        suspended first and take the tasks back as from a car gone offline, dropping
        their nacks as stale."""
        deadline = time.monotonic() + HAND_BACK_WAIT_S
        while not self.tasks.held.handed_back() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _release_all(self, reason: str) -> None:
        """Nack every held task at once, so the gateway redispatches without waiting."""
        with self.tasks.held.releasing() as held:
            for item in held:
                detail = f"owner policy: {reason}"
                self.tasks.nack(item.assignment, NackReason.RELEASED, detail, item.task)
                self._log.info(
                    "task_released", **task_context(item.assignment, item.task), reason=reason
                )
        if self.guard is not None and self.guard.running == 0:
            self.backend.free_memory()

    def _announce(self) -> list[mqtt.MQTTMessageInfo]:
        decision = self.decision
        reason = "" if decision.runs else decision.reason
        return self._status(_STATE_OF_MODE[decision.mode], reason)

    def _status(self, state: VehicleState, reason: str = "") -> list[mqtt.MQTTMessageInfo]:
        """Say how the car stands, and the figures the fleet's metrics are made of, to
        its K gateways and to any other that holds one of its tasks."""
        busy_s = self.runner.busy_s
        status = status_of(self.vehicle_id, state, reason, self.held, busy_s, self.guard)
        mine = self.gateways.mine()
        holders = {gateway for gateway, _ in self.tasks.held.sources()}
        gateways = [*mine, *sorted(holders - set(mine))]
        # The first of the K counts the car in the fleet series; the others only track it.
        first = mine[0] if mine else ""
        return [
            self.outbox.status(gateway, replace(status, primary=gateway == first))
            for gateway in gateways
        ]
