# SPDX-License-Identifier: Apache-2.0
"""The capacity model: what a fleet needs, in cells, gateways, broker nodes and Kafka
brokers, and the messages and bytes on every hop, for the cell design and the old one.

Pure arithmetic on a ``Scenario`` (the workload, from flags) and ``Capacities`` (what one
unit of each component carries, measured: ``capacity_inputs.json``). Counts are sized so
that each component runs at most at ``headroom`` of its capacity; a component whose
count is fixed by its design (the old single broker, six partitions) may go past 1.
docs/SCALE.md gives every formula in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from parkpool.runtime.settings import DEFAULT_MQTT_MAX_MESSAGE_BYTES
from parkpool.schemas.errors import ConfigError

MIB = float(1 << 20)
DAY_S = 86_400.0
OLD_PARTITIONS = 6  # the old tasks topic
OLD_WINDOW = 512  # the old window: unfinished offsets per partition
OLD_STATUS_S = 10.0  # the old gateways re-published their retained status this often
BEATS_PER_LEASE = 3  # a running task's lease heartbeat every third of the lease
ROSTER_CHANGES_PER_RESTART = 2  # offline, then online again
TOPICS = 2  # tasks and results: the results topic has as many partitions

Hops = dict[str, dict[str, "Flow"]]


@dataclass(frozen=True)
class Scenario:
    """The workload: the fleet and its tasks. Field names are the CLI's flags."""

    vehicles: int
    task_seconds: float = 30.0
    eligible: float = 0.5  # share of the fleet parked, plugged in and allowed to work
    utilisation: float = 0.8  # share of eligible cars running a task; the rest have room
    input_mib: float = 1.0  # one task record (Kafka) and the task inside its assignment
    output_mib: float = 0.25  # one result (MQTT, then a Kafka record)
    lease_seconds: float = 30.0
    heartbeat_s: float = 15.0
    pull_refresh_s: float = 10.0
    gateways_per_vehicle: int = 2
    tasks_per_assignment: int = 1
    cell_vehicles: int = 200_000
    window: int = 1024  # in-flight tasks per partition
    mean_parked_s: float = 4 * 3600.0  # cars come and go: each departure is a last will
    gateway_restarts_per_day: float = 1.0  # per gateway: each is two roster changes
    headroom: float = 0.5  # size every component to run at most at this share of capacity
    sdk_clients: int = 1  # each SDK client reads the whole results topic
    gateway_memory_mib: float = 4096.0  # the memory one gateway may use (a budget, chosen)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, name = getattr(self, f.name), flag(f.name)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, not {value}")
            if f.type == "int" and (value != int(value) or value < 1):
                raise ConfigError(f"{name} must be a whole number, at least 1, not {value}")
            if f.name in _SHARES and not 0 < value <= 1:
                raise ConfigError(f"{name} must be more than 0 and at most 1, not {value}")
            if value < 0 or (value == 0 and f.name not in _MAY_BE_0):
                least = "at least 0" if f.name in _MAY_BE_0 else "more than 0"
                raise ConfigError(f"{name} must be {least}, not {value}")


# Shares of a whole, and sizes capped by the largest Kafka record (1 MiB).
_SHARES = frozenset({"eligible", "utilisation", "headroom", "input_mib", "output_mib"})
_MAY_BE_0 = frozenset({"gateway_restarts_per_day"})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Capacities:
    """What one unit of each component carries, and the sizes of the small messages."""

    gateway_msgs_per_s: float
    gateway_data_mib_per_s: float
    gateway_bytes_per_car: float
    gateway_base_mib: float
    broker_node_msgs_per_s: float  # handled: each publish in and each delivery out is one
    broker_node_mib_per_s: float  # handled, in and out
    broker_connects_per_s: float
    kafka_broker_msgs_per_s: float  # records written
    kafka_broker_mib_per_s: float  # MiB written
    kafka_partitions_per_broker: float
    kafka_partitions_per_cluster: float
    sdk_encode_mib_per_s: float  # per core
    reconnect_due_peak_per_100ms: float  # share of a restarted broker's cars, busiest 100 ms
    reconnect_p90_s: float
    pull_bytes: float
    status_bytes: float
    lease_heartbeat_bytes: float
    gateway_status_bytes: float
    assignment_overhead_bytes: float


