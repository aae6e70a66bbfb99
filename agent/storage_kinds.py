"""One primary-storage and one backup-storage collection across every storage kind.

A plugin that serves storages (local/NFS/SMP, Ceph, the image store...) registers
each of its kinds here (``agent.storage_kinds.register(StorageKind(...))``); the core
serves ``GET /v1/{primary,backup}-storage`` (query API), ``/{uuid}``,
``/{uuid}/capacity``, ``DELETE /{uuid}`` and ``PUT /{uuid}/actions`` for any uuid and
hands each call to the kind that owns the uuid.  Plugins never import each other:
they only meet in this registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import errors
from .models import WireModel
from .plugin import action, delete, get, query

PRIMARY, BACKUP = "primary", "backup"
Category = Literal["primary", "backup"]
UUID_PATH = "{uuid:[0-9a-fA-F-]{32,36}}"
PS_U = "/v1/primary-storage/" + UUID_PATH
BS_U = "/v1/backup-storage/" + UUID_PATH

#: What PUT .../{uuid}/actions accepts, per category (the manual's names).
ACTIONS: dict[str, tuple[str, ...]] = {
    PRIMARY: ("reconnectPrimaryStorage", "syncPrimaryStorageCapacity", "changePrimaryStorageState",
              "cleanUpImageCacheOnPrimaryStorage", "updatePrimaryStorage"),
    BACKUP: ("reconnectBackupStorage", "syncBackupStorageCapacity", "changeBackupStorageState",
             "updateBackupStorage", "reclaimSpaceFromImageStore"),
}


@dataclass
class KindAction:
    """One action of a kind: ``run(job, params, uuid)``, an optional ``check(params, uuid)``
    run in the request (for 4xx refusals), and the kind's own parameter model."""
    run: Callable[..., Awaitable[Any]]
    params: type[BaseModel] | None = None
    check: Callable[..., Awaitable[None]] | None = None


@dataclass
class StorageKind:
    """What a plugin tells the core about one kind of storage it serves."""
    category: Category
    type: str                                             # "Ceph", "ImageStoreBackupStorage", ...
    plugin: str                                           # the owning plugin's name (for 503s)
    uuids: Callable[[], list[str]]                        # the storages of this kind
    inventory: Callable[[str], dict[str, Any]]            # from memory: never blocks, never fails
    capacity: Callable[[str], Awaitable[dict[str, Any]]]
    delete: Callable[[Any, "DeleteStorageQuery", str], Awaitable[Any]]   # (job, params, uuid)
    check_delete: Callable[["DeleteStorageQuery", str], Awaitable[None]] | None = None
    actions: dict[str, KindAction] = field(default_factory=dict)
    available: Callable[[], str | None] = lambda: None    # why the kind cannot answer now, or None
    # backup kinds: take an image from an http(s) URL (another kind of this node exports it):
    # import_image(job, uuid, {"url", "imageUuid", "name", "sha256", "md5"}) -> its reply
    import_image: Callable[[Any, str, dict[str, Any]], Awaitable[Any]] | None = None


def hex_uuid(uuid: str) -> str:
    """A uuid of a route (32 hex digits, dashes allowed) as the kinds keep it."""
    return uuid.replace("-", "").lower()


