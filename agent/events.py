"""Node events: stored, streamed to local subscribers, pushed to the controller.

``publish`` writes the event to the local log and, once a controller has
registered itself (connectHost), queues it in the outbox in the same
transaction, so an event is never lost between the two.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .db import Database
from .models import utcnow_iso
from .outbox import Outbox, insert

KV_TARGET = "events.target"
LOCAL_LOG_SECONDS = 24 * 3600
QUEUE_SIZE = 1000


class EventBus:
    def __init__(self, db: Database, outbox: Outbox, *, delivery_ttl: float) -> None:
        self.db = db
        self.outbox = outbox
        self.delivery_ttl = delivery_ttl
        self.target: dict[str, str] | None = None   # {"url", "hostUuid"}
        self._subscribers: set[asyncio.Queue] = set()

    async def load(self) -> None:
        self.target = await self.db.kv_get(KV_TARGET)

    async def set_target(self, url: str, host_uuid: str) -> None:
        """Push events to this controller from now on (persisted)."""
        self.target = {"url": url, "hostUuid": host_uuid}
        await self.db.kv_set(KV_TARGET, self.target)

    async def publish(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        target = self.target
        event = {"type": type_, "hostUuid": target["hostUuid"] if target else None,
                 "time": utcnow_iso(), "data": data}

        def _store(conn) -> int:
            seq = conn.execute("INSERT INTO events(type, time, created, host_uuid, data) "
                               "VALUES(?,?,?,?,?)",
                               (type_, event["time"], now, event["hostUuid"], json.dumps(data))).lastrowid
            conn.execute("DELETE FROM events WHERE created < ?", (now - LOCAL_LOG_SECONDS,))
            if target:
                insert(conn, "event", target["url"],
                       {"Content-Type": "application/json", "X-Event-Type": type_},
                       event, now + self.delivery_ttl)
            return seq

        event["seq"] = await self.db.transaction(_store)
        if target:
            self.outbox.wake()
        for q in list(self._subscribers):
            if q.full():              # a stalled reader loses its stream, not our memory
                q.get_nowait()
            q.put_nowait(event)
        return event

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    async def since(self, seq: int) -> list[dict[str, Any]]:
        rows = await self.db.fetchall("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT 1000",
                                      (seq,))
        return [{"seq": r["seq"], "type": r["type"], "hostUuid": r["host_uuid"], "time": r["time"],
                 "data": json.loads(r["data"])} for r in rows]

    def close_streams(self) -> None:
        """Tell every /v1/events stream to end: the agent is stopping."""
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(None)
