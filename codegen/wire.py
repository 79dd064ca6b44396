"""Derives the positional wire schema: what each dialect's payload looks like as plain
msgpack values (bytes as {"$bytes": hex}), for validators in any language."""

from __future__ import annotations

import copy
import json
from typing import Any

from .model import EVENTS_SCHEMA, Model

SHARED_DEFS = ("Bytes", "ExternalBlockHash", "BlockHash", "TokenId", "Token")


def _value_schema(schema: dict[str, Any]) -> dict[str, Any]:
    keep = {
        k: v
        for k, v in schema.items()
        if not k.startswith("x-") and k not in ("description", "default")
    }
    return copy.deepcopy(keep)


def derive_wire_schema(model: Model) -> dict[str, Any]:
    src = model.events_schema
    defs: dict[str, Any] = {name: copy.deepcopy(src["$defs"][name]) for name in SHARED_DEFS}
    canonical = {e.tag: e for e in model.events}
    for d in model.dialects:
        tags = []
        for de in d.events:
            event = canonical[de.tag]
            props = {f.name: f.schema for f in event.fields}
            field_schemas = []
            for df in de.fields:
                per = props[df.name]["x-dialects"][d.name]
                field_schemas.append(
                    (df, _value_schema(per.get("wire", per.get("schema", props[df.name]))))
                )
            if d.is_positional:
                body: dict[str, Any] = {
                    "type": "array",
                    "prefixItems": [{"const": de.tag}] + [s for _, s in field_schemas],
                    "items": False,
                    "minItems": 1 + len(field_schemas),
                }
            else:
                body = {
                    "type": "object",
                    "properties": {
                        "type": {"const": de.tag},
                        **{df.name: s for df, s in field_schemas},
                    },
                    "required": ["type"]
                    + [df.name for df, _ in field_schemas if df.emit == "always"],
                    "additionalProperties": False,
                    "x-key-order": ["type"] + [df.name for df, _ in field_schemas],
                }
            defs[f"{d.name}.{de.tag}"] = body
            tags.append({"$ref": f"#/$defs/{d.name}.{de.tag}"})
        defs[f"{d.name}.Event"] = {"oneOf": tags}
        defs[f"{d.name}.EventBatch"] = {
            "description": f"{d.producer}: [ts, events, {d.rank_field}], always 3 elements.",
            "type": "array",
            "prefixItems": [
                {"type": "number"},
                {"type": "array", "items": {"$ref": f"#/$defs/{d.name}.Event"}},
                {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            ],
            "items": False,
            "minItems": 3,
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:kvevents:schema:wire",
        "title": "KV-event payloads on the wire, per dialect",
        "description": (
            f"Derived from {EVENTS_SCHEMA} by `python -m codegen`; do not edit. Validate a payload "
            "decoded to plain values against #/$defs/<dialect>.EventBatch. Map events list their key "
            "order in x-key-order (JSON Schema cannot say it)."
        ),
        "$defs": defs,
    }


def render_wire_schema(model: Model) -> str:
    return json.dumps(derive_wire_schema(model), indent=2) + "\n"
