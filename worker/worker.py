# SPDX-License-Identifier: Apache-2.0
"""The stateless vehicle worker: pull work when there is room, run it, publish the result.

Nothing here survives a restart, and nothing needs to: a task the worker loses is
redone elsewhere when its lease ends, so the worker can always just stop.

What the car lets in is ``worker.admission``; what it says back, ``worker.replies``;
how it splits its credits between gateways, ``worker.grants``; running a kernel under
the owner's guard, ``worker.runner``.
"""

from __future__ import annotations

import collections
import contextlib
import random
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from parkpool.runtime.mqtt import Will, connect_and_wait, new_client
from parkpool.runtime.signing import ResultSigner
from parkpool.schemas import (
    Assignment,
    Capabilities,
    DecodeError,
    GatewayStatus,
    KernelError,
    MqttTopics,
    NackReason,
    Preempted,
    PullRequest,
    Reject,
    Result,
    Retry,
    Revoke,
    TaskChunk,
    ValidationError,
    VehicleState,
    VehicleStatus,
    decode,
    encode,
)
from parkpool.schemas.codec import peek_type
from parkpool.worker.admission import Admission
from parkpool.worker.backend import Backend, select_backend
from parkpool.worker.carstate import CarSignals, CarState
from parkpool.worker.grants import GatewayBook
from parkpool.worker.guard import REAL_TIME, OwnerGuard, TimeBase
from parkpool.worker.held import Held, WorkerSettings, task_context
from parkpool.worker.kernels import REGISTRY
from parkpool.worker.netloop import NetworkLoop
from parkpool.worker.policy import RUN, Decision, Mode, OwnerPolicy
from parkpool.worker.replies import heartbeat_of, nack_of, result_of, status_of
from parkpool.worker.runner import TaskRunner

__all__ = ["VehicleWorker", "WorkerSettings"]