@dataclass(frozen=True)
class Flow:
    """Messages per second and MiB per second on one hop."""

    msgs: float
    mib: float

    def __add__(self, other: Flow) -> Flow:
        return Flow(self.msgs + other.msgs, self.mib + other.mib)

    def times(self, k: float) -> Flow:
        return Flow(self.msgs * k, self.mib * k)


def of_size(msgs: float, size_bytes: float) -> Flow:
    return Flow(msgs, msgs * size_bytes / MIB)


def total(kinds: dict[str, Flow]) -> Flow:
    return sum(kinds.values(), Flow(0.0, 0.0))


@dataclass(frozen=True)
class Load:
    """One component's load and capacity, per unit (a gateway, a node, a broker)."""

    load: float
    capacity: float
    unit: str

    @property
    def utilisation(self) -> float:
        return self.load / self.capacity


@dataclass(frozen=True)
class Cars:
    """What one broker's cars do, per second."""

    vehicles: float
    busy: float
    idle: float  # eligible cars with room: they refresh their pulls
    tasks_per_s: float
    departures_per_s: float  # = arrivals in a steady fleet; each departure is a last will

    @classmethod
    def of(cls, s: Scenario, vehicles: float) -> Cars:
        eligible = vehicles * s.eligible
        busy = eligible * s.utilisation
        return cls(
            vehicles, busy, eligible - busy, busy / s.task_seconds, vehicles / s.mean_parked_s
        )


def beats_per_task(s: Scenario) -> int:
    """Lease heartbeats a task sends: one every third of the lease until it ends."""
    return max(0, math.ceil(s.task_seconds * BEATS_PER_LEASE / s.lease_seconds) - 1)


def mqtt_hops(s: Scenario, c: Capacities, cars: Cars, gateways: int, cells: bool) -> Hops:
    """The four MQTT hops of one broker with ``gateways`` gateways. With cells, a car
    publishes its statuses and refreshed pulls to each of its K gateways' own topic, and
    pulls after a task only when its split moves (not modelled: rare); in the old design
    it pulls after every task, publishes each message once, and every gateway receives
    it."""
    k = min(s.gateways_per_vehicle, gateways) if cells else 1
    fan = 1 if cells else gateways
    status = of_size(cars.vehicles * k / s.heartbeat_s, c.status_bytes)
    # The old car pulled after every task; a cell car's gateway refills the slot when
    # the lease ends, so only idle cars' refreshes remain (docs/ARCHITECTURE.md, Pull).
    per_task = 0.0 if cells else cars.tasks_per_s
    pull = of_size(per_task + cars.idle * k / s.pull_refresh_s, c.pull_bytes)
    result = Flow(cars.tasks_per_s, cars.tasks_per_s * s.output_mib)
    beats = of_size(cars.tasks_per_s * beats_per_task(s), c.lease_heartbeat_bytes)
    will = of_size(cars.departures_per_s * gateways, c.status_bytes)
    sent = cars.tasks_per_s / s.tasks_per_assignment
    assignment = Flow(
        sent, sent * c.assignment_overhead_bytes / MIB + cars.tasks_per_s * s.input_mib
    )
    if cells:  # retained, published on a change of state only
        roster = gateways * s.gateway_restarts_per_day * ROSTER_CHANGES_PER_RESTART / DAY_S
    else:  # re-published every 10 s, to every car
        roster = gateways / OLD_STATUS_S
    to_cars = roster * cars.vehicles + cars.departures_per_s * gateways  # + retained on connect
    return {
        "car_to_broker": {"status": status, "pull": pull, "result": result, "heartbeat": beats},
        "broker_to_gateway": {
            "status": status.times(fan),
            "pull": pull.times(fan),
            "result": result,
            "heartbeat": beats,
            "will": will,
        },
        "gateway_to_broker": {
            "assignment": assignment,
            "roster": of_size(roster, c.gateway_status_bytes),
        },
        "broker_to_car": {
            "assignment": assignment,
            "roster": of_size(to_cars, c.gateway_status_bytes),
        },
    }


