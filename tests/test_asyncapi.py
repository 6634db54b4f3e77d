# SPDX-License-Identifier: Apache-2.0
"""schemas/asyncapi.yaml describes exactly the messages, topics and enums the code has."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest
import yaml

import parkpool.schemas
from parkpool.broker_config import auth
from parkpool.schemas import blobref, codec, reputation, topics
from parkpool.schemas import messages as m
from parkpool.schemas.errors import DecodeError
from parkpool.schemas.validate import NAME_RE

SPEC: dict[str, Any] = yaml.safe_load(
    (Path(parkpool.schemas.__file__).parent / "asyncapi.yaml").read_text(encoding="utf-8")
)
BY_TAG: dict[str, type] = {cls.TYPE: cls for cls in m.MESSAGE_TYPES}  # type: ignore[attr-defined]
SAMPLE = {"namespace": "acme", "vehicleId": "car-1", "gatewayId": "gw-1"}
KAFKA, MQTT = topics.KafkaTopics("acme"), topics.MqttTopics("acme")


class Channel(NamedTuple):
    """What a channel carries, and what the gateway does with which of those messages."""

    carries: tuple[type, ...]
    action: str | None  # None: gateways neither read nor write it
    gateway_uses: tuple[type, ...]
    qos: int | None = None  # MQTT channels only


def both_ways(action: str, *carries: type, qos: int | None = None) -> Channel:
    """A channel whose every message type the gateway handles."""
    return Channel(carries, action, carries, qos)


EXPECTED_CHANNELS: dict[str, Channel] = {
    KAFKA.tasks: both_ways("receive", m.TaskChunk, m.CancelJob),
    KAFKA.results: both_ways("send", m.Result),
    # The dead-letter tools, not gateways, write the DlqAction notes.
    KAFKA.dead_letter: Channel((m.DeadLetter, m.DlqAction), "send", (m.DeadLetter,)),
    # SDK clients and operators write it; gateways read it for the quarantines alone.
    KAFKA.reputation: Channel((m.CarTally, m.QuarantineNotice), "receive", (m.QuarantineNotice,)),
    # SDK clients alone write and read it, to follow a job by its id.
    KAFKA.jobs: Channel((m.JobSubmitted,), None, ()),
    # A car addresses each of these to one gateway: the last level is that gateway's id.
    MQTT.pull("car-1", "gw-1"): both_ways("receive", m.PullRequest, qos=0),
    MQTT.status("car-1", "gw-1"): both_ways("receive", m.VehicleStatus, qos=1),
    MQTT.result("car-1", "gw-1"): both_ways("receive", m.Result, qos=1),
    MQTT.nack("car-1", "gw-1"): both_ways("receive", m.Nack, qos=1),
    MQTT.heartbeat("car-1", "gw-1"): both_ways("receive", m.LeaseHeartbeat, qos=0),
    # The last will, the one thing a car sends that every gateway of its cell hears.
    MQTT.will("car-1"): both_ways("receive", m.VehicleStatus, qos=1),
    # Everything a gateway says to one car: leases, alone or batched, revokes, notices.
    MQTT.task("car-1"): both_ways(
        "send", m.Assignment, m.AssignmentBatch, m.Revoke, m.GatewayStatus, qos=1
    ),
    # The retained roster entry, the one thing a gateway sends that every car hears.
    MQTT.gateway_status("gw-1"): both_ways("send", m.GatewayStatus, qos=1),
}


def gateway_subscriptions(me: str) -> set[str]:
    """What a gateway subscribes to: every vehicle ('+'), but only what is addressed to
    it, and the cell's last wills."""
    return {
        MQTT.pulls_for(me),
        MQTT.statuses_for(me),
        MQTT.all_wills,
        MQTT.results_for(me),
        MQTT.nacks_for(me),
        MQTT.heartbeats_for(me),
    }


def vehicle_subscriptions(car: str) -> set[str]:
    """What a car subscribes to: its own task topic and the cell's roster."""
    return {MQTT.task(car), MQTT.all_gateway_statuses}


GATEWAY_SUBSCRIPTIONS = gateway_subscriptions("gw-1")
VEHICLE_SUBSCRIPTIONS = vehicle_subscriptions("car-1")


def matches(pattern: str, topic: str) -> bool:
    """Whether an MQTT subscription (with '+' and '#') matches a topic."""
    levels, wanted = topic.split("/"), pattern.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(wanted) == len(levels)


