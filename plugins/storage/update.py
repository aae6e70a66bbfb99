"""updatePrimaryStorage: a storage's name and description (url and mount options: see README)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from agent import errors
from agent.models import WireModel

if TYPE_CHECKING:
    from . import StoragePlugin


class UpdatePrimaryStorage(WireModel):
    name: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=2048)
    url: str | None = Field(None, min_length=1, max_length=4096)
    mount_options: str | None = Field(None, max_length=1024)


def _no_control(v: str | None, what: str) -> None:
    if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise errors.BadRequest(f"{what} holds control characters", code="STORAGE.1001")


async def check(p: "StoragePlugin", params: UpdatePrimaryStorage, uuid: str) -> None:
    st = p.get_storage(uuid)
    _no_control(params.name, "name")
    _no_control(params.description, "description")
    if (params.url is not None and params.url != st.row.url) or \
            (params.mount_options is not None and params.mount_options != st.row.mount_options):
        raise errors.BadRequest("changing url or mountOptions of a primary storage is not "
                                "supported by this agent yet: delete and add it again",
                                code="STORAGE.1001")


async def update(p: "StoragePlugin", job, params: UpdatePrimaryStorage, uuid: str) -> dict[str, Any]:
    await check(p, params, uuid)
    st = p.get_storage(uuid)
    if params.name is not None:
        st.row.name = params.name
    if params.description is not None:
        st.row.description = params.description
    await p.registry.save_storage(st.row)
    return {"inventory": st.row.inventory()}
