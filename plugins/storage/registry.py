"""Persistence of primary storages, their volumes and image cache entries (SQLite).

Rows are written in the agent's state database through ``agent.db`` (its own
thread), so a registration, a volume or a cache entry survives ``kill -9``.
Only metadata lives here; the data lives on the storage.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.db import Database
from agent.jobs import iso

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS storage_primary (
        uuid TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        zone_uuid TEXT,
        url TEXT NOT NULL,
        mount_path TEXT NOT NULL,
        mount_options TEXT,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        capacity TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        extra TEXT)""",
    """CREATE TABLE IF NOT EXISTS storage_volumes (
        uuid TEXT PRIMARY KEY,
        ps_uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        path TEXT NOT NULL,
        format TEXT NOT NULL,
        size INTEGER NOT NULL,
        type TEXT NOT NULL,
        image_uuid TEXT,
        backing TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE(ps_uuid, path))""",
    "CREATE INDEX IF NOT EXISTS storage_volumes_ps ON storage_volumes(ps_uuid)",
    """CREATE TABLE IF NOT EXISTS storage_images (
        ps_uuid TEXT NOT NULL,
        uuid TEXT NOT NULL,
        url TEXT,
        path TEXT NOT NULL,
        format TEXT NOT NULL,
        size INTEGER NOT NULL,
        actual_size INTEGER NOT NULL,
        checksum TEXT,
        checksum_type TEXT,
        created REAL NOT NULL,
        PRIMARY KEY(ps_uuid, uuid))""",
]

TYPES = {"local": "LocalStorage", "nfs": "NFS", "smp": "SharedMountPoint"}


@dataclass
class StorageRow:
    uuid: str
    type: str                     # LocalStorage | NFS | SharedMountPoint
    name: str
    url: str
    mount_path: str               # the root of the storage on this node
    state: str = "Enabled"
    status: str = "Connecting"
    description: str | None = None
    zone_uuid: str | None = None
    mount_options: str | None = None
    status_reason: str | None = None
    capacity: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def inventory(self) -> dict[str, Any]:
        c = self.capacity
        return {"uuid": self.uuid, "zoneUuid": self.zone_uuid, "name": self.name, "url": self.url,
                "description": self.description,
                "totalCapacity": c.get("totalCapacity"),
                "availableCapacity": c.get("availableCapacity"),
                "totalPhysicalCapacity": c.get("totalPhysicalCapacity"),
                "availablePhysicalCapacity": c.get("availablePhysicalCapacity"),
                "systemUsedCapacity": c.get("systemUsedCapacity"),
                "type": self.type, "state": self.state, "status": self.status,
                "statusReason": self.status_reason, "mountPath": self.mount_path,
                "mountOptions": self.mount_options, "createDate": iso(self.created),
                "lastOpDate": iso(self.updated), "attachedClusterUuids": []}


@dataclass
class VolumeRow:
    uuid: str
    ps_uuid: str
    name: str
    path: str
    format: str
    size: int
    type: str = "Data"
    description: str | None = None
    image_uuid: str | None = None
    backing: str | None = None    # the backing file as written in the qcow2 header (relative)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


@dataclass
class ImageRow:
    ps_uuid: str
    uuid: str
    path: str
    format: str
    size: int
    actual_size: int
    url: str | None = None
    checksum: str | None = None
    checksum_type: str | None = None
    created: float = field(default_factory=time.time)


