"""Base models of the wire: camelCase names, unknown fields refused."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import to_jsonable_python

from .validation import ResourceUuid


class WireModel(BaseModel):
    """Parameters and results: snake_case in Python, camelCase on the wire."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid", defer_build=True)


class Empty(WireModel):
    """An action without parameters."""


RESOURCE_UUID_DOC = ("the new resource's uuid (the manual's resourceUuid): 32 hex digits or the "
                     "dashed form, kept as 32 lowercase hex digits; a uuid in use is a 409; "
                     "absent: a new random one")


def resource_uuid_field(*older_names: str) -> Any:
    """The resourceUuid field, also taken under a route's older names (``uuid``...)."""
    return Field(None, validation_alias=AliasChoices("resourceUuid", "resource_uuid", *older_names),
                 description=RESOURCE_UUID_DOC + (f"; also taken as {', '.join(older_names)}"
                                                  if older_names else ""))


class CreateParams(WireModel):
    """The parameters of a create (POST) of a resource.

    The core owns ``resourceUuid``: it checks and normalises it, makes a random
    one when absent, answers 409 when the route's ``exists`` hook says it is in
    use, and hands the plugin params whose ``resource_uuid`` is always set.
    """
    resource_uuid: ResourceUuid | None = resource_uuid_field("uuid")


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