class StorageKinds:
    """The registry (one per agent, on the AgentContext)."""

    def __init__(self) -> None:
        self.kinds: list[StorageKind] = []

    def register(self, kind: StorageKind) -> None:
        if any(k.category == kind.category and k.type == kind.type for k in self.kinds):
            raise ValueError(f"{kind.category} storage type {kind.type} is already registered")
        self.kinds.append(kind)

    def of(self, category: str) -> list[StorageKind]:
        return [k for k in self.kinds if k.category == category]

    def holder(self, uuid: str) -> StorageKind | None:
        """The kind, of either category and any plugin, that has a storage of this uuid: one
        uuid names one storage of this node, so a registration must not take it again."""
        u = hex_uuid(uuid)
        return next((k for k in self.kinds if u in k.uuids()), None)

    def owner(self, category: str, uuid: str) -> StorageKind:
        u = hex_uuid(uuid)
        for k in self.of(category):
            if u in k.uuids():
                reason = k.available()
                if reason:
                    raise errors.Unavailable(f"{k.type} storage is not available: {reason}",
                                             code="SYS.1504")
                return k
        raise errors.NotFound(f"no {category} storage {uuid} on this node", code="STORAGE.1004")

    def inventories(self, category: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for k in self.of(category):
            if k.available():
                continue
            for u in k.uuids():
                rows.append(common_row(k.inventory(u), k.type))
        rows.sort(key=lambda r: r.get("createDate") or "")
        return rows


COMMON = ("uuid", "name", "type", "url", "state", "status", "totalCapacity", "availableCapacity",
          "totalPhysicalCapacity", "availablePhysicalCapacity", "createDate", "lastOpDate")


def common_row(inv: dict[str, Any], kind_type: str) -> dict[str, Any]:
    """The manual's common fields first (None where a kind has no value), then the kind's own."""
    row = {k: inv.get(k) for k in COMMON}
    row["type"] = inv.get("type") or kind_type
    row.update((k, v) for k, v in inv.items() if k not in row)
    return row


# --- wire models ----------------------------------------------------------------------------

class StorageInventory(WireModel):
    """The common fields of every kind; each row carries its kind's own fields too
    (only these common ones can be used in q=, sort= and fields=)."""
    model_config = ConfigDict(extra="allow")
    uuid: str
    name: str | None = None
    type: str = Field(description="LocalStorage, NFS, SharedMountPoint, Ceph, "
                                  "ImageStoreBackupStorage...")
    url: str | None = None
    state: str | None = None
    status: str | None = None
    total_capacity: int | None = None
    available_capacity: int | None = None
    total_physical_capacity: int | None = None
    available_physical_capacity: int | None = None
    create_date: str | None = None
    last_op_date: str | None = None


class StorageReply(WireModel):
    model_config = ConfigDict(extra="allow")
    inventory: StorageInventory


class StorageCapacity(WireModel):
    model_config = ConfigDict(extra="allow")
    total_capacity: int | None = None
    available_capacity: int | None = None
    total_physical_capacity: int | None = None
    available_physical_capacity: int | None = None


class DeleteStorageQuery(WireModel):
    delete_mode: Literal["Permissive", "Enforcing"] = "Permissive"
    delete_data: bool = Field(False, description="also remove the storage's data (image store: "
                                                 "its blobs); refused by kinds that never do")


class AnyParams(WireModel):
    """The action's parameters, validated by the owning kind's own model."""
    model_config = ConfigDict(extra="allow")


def kind_params(kind: StorageKind, name: str, params: BaseModel | None) -> tuple[KindAction, Any]:
    """The kind's action and the parameters validated by its own model (strict, like the core)."""
    act = kind.actions.get(name)
    if act is None:
        raise errors.BadRequest(f"{name} is not supported by {kind.type} storage; it supports: "
                                f"{', '.join(sorted(kind.actions)) or 'no actions'}", code="SYS.1006")
    data = params.model_extra if params is not None else {}
    if act.params is None:
        return act, None
    try:
        return act, act.params.model_validate_json(json.dumps(data or {}), strict=True)
    except ValidationError as e:
        from .server import describe_validation     # the core's wording of a 400
        raise describe_validation(e, f"parameters of {name}") from None


# --- the routes (a part of the core plugin) ------------------------------------------------------

class StorageCollectionRoutes:
    """Mixed into the core plugin: the collections and the per-uuid calls of every kind."""

    def _kinds(self) -> StorageKinds:
        return self.agent.storage_kinds          # type: ignore[attr-defined]

    def _owned(self, category: str, uuid: str) -> tuple[StorageKind, str]:
        """The kind that owns the storage, and its uuid as the kinds keep it (32 lower hex)."""
        return self._kinds().owner(category, uuid), hex_uuid(uuid)

    async def _get(self, category: str, uuid: str) -> dict[str, Any]:
        k, u = self._owned(category, uuid)
        return {"inventory": common_row(k.inventory(u), k.type)}

    async def _capacity(self, category: str, uuid: str) -> Any:
        k, u = self._owned(category, uuid)
        return await k.capacity(u)

    async def _act(self, category: str, name: str, job, params, uuid: str) -> Any:
        k, u = self._owned(category, uuid)
        act, p = kind_params(k, name, params)
        return await act.run(job, p, u)

    async def _act_check(self, category: str, name: str, params, uuid: str) -> None:
        k, u = self._owned(category, uuid)
        act, p = kind_params(k, name, params)
        if act.check is not None:
            await act.check(p, u)

    async def _delete(self, category: str, job, params, uuid: str) -> Any:
        k, u = self._owned(category, uuid)
        return await k.delete(job, params or DeleteStorageQuery(), u)

    async def _delete_check(self, category: str, params, uuid: str) -> None:
        k, u = self._owned(category, uuid)
        if k.check_delete is not None:
            await k.check_delete(params or DeleteStorageQuery(), u)

    # primary storage
    @query("/v1/primary-storage", model=StorageInventory)
    async def query_primary_storage(self) -> list[dict[str, Any]]:
        """QueryPrimaryStorage: every kind (local, NFS, SMP, Ceph...), with its type."""
        return self._kinds().inventories(PRIMARY)

    @get(PS_U, result=StorageReply)
    async def get_primary_storage(self, uuid: str) -> dict[str, Any]:
        return await self._get(PRIMARY, uuid)

    @get(PS_U + "/capacity", result=StorageCapacity)
    async def get_primary_storage_capacity(self, uuid: str) -> Any:
        """GetPrimaryStorageCapacity, read now by the owning kind."""
        return await self._capacity(PRIMARY, uuid)

    @delete(PS_U, params=DeleteStorageQuery)
    async def delete_primary_storage(self, job, params, uuid: str) -> Any:
        """DeletePrimaryStorage (the owning kind decides what is left behind: never data)."""
        return await self._delete(PRIMARY, job, params, uuid)

    @delete_primary_storage.check
    async def _delete_primary_check(self, params, uuid: str) -> None:
        await self._delete_check(PRIMARY, params, uuid)

    # backup storage
    @query("/v1/backup-storage", model=StorageInventory)
    async def query_backup_storage(self) -> list[dict[str, Any]]:
        """QueryBackupStorage: every kind (image store, Ceph...), with its type."""
        return self._kinds().inventories(BACKUP)

    @get(BS_U, result=StorageReply)
    async def get_backup_storage(self, uuid: str) -> dict[str, Any]:
        return await self._get(BACKUP, uuid)

    @get(BS_U + "/capacity", result=StorageCapacity)
    async def get_backup_storage_capacity(self, uuid: str) -> Any:
        """GetBackupStorageCapacity, read now by the owning kind."""
        return await self._capacity(BACKUP, uuid)

    @delete(BS_U, params=DeleteStorageQuery)
    async def delete_backup_storage(self, job, params, uuid: str) -> Any:
        """DeleteBackupStorage: image data stays unless ?deleteData=true."""
        return await self._delete(BACKUP, job, params, uuid)

    @delete_backup_storage.check
    async def _delete_backup_check(self, params, uuid: str) -> None:
        await self._delete_check(BACKUP, params, uuid)


def _add_action_routes(cls: type, category: str, path: str) -> None:
    """One route per action name; each hands the call to the owning kind."""
    for name in ACTIONS[category]:
        def make(name: str = name):
            async def run(self, job, params, uuid: str) -> Any:
                return await self._act(category, name, job, params, uuid)
            run.__doc__ = f"{name}: dispatched to the kind that owns the storage."
            run.__name__ = f"action_{name}"
            routed = action(path, name, params=AnyParams)(run)

            async def check(self, params, uuid: str) -> None:
                await self._act_check(category, name, params, uuid)
            routed.check(check)
            return routed
        setattr(cls, f"action_{name}", make())


_add_action_routes(StorageCollectionRoutes, PRIMARY, PS_U + "/actions")
_add_action_routes(StorageCollectionRoutes, BACKUP, BS_U + "/actions")
