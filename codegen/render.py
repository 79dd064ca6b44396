"""Renders every file of generated/kvevents/ (and the derived wire schema) in memory."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from .model import ASYNCAPI, CONFIG_SCHEMA, EVENTS_SCHEMA, SCHEMA_DIR, Model, load_model
from .pytypes import python_type
from .wire import render_wire_schema

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = TEMPLATES / "static"
PACKAGE = Path("generated/kvevents")
WIRE_SCHEMA = Path("schema/derived/wire.schema.json")

_FRAME_VALUES = {"empty": 'b""', "any": 'b""', "end_seq": "END_SEQ", "start_seq": "seq_bytes(start)"}
_REPLY_VALUES = {"empty": 'b""', "topic": "topic", "seq": "entry[1]", "payload": "entry[2]", "end_seq": "END_SEQ"}


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
    env.filters["pyrepr"] = repr
    return env


def _ruff(source: str, filename: str) -> str:
    """Sort imports and format, as `ruff` pinned in pyproject does it."""
    if importlib.util.find_spec("ruff") is None:
        raise SystemExit("codegen needs its pinned toolchain: pip install -e '.[codegen]' (or use nox -s regenerate)")
    base = [sys.executable, "-m", "ruff"]
    config = ["--config", str(ROOT / "pyproject.toml")]
    fixed = subprocess.run(
        [*base, "check", *config, "--select", "I,F401", "--fix", "--quiet", "--exit-zero", "--stdin-filename", filename, "-"],
        input=source, capture_output=True, text=True, check=True,
    ).stdout
    return subprocess.run(
        [*base, "format", *config, "--quiet", "--stdin-filename", filename, "-"],
        input=fixed, capture_output=True, text=True, check=True,
    ).stdout


def _config_model() -> str:
    """The union pydantic model, rendered by datamodel-code-generator."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "config.py"
        subprocess.run(
            [
                sys.executable, "-m", "datamodel_code_generator",
                "--input", str(SCHEMA_DIR / CONFIG_SCHEMA),
                "--input-file-type", "jsonschema",
                "--output", str(out),
                "--output-model-type", "pydantic_v2.BaseModel",
                "--target-python-version", "3.11",
                "--disable-timestamp",
                "--use-annotated",
                "--use-standard-collections",
                "--use-union-operator",
                "--use-schema-description",
                "--use-field-description",
                "--use-default",
                "--strict-nullable",
                "--enum-field-as-literal", "all",
                "--class-name", "KVEventsConfig",
            ],
            check=True, capture_output=True, text=True,
        )
        body = out.read_text(encoding="utf-8")
    body = "\n".join(line for line in body.splitlines() if not line.startswith("#"))
    return body


def render_all(model: Model | None = None) -> dict[Path, str]:
    """Every generated file, keyed by its path relative to the repository root."""
    model = model or load_model()
    env = _environment()
    files: dict[Path, str] = {}

    def header(*sources: str) -> dict[str, Any]:
        return {"sources": list(sources)}

    def emit(path: Path, template: str, sources: tuple[str, ...], **context: Any) -> None:
        text = env.get_template(template).render(**header(*sources), **context)
        files[path] = _ruff(text, path.name)

    defs = model.events_schema["$defs"]
    emit(
        PACKAGE / "events.py", "events.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/events.py.j2"),
        events=model.events,
        block_hash_type=python_type(defs["BlockHash"], defs, canonical=True),
        block_hash_doc=defs["BlockHash"]["description"],
        token_id_type=python_type(defs["TokenId"], defs, canonical=True).replace("TokenId", "int"),
        token_id_doc=defs["TokenId"]["description"],
        token_type=python_type(defs["Token"], defs, canonical=True),
        token_doc=defs["Token"]["description"],
    )
    emit(PACKAGE / "codec.py", "codec.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/codec.py.j2"),
         events=model.events, dialects=model.dialects)
    emit(PACKAGE / "frames.py", "frames.py.j2", (f"schema/{ASYNCAPI}", "codegen/templates/frames.py.j2"),
         constants=model.constants, messages=model.messages)
    shapes = []
    for shape in ("with_topic", "without_topic"):
        reply = next(m for m in model.messages.values() if m.shape == shape and "payload" in [f.kind for f in m.frames])
        end = next(m for m in model.messages.values() if m.shape == shape and m is not reply)
        shapes.append((shape, reply, end))
    emit(PACKAGE / "replay.py", "replay.py.j2", (f"schema/{ASYNCAPI}", "codegen/templates/replay.py.j2"), shapes=shapes)
    emit(PACKAGE / "__init__.py", "package_init.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/package_init.py.j2"),
         events=model.events, dialects=model.dialects)

    publisher_args = ("endpoint", "replay_endpoint", "buffer_steps", "hwm", "max_queue_size", "topic")
    extension_args = tuple(f.name for f in model.config_fields if not f.dialects)
    for d in model.dialects:
        p = model.events_schema["x-dialects"][d.name]["publisher"]
        pkg = PACKAGE / d.name
        defs_alias = python_type(defs["ExternalBlockHash"], defs, canonical=False)
        upstream = d.module.removesuffix(".py").replace("/", ".")
        emit(pkg / "structs.py", "dialect_structs.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/dialect_structs.py.j2"),
             d=d, hash_alias_type=defs_alias)
        args = publisher_args + (("bind",) if p["bind_arg"] else ())
        emit(pkg / "publisher.py", "dialect_publisher.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/dialect_publisher.py.j2"),
             d=d, p=p, publisher_args=args, extension_args=extension_args + (() if p["bind_arg"] else ("bind",)))
        fields = [f for f in model.config_fields if d.name in f.dialects or not f.dialects]
        emit(pkg / "config.py", "dialect_config.py.j2", (f"schema/{CONFIG_SCHEMA}", "codegen/templates/dialect_config.py.j2"),
             d=d, p=p, fields=fields, uses_literal=any("Literal[" in f.py_type for f in fields))
        emit(pkg / "__init__.py", "dialect_init.py.j2", (f"schema/{EVENTS_SCHEMA}", "codegen/templates/dialect_init.py.j2"),
             d=d, upstream_import=upstream)

    config_header = env.get_template("_header.j2").render(sources=[f"schema/{CONFIG_SCHEMA}", "datamodel-code-generator"])
    files[PACKAGE / "config.py"] = _ruff(
        config_header + '"""The union of every producer\'s KVEventsConfig and kvevents\' options."""\n' + _config_model(),
        "config.py",
    )

    for static in sorted(STATIC.glob("*.py")):
        rel = f"codegen/templates/static/{static.name}"
        text = env.get_template("_header.j2").render(sources=[rel]) + static.read_text(encoding="utf-8")
        files[PACKAGE / static.name] = _ruff(text, static.name)
    files[PACKAGE / "py.typed"] = ""
    files[WIRE_SCHEMA] = render_wire_schema(model)
    return dict(sorted(files.items()))
