"""Maps the JSON Schema shapes used in schema/ to Python annotations.

Only the shapes the schema uses are supported; anything else is an error, so a schema
change that the generator cannot express fails loudly instead of degrading to Any.
"""

from __future__ import annotations

from typing import Any

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


def _is_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null"


def python_type(
    schema: dict[str, Any],
    defs: dict[str, Any],
    *,
    canonical: bool,
    hash_alias: str | None = None,
    alternative: int = 0,
) -> str:
    """The annotation for ``schema``.

    ``canonical`` adds msgspec constraints (u32 token ids, bounded bytes hashes) that the
    tolerant decoder enforces; the dialect structs copy the producers' plain types.
    """
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name == "Bytes":
            if canonical and "x-max-length" in schema:
                return f"Annotated[bytes, Meta(min_length={schema['x-min-length']}, max_length={schema['x-max-length']})]"
            return "bytes"
        if name == "ExternalBlockHash" and hash_alias:
            return hash_alias
        target = defs.get(name, {})
        if canonical and target.get("x-split-union"):
            # One alternative per struct: `alternative` picks which (see split_union_count).
            return python_type(target["anyOf"][alternative], defs, canonical=True)
        aliases = {"BlockHash": "BlockHash", "TokenId": "TokenId", "Token": "Token"}
        if canonical and name in aliases:
            return aliases[name]
        return python_type(defs[name], defs, canonical=canonical, hash_alias=hash_alias)
    if "anyOf" in schema:
        members = [m for m in schema["anyOf"] if not _is_null(m)]
        rendered = [
            python_type(
                m, defs, canonical=canonical, hash_alias=hash_alias, alternative=alternative
            )
            for m in members
        ]
        if len(members) < len(schema["anyOf"]):
            rendered.append("None")
        return " | ".join(rendered)
    kind = schema.get("type")
    if kind == "integer":
        # msgspec bounds must fit in int64; the msgpack int range itself bounds the rest.
        bounds = []
        if "minimum" in schema and schema["minimum"] > I64_MIN:
            bounds.append(f"ge={schema['minimum']}")
        if "maximum" in schema and schema["maximum"] < I64_MAX:
            bounds.append(f"le={schema['maximum']}")
        if canonical and bounds:
            return f"Annotated[int, Meta({', '.join(bounds)})]"
        return "int"
    if kind == "number":
        return "float"
    if kind == "string":
        if "enum" in schema:
            return "Literal[" + ", ".join(f'"{v}"' for v in schema["enum"]) + "]"
        return "str"
    if kind == "boolean":
        return "bool"
    if kind == "array":
        if "prefixItems" in schema:
            parts = [
                python_type(
                    p, defs, canonical=canonical, hash_alias=hash_alias, alternative=alternative
                )
                for p in schema["prefixItems"]
            ]
            return f"tuple[{', '.join(parts)}]"
        items = schema.get("items", {})
        inner = (
            "Any"
            if items == {}
            else python_type(
                items, defs, canonical=canonical, hash_alias=hash_alias, alternative=alternative
            )
        )
        if schema.get("x-python") == "tuple":
            return f"tuple[{inner}, ...]"
        return f"list[{inner}]"
    if schema == {}:
        return "Any"
    raise ValueError(f"codegen cannot map schema {schema!r}")


def split_union_count(schema: dict[str, Any], defs: dict[str, Any]) -> int:
    """How many alternatives of an x-split-union the field holds (1 when none)."""
    if "$ref" in schema:
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        if target.get("x-split-union"):
            return len(target["anyOf"])
        return 1
    counts = [split_union_count(m, defs) for m in schema.get("anyOf", [])]
    if "items" in schema and isinstance(schema["items"], dict):
        counts.append(split_union_count(schema["items"], defs))
    return max(counts, default=1)
