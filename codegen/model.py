"""Reads schema/ into the plain records the templates render from.

Everything a template needs is computed here, once, in a deterministic order, so the
templates stay free of logic beyond loops and the output depends on the schema alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pytypes import python_type, split_union_count

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
EVENTS_SCHEMA = "kvevents.schema.json"
CONFIG_SCHEMA = "config.schema.json"
ASYNCAPI = "kvevents.asyncapi.json"
EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


def load_json(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Field:
    name: str
    schema: dict[str, Any]
    py_type: str
    required: bool
    default: Any
    position: int | None  # slot in the positional event form; None: never positional
    positional_required: bool
    alternatives: tuple[str, ...] = ()  # py types of the other x-split-union alternatives

    @property
    def default_repr(self) -> str:
        return repr(self.default)


@dataclass(frozen=True)
class DialectField:
    name: str
    py_type: str
    has_default: bool
    default: Any
    emit: str

    @property
    def default_repr(self) -> str:
        return repr(self.default)


@dataclass(frozen=True)
class EventType:
    tag: str
    description: str
    fields: tuple[Field, ...]

    @property
    def alternatives(self) -> tuple[int, ...]:
        """Indexes of the split-union alternatives beyond the first (empty when none)."""
        count = max((len(f.alternatives) for f in self.fields), default=0)
        return tuple(range(1, count + 1))

    @property
    def positional_fields(self) -> tuple[Field, ...]:
        return tuple(
            sorted(
                (f for f in self.fields if f.position is not None), key=lambda f: f.position or 0
            )
        )


@dataclass(frozen=True)
class DialectEvent:
    tag: str
    fields: tuple[DialectField, ...]
    hash_excluded: tuple[str, ...]


@dataclass(frozen=True)
class Dialect:
    name: str
    producer: str
    module: str
    event_encoding: str
    rank_field: str
    batch_options: dict[str, Any]
    event_options: dict[str, Any]
    replay_reply: str
    hashable_events: bool
    constants: dict[str, str]
    hash_alias: str | None
    medium_enum: dict[str, Any] | None
    events: tuple[DialectEvent, ...]
    module_exports: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Names the producer's module exports beyond the wire, by the runtime module that has them."""
    dropped: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_positional(self) -> bool:
        return self.event_encoding == "array"


@dataclass(frozen=True)
class ConfigField:
    name: str
    py_type: str
    default: Any
    description: str
    dialects: tuple[str, ...]
    dialect_defaults: dict[str, Any]

    def default_for(self, dialect: str) -> Any:
        return self.dialect_defaults.get(dialect, self.default)


@dataclass(frozen=True)
class Frame:
    name: str
    kind: str


@dataclass(frozen=True)
class Message:
    name: str
    summary: str
    frames: tuple[Frame, ...]
    router_prefix: tuple[str, ...]
    shape: str | None
    info: bool = False


@dataclass(frozen=True)
class Model:
    events_schema: dict[str, Any]
    config_schema: dict[str, Any]
    asyncapi: dict[str, Any]
    events: tuple[EventType, ...]
    dialects: tuple[Dialect, ...]
    config_fields: tuple[ConfigField, ...]
    messages: dict[str, Message]
    constants: dict[str, Any]
    batch_rank_default: Any = None

    def dialect(self, name: str) -> Dialect:
        return next(d for d in self.dialects if d.name == name)


def _event_types(schema: dict[str, Any]) -> tuple[EventType, ...]:
    defs = schema["$defs"]
    out = []
    for tag in EVENT_TYPES:
        spec = defs[tag]
        required = set(spec.get("required", ()))
        fields = []
        for name, prop in spec["properties"].items():
            fields.append(
                Field(
                    name=name,
                    schema=prop,
                    py_type=python_type(prop, defs, canonical=True),
                    required=name in required,
                    default=prop.get("default"),
                    position=prop.get("x-position"),
                    positional_required=name in required or bool(prop.get("x-positional-required")),
                    alternatives=tuple(
                        python_type(prop, defs, canonical=True, alternative=i)
                        for i in range(1, split_union_count(prop, defs))
                    ),
                )
            )
        out.append(
            EventType(tag=tag, description=spec.get("description", ""), fields=tuple(fields))
        )
    return tuple(out)


