"""Idle helper processes started ahead of need: the migration sender and the writer.

A migration would otherwise wait for a Python process to start and import what it
needs (30 to 60 ms for each of the sender and the writer, on the critical path of
every migration).  A spare has done that already and waits for its settings on
stdin; EOF there ends it.  It touches no storage before it has them: an idle spare
cannot hang on a dead server.  The next spare is started once the work that took one
is over.

The writer gets the descriptor of the connection it is to read (when the agent hands
a request's socket over) through a unix socket pair of its own, with SCM_RIGHTS, since
it was started before that connection existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Callable

log = logging.getLogger("node_agent.storage")


class Spawned:
    """A started helper: the process, and for a writer the agent's end of its fd channel."""

    def __init__(self, proc: asyncio.subprocess.Process, channel: socket.socket | None = None) -> None:
        self.proc = proc
        self.channel = channel

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    async def discard(self) -> None:
        """An unused spare: EOF on its stdin ends it."""
        self.close_channel()
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                async with asyncio.timeout(2):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()


class Spare:
    """One spare of a kind: ``take`` hands it out (or starts one now); ``prime`` starts the next,
    which the user calls once its work is done (a start-up meanwhile would take CPU from it,
    and forking the agent blocks its loop for a few milliseconds)."""

    def __init__(self, spawn: Callable[[], "asyncio.Future[Spawned] | object"]) -> None:
        self._spawn = spawn
        self._next: asyncio.Task | None = None
        self.closed = False

    def prime(self) -> None:
        if self._next is None and not self.closed:
            self._next = asyncio.ensure_future(self._spawn())

    def prime_soon(self, delay: float = 0.2) -> None:
        """Prime a moment later: the answer of the work just done goes out first."""
        asyncio.get_running_loop().call_later(delay, self.prime)

    async def take(self) -> Spawned:
        task, self._next = self._next, None
        spawned = None
        if task is not None:
            try:
                spawned = await task
            except Exception as e:     # could not start one ahead: try now, and say why if not
                log.warning("a spare helper process did not start: %s", e)
            if spawned is not None and spawned.proc.returncode is not None:
                spawned.close_channel()
                spawned = None
        if spawned is None:
            spawned = await self._spawn()
        return spawned

    async def close(self) -> None:
        self.closed = True
        task, self._next = self._next, None
        if task is None:
            return
        try:
            spawned = await task
        except Exception:
            return
        await spawned.discard()
