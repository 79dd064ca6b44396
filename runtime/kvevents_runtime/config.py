"""The base of the generated `KVEventsConfig` models (one per dialect, rendered from
schema/config.schema.json by datamodel-code-generator): what every producer's config does
beyond validating its fields."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel


class KVEventsConfigBase(BaseModel):
    def model_post_init(self, context: Any, /) -> None:
        # vLLM leaves `publisher` unset and derives it from `enable_kv_cache_events`; a
        # producer without that flag (SGLang) keeps its own default.
        fields = type(self).model_fields
        if "enable_kv_cache_events" in fields and getattr(self, "publisher", "") is None:
            derived = "zmq" if getattr(self, "enable_kv_cache_events") else "null"  # noqa: B009
            setattr(self, "publisher", derived)  # noqa: B010

    @classmethod
    def from_cli(cls, cli_value: str) -> Self:
        """Parse the `--kv-events-config` JSON value."""
        return cls.model_validate_json(cli_value)
