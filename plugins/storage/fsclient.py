"""The agent's side of the hang-proof helper (``fsworker.py``): one process per storage.

Calls are serialized per storage and each has a timeout that also covers
waiting for the helper.  When a call runs out of time the helper is SIGKILLed
and abandoned (never waited for: it may sit in D state until the filesystem
comes back) and the next call starts a fresh one.  After ``max_stuck``
abandoned helpers are still alive, calls fail at once: the storage is hung,
and piling up more unkillable processes helps nobody.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import signal
import sys
from typing import Any, Callable

from agent import errors

log = logging.getLogger("node_agent.storage")

FSWORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsworker.py")
LINE_LIMIT = 256 << 20


class FsError(Exception):
    """The helper answered with an error: kind is confinement, oserror or bad."""

    def __init__(self, kind: str, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno_


class StorageHung(errors.OperationFailed):
    code = "STORAGE.1408"


@functools.cache
def helper_pypath() -> tuple[str, ...]:
    """Where the agent found xxhash (the migration checksum): the helpers run with -S,
    without site-packages, and add this to their sys.path when they need it."""
    try:
        import xxhash
    except ImportError:
        return ()
    return (os.path.dirname(os.path.dirname(os.path.abspath(xxhash.__file__))),)


def helper_argv(*args: str) -> list[str]:
    # -S: no site import, so the helper starts in milliseconds; it needs only the stdlib.
    return [sys.executable, "-S", FSWORKER, *args]


class FsHelper:
    def __init__(self, storage_uuid: str, root: str, tag: str, *, timeout: float,
                 max_stuck: int) -> None:
        self.storage_uuid = storage_uuid
        self.root = root
        self.tag = tag
        self.timeout = timeout
        self.max_stuck = max_stuck
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._stuck: list[asyncio.subprocess.Process] = []
        self.abandoned_total = 0
        self.closed = False
        # Told (with the reason) when a call times out or is refused as hung: the
        # storage's status follows its calls, not only the periodic probe.
        self.on_hung: Callable[[str], None] | None = None

    # -- bookkeeping ------------------------------------------------------------------
    def stuck(self) -> int:
        """Abandoned helpers still alive (stuck in the kernel)."""
        self._stuck = [p for p in self._stuck if p.returncode is None and _alive(p.pid)]
        return len(self._stuck)

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                *helper_argv("serve", self.root, self.tag), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                cwd="/", start_new_session=True, limit=LINE_LIMIT)
        return self._proc

    def _abandon(self, proc: asyncio.subprocess.Process, why: str) -> None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._stuck.append(proc)
        self.abandoned_total += 1
        if self._proc is proc:
            self._proc = None
        log.warning("storage %s: helper %d abandoned (%s); %d stuck", self.storage_uuid, proc.pid,
                    why, self.stuck())

    # -- calls ----------------------------------------------------------------------------
    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        if self.closed:
            raise errors.Unavailable(f"storage {self.storage_uuid} is being removed",
                                     code="STORAGE.1504")
        limit = timeout if timeout is not None else self.timeout
        stuck = self.stuck()
        if stuck >= self.max_stuck:
            raise self._hung(StorageHung(
                f"primary storage {self.storage_uuid} is hung: {stuck} helper process(es) are "
                f"stuck in the kernel on {self.root}; check the storage server, then call "
                "reconnectPrimaryStorage", details=f"operation {op} was not tried"))
        sent: asyncio.subprocess.Process | None = None
        try:
            async with asyncio.timeout(limit):
                async with self._lock:
                    proc = await self._ensure()
                    rid = next(self._ids)
                    sent = proc
                    proc.stdin.write(json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n")
                    await proc.stdin.drain()
                    line = await proc.stdout.readline()
                    sent = None
                    if not line:
                        await proc.wait()
                        self._proc = None
                        raise errors.OperationFailed(
                            f"the filesystem helper of primary storage {self.storage_uuid} exited "
                            f"(code {proc.returncode}) during {op}", code="STORAGE.1503")
        except TimeoutError:
            if sent is not None:
                self._abandon(sent, f"{op} took more than {limit:g} s")
            raise self._hung(StorageHung(
                f"primary storage {self.storage_uuid}: {op} on {self.root} did not answer within "
                f"{limit:g} s; the filesystem looks hung (a dead NFS server?). The helper was "
                "abandoned; check the storage, then call reconnectPrimaryStorage")) from None
        except (BrokenPipeError, ConnectionResetError):
            self._proc = None
            raise errors.OperationFailed(f"the filesystem helper of primary storage "
                                         f"{self.storage_uuid} died during {op}",
                                         code="STORAGE.1503") from None
        except asyncio.CancelledError:
            if sent is not None:       # the answer would be read by the next caller: drop it
                self._abandon(sent, f"{op} was cancelled")
            raise
        reply = json.loads(line)
        if reply.get("ok"):
            return reply.get("result")
        raise FsError(reply.get("kind", "bad"), reply.get("error", "unknown error"), reply.get("errno"))

    def _hung(self, e: StorageHung) -> StorageHung:
        if self.on_hung is not None:
            try:
                self.on_hung(e.description)
            except Exception:
                log.exception("storage %s: the hung callback failed", self.storage_uuid)
        return e

    async def close(self) -> None:
        """Stop the helper: EOF ends an idle one; one stuck in a call is abandoned."""
        self.closed = True
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.stdin.close()
        except Exception:
            pass
        try:
            async with asyncio.timeout(1.0):
                await proc.wait()
        except TimeoutError:
            self._abandon(proc, "the agent is stopping")


def _alive(pid: int) -> bool:
    """Running, or stuck in the kernel: anything but gone or a zombie."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
