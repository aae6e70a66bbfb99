"""Ceph primary and backup storage in the core's storage-kind registry (agent/storage_kinds.py).

The core's ``/v1/{primary,backup}-storage/{uuid}`` calls for a Ceph uuid come
here.  Actions are the plugin's own ``.../ceph/{uuid}/actions`` routes, found by
name, so an action added there (with its check) answers on the shared path too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent import errors
from agent.models import dump
from agent.storage_kinds import BACKUP, PRIMARY, KindAction, StorageKind

if TYPE_CHECKING:
    from . import CephPlugin


def register(plugin: "CephPlugin", ps_actions: str, bs_actions: str) -> None:
    plugin.agent.storage_kinds.register(_kind(plugin, PRIMARY, ps_actions))
    plugin.agent.storage_kinds.register(_kind(plugin, BACKUP, bs_actions))


def _bind(plugin: "CephPlugin", route) -> KindAction:
    async def run(job, params, uuid: str) -> Any:
        return await route.func(plugin, job, params, uuid=uuid)

    async def check(params, uuid: str) -> None:
        if route.check is not None:
            await route.check(plugin, params, uuid=uuid)
    return KindAction(run, route.params, check)


def _kind(p: "CephPlugin", kind: str, actions_path: str) -> StorageKind:
    def uuids() -> list[str]:
        return [u for u, s in p.store.storages.items() if s["kind"] == kind]

    def inventory(uuid: str) -> dict[str, Any]:
        return dump(p.inventory(p._storage(uuid, kind)))

    async def capacity(uuid: str) -> Any:
        return await p._capacity(uuid, kind)

    async def check_delete(params, uuid: str) -> None:
        p._storage(uuid, kind)
        if params.delete_data:
            raise errors.BadRequest("deleteData is refused for Ceph storage: the agent never "
                                    "removes a cluster's pools", code="CEPH.1400")

    async def delete(job, params, uuid: str) -> Any:
        await check_delete(params, uuid)
        return await p._unregister(uuid)

    routes = type(p).routes()
    actions = {r.action: _bind(p, r) for r in routes
               if r.kind == "action" and r.path == actions_path}
    images = actions_path[:-len("/actions")] + "/images"
    create = next((r for r in routes if r.kind == "create" and r.path == images), None)

    async def import_image(job, uuid: str, img: dict[str, Any]) -> Any:
        """An image of another kind of this node, by the URL it exports (sha256 checked)."""
        params = create.params.model_validate({
            "url": img["url"], "imageUuid": img.get("imageUuid"), "name": img.get("name"),
            "checksum": f"sha256:{img['sha256']}" if img.get("sha256") else None})
        if create.check is not None:
            await create.check(p, params, uuid=uuid)
        return await create.func(p, job, params, uuid=uuid)

    return StorageKind(category=kind, type="Ceph", plugin=p.name, uuids=uuids, inventory=inventory,
                       capacity=capacity, delete=delete, check_delete=check_delete,
                       actions=actions, available=p.down_reason,
                       import_image=import_image if create is not None else None)