def acl_patterns(access: str) -> set[str]:
    """The ACL's per-vehicle patterns (``%u`` for the vehicle) of one access kind."""
    lines = (line.split() for line in auth.ACL.splitlines())
    return {words[2] for words in lines if words[:2] == ["pattern", access]}


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target: Any = SPEC
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def flatten(schema: Any) -> dict[str, Any]:
    """A schema with its $ref and allOf parts merged into one dict."""
    schema = dict(resolve(schema))
    for part in schema.pop("allOf", []):
        schema = flatten(part) | schema
    return schema


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def component_messages() -> dict[str, dict[str, Any]]:
    return SPEC["components"]["messages"]  # type: ignore[no-any-return]


def message_spec(cls: type) -> dict[str, Any]:
    return component_messages()[cls.__name__]


def payload_schema(cls: type) -> dict[str, Any]:
    return flatten(message_spec(cls)["payload"])


def examples_of(cls: type) -> list[dict[str, Any]]:
    return [example["payload"] for example in message_spec(cls)["examples"]]


def example_of(cls: type) -> dict[str, Any]:
    """The message's first example: a message with several uses has one for each."""
    return examples_of(cls)[0]


# Every (message type, example number) of the document.
EXAMPLES = [(cls, i) for cls in m.MESSAGE_TYPES for i in range(len(examples_of(cls)))]


def example_id(case: tuple[type, int]) -> str:
    return f"{case[0].__name__}-{case[1]}"


def required_fields(cls: type) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def default_of(f: dataclasses.Field[Any]) -> Any:
    value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return plain(value)


