"""Durable asynchronous jobs: every non-GET call of the wire contract.

A job row is committed before the caller gets its 202, so an X-Job-UUID is
idempotent across restarts.  While a job runs, its progress lives in memory
(written through to the row at most once a second); its end, its result and
its webhook are committed in one transaction.  A job that was running when
the agent died is reported failed on the next start, never as a success.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from . import errors, outbox
from .db import Database
from .models import iso, utcnow_iso  # noqa: F401 (iso: used by plugins too)
from .outbox import Outbox
from .runner import IN_JOB

log = logging.getLogger("node_agent.jobs")

RUNNING, SUCCEEDED, FAILED = "Running", "Succeeded", "Failed"
INTERRUPTED = "JOB.1001"
CANCELLED = "JOB.1002"
PROGRESS_WRITE_INTERVAL = 1.0


class JobContext:
    """What a running job gets: its id, its plugin's runner, a way to report progress."""

    def __init__(self, manager: "JobManager", uuid: str, runner: Any, caller: str | None) -> None:
        self._manager = manager
        self.uuid = uuid
        self.runner = runner
        self.caller = caller          # the client's address, for audit lines
        self._last_write = 0.0

    def progress(self, percent: float | None = None, message: str | None = None,
                 **extra: Any) -> None:
        """Report progress; polling answers 202 with it.  Cheap to call often."""
        p: dict[str, Any] = {"percent": None if percent is None else round(float(percent), 1),
                             "message": message, "updated": utcnow_iso()}
        p.update(extra)
        live = self._manager._live.get(self.uuid)
        if live is not None:
            live.progress = p
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_WRITE_INTERVAL:
            self._last_write = now
            asyncio.get_running_loop().create_task(self._manager._write_progress(self.uuid, p))


@dataclass
class LiveJob:
    task: asyncio.Task | None = None
    progress: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str | None = None


@dataclass
class JobMeta:
    plugin: str
    method: str
    path: str
    action: str | None
    caller: str | None = None


Work = Callable[[JobContext], Awaitable[Any]]