log = structlog.get_logger("parkpool.worker")


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
        self.completed = 0
        self.released = 0  # tasks handed back because the owner policy stopped the car
        self._releasing = 0  # hand-backs whose nacks are still being sent
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
        self._held: dict[int, Held] = {}
        self.gateways = GatewayBook()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(settings.concurrency)
        self.admission = Admission(settings.trusted_keys, self.vehicle_id)
        self.rejected = self.admission.rejected  # assignments refused: bad_signature, replayed
        self.handler_errors: collections.Counter[str] = collections.Counter()
        self._signer = ResultSigner.load(settings.result_key) if settings.result_key else None
        self._departure: float | None = None  # the last next_departure a pull reported
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._last_pull = 0.0  # monotonic time of the last pull sent
        self._refresh_s = settings.pull_refresh_s * random.uniform(0.75, 1.25)
        self._next_heartbeat = 0.0
        self._owns_network = network is None
        self._network = network if network is not None else NetworkLoop().start()
        self._owns_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(settings.concurrency, f"veh-{self.vehicle_id}")
        self._log = log.bind(vehicle_id=self.vehicle_id)
        will = VehicleStatus(self.vehicle_id, VehicleState.OFFLINE, time.time(), "connection_lost")
        self._client = new_client(
            f"veh-{settings.namespace}-{self.vehicle_id}",
            settings.mqtt,
            will=Will(self.topics.status(self.vehicle_id), encode(will)),
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True)

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout: float = 15.0) -> None:
        self._network.attach(self._client)
        connect_and_wait(
            self._client,
            self.settings.mqtt,
            connected=self._connected,
            timeout=timeout,
            start_loop=False,
        )
        if not self._subscribed.wait(timeout):
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
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        for item in held:
            self._nack(item.assignment, NackReason.RELEASED, reason, item.task)
        # Not connected (the broker is restarting, say): the gateway learns it from the
        # last will or the missing heartbeats instead, and the nacks wait in paho's queue.
        with contextlib.suppress(RuntimeError, ValueError):
            self._status(VehicleState.OFFLINE, reason).wait_for_publish(timeout=5)
        self._network.detach(self._client)
        self._client.disconnect()
        if self._owns_network:
            self._close_own_network()
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.free_memory()

    def kill(self) -> None:
        """Vanish without a DISCONNECT, as a car driving out of coverage does.

        The broker then publishes our last will, which is what the gateway must handle.
        """
        self._stopping.set()
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
        with self._lock:
            return len(self._held)

    # ---------------------------------------------------------------- pulling

    def pull(self, *, force: bool = False) -> None:
        """Ask for as many tasks as there is room for; absolute, so repeating it is safe.

        Sent whenever room frees up (``force``), and again every ``pull_refresh_s`` while
        there is room, because a gateway that restarted has forgotten the last one.
        """
        if self._stopping.is_set() or not self.eligible:
            return
        with self._lock:
            credits = self.settings.capacity - len(self._held)
            due = time.monotonic() - self._last_pull >= self._refresh_s
            if credits <= 0 or not self.gateways.any_online() or not (force or due):
                return
            self._last_pull = time.monotonic()
        seen, grants = self.gateways.split(credits)
        dwell = self.guard.dwell_s() if self.guard else 0.0
        pull = PullRequest(self.vehicle_id, credits, self.capabilities, seen, grants, dwell)
        # QoS 0: a pull is absolute and refreshed every pull_refresh_s, so a lost one only
        # delays work briefly, while QoS 1 would double the packets on the busiest topic.
        self._client.publish(self.topics.pull(self.vehicle_id), encode(pull), qos=0)

    def _tick_loop(self) -> None:
        while not self._stopping.wait(0.5):
            self.tick()

    def tick(self) -> None:
        """Periodic duties: refresh the pull, keep leases alive, send the heartbeat."""
        if self._stopping.is_set():
            return
        if self.guard is not None:
            self.guard.reconsider()  # rules that move with time: departure, dwell, budget
        self.pull()
        self._beat_leases()
        if time.monotonic() >= self._next_heartbeat:
            self._announce()
            self._next_heartbeat = time.monotonic() + self.settings.heartbeat_s

    def _beat_leases(self) -> None:
        """Keep the leases of running tasks alive, however long the kernel takes."""
        now = time.time()
        with self._lock:
            due = [h for h in self._held.values() if h.running and h.next_beat <= now]
            for held in due:
                held.next_beat = now + held.beat_every
        for held in due:
            beat = heartbeat_of(held, self.vehicle_id, now)
            topic = self.topics.heartbeat(self.vehicle_id, beat.gateway_id)
            self._client.publish(topic, encode(beat), qos=1)

    # ---------------------------------------------------------------- receiving tasks

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._log.error("mqtt_connect_refused", reason=str(rc))
            return
        self._connected.set()
        client.subscribe(
            [(self.topics.task(self.vehicle_id), 1), (self.topics.all_gateway_statuses, 1)]
        )
        if self._subscribed.is_set():  # a reconnect: say we are here again
            self._announce()
            self.pull(force=True)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _m: int, codes: Any, _p: Any) -> None:
        if not any(code.is_failure for code in codes):
            self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        kind = "gateway_status"
        try:
            if msg.topic != self.topics.task(self.vehicle_id):
                self._on_gateway_status(msg.topic, payload)
            elif peek_type(payload) == Revoke.TYPE:
                kind = "revoke"
                self._on_revoke(payload)
            else:
                kind = "assignment"
                self._on_assignment(payload)
        except Exception:
            # Raised into paho's network loop it would stop every car on that loop; a bug
            # met by one message is counted and the message dropped (its lease expires).
            self.handler_errors[kind] += 1
            self._log.exception("message_handler_failed", kind=kind)

    def _on_gateway_status(self, topic: str, payload: bytes) -> None:
        try:
            status = decode(payload, GatewayStatus)
        except DecodeError:
            return
        if topic != self.topics.gateway_status(status.gateway_id):
            self._log.warning("gateway_status_misplaced", topic=topic)
            return  # one gateway (or anyone) speaking for another
        if self.gateways.announced(status):
            self.pull(force=True)

    def _on_revoke(self, payload: bytes) -> None:
        try:
            revoke = decode(payload, Revoke)
        except DecodeError as exc:
            self._log.warning("revoke_malformed", reason=str(exc))
            return
        with self._lock:
            held = self._held.pop(revoke.epoch, None)
        if held is not None:
            self._log.info("lease_revoked", job_id=held.task.job_id, reason=revoke.reason)
            self.pull(force=True)

    def _on_assignment(self, payload: bytes) -> None:
        try:
            assignment = decode(payload, Assignment)
        except DecodeError as exc:
            # Without a readable epoch there is nothing to nack; the lease will expire.
            self._log.warning("assignment_malformed", reason=str(exc))
            return
        if not self.admission.authentic(assignment):
            return
        if assignment.vehicle_id == self.vehicle_id:  # another car's epochs mean nothing here
            self.gateways.received(assignment.gateway_id, assignment.epoch)
        refusal = self._refusal(assignment)
        if refusal is not None:
            self._nack(assignment, *refusal)
            return
        try:
            task = decode(assignment.task, TaskChunk)
        except DecodeError as exc:
            self._nack(assignment, NackReason.INVALID_TASK, str(exc))
            return
        try:
            task = self.admission.open(assignment, task)
        except DecodeError as exc:
            # Sealed to another key (this car restarted since its pull, say): counted as a
            # failed attempt, so a task no car can open still ends in the dead-letter topic.
            self._nack(assignment, NackReason.KERNEL_ERROR, f"sealed inputs: {exc}", task)
            return
        with self._lock:
            self._held[assignment.epoch] = Held(assignment, task)
        self._log.debug("task_received", **task_context(assignment, task))
        self._pool.submit(self._run, assignment.epoch)

    def _refusal(self, assignment: Assignment) -> tuple[NackReason, str] | None:
        if self._stopping.is_set():
            return NackReason.RELEASED, "worker stopping"
        if not self.eligible:
            return NackReason.RELEASED, f"owner policy: {self.decision.reason}"
        if assignment.vehicle_id != self.vehicle_id:
            return NackReason.INVALID_TASK, "assignment addressed to another vehicle"
        if assignment.lease_deadline < time.time():
            return NackReason.EXPIRED, "lease deadline passed before the task could start"
        if self.held >= self.settings.capacity:
            return NackReason.BUSY, "more tasks than credits given"
        return None

    # ---------------------------------------------------------------- running tasks

    def _run(self, epoch: int) -> None:
        # A shared fleet pool has threads to spare; the car runs only `concurrency` at once,
        # and a prefetched task waits here until a slot frees.
        with self._slots:
            self._run_held(epoch)

    def _run_held(self, epoch: int) -> None:
        with self._lock:
            item = self._held.get(epoch)
            if item is None or self._stopping.is_set():
                return  # released or revoked meanwhile
            item.running = True
            item.next_beat = time.time() + item.beat_every
        try:
            outputs, seconds = self.runner.run(item.task)
        except Preempted:
            # The guard's stop hands every task back, then says so. If that is done, say
            # at once how long the stop took (its status could not know yet); if not, its
            # status will, and announcing before its nacks would make them look stale.
            if self.guard is not None and self.guard.running == 0 and self._handed_back():
                self._announce()
            return
        except (ValidationError, Reject) as exc:
            self._finish(epoch, nack=(NackReason.INVALID_TASK, str(exc)))
            return
        except (KernelError, Retry) as exc:
            self._finish(epoch, nack=(NackReason.KERNEL_ERROR, str(exc)))
            return
        try:
            result = result_of(item, self.vehicle_id, outputs, seconds)
        except DecodeError as exc:  # a reply_key nothing can be sealed to: no car can answer
            self._finish(epoch, nack=(NackReason.INVALID_TASK, f"reply_key: {exc}"))
            return
        self._finish(epoch, result=result)

    def _finish(
        self,
        epoch: int,
        result: Result | None = None,
        nack: tuple[NackReason, str] | None = None,
    ) -> None:
        with self._lock:
            item = self._held.pop(epoch, None)
        if item is None or self._stopping.is_set():
            return  # already released by stop(): the gateway has our nack
        if result is not None:
            if self._signer is not None:
                result = self._signer.sign(result)
            payload = encode(result)
            limit = self.settings.mqtt.max_message_bytes
            if len(payload) <= limit:
                topic = self.topics.result(self.vehicle_id, result.gateway_id)
                self._client.publish(topic, payload, qos=1)
                self.completed += 1
                self._log.debug("task_done", **task_context(item.assignment, item.task))
            else:
                # The broker would drop it (or us); every car's answer would be as large.
                detail = f"result of {len(payload):,} bytes is over the MQTT limit of {limit:,}"
                nack = (NackReason.INVALID_TASK, detail)
        if nack is not None:
            context = task_context(item.assignment, item.task)
            self._log.warning("task_failed", **context, reason=nack[0].value, detail=nack[1])
            self._nack(item.assignment, *nack, item.task)
        self.pull(force=True)

    def _nack(
        self,
        assignment: Assignment,
        reason: NackReason,
        detail: str,
        task: TaskChunk | None = None,
    ) -> None:
        nack = nack_of(assignment, self.vehicle_id, reason, detail, task)
        topic = self.topics.nack(self.vehicle_id, assignment.gateway_id)
        self._client.publish(topic, encode(nack), qos=1)

    # ---------------------------------------------------------------- the owner's policy

    def _on_policy(self, previous: Decision, decision: Decision) -> None:
        """The guard changed its mind: hand work back, say so, or ask for work again."""
        if self._stopping.is_set() or not self._subscribed.is_set():
            return  # start() announces the first decision itself
        if decision.mode is Mode.SUSPEND:
            self._release_all(decision.reason)
        self._announce()
        if decision.runs:
            self.pull(force=True)

    def _on_car_signals(self, state: CarState) -> None:
        """A new departure time changes the dwell gateways plan with: tell them now."""
        if state.next_departure != self._departure:
            self._departure = state.next_departure
            self.pull(force=True)

    def _release_all(self, reason: str) -> None:
        """Nack every held task at once, so the gateway redispatches without waiting."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
            self._releasing += 1
        try:
            for item in held:
                detail = f"owner policy: {reason}"
                self._nack(item.assignment, NackReason.RELEASED, detail, item.task)
                self._log.info(
                    "task_released", **task_context(item.assignment, item.task), reason=reason
                )
        finally:
            with self._lock:
                self._releasing -= 1
        self.released += len(held)
        if self.guard is not None and self.guard.running == 0:
            self.backend.free_memory()

    def _handed_back(self) -> bool:
        """Nothing held, and every nack of a hand-back already sent."""
        with self._lock:
            return not self._held and not self._releasing

    def _announce(self) -> mqtt.MQTTMessageInfo:
        decision = self.decision
        reason = "" if decision.runs else decision.reason
        return self._status(_STATE_OF_MODE[decision.mode], reason)

    def _status(self, state: VehicleState, reason: str = "") -> mqtt.MQTTMessageInfo:
        """Say how the car stands, and the figures the fleet's metrics are made of."""
        busy_s = self.runner.busy_s
        status = status_of(self.vehicle_id, state, reason, self.held, busy_s, self.guard)
        return self._client.publish(self.topics.status(self.vehicle_id), encode(status), qos=1)