def _storage(r: sqlite3.Row) -> StorageRow:
    return StorageRow(uuid=r["uuid"], type=r["type"], name=r["name"], url=r["url"],
                      mount_path=r["mount_path"], state=r["state"], status=r["status"],
                      description=r["description"], zone_uuid=r["zone_uuid"],
                      mount_options=r["mount_options"], status_reason=r["status_reason"],
                      capacity=json.loads(r["capacity"] or "{}"), created=r["created"],
                      updated=r["updated"], extra=json.loads(r["extra"] or "{}"))


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def open(self) -> None:
        await self.db.migrate(SCHEMA)

    # -- storages ---------------------------------------------------------------------------
    async def storages(self) -> list[StorageRow]:
        return [_storage(r) for r in await self.db.fetchall("SELECT * FROM storage_primary ORDER BY created")]

    async def save_storage(self, s: StorageRow) -> None:
        s.updated = time.time()
        await self.db.execute(
            "INSERT INTO storage_primary(uuid, type, name, description, zone_uuid, url, mount_path, "
            "mount_options, state, status, status_reason, capacity, created, updated, extra) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET "
            "name=excluded.name, description=excluded.description, state=excluded.state, "
            "status=excluded.status, status_reason=excluded.status_reason, "
            "capacity=excluded.capacity, updated=excluded.updated, extra=excluded.extra, "
            "mount_options=excluded.mount_options, url=excluded.url, mount_path=excluded.mount_path",
            (s.uuid, s.type, s.name, s.description, s.zone_uuid, s.url, s.mount_path,
             s.mount_options, s.state, s.status, s.status_reason, json.dumps(s.capacity),
             s.created, s.updated, json.dumps(s.extra)))

    async def delete_storage(self, uuid: str) -> None:
        def _tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM storage_volumes WHERE ps_uuid=?", (uuid,))
            conn.execute("DELETE FROM storage_images WHERE ps_uuid=?", (uuid,))
            conn.execute("DELETE FROM storage_primary WHERE uuid=?", (uuid,))
        await self.db.transaction(_tx)

    # -- volumes ------------------------------------------------------------------------------
    async def volumes(self, ps_uuid: str) -> list[VolumeRow]:
        rows = await self.db.fetchall("SELECT * FROM storage_volumes WHERE ps_uuid=? ORDER BY created",
                                      (ps_uuid,))
        return [VolumeRow(**dict(r)) for r in rows]

    async def volume(self, uuid: str) -> VolumeRow | None:
        r = await self.db.fetchone("SELECT * FROM storage_volumes WHERE uuid=?", (uuid,))
        return VolumeRow(**dict(r)) if r else None

    async def volume_at(self, ps_uuid: str, path: str) -> VolumeRow | None:
        r = await self.db.fetchone("SELECT * FROM storage_volumes WHERE ps_uuid=? AND path=?",
                                   (ps_uuid, path))
        return VolumeRow(**dict(r)) if r else None

    async def save_volume(self, v: VolumeRow) -> None:
        v.updated = time.time()
        d = asdict(v)
        cols = ", ".join(d)
        await self.db.execute(
            f"INSERT INTO storage_volumes({cols}) VALUES({', '.join('?' * len(d))}) "
            "ON CONFLICT(uuid) DO UPDATE SET " + ", ".join(f"{k}=excluded.{k}" for k in d if k != "uuid"),
            tuple(d.values()))

    async def delete_volume(self, uuid: str) -> None:
        await self.db.execute("DELETE FROM storage_volumes WHERE uuid=?", (uuid,))

    # -- image cache -----------------------------------------------------------------------------
    async def images(self, ps_uuid: str) -> list[ImageRow]:
        rows = await self.db.fetchall("SELECT * FROM storage_images WHERE ps_uuid=? ORDER BY created",
                                      (ps_uuid,))
        return [ImageRow(**dict(r)) for r in rows]

    async def image(self, ps_uuid: str, uuid: str) -> ImageRow | None:
        r = await self.db.fetchone("SELECT * FROM storage_images WHERE ps_uuid=? AND uuid=?",
                                   (ps_uuid, uuid))
        return ImageRow(**dict(r)) if r else None

    async def save_image(self, i: ImageRow) -> None:
        d = asdict(i)
        await self.db.execute(
            f"INSERT OR REPLACE INTO storage_images({', '.join(d)}) VALUES({', '.join('?' * len(d))})",
            tuple(d.values()))

    async def delete_image(self, ps_uuid: str, uuid: str) -> None:
        await self.db.execute("DELETE FROM storage_images WHERE ps_uuid=? AND uuid=?", (ps_uuid, uuid))
