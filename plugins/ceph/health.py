"""Status and health of each registered cluster, and StorageStatusChanged events.

A background task asks every connection, every ``health_interval`` seconds,
for ``status`` (health, capacity) and ``quorum_status`` (the monmap and the
quorum) -- two mon commands, each bounded by ``rados_mon_op_timeout``.  A storage
is Connected when they answer and Disconnected when they do not; any operation
that finds the cluster unreachable marks it Disconnected at once, and from then
on its calls fail fast (``ClusterDown``) until this check reaches it again.  A change of status or of health
(HEALTH_OK/WARN/ERR) publishes one ``StorageStatusChanged`` event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from agent.events import utcnow_iso

from . import mons
from .cluster import Connection, mon_command

if TYPE_CHECKING:
    from . import CephPlugin

log = logging.getLogger("node_agent.ceph")

CONNECTED, DISCONNECTED, CONNECTING = "Connected", "Disconnected", "Connecting"


def summary(r: Any) -> dict[str, Any]:
    """Blocking: health, capacity, fsid and quorum of one cluster."""
    st = mon_command(r, "status") or {}
    qs = mon_command(r, "quorum_status") or {}
    health = st.get("health") or {}
    checks = [{"name": name, "severity": c.get("severity", ""),
               "summary": (c.get("summary") or {}).get("message", "")}
              for name, c in sorted((health.get("checks") or {}).items())]
    pg = st.get("pgmap") or {}
    return {"fsid": st.get("fsid"), "health": health.get("status"), "healthChecks": checks,
            "totalCapacity": pg.get("bytes_total"), "availableCapacity": pg.get("bytes_avail"),
            "quorumStatus": qs}


class HealthChecker:
    def __init__(self, plugin: "CephPlugin", interval: float) -> None:
        self.plugin = plugin
        self.interval = interval
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self.inflight: dict[Connection, asyncio.Task] = {}

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="ceph-health")

    async def stop(self) -> None:
        tasks = [t for t in (self.task, *self.inflight.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the Ceph health check failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()

    async def check_all(self) -> None:
        """Start one check per cluster, each on its own: a dead cluster's check (which
        waits out its timeouts) never delays a healthy one's next check."""
        for c in self.plugin.registry.all():
            t = self.inflight.get(c)
            if t is None or t.done():
                self.inflight[c] = asyncio.create_task(self._check_logged(c))
        for c in [c for c, t in self.inflight.items() if t.done()]:
            del self.inflight[c]

    async def _check_logged(self, conn: Connection) -> None:
        try:
            await self.check(conn)
        except Exception:
            log.exception("the Ceph health check of %s failed", conn.label)

    async def check(self, conn: Connection) -> None:
        p = self.plugin
        uuids = [u for u in conn.storages if u in p.store.storages]
        if not uuids:
            return
        records = {u: p.store.mons_of(u) for u in uuids}

        def work(r: Any) -> dict[str, Any]:
            info = summary(r)
            info["monStates"] = {u: mons.match(recs, info["quorumStatus"])
                                 for u, recs in records.items()}
            return info
        try:
            info = await p.call_conn(conn, work, what="health check", probe=True)
        except Exception as e:
            reason = getattr(e, "description", None) or str(e)
            for u in uuids:
                await p.set_status(u, DISCONNECTED, reason)
            return
        if conn.down is not None:
            log.info("Ceph cluster at %s answers again; its calls go through", conn.label)
            conn.down = None
        for u in uuids:
            await p.set_status(u, CONNECTED, None, dict(info, monStates=info["monStates"].get(u, {})))


def event_data(s: dict[str, Any], old_status: str | None, old_health: str | None) -> dict[str, Any]:
    return {"storageUuid": s["uuid"],
            "storageType": "CephPrimaryStorage" if s["kind"] == "primary" else "CephBackupStorage",
            "name": s.get("name"), "fsid": s.get("fsid"),
            "status": s.get("status"), "previousStatus": old_status,
            "health": s.get("health"), "previousHealth": old_health,
            "healthChecks": s.get("healthChecks", []),
            "reason": s.get("statusReason"), "time": utcnow_iso()}
