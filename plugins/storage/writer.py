"""The agent's side of the writer (``fsworker.py write``): data into a hidden temporary file.

The agent only moves bytes into the writer's stdin; the writer (a process,
so a hung storage cannot block the agent) writes, hashes, and renames to the
final name on COMMIT.  Without a COMMIT (an error, a closed pipe, an agent
killed with -9) the writer removes the temporary and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from typing import Any

from agent import errors

from .fsclient import LINE_LIMIT, StorageHung, helper_argv
from .fsworker import FRAME, FRAME_DATA, FRAME_END, PART_MARK


def temp_name(final_rel: str, tag: str) -> str:
    head, name = os.path.split(final_rel)
    tmp = f".{name}{PART_MARK}{tag}-{secrets.token_hex(4)}"
    return os.path.join(head, tmp) if head else tmp


class Writer:
    def __init__(self, storage_uuid: str, root: str, tmp_rel: str, alg: str, scope: str,
                 stall: float) -> None:
        self.storage_uuid = storage_uuid
        self.root = root
        self.tmp_rel = tmp_rel
        self.alg = alg
        self.scope = scope
        self.stall = stall
        self.proc: asyncio.subprocess.Process | None = None
        self.offset = 0
        self.done = False

    @property
    def tmp_path(self) -> str:
        return os.path.join(self.root, self.tmp_rel)

    async def start(self) -> "Writer":
        self.proc = await asyncio.create_subprocess_exec(
            *helper_argv("write", self.root, self.tmp_rel, self.alg, self.scope),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, cwd="/", start_new_session=True, limit=LINE_LIMIT)
        return self

    async def _bounded(self, aw, what: str):
        try:
            async with asyncio.timeout(self.stall):
                return await aw
        except TimeoutError:
            self.kill()
            raise StorageHung(f"primary storage {self.storage_uuid}: writing {what} made no progress "
                              f"for {self.stall:g} s; the storage looks hung") from None

    async def feed(self, data: bytes | memoryview) -> None:
        """Raw bytes (already framed by the sender)."""
        try:
            self.proc.stdin.write(data)
            await self._bounded(self.proc.stdin.drain(), "the stream")
        except (BrokenPipeError, ConnectionResetError):
            raise await self._died("while receiving data") from None

    async def feed_data(self, data: bytes) -> None:
        """Sequential content (a download): framed here."""
        if data:
            await self.feed(FRAME.pack(FRAME_DATA, self.offset, len(data)) + data)
            self.offset += len(data)

    async def end(self, size: int | None = None) -> dict[str, Any]:
        """Send the end frame (content mode) and read the writer's report."""
        size = self.offset if size is None else size
        await self.feed(FRAME.pack(FRAME_END, size, 0))
        return await self.report()

    async def report(self) -> dict[str, Any]:
        """The writer's line after the end frame: digest, size, bytes (or its error)."""
        line = await self._bounded(self.proc.stdout.readline(), "the end of the stream")
        if not line:
            raise await self._died("before reporting")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise errors.OperationFailed(f"writing into primary storage {self.storage_uuid} "
                                         f"failed: {reply.get('error')}", code="STORAGE.1503")
        return reply

    async def commit(self, final_rel: str) -> None:
        try:
            self.proc.stdin.write(f"COMMIT {final_rel}\n".encode())
            await self._bounded(self.proc.stdin.drain(), "the commit")
        except (BrokenPipeError, ConnectionResetError):
            raise await self._died("before the commit") from None
        line = await self._bounded(self.proc.stdout.readline(), "the commit")
        reply = json.loads(line) if line else {"ok": False, "error": "the writer exited"}
        if not reply.get("ok"):
            if reply.get("errno") == 17:
                raise errors.Conflict(f"{final_rel} already exists on primary storage "
                                      f"{self.storage_uuid}", code="STORAGE.1009")
            raise errors.OperationFailed(f"could not give {final_rel} its final name: "
                                         f"{reply.get('error')}", code="STORAGE.1503")
        self.done = True
        self.proc.stdin.close()
        await self._bounded(self.proc.wait(), "the commit")

    async def abort(self) -> None:
        """No commit: close the pipe, so the writer removes its temporary file."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        try:
            async with asyncio.timeout(min(self.stall, 10.0)):
                await self.proc.wait()
        except TimeoutError:
            self.kill()     # stuck in the kernel: abandoned; the hidden temporary is swept later

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _died(self, when: str) -> errors.ApiError:
        err = ""
        try:
            async with asyncio.timeout(1.0):
                line = await self.proc.stdout.readline()
            if line:
                err = json.loads(line).get("error", "")
        except (TimeoutError, ValueError):
            pass
        return errors.OperationFailed(f"the writer of primary storage {self.storage_uuid} stopped "
                                      f"{when}" + (f": {err}" if err else ""), code="STORAGE.1503")