def plain(value: Any) -> Any:
    """A comparable, YAML-like form of a message, record, array or field value."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def from_example(schema: Any, value: Any) -> Any:
    """Turn an example value into what goes on the wire: arrays and bytes become real."""
    schema = flatten(schema)
    if schema.get("x-msgpack-ext") == codec.ARRAY_EXT:
        data = [complex(*x) if isinstance(x, list) else x for x in value["data"]]
        return np.array(data, dtype=value["dtype"]).reshape(value["shape"])
    if schema.get("contentEncoding") == "base64":
        return base64.b64decode(value, validate=True)
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", {})
        return {
            k: from_example(props.get(k, extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [from_example(schema.get("items", {}), item) for item in value]
    return value


def wire_bytes(cls: type, index: int = 0) -> bytes:
    body = from_example(message_spec(cls)["payload"], examples_of(cls)[index])
    return msgpack.packb(body, default=codec._default, use_bin_type=True)  # type: ignore[no-any-return]


JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def is_base64(value: Any) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError):
        return False
    return True


# JSON Schema keyword -> does ``value`` pass it, given the keyword's argument
KEYWORDS: dict[str, Callable[[Any, Any], bool]] = {
    "const": lambda value, arg: value == arg,
    "enum": lambda value, arg: value in arg,
    "pattern": lambda value, arg: re.search(arg, value) is not None,
    "maxLength": lambda value, arg: len(value) <= arg,
    "minimum": lambda value, arg: value >= arg,
    "maximum": lambda value, arg: value <= arg,
    "minItems": lambda value, arg: len(value) >= arg,
    "maxItems": lambda value, arg: len(value) <= arg,
    "maxProperties": lambda value, arg: len(value) <= arg,
    "contentEncoding": lambda value, arg: arg == "base64" and is_base64(value),
}


def conforms(schema: Any, value: Any, path: str = "$") -> list[str]:
    """Errors of ``value`` against the JSON Schema subset this document uses."""
    s = flatten(schema)
    kinds = [s["type"]] if isinstance(s.get("type"), str) else s.get("type", [])
    if kinds and not any(JSON_TYPES[kind](value) for kind in kinds):
        return [f"{path}: {value!r} is not {kinds}"]
    errors = [
        f"{path}: {value!r} fails {key}={arg!r}"
        for key, arg in s.items()
        if key in KEYWORDS and not KEYWORDS[key](value, arg)
    ]
    if "oneOf" in s and sum(not conforms(o, value, path) for o in s["oneOf"]) != 1:
        errors.append(f"{path}: not exactly one of oneOf")
    if isinstance(value, dict):
        errors += object_errors(s, value, path)
    if isinstance(value, list):
        for i, item in enumerate(value):
            errors += conforms(s.get("items", {}), item, f"{path}[{i}]")
    return errors


def object_errors(s: dict[str, Any], value: dict[str, Any], path: str) -> list[str]:
    errors = [f"{path}: missing {key}" for key in s.get("required", []) if key not in value]
    extra = s.get("additionalProperties", True)
    for key, item in value.items():
        errors += conforms(s.get("propertyNames", {}), key, f"{path}.<key {key}>")
        sub = s.get("properties", {}).get(key, extra)
        if sub is False:
            errors.append(f"{path}.{key}: not allowed")
        elif isinstance(sub, dict):
            errors += conforms(sub, item, f"{path}.{key}")
    return errors


class TestDocument:
    """The document is AsyncAPI 3.0.0, its references resolve and its servers are right."""

    def test_version(self) -> None:
        assert SPEC["asyncapi"] == "3.0.0"
        assert SPEC["info"]["version"] == str(codec.WIRE_VERSION)
        assert SPEC["defaultContentType"] == "application/msgpack"
        assert flatten({"$ref": "#/components/schemas/Version"})["const"] == codec.WIRE_VERSION

    def test_every_ref_resolves(self) -> None:
        for node in walk(SPEC):
            if "$ref" in node:
                assert isinstance(resolve(node), dict), node["$ref"]

    def test_servers(self) -> None:
        servers = SPEC["servers"]
        assert servers["kafka"]["protocol"] == "kafka"
        assert (servers["mqtt"]["protocol"], servers["mqtt"]["protocolVersion"]) == ("mqtt", "5")

    def test_parameter_patterns_match_topics(self) -> None:
        params = SPEC["components"]["parameters"]
        assert params["namespace"]["x-pattern"] == topics._NAMESPACE_RE.pattern
        assert params["vehicleId"]["x-pattern"] == topics._ID_RE.pattern
        assert params["gatewayId"]["x-pattern"] == topics._ID_RE.pattern

    def test_every_pattern_is_one_the_code_uses(self) -> None:
        known = {m._ID.pattern, m._TOPIC.pattern, m._SHA256.pattern, NAME_RE.pattern}
        known |= {m._URL.pattern, blobref._SHA256.pattern, f"^(|{m._URL.pattern[1:-1]})$"}
        assert {n["pattern"] for n in walk(SPEC) if "pattern" in n} == known


class TestChannels:
    """Every topic of the code is a channel with its message and the gateway's operation."""

    @staticmethod
    def address(channel: dict[str, Any], **override: str) -> str:
        values = SAMPLE | override
        return re.sub(r"\{(\w+)\}", lambda match: values[match[1]], channel["address"])

    @staticmethod
    def operations_on(name: str) -> list[dict[str, Any]]:
        ref = f"#/channels/{name}"
        return [o for o in SPEC["operations"].values() if o["channel"]["$ref"] == ref]

    def test_addresses_are_the_code_topics(self) -> None:
        channels = SPEC["channels"].values()
        assert sorted(self.address(c) for c in channels) == sorted(EXPECTED_CHANNELS)

    def test_every_message_type_travels_somewhere(self) -> None:
        carried = {cls for channel in EXPECTED_CHANNELS.values() for cls in channel.carries}
        assert carried == set(m.MESSAGE_TYPES)

    @pytest.mark.parametrize("name", sorted(SPEC["channels"]))
    def test_channel(self, name: str) -> None:
        channel = SPEC["channels"][name]
        expected = EXPECTED_CHANNELS[self.address(channel)]
        # Its parameters are exactly its address's placeholders,
        assert set(channel["parameters"]) == set(re.findall(r"\{(\w+)\}", channel["address"]))
        # it lists every message type it carries, each once,
        assert len(channel["messages"]) == len(expected.carries)
        for message, cls in zip(channel["messages"].values(), expected.carries, strict=True):
            assert resolve(message) is message_spec(cls)
        # and the gateway's operations on it go the expected way, each message in one of
        # them, and each operation names messages of this very channel.
        operations = self.operations_on(name)
        assert {o["action"] for o in operations} == ({expected.action} - {None})
        used = [r["$ref"] for o in operations for r in o["messages"]]
        assert all(ref.startswith(f"#/channels/{name}/messages/") for ref in used)
        used_titles = sorted(resolve({"$ref": ref})["title"] for ref in used)
        assert used_titles == sorted(cls.__name__ for cls in expected.gateway_uses)
        (server,) = channel["servers"]
        is_mqtt = "/" in channel["address"]
        assert server["$ref"] == ("#/servers/mqtt" if is_mqtt else "#/servers/kafka")
        qos = {o["bindings"]["mqtt"]["qos"] for o in operations if is_mqtt}
        assert qos == ({expected.qos} if is_mqtt else set())

    @classmethod
    def mqtt_channels(cls, action: str) -> list[dict[str, Any]]:
        """The MQTT channels the gateway ``action``s on (receive: what cars send)."""
        return [
            channel
            for name, channel in SPEC["channels"].items()
            if "/" in channel["address"]
            and any(o["action"] == action for o in cls.operations_on(name))
        ]

    def test_gateway_subscriptions_are_the_channels_it_receives(self) -> None:
        # Given every MQTT channel the gateway receives on, with '+' for the vehicle,
        received = {self.address(c, vehicleId="+") for c in self.mqtt_channels("receive")}
        # then they are exactly what the code subscribes to.
        assert received == GATEWAY_SUBSCRIPTIONS

    def test_vehicle_subscriptions_are_the_channels_the_gateway_sends_on(self) -> None:
        # Given every MQTT channel the gateway sends on, with '+' for the gateway,
        sent = {self.address(c, gatewayId="+") for c in self.mqtt_channels("send")}
        # then they are exactly what a car subscribes to.
        assert sent == VEHICLE_SUBSCRIPTIONS

    def test_no_broadcast_but_wills_and_the_roster(self) -> None:
        # Given what car-1 sends to gw-1, and what gw-1 sends to car-1,
        to_gateway = {self.address(c): c for c in self.mqtt_channels("receive")}
        to_vehicle = {self.address(c): c for c in self.mqtt_channels("send")}
        # then another gateway of the cell hears only the car's last will,
        heard = {t for t in to_gateway for s in gateway_subscriptions("gw-2") if matches(s, t)}
        assert heard == {MQTT.will("car-1")}
        # and another car only the gateway's roster entry.
        seen = {t for t in to_vehicle for s in vehicle_subscriptions("car-2") if matches(s, t)}
        assert seen == {MQTT.gateway_status("gw-1")}
        # They are also the only channels whose address does not name the addressee.
        unaddressed = [t for t, c in to_gateway.items() if "gatewayId" not in c["parameters"]]
        unaddressed += [t for t, c in to_vehicle.items() if "vehicleId" not in c["parameters"]]
        assert sorted(unaddressed) == sorted([MQTT.will("car-1"), MQTT.gateway_status("gw-1")])

    def test_acl_is_the_channels(self) -> None:
        # Given the MQTT channels as broker ACL patterns: any namespace and gateway, and
        # the logged-in vehicle's own id,
        def pattern(channel: dict[str, Any]) -> str:
            return self.address(channel, namespace="+", vehicleId="%u", gatewayId="+")

        # then a car may write exactly what the gateway receives, and read exactly what
        # the gateway sends.
        assert acl_patterns("write") == {pattern(c) for c in self.mqtt_channels("receive")}
        assert acl_patterns("read") == {pattern(c) for c in self.mqtt_channels("send")}
        assert acl_patterns("readwrite") == set()

    @pytest.mark.parametrize("name", sorted(SPEC["channels"]))
    def test_vehicle_topics_parse(self, name: str) -> None:
        # A vehicle topic yields its vehicle and its kind, the level after the vehicle id
        # (``will`` for the four-level status topic, which only last wills use).
        address = SPEC["channels"][name]["address"]
        if "/v/{vehicleId}/" in address:
            topic = self.address(SPEC["channels"][name])
            assert MQTT.vehicle_of(topic) == "car-1"
            kind = "will" if topic == MQTT.will("car-1") else address.split("/")[3]
            assert MQTT.kind_of(topic) == kind

    def test_mqtt_specifics(self) -> None:
        ops = SPEC["operations"]
        # The roster entry is retained; a notice to one car is not.
        assert ops["announceGateway"]["bindings"]["mqtt"]["retain"] is True
        assert ops["sendNotices"]["bindings"]["mqtt"].get("retain", False) is False
        # Assignments, alone or batched, expire with their lease.
        assert "messageExpiryInterval" in ops["sendAssignments"]["bindings"]["mqtt"]
        leases = [resolve(ref)["title"] for ref in ops["sendAssignments"]["messages"]]
        assert leases == ["Assignment", "AssignmentBatch"]