class JobManager:
    def __init__(self, db: Database, box: Outbox, *, ttl: float) -> None:
        self.db = db
        self.outbox = box
        self.ttl = ttl
        self._live: dict[str, LiveJob] = {}
        self._uuid_locks: dict[str, asyncio.Lock] = {}
        self.counts = {RUNNING: 0, SUCCEEDED: 0, FAILED: 0}

    async def recover(self) -> int:
        """Fail the jobs a previous process left running; queue their webhooks."""
        now = time.time()
        body = errors.OperationFailed(
            "the job was interrupted by an agent restart; its outcome is unknown, "
            "check the resource and submit the job again if needed",
            code=INTERRUPTED).body()

        def _fail(conn: sqlite3.Connection) -> int:
            rows = conn.execute("SELECT uuid, webhook FROM jobs WHERE state=?", (RUNNING,)).fetchall()
            for r in rows:
                self._finish_row(conn, r["uuid"], r["webhook"], False, body, now)
            return len(rows)

        n = await self.db.transaction(_fail)
        if n:
            log.warning("%d job(s) were interrupted by the previous agent stop", n)
            self.outbox.wake()
        return n

    def _finish_row(self, conn: sqlite3.Connection, uuid: str, webhook: str | None,
                    success: bool, body: Any, now: float, progress: dict | None = None) -> None:
        conn.execute("UPDATE jobs SET state=?, result=?, finished=?, updated=?, "
                     "progress=COALESCE(?, progress) WHERE uuid=?",
                     (SUCCEEDED if success else FAILED, json.dumps(body), now, now,
                      json.dumps(progress) if progress else None, uuid))
        if webhook:
            outbox.insert(conn, "webhook", webhook,
                          {"Content-Type": "application/json", "X-Job-UUID": uuid,
                           "X-Job-Success": "true" if success else "false"},
                          body, now + self.ttl)

    async def submit(self, *, job_uuid: str | None, fingerprint: str, webhook: str | None,
                     meta: JobMeta, runner: Any, work: Work,
                     check: Callable[[], Awaitable[None]] | None = None) -> tuple[str, bool]:
        """Start a job, or find the one already submitted under job_uuid.

        Returns (uuid, created).  ``check`` runs only for a new job, before
        anything is stored, so a refused request changes nothing.
        """
        # Copies of one request are serialized so they cannot both pass the lookup.
        lock = self._uuid_locks.setdefault(job_uuid, asyncio.Lock()) if job_uuid else None
        if lock is None:
            return await self._submit(job_uuid, fingerprint, webhook, meta, runner, work, check)
        try:
            async with lock:
                return await self._submit(job_uuid, fingerprint, webhook, meta, runner, work, check)
        finally:
            if not lock.locked():
                self._uuid_locks.pop(job_uuid, None)

    async def _submit(self, job_uuid: str | None, fingerprint: str, webhook: str | None,
                      meta: JobMeta, runner: Any, work: Work,
                      check: Callable[[], Awaitable[None]] | None) -> tuple[str, bool]:
        if job_uuid is not None:
            row = await self.db.fetchone("SELECT fingerprint FROM jobs WHERE uuid=?", (job_uuid,))
            if row is not None:
                if row["fingerprint"] != fingerprint:
                    raise errors.Conflict(
                        f"X-Job-UUID {job_uuid} was already used for a different request",
                        code="JOB.1009")
                return job_uuid, False
        if check is not None:
            await check()
        uuid = job_uuid or uuidlib.uuid4().hex
        now = time.time()
        await self.db.execute(
            "INSERT INTO jobs(uuid, fingerprint, plugin, method, path, action, state, "
            "created, updated, webhook) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (uuid, fingerprint, meta.plugin, meta.method, meta.path, meta.action, RUNNING,
             now, now, webhook))
        live = LiveJob()
        self._live[uuid] = live
        self.counts[RUNNING] += 1
        ctx = JobContext(self, uuid, runner, meta.caller)
        live.task = asyncio.create_task(self._run(ctx, live, webhook, work), name=f"job-{uuid}")
        return uuid, True

    async def _run(self, ctx: JobContext, live: LiveJob, webhook: str | None, work: Work) -> None:
        started = time.monotonic()
        IN_JOB.set(ctx.uuid)     # this task's own context: its subprocesses die with the agent
        try:
            result = await work(ctx)
            success, body = True, result if result is not None else {}
        except errors.ApiError as e:
            success, body = False, e.body()
        except asyncio.CancelledError:
            reason = live.cancel_reason or "the agent is shutting down"
            code = CANCELLED if live.cancel_reason else INTERRUPTED
            success, body = False, errors.OperationFailed(f"the job was cancelled: {reason}",
                                                          code=code).body()
        except Exception as e:   # a bug: report it honestly, keep the agent up
            log.exception("job %s failed unexpectedly", ctx.uuid)
            success, body = False, errors.InternalError(
                f"the job failed with an unexpected error: {type(e).__name__}",
                details=str(e)[:2000]).body()
        now = time.time()
        try:
            await asyncio.shield(self.db.transaction(
                lambda conn: self._finish_row(conn, ctx.uuid, webhook, success, body, now,
                                              live.progress)))
        except Exception:
            log.exception("could not record the end of job %s", ctx.uuid)
        self.counts[RUNNING] -= 1
        self.counts[SUCCEEDED if success else FAILED] += 1
        log.info("job %s %s in %.0f ms", ctx.uuid, "succeeded" if success else "failed",
                 (time.monotonic() - started) * 1000)
        if webhook:
            self.outbox.wake()
        self._live.pop(ctx.uuid, None)
        live.done.set()

    async def _write_progress(self, uuid: str, p: dict[str, Any]) -> None:
        try:
            await self.db.execute("UPDATE jobs SET progress=?, updated=? WHERE uuid=? AND state=?",
                                  (json.dumps(p), time.time(), uuid, RUNNING))
        except Exception:
            log.exception("could not record progress of job %s", uuid)

    async def get(self, uuid: str, wait: float = 0.0) -> sqlite3.Row | None:
        live = self._live.get(uuid)
        if live is not None and wait > 0:
            try:
                async with asyncio.timeout(wait):
                    await live.done.wait()
            except TimeoutError:
                pass
        row = await self.db.fetchone("SELECT * FROM jobs WHERE uuid=?", (uuid,))
        if row is not None and row["finished"] is not None and row["finished"] < time.time() - self.ttl:
            return None   # expired: gone for the caller even before the purge runs
        return row

    async def list_rows(self) -> list[sqlite3.Row]:
        """Running jobs and the ended ones whose results have not expired."""
        return await self.db.fetchall(
            "SELECT * FROM jobs WHERE state=? OR finished >= ? ORDER BY created",
            (RUNNING, time.time() - self.ttl))

    def live_progress(self, uuid: str) -> dict[str, Any] | None:
        live = self._live.get(uuid)
        return live.progress if live else None

    async def cancel(self, uuid: str, reason: str = "cancelled by the caller") -> bool:
        live = self._live.get(uuid)
        if live is None or live.task is None:
            return False
        live.cancel_reason = reason
        live.task.cancel()
        await live.done.wait()
        return True

    async def shutdown(self) -> None:
        tasks = [l.task for l in self._live.values() if l.task]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def purge_expired(self) -> int:
        return await self.db.execute("DELETE FROM jobs WHERE state != ? AND finished < ?",
                                     (RUNNING, time.time() - self.ttl))

    async def load_counts(self) -> None:
        rows = await self.db.fetchall("SELECT state, COUNT(*) n FROM jobs GROUP BY state")
        self.counts = {RUNNING: 0, SUCCEEDED: 0, FAILED: 0} | {r["state"]: r["n"] for r in rows}

    def inventory(self, row: sqlite3.Row) -> dict[str, Any]:
        progress = self.live_progress(row["uuid"]) or (json.loads(row["progress"]) if row["progress"] else None)
        return {"uuid": row["uuid"], "state": row["state"], "plugin": row["plugin"],
                "method": row["method"], "path": row["path"], "action": row["action"],
                "createDate": iso(row["created"]), "lastOpDate": iso(row["updated"]),
                "finishDate": iso(row["finished"]), "progress": progress,
                "success": None if row["state"] == RUNNING else row["state"] == SUCCEEDED}
