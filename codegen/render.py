"""Renders every file of generated/kvevents/ (and the derived wire schema) in memory."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from .model import ASYNCAPI, CONFIG_SCHEMA, EVENTS_SCHEMA, Model, load_model
from .pytypes import python_type
from .wire import render_wire_schema

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
PACKAGE = Path("generated/kvevents")
DERIVED = Path("schema/derived")
WIRE_SCHEMA = DERIVED / "wire.schema.json"
DIALECT_DIR = "__dialect__"
"""The template folder rendered once per dialect, into generated/kvevents/<dialect>/."""

_FRAME_VALUES = {
    "empty": 'b""',
    "any": 'b""',
    "end_seq": "END_SEQ",
    "start_seq": "seq_bytes(start)",
    "info_flag": "INFO_FLAG",
    "snapshot_flag": "SNAPSHOT_FLAG",
}
_LIVE_VALUES = {"topic": "topic", "seq": "seq_frame", "payload": "payload"}
_REPLY_VALUES = {
    "empty": 'b""',
    "topic": "topic",
    "seq": "entry[1]",
    "payload": "entry[2]",
    "end_seq": "END_SEQ",
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _frame_value(kind: str, name: str) -> str:
    return _FRAME_VALUES.get(kind, name)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["snake"] = _snake
    env.filters["frame_value"] = _frame_value
    env.filters["reply_value"] = lambda kind: _REPLY_VALUES[kind]
    env.filters["live_value"] = lambda kind: _LIVE_VALUES[kind]
    env.filters["pyrepr"] = repr
    return env


def _ruff(source: str, filename: str) -> str:
    """Sort imports and format, as `ruff` pinned in pyproject does it."""
    if importlib.util.find_spec("ruff") is None:
        raise SystemExit(
            "codegen needs its pinned toolchain: pip install -e '.[codegen]' (or use nox -s regenerate)"
        )
    base = [sys.executable, "-m", "ruff"]
    config = ["--config", str(ROOT / "pyproject.toml")]
    fixed = subprocess.run(
        [
            *base,
            "check",
            *config,
            "--select",
            "I,F401",
            "--fix",
            "--quiet",
            "--exit-zero",
            "--stdin-filename",
            filename,
            "-",
        ],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return subprocess.run(
        [*base, "format", *config, "--quiet", "--stdin-filename", filename, "-"],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def derive_config_schema(schema: dict[str, Any], dialect: str) -> dict[str, Any]:
    """The config schema as `dialect`'s producer reads it: its fields with its defaults and
    value schemas, plus kvevents' own options (fields listed for no producer), and unknown
    keys forbidden or ignored as the producer does."""
    properties = {}
    for name, prop in schema["properties"].items():
        carried_by = prop.get("x-dialects", [])
        if carried_by and dialect not in carried_by:
            continue
        derived_prop = {k: v for k, v in prop.items() if not k.startswith("x-")}
        override = prop.get("x-dialect-schemas", {}).get(dialect)
        if override is not None:
            derived_prop = {
                k: v for k, v in derived_prop.items() if k in ("default", "description")
            } | override
        defaults = prop.get("x-dialect-defaults", {})
        if dialect in defaults:
            derived_prop["default"] = defaults[dialect]
        properties[name] = derived_prop
    model = schema["x-dialect-models"][dialect]
    derived = {
        k: v
        for k, v in schema.items()
        if not k.startswith("x-") and k not in ("properties", "additionalProperties")
    }
    derived["$id"] = f"{schema['$id']}:{dialect}"
    derived["description"] = (
        f"KVEventsConfig as {dialect} reads it, with kvevents' options. {model['description']} "
        f"Derived from {CONFIG_SCHEMA} by `python -m codegen`; do not edit."
    )
    if model["extra-fields"] == "forbid":
        derived["additionalProperties"] = False
    derived["properties"] = properties
    return derived


def _config_model(schema_file: Path, model: dict[str, str]) -> str:
    """The model of one derived config schema, rendered by datamodel-code-generator."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "config.py"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "datamodel_code_generator",
                "--input",
                str(schema_file),
                "--input-file-type",
                "jsonschema",
                "--output",
                str(out),
                "--output-model-type",
                model["output-model-type"],
                "--extra-fields",
                model["extra-fields"],
                "--base-class",
                model["base-class"],
                "--target-python-version",
                "3.11",
                "--disable-timestamp",
                "--use-annotated",
                "--use-standard-collections",
                "--use-union-operator",
                "--use-field-description",
                "--use-default",
                "--strict-nullable",
                "--enum-field-as-literal",
                "all",
                "--class-name",
                "KVEventsConfig",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        body = out.read_text(encoding="utf-8")
    return "\n".join(line for line in body.splitlines() if not line.startswith("#"))


