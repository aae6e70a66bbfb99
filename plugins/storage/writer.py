"""The agent's side of the writer (``fsworker.py write``): data into a hidden temporary file.

The writer (a process, so a hung storage cannot block the agent) receives the
frames, hashes, writes, and renames to the final name on COMMIT.  Without a
COMMIT (an error, a closed pipe, an agent killed with -9) it removes the
temporary and exits.

The frames reach it one of two ways: the agent pipes them into its stdin (an
HTTPS request, whose bytes only the agent's TLS layer can read), or the agent
hands it the request's connection itself (``sock_fd``, passed with SCM_RIGHTS
over the writer's channel) and the writer reads the rest of the body straight
from the socket: no body byte then goes through the agent's event loop, which
was the limit (about 400 MB/s through aiohttp's body reader and a pipe).

Writers are started ahead (spares.py): one waits idle for the next stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
from typing import Any

from agent import errors

from .fsclient import LINE_LIMIT, StorageHung, helper_argv, helper_pypath
from .fsworker import FRAME, FRAME_DATA, FRAME_END, PART_MARK
from .spares import Spare, Spawned


async def spawn_writer() -> Spawned:
    """``fsworker.py write CHANNEL``: idle until its settings arrive on stdin; CHANNEL is its
    end of a unix socket pair, for the descriptor of a connection to read from."""
    agent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            *helper_argv("write", str(child_end.fileno()), *helper_pypath()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, cwd="/", start_new_session=True, limit=LINE_LIMIT,
            pass_fds=(child_end.fileno(),))
    except BaseException:
        agent_end.close()
        raise
    finally:
        child_end.close()
    return Spawned(proc, agent_end)


def temp_name(final_rel: str, tag: str) -> str:
    head, name = os.path.split(final_rel)
    tmp = f".{name}{PART_MARK}{tag}-{secrets.token_hex(4)}"
    return os.path.join(head, tmp) if head else tmp


class Writer:
    def __init__(self, storage_uuid: str, root: str, tmp_rel: str, alg: str, scope: str,
                 stall: float, sock_fd: int | None = None) -> None:
        self.storage_uuid = storage_uuid
        self.sock_fd = sock_fd
        self.took_connection = False      # it reads the body from sock_fd (migrate.stream_body)
        self.root = root
        self.tmp_rel = tmp_rel
        self.alg = alg
        self.scope = scope
        self.stall = stall
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: socket.socket | None = None
        self.offset = 0
        self.done = False
        self.killed = False

    @property
    def tmp_path(self) -> str:
        return os.path.join(self.root, self.tmp_rel)

    async def start(self, spare: Spare | None = None) -> "Writer":
        """Take a spare writer (or start one); it creates nothing before ``begin``."""
        spawned = await (spare.take() if spare is not None else spawn_writer())
        self.proc, self.channel = spawned.proc, spawned.channel
        return self

    async def begin(self, prefix: bytes = b"", length: int | None = None) -> None:
        """The settings line: from here the writer has its temporary file.  With a socket,
        its descriptor goes first (SCM_RIGHTS on the writer's channel), ``prefix`` (the body
        bytes the agent already read) follows the settings, and the writer reads the rest
        of the ``length`` bytes from the connection."""
        cfg: dict[str, Any] = {"root": self.root, "tmp": self.tmp_rel, "alg": self.alg,
                               "scope": self.scope, "pypath": list(helper_pypath()),
                               "stall": self.stall}
        if self.sock_fd is not None:
            try:
                socket.send_fds(self.channel, [b"S"], [self.sock_fd])
            except OSError:
                raise await self._died("before the stream") from None
            cfg.update(sock="channel", prefix=len(prefix), length=length)
        self._close_channel()
        await self.feed(json.dumps(cfg).encode() + b"\n" + (prefix if self.sock_fd is not None else b""))

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    async def _bounded(self, aw, what: str, margin: float = 0.0):
        try:
            async with asyncio.timeout(self.stall + margin):
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
        """The writer's line after the end frame: digest, size, bytes (or its error).  Its
        progress lines ({"got": bytes}, 4 a second) keep the stall timer from firing.  When
        it reads the connection itself, its own timeout on the socket (a silent sender) fires
        first: this one is then for a writer stuck on the storage."""
        margin = 10.0 if self.sock_fd is not None else 0.0
        while True:
            line = await self._bounded(self.proc.stdout.readline(), "the stream", margin)
            if not line:
                raise await self._died("before reporting")
            reply = json.loads(line)
            if "got" not in reply:
                break
        if not reply.get("ok"):
            if reply.get("kind") == "bad":     # a malformed or cut stream: the sender's fault
                raise errors.BadRequest(f"the stream is not valid: {reply.get('error')}",
                                        code="STORAGE.1001")
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
        self._close_channel()
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

    @property
    def left_temp(self) -> bool:
        """Ended without removing its temporary file: killed, and not by us (we kill a
        writer stuck on a hung storage, where nothing should be tried before it recovers)."""
        return (self.proc is not None and self.proc.returncode is not None
                and self.proc.returncode < 0 and not self.killed)

    def kill(self) -> None:
        self.killed = True
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
