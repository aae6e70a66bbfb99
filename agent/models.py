"""Base models of the wire: camelCase names, unknown fields refused."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic_core import to_jsonable_python


class WireModel(BaseModel):
    """Parameters and results: snake_case in Python, camelCase on the wire."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid", defer_build=True)


class Empty(WireModel):
    """An action without parameters."""


def iso(ts: float | None) -> str | None:
    """A Unix time as the wire writes timestamps: ISO 8601 UTC, milliseconds, Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow_iso() -> str:
    return iso(time.time())


def dump(value: Any) -> Any:
    """A handler's return value as JSON-ready data (models by their wire names).

    pydantic-core walks plain lists and dicts in Rust, so a 1000-item
    inventory costs about a millisecond, models or not.
    """
    return to_jsonable_python(value, by_alias=True)
