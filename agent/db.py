"""The state database: SQLite in WAL mode under the state directory.

One connection, used only from one dedicated thread, so no SQLite call ever
runs on the event loop and writes are serialized without locks.  WAL with
synchronous=NORMAL keeps every committed transaction across a ``kill -9`` of
the agent (only a power loss may drop the last ones).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("node_agent.db")

CORE_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        uuid TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        plugin TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        action TEXT,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        finished REAL,
        progress TEXT,
        result TEXT,
        webhook TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    "CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished)",
    # Undelivered webhooks and controller events.  Events go out in id order.
    """CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        url TEXT NOT NULL,
        headers TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        expires REAL NOT NULL,
        last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox(kind, next_attempt)",
    # The local event log, replayed to /v1/events clients by Last-Event-ID.
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        time TEXT NOT NULL,
        created REAL NOT NULL,
        host_uuid TEXT,
        data TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


class Database:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    def _private_files(self) -> None:
        """The database holds install tokens and webhook URLs: only the agent reads it.
        SQLite gives its -wal and -shm files the database file's mode, so creating
        that 0600 is enough for new ones; older, wider ones are narrowed here."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode) and mode & 0o077:
                os.chmod(path, 0o600)
                log.warning("%s was readable by others (mode %04o): set to 0600", path, mode)

    async def open(self) -> None:
        def _open() -> None:
            self._private_files()
            conn = sqlite3.connect(self.path, check_same_thread=False,
                                   isolation_level=None, timeout=10)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
            for sql in CORE_SCHEMA:
                conn.execute(sql)
        await self._submit(_open)

    async def close(self) -> None:
        if self._conn is not None:
            await self._submit(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=False)

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancel
        # that lands as the call completes, and a cancelled task would go on.
        async with asyncio.timeout(self.timeout):
            return await loop.run_in_executor(self._pool, fn, *args)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in the database thread inside one transaction."""
        def _tx() -> T:
            conn = self._conn
            assert conn is not None, "database is not open"
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out
        return await self._submit(_tx)

    async def execute(self, sql: str, params: tuple | dict = ()) -> int:
        """Run one statement; return the number of rows changed."""
        return await self.transaction(lambda c: c.execute(sql, params).rowcount)

    async def fetchall(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return await self._submit(lambda: self._conn.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return await self._submit(lambda: self._conn.execute(sql, params).fetchone())

    async def migrate(self, statements: list[str]) -> None:
        """Let a plugin create its own tables (CREATE ... IF NOT EXISTS)."""
        def _m(conn: sqlite3.Connection) -> None:
            for sql in statements:
                conn.execute(sql)
        await self.transaction(_m)

    async def kv_get(self, key: str, default: Any = None) -> Any:
        row = await self.fetchone("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(row["value"]) if row else default

    async def kv_set(self, key: str, value: Any) -> None:
        await self.execute("INSERT INTO kv(key, value) VALUES(?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                           (key, json.dumps(value)))
