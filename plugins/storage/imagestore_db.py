"""Rows of the image store backup storage in the state database (SQLite, survives kill -9).

Only metadata lives here: an image row names its content by sha256; the data is
the blob ``blobs/<sha256>`` in the store's directory, shared by every image
with the same content.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.db import Database

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS imagestore_bs (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT,
        url TEXT NOT NULL,
        hostname TEXT,
        username TEXT,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        capacity TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS imagestore_images (
        bs_uuid TEXT NOT NULL,
        uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        url TEXT,
        sha256 TEXT NOT NULL,
        md5 TEXT,
        format TEXT NOT NULL,
        size INTEGER NOT NULL,
        actual_size INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY(bs_uuid, uuid))""",
    "CREATE INDEX IF NOT EXISTS imagestore_images_sha ON imagestore_images(bs_uuid, sha256)",
    """CREATE TABLE IF NOT EXISTS imagestore_exports (
        token_hash TEXT PRIMARY KEY,
        bs_uuid TEXT NOT NULL,
        image_uuid TEXT NOT NULL,
        expires REAL NOT NULL)""",
]


@dataclass
class StoreRow:
    uuid: str
    name: str
    url: str
    description: str | None = None
    hostname: str | None = None
    username: str | None = None
    state: str = "Enabled"
    status: str = "Connecting"
    status_reason: str | None = None
    capacity: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


@dataclass
class StoreImage:
    bs_uuid: str
    uuid: str
    name: str
    sha256: str
    format: str
    size: int
    actual_size: int
    url: str | None = None
    md5: str | None = None
    description: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def blob(self) -> str:
        return blob_path(self.sha256)


def blob_path(sha256: str) -> str:
    return f"blobs/{sha256}"


class ImageStoreDb:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def open(self) -> None:
        await self.db.migrate(SCHEMA)

    async def stores(self) -> list[StoreRow]:
        rows = await self.db.fetchall("SELECT * FROM imagestore_bs ORDER BY created")
        out = []
        for r in rows:
            d = dict(r)
            d["capacity"] = json.loads(d["capacity"] or "{}")
            out.append(StoreRow(**d))
        return out

    async def save_store(self, s: StoreRow) -> None:
        s.updated = time.time()
        d = asdict(s)
        d["capacity"] = json.dumps(s.capacity)
        await self.db.execute(
            f"INSERT INTO imagestore_bs({', '.join(d)}) VALUES({', '.join('?' * len(d))}) "
            "ON CONFLICT(uuid) DO UPDATE SET " + ", ".join(f"{k}=excluded.{k}" for k in d if k != "uuid"),
            tuple(d.values()))

    async def delete_store(self, uuid: str) -> None:
        def _tx(conn) -> None:
            conn.execute("DELETE FROM imagestore_images WHERE bs_uuid=?", (uuid,))
            conn.execute("DELETE FROM imagestore_exports WHERE bs_uuid=?", (uuid,))
            conn.execute("DELETE FROM imagestore_bs WHERE uuid=?", (uuid,))
        await self.db.transaction(_tx)

    async def images(self, bs_uuid: str) -> list[StoreImage]:
        rows = await self.db.fetchall("SELECT * FROM imagestore_images WHERE bs_uuid=? ORDER BY created",
                                      (bs_uuid,))
        return [StoreImage(**dict(r)) for r in rows]

    async def image(self, bs_uuid: str, uuid: str) -> StoreImage | None:
        r = await self.db.fetchone("SELECT * FROM imagestore_images WHERE bs_uuid=? AND uuid=?",
                                   (bs_uuid, uuid))
        return StoreImage(**dict(r)) if r else None

    async def by_sha256(self, bs_uuid: str, sha256: str) -> StoreImage | None:
        r = await self.db.fetchone("SELECT * FROM imagestore_images WHERE bs_uuid=? AND sha256=? "
                                   "LIMIT 1", (bs_uuid, sha256))
        return StoreImage(**dict(r)) if r else None

    async def save_image(self, i: StoreImage) -> None:
        d = asdict(i)
        await self.db.execute(
            f"INSERT OR REPLACE INTO imagestore_images({', '.join(d)}) VALUES({', '.join('?' * len(d))})",
            tuple(d.values()))

    async def delete_image(self, bs_uuid: str, uuid: str) -> None:
        def _tx(conn) -> None:
            conn.execute("DELETE FROM imagestore_exports WHERE bs_uuid=? AND image_uuid=?", (bs_uuid, uuid))
            conn.execute("DELETE FROM imagestore_images WHERE bs_uuid=? AND uuid=?", (bs_uuid, uuid))
        await self.db.transaction(_tx)

    # -- exports: only a hash of the token is kept (the token is the credential)
    async def add_export(self, token_hash: str, bs_uuid: str, image_uuid: str, expires: float) -> None:
        await self.db.execute("INSERT INTO imagestore_exports VALUES(?,?,?,?)",
                              (token_hash, bs_uuid, image_uuid, expires))

    async def export(self, token_hash: str) -> dict[str, Any] | None:
        r = await self.db.fetchone("SELECT * FROM imagestore_exports WHERE token_hash=?", (token_hash,))
        return dict(r) if r else None

    async def delete_exports(self, bs_uuid: str, image_uuid: str) -> int:
        before = await self.db.fetchall("SELECT token_hash FROM imagestore_exports WHERE bs_uuid=? "
                                        "AND image_uuid=?", (bs_uuid, image_uuid))
        await self.db.execute("DELETE FROM imagestore_exports WHERE bs_uuid=? AND image_uuid=?",
                              (bs_uuid, image_uuid))
        return len(before)

    async def delete_export(self, token_hash: str) -> None:
        await self.db.execute("DELETE FROM imagestore_exports WHERE token_hash=?", (token_hash,))

    async def expire_exports(self, now: float) -> None:
        await self.db.execute("DELETE FROM imagestore_exports WHERE expires<?", (now,))