class TestMessages:
    """Each message type has one component message whose payload lists exactly its fields."""

    def test_one_component_per_type(self) -> None:
        specs = component_messages()
        tags = [spec["x-parkpool-type"] for spec in specs.values()]
        assert sorted(tags) == sorted(BY_TAG)
        for key, spec in specs.items():
            cls = BY_TAG[spec["x-parkpool-type"]]
            assert (key, spec["name"], spec["title"]) == (cls.__name__, cls.TYPE, cls.__name__)  # type: ignore[attr-defined]
            assert spec["contentType"] == "application/msgpack"

    @pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
    def test_payload_fields(self, cls: type) -> None:
        schema = payload_schema(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(schema["properties"]) == fields | {"v", "type"}
        assert set(schema["required"]) == required_fields(cls) | {"v", "type"}
        assert flatten(schema["properties"]["type"])["const"] == cls.TYPE  # type: ignore[attr-defined]
        assert flatten(schema["properties"]["v"])["const"] == codec.WIRE_VERSION

    @pytest.mark.parametrize("cls", [*m.MESSAGE_TYPES, *m.NESTED_TYPES.values()])
    def test_defaults(self, cls: type) -> None:
        record = {s.get("x-parkpool-record"): s for s in SPEC["components"]["schemas"].values()}
        schema = record[cls.__name__] if cls in m.NESTED_TYPES.values() else payload_schema(cls)
        for f in dataclasses.fields(cls):
            if f.name not in required_fields(cls):
                described = flatten(schema["properties"][f.name])["default"]
                if isinstance(default_of(f), bytes):  # Bytes travel as base64 in the document
                    described = base64.b64decode(described)
                assert described == default_of(f), f.name

    @pytest.mark.parametrize(("field", "record"), list(m.NESTED_TYPES.items()))
    def test_nested_records(self, field: str, record: type) -> None:
        # Given each message that holds the record under ``field``,
        holders = [c for c in m.MESSAGE_TYPES if field in {f.name for f in dataclasses.fields(c)}]
        assert holders
        for holder in holders:
            schema = flatten(payload_schema(holder)["properties"][field])
            schema = flatten(schema["items"]) if schema.get("type") == "array" else schema
            # then the record is described with exactly its fields.
            assert schema["x-parkpool-record"] == record.__name__
            assert set(schema["properties"]) == {f.name for f in dataclasses.fields(record)}
            assert set(schema["required"]) == required_fields(record)

    def test_enums_are_the_code_enums(self) -> None:
        code = {
            name: value
            for module in (m, reputation)
            for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, enum.Enum)
        }
        described = set()
        for node in (n for n in walk(SPEC) if "enum" in n):
            name = node["x-parkpool-enum"]
            if name == "codec.ALLOWED_DTYPES":
                assert sorted(node["enum"]) == sorted(codec.ALLOWED_DTYPES)
            else:
                assert node["enum"] == [member.value for member in code[name]]
            described.add(name)
        assert described == set(code) | {"codec.ALLOWED_DTYPES"}

    @pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
    def test_bounds_are_the_code_bounds(self, cls: type) -> None:
        # Given the example, with room for any chunk_id and no grants to exceed the credits,
        body = from_example(message_spec(cls)["payload"], example_of(cls))
        room = {"chunk_id": 0, "n_chunks": m.MAX_CHUNKS, "grants": {}}
        body |= {key: value for key, value in room.items() if key in body}
        for name, prop in payload_schema(cls)["properties"].items():
            schema = flatten(prop)
            step = 1 if schema.get("type") == "integer" else 0.5
            # when a field is set to a declared bound, the code accepts it,
            for bound, delta in (("minimum", -step), ("maximum", step)):
                if bound in schema:
                    self.decode(cls, body | {name: schema[bound]})
                    # and just outside it, the code refuses it.
                    with pytest.raises(DecodeError, match=r"^out_of_range"):
                        self.decode(cls, body | {name: schema[bound] + delta})
            if "maxLength" in schema:
                self.decode(cls, body | {name: "x" * schema["maxLength"]})
                with pytest.raises(DecodeError, match=r"^too_large"):
                    self.decode(cls, body | {name: "x" * (schema["maxLength"] + 1)})
            # A list of the example's first item: as long as declared is accepted, and
            # one item more or fewer is refused.
            for bound, delta in (("minItems", -1), ("maxItems", 1)):
                if bound in schema and body.get(name):
                    item = body[name][0]
                    self.decode(cls, body | {name: [item] * schema[bound]})
                    with pytest.raises(DecodeError):
                        self.decode(cls, body | {name: [item] * (schema[bound] + delta)})

    def test_sum_limit_is_the_code_limit(self) -> None:
        # Given the one map whose values the document caps by another field's value,
        ((cls, name, limit),) = [
            (cls, name, flatten(prop)["x-parkpool-sum-at-most"])
            for cls in m.MESSAGE_TYPES
            for name, prop in payload_schema(cls)["properties"].items()
            if "x-parkpool-sum-at-most" in flatten(prop)
        ]
        assert (cls, name, limit) == (m.PullRequest, "grants", "credits")
        body = from_example(message_spec(cls)["payload"], example_of(cls))
        total = body[limit]
        # when its values add up to the limit, the code accepts it,
        self.decode(cls, body | {name: {"gw-a": total - 1, "gw-b": 1}})
        # and one more is refused.
        with pytest.raises(DecodeError, match=r"^bad_value"):
            self.decode(cls, body | {name: {"gw-a": total, "gw-b": 1}})

    @staticmethod
    def decode(message_type: type, body: dict[str, Any]) -> Any:
        data = msgpack.packb(body, default=codec._default, use_bin_type=True)
        return codec.decode(data, message_type)


