"""The image cache of a primary storage: download with a checksum, clean-up by backing chains.

A download runs in a process of its own (``streamio.py fetch``: HTTP, hash and
write in one pass, into a hidden temporary file of the storage); only a
file whose checksum matched, and that qemu-img reads as qcow2 or raw without a
backing file of its own, gets its final name ``imagecache/<imageUuid>.<fmt>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from typing import Any, Callable

from yarl import URL

from agent import errors
from agent.runner import kill_tree

STREAMIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "streamio.py")

CACHE_DIR = "imagecache"


def check_url(url: str) -> None:
    try:
        u = URL(url)
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host or any(c in url for c in "\r\n\0 "):
        raise errors.BadRequest(f"url {url!r} must be an absolute http:// or https:// URL",
                                code="STORAGE.1001")
    if u.user or u.password:
        # it would be stored and shown in the cache's inventory
        raise errors.BadRequest("credentials in the image URL are not supported",
                                code="STORAGE.1001")


def checksum_spec(checksum: str | None, ctype: str | None, md5sum: str | None) -> tuple[str | None, str]:
    """(expected hex or None, algorithm); the type follows from the length when not given."""
    if md5sum and checksum and md5sum != checksum:
        raise errors.BadRequest("md5sum and checksum disagree", code="STORAGE.1001")
    if md5sum:
        checksum, ctype = md5sum, ctype or "md5"
    if checksum is None:
        if ctype is not None:
            raise errors.BadRequest("checksumType needs a checksum", code="STORAGE.1001")
        return None, "sha256"
    inferred = "md5" if len(checksum) == 32 else "sha256"
    if ctype is not None and ctype != inferred:
        raise errors.BadRequest(f"a {ctype} checksum has {32 if ctype == 'md5' else 64} hex digits",
                                code="STORAGE.1001")
    return checksum, inferred


def ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


class Fetcher:
    """``streamio.py fetch``: the download runs in a process of its own (HTTP, hash, write).

    The agent reads its progress lines; the file keeps a hidden name until commit().
    """

    def __init__(self, root: str, tmp_rel: str, url: str, alg: str, *, stall: float,
                 ca_file: str | None, extra_algs: tuple[str, ...] = (),
                 local_file: str | None = None, sparse: bool = False) -> None:
        self.root, self.tmp_rel, self.url, self.alg = root, tmp_rel, url, alg
        self.stall, self.ca_file = stall, ca_file
        self.extra_algs, self.local_file, self.sparse = extra_algs, local_file, sparse
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def tmp_path(self) -> str:
        return os.path.join(self.root, self.tmp_rel)

    async def run(self, progress: Callable[[int, int | None], None], timeout: float) -> dict[str, Any]:
        cfg = {"root": self.root, "tmp": self.tmp_rel, "url": self.url, "alg": self.alg,
               "cafile": self.ca_file, "timeout": self.stall, "parent": os.getpid(),
               "extra_algs": list(self.extra_algs), "file": self.local_file, "sparse": self.sparse}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-S", STREAMIO, "fetch", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
            start_new_session=True, limit=1 << 20)
        self._err = asyncio.ensure_future(self.proc.stderr.read(64 << 10))
        self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        await self.proc.stdin.drain()
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with asyncio.timeout(self.stall):
                            line = await self.proc.stdout.readline()
                    except TimeoutError:
                        raise errors.OperationFailed(
                            f"downloading {self.url} made no progress for {self.stall:g} s",
                            code="STORAGE.1530") from None
                    if not line:
                        err = (await self._err).decode(errors="replace").strip()
                        raise errors.OperationFailed(f"downloading {self.url} failed: the fetcher "
                                                     "stopped", code="STORAGE.1530",
                                                     details=err[-2000:] or None)
                    msg = json.loads(line)
                    if msg.get("done"):
                        break
                    progress(msg["got"], msg.get("total"))
        except TimeoutError:
            raise errors.OperationFailed(f"downloading {self.url} did not finish within {timeout:g} s",
                                         code="STORAGE.1530") from None
        if msg.get("status") != 200:
            raise errors.OperationFailed(f"downloading {self.url} failed: {msg.get('error')}",
                                         code="STORAGE.1530")
        msg["seconds"] = time.monotonic() - t0
        return msg

    async def commit(self, final_rel: str) -> None:
        self.proc.stdin.write(f"COMMIT {final_rel}\n".encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(self.stall):
            line = await self.proc.stdout.readline()
            await self.proc.wait()
        reply = json.loads(line) if line else {}
        if not reply.get("ok"):
            err = (await self._err).decode(errors="replace").strip().splitlines()
            raise errors.OperationFailed(f"could not give the download its final name {final_rel}: "
                                         f"{err[-1] if err else 'the fetcher stopped'}",
                                         code="STORAGE.1503")

    async def abort(self) -> None:
        """No commit: EOF on stdin makes the fetcher remove its file; kill it when stuck."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.proc.stdin.close()
            async with asyncio.timeout(5.0):
                await self.proc.wait()
        except (TimeoutError, OSError):
            kill_tree(self.proc.pid)


def download_progress(job) -> Callable[[int, int | None], None]:
    """A Fetcher progress callback reporting to the job at most every 0.25 s."""
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            job.progress(100.0 * done / total if total else None, "downloading",
                         downloadedBytes=done, totalBytes=total)
    return progress


def cache_path(image_uuid: str, fmt: str) -> str:
    return f"{CACHE_DIR}/{image_uuid}.{fmt}"


def referenced(infos_by_file: dict[str, list[dict[str, Any]]], roots: list[str]) -> set[str]:
    """Storage-relative paths of every backing file named in the chains read by qemu-img.

    roots: the storage root as registered and as resolved by the helper (pure
    string work here: nothing on the storage is touched by the agent itself)."""
    refs: set[str] = set()
    for infos in infos_by_file.values():
        for info in infos[1:]:
            fn = info.get("filename")
            if not fn:
                continue
            path = os.path.normpath(fn)
            for root in roots:
                root = os.path.normpath(root)
                if path.startswith(root + "/"):
                    refs.add(os.path.relpath(path, root))
    return refs
