"""The bases of the generated `KVEventsConfig` models (one per dialect, rendered from
schema/config.schema.json by datamodel-code-generator): what a producer's config does beyond
validating its fields. vLLM's is a pydantic dataclass (msgspec encodes it into the engine's
ready response), SGLang's a pydantic BaseModel."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, TypeAdapter


def _derive_publisher(config: Any) -> None:
    # vLLM leaves `publisher` unset and derives it from `enable_kv_cache_events`; a producer
    # without that flag (SGLang) keeps its own default.
    if hasattr(config, "enable_kv_cache_events") and getattr(config, "publisher", "") is None:
        config.publisher = "zmq" if config.enable_kv_cache_events else "null"


class KVEventsConfigBase(BaseModel):
    def model_post_init(self, context: Any, /) -> None:
        _derive_publisher(self)

    @classmethod
    def from_cli(cls, cli_value: str) -> Self:
        """Parse the `--kv-events-config` JSON value."""
        return cls.model_validate_json(cli_value)


class KVEventsConfigDataclass:
    """Mixed into a pydantic dataclass: `__post_init__` runs after validation."""

    def __post_init__(self) -> None:
        _derive_publisher(self)

    @classmethod
    def from_cli(cls, cli_value: str) -> Self:
        """Parse the `--kv-events-config` JSON value."""
        return TypeAdapter(cls).validate_json(cli_value)