class TestExamples:
    """Each message has an example for each of its uses, valid by its schema, that
    round-trips through the codec."""

    @pytest.mark.parametrize(("cls", "index"), EXAMPLES, ids=list(map(example_id, EXAMPLES)))
    def test_example_conforms_to_schema(self, cls: type, index: int) -> None:
        example = examples_of(cls)[index]
        assert conforms(message_spec(cls)["payload"], example) == []
        assert set(example) <= set(payload_schema(cls)["properties"])

    @pytest.mark.parametrize(("cls", "index"), EXAMPLES, ids=list(map(example_id, EXAMPLES)))
    def test_example_round_trips(self, cls: type, index: int) -> None:
        # Given the example packed the way a peer would pack it,
        example = from_example(message_spec(cls)["payload"], examples_of(cls)[index])
        # when it is decoded, re-encoded and decoded again,
        first = codec.decode(wire_bytes(cls, index), cls)
        second = codec.decode(codec.encode(first), cls)
        # then nothing changed on the way, and every field says what the example says.
        assert plain(second) == plain(first)
        assert codec.encode(second) == codec.encode(first)
        for f in dataclasses.fields(cls):
            expected = plain(example[f.name]) if f.name in example else default_of(f)
            assert plain(getattr(first, f.name)) == expected, f.name

    def test_arrays_in_examples_are_consistent(self) -> None:
        for node in walk(component_messages()):
            if {"dtype", "shape", "data"} <= set(node):
                assert math.prod(node["shape"]) == len(node["data"])

    def test_example_task_bytes_are_the_example_task(self) -> None:
        task = plain(codec.decode(wire_bytes(m.TaskChunk), m.TaskChunk))
        for cls, field in ((m.Assignment, "task"), (m.DeadLetter, "original")):
            carried = getattr(codec.decode(wire_bytes(cls), cls), field)
            assert plain(codec.decode(carried, m.TaskChunk)) == task

    def test_batch_items_are_assignments_of_the_batch(self) -> None:
        # Given the example batch,
        batch = codec.decode(wire_bytes(m.AssignmentBatch), m.AssignmentBatch)
        assert len(batch.assignments) > 1
        epochs = []
        for item in batch.assignments:
            # each item is an Assignment on its own, signed on its own, from the batch's
            # gateway to the batch's vehicle, carrying a task that decodes.
            assignment = codec.decode(item, m.Assignment)
            assert (assignment.gateway_id, assignment.vehicle_id) == (
                batch.gateway_id,
                batch.vehicle_id,
            )
            assert assignment.signature and assignment.nonce
            codec.decode(assignment.task, m.TaskChunk)
            epochs.append(assignment.epoch)
        # Each is its own lease, and the first leases the example task.
        assert len(set(epochs)) == len(epochs)
        first = codec.decode(batch.assignments[0], m.Assignment)
        assert first.task == codec.decode(wire_bytes(m.Assignment), m.Assignment).task

    def test_gateway_status_examples_show_both_uses(self) -> None:
        # The retained roster entry says no backlog; the notices say none and some.
        queued = [plain(example).get("queued", 0) for example in examples_of(m.GatewayStatus)]
        assert queued[0] == 0
        assert {q > 0 for q in queued[1:]} == {False, True}
