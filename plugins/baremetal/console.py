"""Serial-over-LAN consoles: one-time tokens and the websocket bridge.

``POST /v1/baremetal/consoles`` grants a token (one use, short expiry) for one
chassis; ``GET /v1/baremetal/consoles/{token}`` upgrades to a websocket that
bridges the chassis' IPMI SOL both ways through pyghmi's Console:

- from the agent: binary frames carry the serial output as it arrives; text
  frames are JSON notices: ``{"event": "connected"}``, ``{"event": "info",
  "message": ...}``, ``{"event": "error", "message": ...}`` (then the agent
  closes the socket);
- to the agent: binary or text frames are typed on the serial line (text as
  UTF-8).

A chassis has at most one console: a granted, unexpired token or an open
websocket makes another request a 409.  pyghmi delivers SOL data from
whichever thread pumps its event loop (the plugin's pump thread); the data is
handed to the websocket through the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent import errors

from .ipmi import Credentials

log = logging.getLogger("node_agent.baremetal.console")

CONNECT_TIMEOUT = 15.0
SEND_TIMEOUT = 20.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Grant:
    uuid: str
    chassis_uuid: str
    expires: float
    token_hash: str | None = None     # None while the job that issues it has not run yet
    connected: bool = False
    closer: Any = None                # closes the open websocket (set while connected)


class ConsoleGrants:
    """Which chassis has a console (granted or open), and the one-time tokens."""

    def __init__(self) -> None:
        self.by_chassis: dict[str, Grant] = {}
        self.by_token: dict[str, Grant] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for cu, g in list(self.by_chassis.items()):
            if not g.connected and g.expires < now:
                self.release(g)

    def reserve(self, chassis_uuid: str, uuid: str, ttl: float) -> Grant:
        """Hold the chassis' console slot (in the request, before the job exists)."""
        self._expire()
        if chassis_uuid in self.by_chassis:
            g = self.by_chassis[chassis_uuid]
            state = "open" if g.connected else "granted and not used yet"
            raise errors.Conflict(f"chassis {chassis_uuid} already has a console ({state}); "
                                  "one console per chassis at a time: close it or let the "
                                  "unused token expire", code="BM.1111")
        g = Grant(uuid=uuid, chassis_uuid=chassis_uuid, expires=time.monotonic() + ttl)
        self.by_chassis[chassis_uuid] = g
        return g

    def issue(self, chassis_uuid: str, ttl: float) -> tuple[Grant, str]:
        g = self.by_chassis.get(chassis_uuid)
        if g is None or g.token_hash is not None:
            raise errors.Conflict(f"the console slot of chassis {chassis_uuid} was lost; "
                                  "request the console again", code="BM.1111")
        token = secrets.token_urlsafe(32)
        g.token_hash = token_hash(token)
        g.expires = time.monotonic() + ttl
        self.by_token[g.token_hash] = g
        return g, token

    def claim(self, token: str) -> Grant:
        """Use a token (once): the console is then open until release()."""
        self._expire()
        g = self.by_token.pop(token_hash(token), None)
        if g is None or g.connected:
            raise errors.NotFound("no such console token: it is unknown, expired or already "
                                  "used; request a new one with POST /v1/baremetal/consoles",
                                  code="BM.1112")
        g.connected = True
        return g

    def release(self, g: Grant) -> None:
        if self.by_chassis.get(g.chassis_uuid) is g:
            del self.by_chassis[g.chassis_uuid]
        if g.token_hash:
            self.by_token.pop(g.token_hash, None)

    def for_chassis(self, chassis_uuid: str) -> Grant | None:
        return self.by_chassis.get(chassis_uuid)


@dataclass
class SolBridge:
    """One pyghmi SOL console whose output goes to an asyncio queue."""

    creds: Credentials
    runner: Any
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    console: Any = None
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    def _on_data(self, data: Any) -> None:       # pyghmi's threads
        if self._closed.is_set():
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, data)

    def _open(self):
        from pyghmi.ipmi.console import Console
        # force: an SOL left active by a previous agent (or a crash) is taken over.
        return Console(bmc=self.creds.address, userid=self.creds.username,
                       password=self.creds.password, iohandler=self._on_data,
                       port=self.creds.port, force=True)

    async def open(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Log in and activate SOL; raise OperationFailed with the BMC's reason."""
        self.console = await self.runner.call(self._open, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.console.connected:
            if self.console.broken:
                for _ in range(10):            # the reason is on its way through the loop
                    if not self.queue.empty():
                        break
                    await asyncio.sleep(0.02)
                raise errors.OperationFailed(
                    f"the BMC at {self.creds.where} did not open serial-over-LAN: "
                    f"{self._first_error() or 'the session failed'}", code="BM.1113")
            if time.monotonic() > deadline:
                raise errors.OperationFailed(
                    f"the BMC at {self.creds.where} did not open serial-over-LAN within "
                    f"{timeout:g} s", code="BM.1113")
            await asyncio.sleep(0.05)

    def _first_error(self) -> str | None:
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, dict) and "error" in item:
                return str(item["error"])
        return None

    async def send(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:       # pyghmi waits for each ack: one at a time
            await self.runner.call(self.console.send_data, data, timeout=SEND_TIMEOUT)

    async def close(self) -> None:
        self._closed.set()
        if self.console is None:
            return
        try:
            await asyncio.shield(self.runner.call(self.console.close, timeout=5))
        except Exception as e:
            log.info("closing SOL on %s: %s", self.creds.where, e)