def kafka_hops(s: Scenario, tasks_per_s: float) -> Hops:
    """One task record in and one result record out per task; every SDK client reads
    the whole results topic (it routes records by key)."""
    task = Flow(tasks_per_s, tasks_per_s * s.input_mib)
    result = Flow(tasks_per_s, tasks_per_s * s.output_mib)
    return {
        "sdk_to_kafka": {"task": task},
        "kafka_to_gateway": {"task": task},
        "gateway_to_kafka": {"result": result},
        "kafka_to_sdk": {"result": result.times(s.sdk_clients)},
    }


def check_assignment_fits(s: Scenario, c: Capacities) -> None:
    size = s.tasks_per_assignment * s.input_mib * MIB + c.assignment_overhead_bytes
    if size > DEFAULT_MQTT_MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"an assignment of {s.tasks_per_assignment} task(s) of {s.input_mib} MiB is "
            f"{size:,.0f} bytes, over the MQTT limit of {DEFAULT_MQTT_MAX_MESSAGE_BYTES:,}: "
            "lower --tasks-per-assignment or --input-mib"
        )


def ceil_at_least(value: float, floor: int = 1) -> int:
    return max(floor, math.ceil(value - 1e-9))


@dataclass(frozen=True)
class Design:
    """One design sized for a scenario: its counts, its hops, and each component's load."""

    tasks_per_s: float
    busy_vehicles: float
    in_flight_tasks: float
    cells: int
    vehicles_per_cell: float
    gateways_per_cell: int
    broker_nodes_per_cell: int
    kafka_task_partitions: int  # the results topic has as many
    kafka_brokers: int
    vehicles_known_per_gateway: float
    hops: Hops  # the whole system's, every cell together
    loads: dict[str, Load]
    reconnect: dict[str, float]  # one cell's broker restarting

    @property
    def gateways(self) -> int:
        return self.cells * self.gateways_per_cell

    @property
    def broker_nodes(self) -> int:
        return self.cells * self.broker_nodes_per_cell

    @property
    def gateway_memory_mib(self) -> float:
        return self.loads["gateway_memory"].load

    @property
    def kafka_partitions(self) -> int:
        return self.kafka_task_partitions * TOPICS

    @property
    def sized_by(self) -> dict[str, str]:
        """For each count, the load that set it: the one of its loads nearest capacity."""
        return {
            n: max(group, key=lambda x: self.loads[x].utilisation) for n, group in SIZED_BY.items()
        }

    @property
    def binding(self) -> str:
        """The component nearest its capacity: the first to add to as load grows."""
        return max(self.loads, key=lambda name: self.loads[name].utilisation)

    @property
    def saturated_by(self) -> list[str]:
        return [name for name, load in self.loads.items() if load.utilisation > 1]


def new_design(s: Scenario, c: Capacities) -> Design:
    """Cells of at most ``cell_vehicles`` cars, each with gateways enough for its load."""
    check_assignment_fits(s, c)
    cells = math.ceil(s.vehicles / s.cell_vehicles)
    cars = Cars.of(s, s.vehicles / cells)
    return _sized(s, c, cars, cells=cells, gateways=gateways_per_cell(s, c, cars), old=False)


def old_design(s: Scenario, c: Capacities, gateways: int) -> Design:
    """One broker for the whole fleet, ``gateways`` gateways that each hear every car,
    and the old in-flight bound of 6 partitions x 512 offsets."""
    check_assignment_fits(s, c)
    cars = Cars.of(s, s.vehicles)
    return _sized(s, c, cars, cells=1, gateways=gateways, old=True)