def _dialects(schema: dict[str, Any], events: tuple[EventType, ...]) -> tuple[Dialect, ...]:
    defs = schema["$defs"]
    out = []
    for name, meta in schema["x-dialects"].items():
        dialect_events = []
        dropped: dict[str, tuple[str, ...]] = {}
        for event in events:
            carried = []
            for f in event.fields:
                per = f.schema.get("x-dialects", {}).get(name)
                if per is None:
                    continue
                prop_schema = per.get("schema", f.schema)
                has_default = per["emit"] == "omit-default"
                carried.append(
                    (
                        per["position"],
                        DialectField(
                            name=f.name,
                            py_type=python_type(
                                prop_schema,
                                defs,
                                canonical=False,
                                hash_alias=meta.get("hash_alias"),
                            ),
                            has_default=has_default,
                            default=f.default if has_default else None,
                            emit=per["emit"],
                        ),
                    )
                )
            carried.sort(key=lambda pair: pair[0])
            positions = [p for p, _ in carried]
            if positions != list(range(1, len(positions) + 1)):
                raise ValueError(f"{name}.{event.tag}: positions {positions} are not 1..n")
            names = {df.name for _, df in carried}
            dropped[event.tag] = tuple(f.name for f in event.fields if f.name not in names)
            excluded = tuple(
                f.name for f in event.fields if name in f.schema.get("x-hash-excluded", ())
            )
            dialect_events.append(
                DialectEvent(
                    tag=event.tag, fields=tuple(df for _, df in carried), hash_excluded=excluded
                )
            )
        out.append(
            Dialect(
                name=name,
                producer=meta["producer"],
                module=meta["module"],
                event_encoding=meta["event_encoding"],
                rank_field=meta["rank_field"],
                batch_options=meta["batch_options"],
                event_options=meta["event_options"],
                replay_reply=meta["replay_reply"],
                hashable_events=meta["hashable_events"],
                constants=meta.get("constants", {}),
                hash_alias=meta.get("hash_alias"),
                medium_enum=meta.get("medium_enum"),
                events=tuple(dialect_events),
                dropped=dropped,
                module_exports=_by_module(meta.get("module_exports", {})),
            )
        )
    return tuple(out)


def _by_module(exports: dict[str, str]) -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[str]] = {}
    for name, module in sorted(exports.items()):
        grouped.setdefault(module, []).append(name)
    return {module: tuple(names) for module, names in sorted(grouped.items())}


def _config_fields(schema: dict[str, Any]) -> tuple[ConfigField, ...]:
    out = []
    for name, prop in schema["properties"].items():
        out.append(
            ConfigField(
                name=name,
                py_type=python_type(prop, {}, canonical=False),
                default=prop.get("default"),
                description=prop.get("description", ""),
                dialects=tuple(prop.get("x-dialects", ())),
                dialect_defaults=prop.get("x-dialect-defaults", {}),
            )
        )
    return tuple(out)


def _messages(asyncapi: dict[str, Any]) -> dict[str, Message]:
    out = {}
    for name, msg in asyncapi["components"]["messages"].items():
        out[name] = Message(
            name=name,
            summary=msg.get("summary", ""),
            frames=tuple(Frame(f["name"], f["kind"]) for f in msg["x-frames"]),
            router_prefix=tuple(msg.get("x-router-prefix", ())),
            shape=msg.get("x-shape"),
            info=bool(msg.get("x-info")),
        )
    return out


def load_model() -> Model:
    events_schema = load_json(EVENTS_SCHEMA)
    config_schema = load_json(CONFIG_SCHEMA)
    asyncapi = load_json(ASYNCAPI)
    events = _event_types(events_schema)
    return Model(
        events_schema=events_schema,
        config_schema=config_schema,
        asyncapi=asyncapi,
        events=events,
        dialects=_dialects(events_schema, events),
        config_fields=_config_fields(config_schema),
        messages=_messages(asyncapi),
        constants=asyncapi["x-constants"],
    )
