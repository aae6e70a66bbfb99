"""The agent's own routes: health, OpenAPI, metrics, jobs and events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from pydantic import Field

from . import errors
from .jobs import RUNNING, SUCCEEDED
from .models import WireModel
from .plugin import Plugin, delete, get, query, raw
from .storage_kinds import StorageCollectionRoutes

SSE_HEARTBEAT = 15.0


class Capability(WireModel):
    available: bool
    reason: str | None = None


class PluginStatus(WireModel):
    name: str
    available: bool
    reason: str | None = None
    capabilities: dict[str, Capability] = {}


class Health(WireModel):
    status: str
    version: str
    uptime: float
    plugins: list[PluginStatus]


class JobProgress(WireModel):
    model_config = {"extra": "allow"}
    percent: float | None = None
    message: str | None = None
    updated: str | None = None


class JobInventory(WireModel):
    uuid: str
    state: str = Field(description="Running, Succeeded or Failed")
    plugin: str
    method: str
    path: str
    action: str | None = None
    create_date: str
    last_op_date: str
    finish_date: str | None = None
    progress: JobProgress | None = None
    success: bool | None = None


class JobCancelled(WireModel):
    inventory: JobInventory


class CorePlugin(StorageCollectionRoutes, Plugin):
    name = "core"

    def __init__(self, agent, settings) -> None:
        super().__init__(agent, settings)
        self.plugins: dict[str, Plugin] = {}      # filled in by the app builder
        self.failures: list[dict[str, Any]] = []  # plugins that could not load
        self.all_routes: list = []                # every route, for the OpenAPI document
        self._openapi: dict[str, Any] | None = None
        self.metrics = None

    @property
    def openapi(self) -> dict[str, Any]:
        """Built on first request, not at start: it needs every model's schema, which
        costs start-up time and memory that most agents never use (models build lazily)."""
        if self._openapi is None:
            from .openapi import build
            self._openapi = build(self.all_routes, self.agent.version)
        return self._openapi

    @get("/v1/health", result=Health, auth=False, needs_available=False)
    async def health(self) -> Health:
        """Liveness and each plugin's availability (no token needed)."""
        plugins = [PluginStatus(**p.plugin_status()) for n, p in self.plugins.items() if n != "core"]
        plugins += [PluginStatus(**f) for f in self.failures]
        return Health(status="ok", version=self.agent.version,
                      uptime=round(time.time() - self.agent.started, 3), plugins=plugins)

    async def lifecycle(self):
        purge = asyncio.create_task(self._purge_loop())
        yield
        purge.cancel()
        await asyncio.gather(purge, return_exceptions=True)

    async def _purge_loop(self) -> None:
        while True:
            await self.agent.jobs.purge_expired()
            await asyncio.sleep(max(1.0, min(600.0, self.agent.jobs.ttl / 4)))

    @get("/v1/openapi.json", needs_available=False)
    async def openapi_document(self) -> dict[str, Any]:
        """This document: every route with its parameter and result models."""
        return self.openapi

    @raw("GET", "/metrics", summary="Prometheus metrics")
    async def prometheus(self, request: web.Request) -> web.Response:
        body = await self.metrics.render(self.agent)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    @query("/v1/api-jobs", model=JobInventory)
    async def list_jobs(self) -> list[dict[str, Any]]:
        """All jobs still kept (results expire after the configured time)."""
        rows = await self.agent.jobs.list_rows()
        return [self.agent.jobs.inventory(r) for r in rows]

    @raw("GET", "/v1/api-jobs/{uuid}", summary="Poll a job: 202 running, 200 done, 503 failed, 404 unknown")
    async def poll_job(self, request: web.Request) -> web.Response:
        uuid = request.match_info["uuid"]
        wait = 0.0
        if "wait" in request.query:
            try:
                wait = float(request.query["wait"])
            except ValueError:
                wait = -1
            if not 0 <= wait:
                raise errors.BadRequest("wait must be a number of seconds >= 0", code="JOB.1402")
            wait = min(wait, self.agent.config.server.max_wait_seconds)
        row = await self.agent.jobs.get(uuid, wait)
        if row is None:
            raise errors.NotFound(f"no job {uuid}: unknown, or its result expired", code="JOB.1004")
        if row["state"] == RUNNING:
            location = f"{request.url.origin()}/v1/api-jobs/{uuid}"
            body: dict[str, Any] = {"location": location}
            progress = self.agent.jobs.live_progress(uuid) or (
                json.loads(row["progress"]) if row["progress"] else None)
            if progress:
                body["progress"] = progress
            return web.json_response(body, status=202)
        status = 200 if row["state"] == SUCCEEDED else 503
        return web.Response(text=row["result"], status=status, content_type="application/json")

    @delete("/v1/api-jobs/{uuid}", result=JobCancelled)
    async def cancel_job(self, job, params, uuid: str) -> JobCancelled:
        """Cancel a running job: its coroutine is cancelled, its subprocesses killed."""
        await self.agent.jobs.cancel(uuid)
        row = await self.agent.jobs.get(uuid)
        return JobCancelled(inventory=self.agent.jobs.inventory(row))

    @cancel_job.check
    async def _cancel_check(self, params, uuid: str) -> None:
        row = await self.agent.jobs.get(uuid)
        if row is None:
            raise errors.NotFound(f"no job {uuid}: unknown, or its result expired", code="JOB.1004")
        if row["state"] != RUNNING:
            raise errors.Conflict(f"job {uuid} has already ended ({row['state']})", code="JOB.1010")

    @raw("GET", "/v1/events", kind="stream", summary="Server-sent events (Last-Event-ID resumes)")
    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        since = request.headers.get("Last-Event-ID") or request.query.get("since")
        try:
            since_seq = int(since) if since is not None else None
        except ValueError:
            raise errors.BadRequest("Last-Event-ID must be an event sequence number", code="SYS.1002") from None
        bus = self.agent.events
        queue = bus.subscribe()
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            last = since_seq or 0
            if since_seq is not None:
                for ev in await bus.since(since_seq):
                    await resp.write(_sse(ev))
                    last = ev["seq"]
            await resp.write(b": connected\n\n")
            while True:
                try:
                    async with asyncio.timeout(SSE_HEARTBEAT):
                        ev = await queue.get()
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if ev is None:          # the agent is stopping
                    break
                if ev["seq"] > last:
                    await resp.write(_sse(ev))
                    last = ev["seq"]
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            bus.unsubscribe(queue)
        return resp


def _sse(ev: dict[str, Any]) -> bytes:
    return f"id: {ev['seq']}\nevent: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