def gateways_per_cell(s: Scenario, c: Capacities, cars: Cars) -> int:
    """Enough gateways that each stays within headroom on inbound messages, data and
    memory; at least K. Last wills reach every gateway of a cell, however many."""
    h, k = s.headroom, s.gateways_per_vehicle
    sent = total(mqtt_hops(s, c, cars, k, cells=True)["car_to_broker"]).msgs
    spare = c.gateway_msgs_per_s * h - cars.departures_per_s
    room = s.gateway_memory_mib * h - c.gateway_base_mib
    needs = [
        sent / spare if spare > 0 else 0.0,  # too big a cell: shows as utilisation over 1
        cars.tasks_per_s * (s.input_mib + s.output_mib) / (c.gateway_data_mib_per_s * h),
        k * cars.vehicles * c.gateway_bytes_per_car / MIB / room if room > 0 else 0.0,
    ]
    return ceil_at_least(max(needs), k)


def _sized(
    s: Scenario, c: Capacities, cars: Cars, *, cells: int, gateways: int, old: bool
) -> Design:
    mqtt = mqtt_hops(s, c, cars, gateways, cells=not old)
    kafka = kafka_hops(s, cars.tasks_per_s * cells)
    broker = sum((total(kinds) for kinds in mqtt.values()), Flow(0.0, 0.0))
    written = total(kafka["sdk_to_kafka"]) + total(kafka["gateway_to_kafka"])
    in_flight = cars.busy * cells * s.tasks_per_assignment
    if old:
        nodes, partitions, window = 1, OLD_PARTITIONS, OLD_WINDOW
    else:
        by_load = max(broker.msgs / c.broker_node_msgs_per_s, broker.mib / c.broker_node_mib_per_s)
        nodes, window = ceil_at_least(by_load / s.headroom), s.window
        partitions = task_partitions(s, c, written, in_flight, gateways * cells)
    every = partitions * TOPICS  # tasks and results topics
    brokers = kafka_brokers(s, c, written, every)
    known = cars.vehicles * (1 if old else min(s.gateways_per_vehicle, gateways) / gateways)
    encode = cars.tasks_per_s * cells * s.input_mib
    cores = ceil_at_least(encode / (c.sdk_encode_mib_per_s * s.headroom))
    rows = (
        ("gateway_inbound", total(mqtt["broker_to_gateway"]).msgs / gateways, "msgs/s"),
        ("gateway_data", cars.tasks_per_s * (s.input_mib + s.output_mib) / gateways, "MiB/s"),
        ("gateway_memory", c.gateway_base_mib + known * c.gateway_bytes_per_car / MIB, "MiB"),
        ("broker_msgs", broker.msgs / nodes, "msgs/s"),
        ("broker_data", broker.mib / nodes, "MiB/s"),
        ("kafka_records", written.msgs / brokers, "records/s"),
        ("kafka_data", written.mib / brokers, "MiB/s"),
        ("kafka_partitions_per_broker", every / brokers, "partitions"),
        ("kafka_partitions_per_cluster", every, "partitions"),
        ("in_flight_window", in_flight, "tasks"),
        ("sdk_encode", encode / cores, "MiB/s"),
    )
    capacity = _capacities(s, c, partitions * window)
    hops = {hop: {kind: f.times(cells) for kind, f in kinds.items()} for hop, kinds in mqtt.items()}
    return Design(
        tasks_per_s=cars.tasks_per_s * cells,
        busy_vehicles=cars.busy * cells,
        in_flight_tasks=in_flight,
        cells=cells,
        vehicles_per_cell=cars.vehicles,
        gateways_per_cell=gateways,
        broker_nodes_per_cell=nodes,
        kafka_task_partitions=partitions,
        kafka_brokers=brokers,
        vehicles_known_per_gateway=known,
        hops={hop: (hops | kafka)[hop] for hop in HOP_ORDER},
        loads={name: Load(load, capacity[name], unit) for name, load, unit in rows},
        reconnect=reconnect(s, c, cars, gateways, nodes, old=old),
    )


def task_partitions(
    s: Scenario, c: Capacities, written: Flow, in_flight: float, gateways: int
) -> int:
    """At least one per gateway, windows for the tasks in flight within headroom, and a
    partition (of tasks or of results) for each Kafka broker to lead."""
    brokers = _by_rate(c, written) / s.headroom
    return ceil_at_least(max(in_flight / s.window / s.headroom, brokers / TOPICS), gateways)


