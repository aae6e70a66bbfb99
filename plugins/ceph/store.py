"""The plugin's records in the agent's state database, mirrored in memory.

Storages, their mon endpoints and pools, the volumes and images made through
the agent, and export tokens (only their sha256).  Each row keeps a JSON
document in camelCase, as the inventories are built from it; reads come from
memory, every change is written through in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from agent.db import Database

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ceph_storages (uuid TEXT PRIMARY KEY, kind TEXT NOT NULL, "
    "data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ceph_mons (uuid TEXT PRIMARY KEY, storage_uuid TEXT NOT NULL, "
    "data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ceph_pools (uuid TEXT PRIMARY KEY, storage_uuid TEXT NOT NULL, "
    "data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ceph_volumes (uuid TEXT PRIMARY KEY, storage_uuid TEXT NOT NULL, "
    "data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ceph_images (uuid TEXT NOT NULL, storage_uuid TEXT NOT NULL, "
    "data TEXT NOT NULL, PRIMARY KEY (storage_uuid, uuid))",
    "CREATE TABLE IF NOT EXISTS ceph_exports (token_sha256 TEXT PRIMARY KEY, "
    "storage_uuid TEXT NOT NULL, image_uuid TEXT NOT NULL, expires REAL NOT NULL)",
]

TABLES = {"mons": "ceph_mons", "pools": "ceph_pools", "volumes": "ceph_volumes"}


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.storages: dict[str, dict[str, Any]] = {}
        self.mons: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.images: dict[tuple[str, str], dict[str, Any]] = {}    # (storage, image) -> data
        self.exports: dict[str, dict[str, Any]] = {}               # token sha256 -> row

    async def load(self) -> None:
        await self.db.migrate(SCHEMA)
        for r in await self.db.fetchall("SELECT uuid, data FROM ceph_storages"):
            self.storages[r["uuid"]] = json.loads(r["data"])
        for attr, table in TABLES.items():
            target = getattr(self, attr)
            for r in await self.db.fetchall(f"SELECT uuid, data FROM {table}"):
                target[r["uuid"]] = json.loads(r["data"])
        for r in await self.db.fetchall("SELECT uuid, storage_uuid, data FROM ceph_images"):
            self.images[(r["storage_uuid"], r["uuid"])] = json.loads(r["data"])
        for r in await self.db.fetchall("SELECT * FROM ceph_exports"):
            self.exports[r["token_sha256"]] = {"storageUuid": r["storage_uuid"],
                                               "imageUuid": r["image_uuid"], "expires": r["expires"]}

    # --- storages (with their mons and pools, in one transaction) ---

    async def add_storage(self, s: dict, mons: list[dict], pools: list[dict]) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO ceph_storages(uuid, kind, data) VALUES(?,?,?)",
                      (s["uuid"], s["kind"], json.dumps(s)))
            for m in mons:
                c.execute("INSERT INTO ceph_mons(uuid, storage_uuid, data) VALUES(?,?,?)",
                          (m["monUuid"], s["uuid"], json.dumps(m)))
            for p in pools:
                c.execute("INSERT INTO ceph_pools(uuid, storage_uuid, data) VALUES(?,?,?)",
                          (p["uuid"], s["uuid"], json.dumps(p)))
        await self.db.transaction(tx)
        self.storages[s["uuid"]] = s
        for m in mons:
            self.mons[m["monUuid"]] = m
        for p in pools:
            self.pools[p["uuid"]] = p

    async def save_storage(self, s: dict) -> None:
        await self.db.execute("UPDATE ceph_storages SET data=? WHERE uuid=?",
                              (json.dumps(s), s["uuid"]))
        self.storages[s["uuid"]] = s

    async def delete_storage(self, uuid: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM ceph_storages WHERE uuid=?", (uuid,))
            for table in (*TABLES.values(), "ceph_images", "ceph_exports"):
                c.execute(f"DELETE FROM {table} WHERE storage_uuid=?", (uuid,))
        await self.db.transaction(tx)
        self.storages.pop(uuid, None)
        for attr in TABLES:
            d = getattr(self, attr)
            for k in [k for k, v in d.items() if _owner(v) == uuid]:
                del d[k]
        for k in [k for k in self.images if k[0] == uuid]:
            del self.images[k]
        for k in [k for k, v in self.exports.items() if v["storageUuid"] == uuid]:
            del self.exports[k]

    def mons_of(self, uuid: str) -> list[dict]:
        return sorted((m for m in self.mons.values() if _owner(m) == uuid),
                      key=lambda m: m["createDate"])

    def pools_of(self, uuid: str) -> list[dict]:
        return sorted((p for p in self.pools.values() if _owner(p) == uuid),
                      key=lambda p: p["createDate"])

    # --- mons, pools, volumes ---

    async def put(self, attr: str, key: str, storage_uuid: str, data: dict) -> None:
        await self.db.execute(f"INSERT INTO {TABLES[attr]}(uuid, storage_uuid, data) VALUES(?,?,?) "
                              "ON CONFLICT(uuid) DO UPDATE SET data=excluded.data",
                              (key, storage_uuid, json.dumps(data)))
        getattr(self, attr)[key] = data

    async def remove(self, attr: str, keys: list[str]) -> None:
        def tx(c: sqlite3.Connection) -> None:
            for k in keys:
                c.execute(f"DELETE FROM {TABLES[attr]} WHERE uuid=?", (k,))
        await self.db.transaction(tx)
        for k in keys:
            getattr(self, attr).pop(k, None)

    async def replace_mons(self, storage_uuid: str, add: list[dict], remove: list[str]) -> None:
        def tx(c: sqlite3.Connection) -> None:
            for k in remove:
                c.execute("DELETE FROM ceph_mons WHERE uuid=?", (k,))
            for m in add:
                c.execute("INSERT INTO ceph_mons(uuid, storage_uuid, data) VALUES(?,?,?) "
                          "ON CONFLICT(uuid) DO UPDATE SET data=excluded.data",
                          (m["monUuid"], storage_uuid, json.dumps(m)))
        await self.db.transaction(tx)
        for k in remove:
            self.mons.pop(k, None)
        for m in add:
            self.mons[m["monUuid"]] = m

    # --- backup images and exports ---

    async def put_image(self, storage_uuid: str, data: dict) -> None:
        await self.db.execute("INSERT INTO ceph_images(uuid, storage_uuid, data) VALUES(?,?,?) "
                              "ON CONFLICT(storage_uuid, uuid) DO UPDATE SET data=excluded.data",
                              (data["uuid"], storage_uuid, json.dumps(data)))
        self.images[(storage_uuid, data["uuid"])] = data

    async def remove_image(self, storage_uuid: str, image_uuid: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM ceph_images WHERE storage_uuid=? AND uuid=?",
                      (storage_uuid, image_uuid))
            c.execute("DELETE FROM ceph_exports WHERE storage_uuid=? AND image_uuid=?",
                      (storage_uuid, image_uuid))
        await self.db.transaction(tx)
        self.images.pop((storage_uuid, image_uuid), None)
        for k in [k for k, v in self.exports.items()
                  if v["storageUuid"] == storage_uuid and v["imageUuid"] == image_uuid]:
            del self.exports[k]

    async def add_export(self, token_sha256: str, storage_uuid: str, image_uuid: str,
                         expires: float) -> None:
        await self.db.execute("INSERT INTO ceph_exports(token_sha256, storage_uuid, image_uuid, "
                              "expires) VALUES(?,?,?,?)",
                              (token_sha256, storage_uuid, image_uuid, expires))
        self.exports[token_sha256] = {"storageUuid": storage_uuid, "imageUuid": image_uuid,
                                      "expires": expires}

    async def remove_exports(self, storage_uuid: str, image_uuid: str) -> int:
        n = await self.db.execute("DELETE FROM ceph_exports WHERE storage_uuid=? AND image_uuid=?",
                                  (storage_uuid, image_uuid))
        for k in [k for k, v in self.exports.items()
                  if v["storageUuid"] == storage_uuid and v["imageUuid"] == image_uuid]:
            del self.exports[k]
        return n

    async def purge_exports(self, now: float) -> None:
        if any(v["expires"] < now for v in self.exports.values()):
            await self.db.execute("DELETE FROM ceph_exports WHERE expires < ?", (now,))
            for k in [k for k, v in self.exports.items() if v["expires"] < now]:
                del self.exports[k]


def _owner(d: dict) -> str | None:
    return d.get("storageUuid")
