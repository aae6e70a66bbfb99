"""Shared fixtures: real agent processes, an HTTP session, a webhook receiver."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agentproc import AgentProcess, process_gone  # noqa: F401 (process_gone: for the tests)


@pytest.fixture
def agent_factory(tmp_path):
    started: list[AgentProcess] = []

    def make(config: dict | None = None, name: str = "agent", **kw) -> AgentProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        a = AgentProcess(workdir, config, **kw)
        started.append(a)
        return a
    yield make
    for a in started:
        a.stop()


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    """An agent with the shell allowed, so tests have a real job to run."""
    return agent_factory({"host": {"allow_run_shell": True}}).start()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


class Receiver:
    """A real HTTP server that records webhooks and events; can be told to fail."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_next = 0
        self.status_when_failing = 500
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=self.status_when_failing)
        self.received.append({"path": request.path, "headers": dict(request.headers),
                              "body": json.loads(body) if body else None})
        self.arrived.set()
        return web.Response(status=200)

    async def start(self, port: int = 0) -> "Receiver":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_for(self, predicate, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [r for r in self.received if predicate(r)]
            if found:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing matching arrived in {timeout} s; got {self.received}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    yield r
    await r.stop()


async def submit(http: aiohttp.ClientSession, agent: AgentProcess, method: str, path: str,
                 body: Any = None, headers: dict | None = None) -> tuple[int, dict]:
    h = dict(agent.headers, **(headers or {}))
    async with http.request(method, agent.url + path, json=body, headers=h) as r:
        return r.status, await r.json()


async def wait_job(http: aiohttp.ClientSession, agent: AgentProcess, location: str,
                   timeout: float = 30) -> tuple[int, dict]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(location, params={"wait": "5"}, headers=agent.headers) as r:
            body = await r.json()
            if r.status != 202:
                return r.status, body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {location} still running after {timeout} s")


async def run_job(http, agent, method, path, body=None, headers=None, timeout=30) -> tuple[int, dict]:
    status, reply = await submit(http, agent, method, path, body, headers)
    assert status == 202, (status, reply)
    return await wait_job(http, agent, reply["location"], timeout)


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition",
                   interval: float = 0.05):
    """predicate()'s first true value (it may be a coroutine function), polled
    every interval; AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)


async def all_gone(pids, within: float = 1.0) -> bool:
    """True once every pid is gone, False if one still runs after within seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return True
        await asyncio.sleep(0.02)
    return False


async def read_pids(path, count: int, within: float = 2.0) -> list[int]:
    """The pids a test script writes to path, once there are count of them."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            got = path.read_text().split()
            if len(got) >= count:
                return [int(x) for x in got]
        await asyncio.sleep(0.02)
    raise AssertionError(f"the script did not write {count} pids to {path}")