def _info_fields(schema: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(name, annotation, default or None) of the info reply's fields, required ones first."""
    types = {
        ("string", "binary"): "bytes",
        ("string", None): "str",
        ("integer", None): "int",
        ("boolean", None): "bool",
    }
    required = schema["required"]
    fields = []
    for name, prop in schema["properties"].items():
        annotation = types[(prop["type"], prop.get("format"))]
        fields.append((name, annotation, None if name in required else repr(prop["default"])))
    return sorted(fields, key=lambda f: f[2] is not None)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def render_all(model: Model | None = None) -> dict[Path, str]:
    """Every generated file, keyed by its path relative to the repository root."""
    model = model or load_model()
    env = _environment()
    files: dict[Path, str] = {}

    def emit(path: Path, template: str, sources: tuple[str, ...], **context: Any) -> None:
        text = env.get_template(template).render(sources=list(sources), **context)
        files[path] = _ruff(text, path.name)

    events_src = f"schema/{EVENTS_SCHEMA}"
    asyncapi_src = f"schema/{ASYNCAPI}"

    def package(name: str, source: str | None, **context: Any) -> None:
        template = f"kvevents/{name}.j2"
        sources = (source,) if source else ()
        emit(PACKAGE / name, template, (*sources, f"codegen/templates/{template}"), **context)

    defs = model.events_schema["$defs"]
    package(
        "events.py",
        events_src,
        events=model.events,
        block_hash_type=python_type(defs["BlockHash"], defs, canonical=True),
        block_hash_doc=defs["BlockHash"]["description"],
        token_id_type=python_type(defs["TokenId"], defs, canonical=True).replace("TokenId", "int"),
        token_id_doc=defs["TokenId"]["description"],
        token_type=python_type(defs["Token"], defs, canonical=True),
        token_doc=defs["Token"]["description"],
    )
    package("codec.py", events_src, events=model.events, dialects=model.dialects)
    package(
        "frames.py",
        asyncapi_src,
        constants=model.constants,
        messages=model.messages,
        info_fields=_info_fields(model.asyncapi["components"]["schemas"]["PublisherInfo"]),
    )
    shapes = []
    for shape in ("with_topic", "without_topic"):
        reply = next(
            m
            for m in model.messages.values()
            if m.shape == shape and "payload" in [f.kind for f in m.frames]
        )
        end = next(
            m for m in model.messages.values() if m.shape == shape and m is not reply and not m.info
        )
        shapes.append((shape, reply, end))
    package(
        "loops.py",
        asyncapi_src,
        live_frames=model.messages["LiveBatch"].frames,
        shapes=shapes,
        seq_size=model.constants["SEQ_SIZE"]["value"],
    )
    package("wire.py", asyncapi_src, dialects=model.dialects)
    package("aio.py", asyncapi_src)
    package("index.py", None)
    package("mock.py", None, dialects=model.dialects)
    package("fleet.py", None, dialects=model.dialects)
    package("__init__.py", events_src, events=model.events, dialects=model.dialects)
    package("__main__.py", None)

    publisher_args = (
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
        "max_queue_size",
        "topic",
    )
    extension_args = tuple(f.name for f in model.config_fields if not f.dialects)
    for d in model.dialects:
        p = model.events_schema["x-dialects"][d.name]["publisher"]
        pkg = PACKAGE / d.name

        def dialect_file(name: str, source: str, **context: Any) -> None:
            template = f"kvevents/{DIALECT_DIR}/{name}.j2"
            emit(pkg / name, template, (source, f"codegen/templates/{template}"), d=d, **context)  # noqa: B023

        upstream = d.module.removesuffix(".py").replace("/", ".")
        dialect_file(
            "structs.py",
            events_src,
            hash_alias_type=python_type(defs["ExternalBlockHash"], defs, canonical=False),
        )
        dialect_file("snapshot.py", events_src)
        args = publisher_args + (("bind",) if p["bind_arg"] else ())
        dialect_file(
            "publisher.py",
            events_src,
            p=p,
            publisher_args=args,
            extension_args=extension_args + (() if p["bind_arg"] else ("bind",)),
        )
        config_schema = DERIVED / f"config.{d.name}.schema.json"
        files[config_schema] = _json(derive_config_schema(model.config_schema, d.name))
        with tempfile.TemporaryDirectory() as tmp:
            schema_file = Path(tmp) / config_schema.name
            schema_file.write_text(files[config_schema], encoding="utf-8")
            config_model = _config_model(
                schema_file, model.config_schema["x-dialect-models"][d.name]
            )
        template = f"kvevents/{DIALECT_DIR}/config.py.j2"
        emit(
            pkg / "config.py",
            template,
            (
                f"schema/{CONFIG_SCHEMA}",
                f"codegen/templates/{template}",
                "datamodel-code-generator",
            ),
            d=d,
            model=config_model,
        )
        dialect_file("__init__.py", events_src, upstream_import=upstream)

    files[PACKAGE / "py.typed"] = ""
    files[WIRE_SCHEMA] = render_wire_schema(model)
    return dict(sorted(files.items()))
