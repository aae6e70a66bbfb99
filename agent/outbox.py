"""Delivery of webhooks and controller events, retried until they land.

Rows are written to the ``outbox`` table in the same transaction as what
produced them (a job's end, an event), so a ``kill -9`` loses nothing: the
next start finds them and goes on.  Webhooks go out concurrently; events go
out one at a time in order, so the controller sees a VM stop after its start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from typing import Any

import aiohttp

from .db import Database

log = logging.getLogger("node_agent.outbox")

MAX_BACKOFF = 300.0
BATCH = 64


def insert(conn: sqlite3.Connection, kind: str, url: str, headers: dict[str, str],
           body: Any, expires: float) -> None:
    """Queue a delivery inside the caller's transaction."""
    conn.execute("INSERT INTO outbox(kind, url, headers, body, next_attempt, expires) "
                 "VALUES(?, ?, ?, ?, ?, ?)",
                 (kind, url, json.dumps(headers), json.dumps(body), time.time(), expires))


def backoff(attempts: int) -> float:
    # 1 s, 2 s, 4 s ... capped, with jitter so many agents do not retry in step.
    return min(MAX_BACKOFF, 2.0 ** max(attempts - 1, 0)) * random.uniform(0.8, 1.2)


class Outbox:
    def __init__(self, db: Database, *, request_timeout: float = 10.0) -> None:
        self.db = db
        self.request_timeout = request_timeout
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self.backlog = {"webhook": 0, "event": 0}
        self.delivered = {"webhook": 0, "event": 0}

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        self._task = asyncio.create_task(self._loop(), name="outbox")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session:
            await self._session.close()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                delay = await self._deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad row stop delivery for good
                log.exception("outbox pass failed")
                delay = 5.0
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancel that lands as the wait completes, and stop() would hang.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def retry_now(self, url: str | None = None) -> None:
        """Make pending deliveries (to url, or all) due now: the peer is back."""
        if url is None:
            await self.db.execute("UPDATE outbox SET next_attempt=?", (time.time(),))
        else:
            await self.db.execute("UPDATE outbox SET next_attempt=? WHERE url=?", (time.time(), url))
        self.wake()

    async def _deliver_due(self) -> float:
        now = time.time()
        await self.db.execute("DELETE FROM outbox WHERE expires < ?", (now,))
        counts = await self.db.fetchall("SELECT kind, COUNT(*) n, MIN(next_attempt) due "
                                        "FROM outbox GROUP BY kind")
        self.backlog = {"webhook": 0, "event": 0} | {r["kind"]: r["n"] for r in counts}
        hooks = await self.db.fetchall(
            "SELECT * FROM outbox WHERE kind='webhook' AND next_attempt <= ? "
            "ORDER BY id LIMIT ?", (now, BATCH))
        events = await self.db.fetchall(
            "SELECT * FROM outbox WHERE kind='event' ORDER BY id LIMIT ?", (BATCH,))
        await asyncio.gather(*(self._deliver(r) for r in hooks), self._deliver_events(events))
        if len(hooks) == BATCH:
            return 0.0
        nxt = await self.db.fetchone("SELECT MIN(next_attempt) t FROM outbox")
        if nxt is None or nxt["t"] is None:
            return 60.0
        return max(0.05, min(60.0, nxt["t"] - time.time()))

    async def _deliver_events(self, rows: list[sqlite3.Row]) -> None:
        # In order: stop at the first event that is not yet due or fails.
        for row in rows:
            if row["next_attempt"] > time.time() or not await self._deliver(row):
                return

    async def _deliver(self, row: sqlite3.Row) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(row["url"], data=row["body"],
                                          headers=json.loads(row["headers"])) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                error = None if ok else f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, error = False, f"{type(e).__name__}: {e}"
        if ok:
            await self.db.execute("DELETE FROM outbox WHERE id=?", (row["id"],))
            self.delivered[row["kind"]] += 1
            return True
        attempts = row["attempts"] + 1
        log.info("delivery of %s %d to %s failed (%s), attempt %d",
                 row["kind"], row["id"], row["url"], error, attempts)
        await self.db.execute(
            "UPDATE outbox SET attempts=?, next_attempt=?, last_error=? WHERE id=?",
            (attempts, time.time() + backoff(attempts), error, row["id"]))
        return False