def kafka_brokers(s: Scenario, c: Capacities, written: Flow, partitions: int) -> int:
    """Enough for the partitions and for what is written, within headroom; never more
    than there are partitions, since each is written by its one leader."""
    need = max(partitions / c.kafka_partitions_per_broker, _by_rate(c, written) / s.headroom)
    return min(ceil_at_least(need), partitions)


def _by_rate(c: Capacities, written: Flow) -> float:
    return max(written.msgs / c.kafka_broker_msgs_per_s, written.mib / c.kafka_broker_mib_per_s)


def _capacities(s: Scenario, c: Capacities, in_flight: float) -> dict[str, float]:
    """Each component's capacity, per unit (a gateway, a node, a broker, a core)."""
    return {
        "gateway_inbound": c.gateway_msgs_per_s,
        "gateway_data": c.gateway_data_mib_per_s,
        "gateway_memory": s.gateway_memory_mib,
        "broker_msgs": c.broker_node_msgs_per_s,
        "broker_data": c.broker_node_mib_per_s,
        "kafka_records": c.kafka_broker_msgs_per_s,
        "kafka_data": c.kafka_broker_mib_per_s,
        "kafka_partitions_per_broker": c.kafka_partitions_per_broker,
        "kafka_partitions_per_cluster": c.kafka_partitions_per_cluster,
        "in_flight_window": in_flight,
        "sdk_encode": c.sdk_encode_mib_per_s,
    }


# Which loads set which count: the one nearest its capacity sized it.
SIZED_BY = {
    "gateways": ("gateway_inbound", "gateway_data", "gateway_memory"),
    "broker_nodes": ("broker_msgs", "broker_data"),
    "kafka_brokers": ("kafka_records", "kafka_data", "kafka_partitions_per_broker"),
}


# A task's way through the system, out and back.
HOP_ORDER = (
    "sdk_to_kafka",
    "kafka_to_gateway",
    "gateway_to_broker",
    "broker_to_car",
    "car_to_broker",
    "broker_to_gateway",
    "gateway_to_kafka",
    "kafka_to_sdk",
)


def reconnect(
    s: Scenario, c: Capacities, cars: Cars, gateways: int, nodes: int, *, old: bool
) -> dict[str, float]:
    """One broker restarts: its cars come back spread by their jittered backoff (the
    measured share due in the busiest 100 ms); each gets the retained roster, sends its
    status and, if eligible, a pull: to its K gateways, or once to every gateway (old)."""
    k = 1 if old else min(s.gateways_per_vehicle, gateways)
    sent = k * (1 + s.eligible)
    to_gateways = sent * (gateways if old else 1)
    handled = sent + gateways + to_gateways  # in; the roster out; out to gateways
    peak = cars.vehicles * c.reconnect_due_peak_per_100ms * 10
    return {
        "vehicles": cars.vehicles,
        "peak_connects_per_s": peak,
        "back_p90_s": c.reconnect_p90_s,
        "roster_deliveries": cars.vehicles * gateways,
        "messages": cars.vehicles * handled,
        "peak_broker_msgs_per_s_per_node": peak * handled / nodes,
        "peak_gateway_msgs_per_s": peak * to_gateways / gateways,
        "connects_utilisation": peak / nodes / c.broker_connects_per_s,
        "broker_utilisation": peak * handled / nodes / c.broker_node_msgs_per_s,
        "gateway_utilisation": peak * to_gateways / gateways / c.gateway_msgs_per_s,
    }


def old_limit(s: Scenario, c: Capacities, ceiling: int = 10**10) -> int:
    """The largest fleet the old design carries with no component over capacity, given
    as many gateways as the cell design would run (0: not even one car)."""

    def fits(vehicles: int) -> bool:
        at = replace(s, vehicles=vehicles)
        return not old_design(at, c, new_design(at, c).gateways).saturated_by

    if not fits(1):
        return 0
    low, high = 1, ceiling
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
