"""The storage plugin's kinds in the core's storage-kind registry (agent/storage_kinds.py).

The core serves ``/v1/primary-storage/{uuid}`` (get, capacity, actions, delete)
for every kind and hands local, NFS and shared-mount-point storages to the
plugin's methods named here; the image store registers its own kind
(imagestore.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent import errors
from agent.models import Empty
from agent.storage_kinds import PRIMARY, KindAction, StorageKind

from . import update
from .models import ChangePrimaryStorageState

if TYPE_CHECKING:
    from . import StoragePlugin


def register(plugin: "StoragePlugin", types: tuple[str, ...]) -> None:
    for t in types:
        plugin.agent.storage_kinds.register(_primary_kind(plugin, t))


def _primary_kind(p: "StoragePlugin", type_: str) -> StorageKind:
    def uuids() -> list[str]:
        return [u for u, st in p.storages.items() if st.row.type == type_]

    def inventory(uuid: str) -> dict[str, Any]:
        return p.get_storage(uuid).row.inventory()

    async def delete(job, params, uuid: str) -> Any:
        if params.delete_data:
            raise errors.BadRequest("deleteData is refused for primary storage: its volumes stay "
                                    "on the storage", code="STORAGE.1001")
        return await p.delete_storage(job, params, uuid)

    async def check_delete(params, uuid: str) -> None:
        if params.delete_data:
            raise errors.BadRequest("deleteData is refused for primary storage: its volumes stay "
                                    "on the storage", code="STORAGE.1001")
        await p._delete_check(params, uuid)

    return StorageKind(
        category=PRIMARY, type=type_, plugin=p.name, uuids=uuids, inventory=inventory,
        capacity=p.get_capacity, delete=delete, check_delete=check_delete, available=p.down_reason,
        actions={
            "reconnectPrimaryStorage": KindAction(p.reconnect, Empty, p._found_check),
            "syncPrimaryStorageCapacity": KindAction(p.sync_capacity, Empty, p._found_check),
            "changePrimaryStorageState": KindAction(p.change_state, ChangePrimaryStorageState,
                                                    p._found_check),
            "cleanUpImageCacheOnPrimaryStorage": KindAction(p.clean_up_cache, Empty,
                                                            p._cleanup_check),
            "updatePrimaryStorage": KindAction(
                lambda job, params, uuid: update.update(p, job, params, uuid),
                update.UpdatePrimaryStorage, lambda params, uuid: update.check(p, params, uuid)),
        })
