"""Backup storage images: import from a URL, export through the agent, migrate.

Import streams the HTTP body.  A raw image goes straight into an RBD image:
4 MiB blocks (the object size), all-zero blocks skipped (the image stays
sparse), up to ``AIO_DEPTH`` asynchronous writes in flight, the checksum
computed on the way in the same thread.  A qcow2 image cannot be converted
from a stream (its tables point anywhere in the file), so it is spooled to
the download directory first, checked, and ``qemu-img convert`` writes it to
RBD as raw through its rbd driver (qemu-block-extra), with a ceph.conf of
the agent's making that names the keyring file, never the key.

Export hands out a URL holding a random token (only its sha256 is stored);
``GET`` on it streams the image (Range supported), no Authorization header
needed: the URL is the secret, so it expires and can be revoked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import threading
from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .cluster import Connection, conflict, failed, not_found, rbd
from .progress import Progress
from .rbdvols import ioctx

BLOCK = 4 << 20                   # the default RBD object size
AIO_DEPTH = 8
QUEUE_BLOCKS = 8
QCOW2_MAGIC = b"QFI\xfb"
GROW_STEP = 1 << 30               # size unknown (no Content-Length): grow by 1 GiB


def public_url(url: str) -> str:
    """The URL without user:password, for inventories and messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


def new_hasher(checksum: str | None, md5sum: str | None) -> tuple[str, Any, str | None]:
    """(algorithm, hasher, expected hex or None).  With nothing to check, sha256 is
    computed for the inventory: about twice as fast as md5 where the CPU has SHA
    instructions, and md5 is the single most expensive step of an import."""
    if checksum:
        algo, _, hexd = checksum.partition(":")
        return algo, hashlib.new(algo), hexd.lower()
    if md5sum:
        return "md5", hashlib.md5(), md5sum.lower()
    return "sha256", hashlib.sha256(), None


# --- sinks: where downloaded blocks go (each runs in one runner thread) ---

class _Feed:
    """Blocks from the event loop to one worker thread, bounded by a semaphore."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = QUEUE_BLOCKS) -> None:
        self.loop = loop
        self.q: queue.Queue = queue.Queue()
        self.slots = asyncio.Semaphore(depth)
        self.abort = threading.Event()
        self.worker: asyncio.Future | None = None

    async def put(self, block: bytes | None) -> None:
        if block is not None:
            while True:
                self._check_worker()
                try:
                    async with asyncio.timeout(0.5):
                        await self.slots.acquire()
                    break
                except TimeoutError:
                    continue
        self.q.put(block)

    def _check_worker(self) -> None:
        """A worker that ended early (it failed) takes nothing more: raise its error."""
        if self.worker is not None and self.worker.done():
            self.worker.result()
            raise failed("the import stopped before the download ended")

    def get(self, guard: Callable[[], None] | None = None) -> bytes | None:
        """The next block; while waiting for it, ``guard()`` every 0.5 s (a sink waiting
        on a slow download stops at once when its cluster is known down)."""
        while True:
            try:
                block = self.q.get(timeout=0.5)
                break
            except queue.Empty:
                if self.abort.is_set():
                    raise failed("the import was stopped")
                if guard is not None:
                    guard()
        if block is not None:
            self.loop.call_soon_threadsafe(self.slots.release)
        return block


class _Aio:
    """Asynchronous librbd writes with a bounded number in flight."""

    def __init__(self, img: Any, depth: int = AIO_DEPTH) -> None:
        self.img = img
        self.depth = depth
        self.inflight: deque = deque()

    def write(self, data: bytes, offset: int) -> None:
        self.inflight.append(self.img.aio_write(data, offset, None))
        while len(self.inflight) > self.depth:
            self._reap()

    def _reap(self) -> None:
        comp = self.inflight.popleft()
        comp.wait_for_complete_and_cb()
        ret = comp.get_return_value()
        if ret < 0:
            raise failed(f"an RBD write failed: {os.strerror(-ret)} (errno {-ret})")

    def drain(self) -> None:
        while self.inflight:
            self._reap()


def _zero(block: bytes, zeros: dict[int, bytes]) -> bool:
    z = zeros.get(len(block))
    if z is None:
        z = zeros[len(block)] = bytes(len(block))
    return block == z


def rbd_sink(conn: Connection, pool: str, name: str, size: int | None, feed: _Feed,
             hasher: Any, progress: Progress, guard: Callable[[], None]) -> dict[str, int]:
    """Create pool/name and write the fed blocks into it (a runner thread of the cluster's
    bulk pool).  Each librbd call is bounded by rados_osd_op_timeout; ``guard()`` stops it
    between blocks once the cluster is known down."""
    zeros: dict[int, bytes] = {}
    with conn.use() as r, ioctx(r, pool) as io:
        current = size if size is not None else GROW_STEP
        try:
            rbd.RBD().create(io, name, current, old_format=False)
        except rbd.ImageExists:
            raise conflict(f"image {pool}/{name} already exists") from None
        with rbd.Image(io, name) as img:
            aio = _Aio(img)
            offset = written = 0
            while True:
                if progress.is_cancelled:
                    raise failed("the import was cancelled")
                guard()
                block = feed.get(guard)
                if block is None:
                    break
                hasher.update(block)
                end = offset + len(block)
                if end > current:
                    aio.drain()
                    current = max(end, current + GROW_STEP)
                    img.resize(current)
                if not _zero(block, zeros):
                    aio.write(block, offset)
                    written += len(block)
                offset = end
            aio.drain()
            if offset != current:
                img.resize(offset)
            return {"size": offset, "written": written}


def file_sink(path: Path, feed: _Feed, hasher: Any, progress: Progress) -> dict[str, int]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    with os.fdopen(fd, "wb") as f:
        while True:
            if progress.is_cancelled:
                raise failed("the import was cancelled")
            block = feed.get()
            if block is None:
                break
            hasher.update(block)
            f.write(block)
            size += len(block)
    return {"size": size, "written": size}


# --- import ----------------------------------------------------------------------------

async def download(url: str, *, feed: _Feed, first: Callable[[bytes, int | None], Any],
                   progress: Progress, timeout: float, verify_tls: bool) -> int:
    """Stream url into feed in BLOCK-sized pieces (the RBD object size, so a zero block
    is a whole object left out).  ``first(head, length)`` is awaited with the first
    bytes before anything is fed: it starts the right sink (feed.worker)."""
    t = aiohttp.ClientTimeout(total=timeout, connect=30, sock_read=60)
    shown = public_url(url)
    got = 0
    try:
        async with aiohttp.ClientSession(timeout=t) as http:
            async with http.get(url, ssl=None if verify_tls else False) as resp:
                if resp.status != 200:
                    raise failed(f"downloading {shown} answered HTTP {resp.status} {resp.reason}",
                                 code="CEPH.1520")
                length = resp.content_length
                started = False
                while True:
                    # readexactly joins the buffered chunks once: one copy per byte
                    try:
                        block = await resp.content.readexactly(BLOCK)
                        last = False
                    except asyncio.IncompleteReadError as e:
                        block, last = e.partial, True
                    got += len(block)
                    if not started:
                        await first(block[:512], length)
                        started = True
                    if block:
                        await feed.put(block)
                    progress.report(got, length or 0, f"downloading {shown}",
                                    bytesDone=got, bytesTotal=length)
                    if last:
                        break
                if length is not None and got != length:
                    raise failed(f"downloading {shown} ended after {got} of {length} bytes",
                                 code="CEPH.1520")
    except aiohttp.ClientError as e:
        why = str(e).replace(url, shown)      # never a password of the URL
        raise failed(f"downloading {shown} failed: {type(e).__name__}: {why}",
                     code="CEPH.1520") from None
    except asyncio.TimeoutError:
        raise failed(f"downloading {shown} did not finish within {timeout:g} s",
                     code="CEPH.1520") from None
    return got


def qemu_conf(path: Path, mon_host: str, keyring: str, timeouts: Any) -> None:
    """A ceph.conf for qemu-img's rbd driver: addresses, keyring path, timeouts; no key."""
    text = ("[global]\n"
            f"mon_host = {mon_host}\n"
            f"keyring = {keyring}\n"
            f"client_mount_timeout = {timeouts.mount:g}\n"
            f"rados_mon_op_timeout = {timeouts.mon_op:g}\n"
            f"rados_osd_op_timeout = {timeouts.osd_op:g}\n"
            "log_to_stderr = false\nerr_to_stderr = false\nlog_file = \nadmin_socket = \n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def rbd_target(pool: str, name: str, user: str, conf: Path) -> str:
    return f"rbd:{pool}/{name}:id={user}:conf={conf}"


def parse_qemu_info(out: bytes) -> dict[str, Any]:
    try:
        return json.loads(out)
    except ValueError:
        raise failed("qemu-img info did not answer JSON", code="CEPH.1510") from None


QEMU_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


# --- export ----------------------------------------------------------------------------

class ImageReader:
    """An image held open across runner calls (each call may run on another thread).

    ``close`` waits for reads still running (a read whose caller timed out goes on in
    its thread), so the image is never closed under a read.
    """

    def __init__(self, conn: Connection, pool: str, name: str) -> None:
        self.conn, self.pool, self.name = conn, pool, name
        self._stack = ExitStack()
        self.img: Any = None
        self.size = 0
        self._cv = threading.Condition()
        self._reads = 0
        self._closed = False

    def open(self) -> int:
        try:
            r = self._stack.enter_context(self.conn.use())
            io = self._stack.enter_context(ioctx(r, self.pool))
            try:
                self.img = rbd.Image(io, self.name, read_only=True)
            except rbd.ImageNotFound:
                raise not_found(f"image {self.pool}/{self.name} does not exist") from None
            self._stack.callback(self.img.close)
            self.size = self.img.size()
            return self.size
        except BaseException:
            self._stack.close()
            raise

    def read(self, offset: int, length: int) -> bytes:
        with self._cv:
            if self._closed:
                raise failed("the export stream was closed")
            self._reads += 1
        try:
            return self.img.read(offset, length)
        finally:
            with self._cv:
                self._reads -= 1
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            while self._reads:
                self._cv.wait()
        self._stack.close()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive), None for the whole image, "bad" if unsatisfiable."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return "bad"
    if not m.group(1):                         # the last N bytes
        n = int(m.group(2))
        if n == 0:
            return "bad"
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return "bad"
    return start, min(end, size - 1)


# --- copy between clusters (migrate) -----------------------------------------------------

class _Side:
    """Tags an error with the cluster it came from (``e.ceph_conn``), so that a copy
    between two clusters marks down the one that did not answer."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, e: BaseException | None, tb: Any) -> bool:
        if e is not None and not hasattr(e, "ceph_conn"):
            try:
                e.ceph_conn = self.conn         # type: ignore[attr-defined]
            except AttributeError:
                pass
        return False


def copy_image(src: Connection, src_pool: str, name: str, dst: Connection, dst_pool: str,
               dst_name: str, progress: Progress, guard: Callable[[], None]) -> dict[str, int]:
    """Copy the allocated parts of an image to another pool (maybe another cluster).

    Runs in the source cluster's bulk pool; each librbd call is bounded by
    rados_osd_op_timeout, and ``guard()`` stops the copy between blocks once either
    cluster is known down."""
    zeros: dict[int, bytes] = {}
    with _Side(src), src.use() as sr, ioctx(sr, src_pool) as sio, \
            rbd.Image(sio, name, read_only=True) as simg:
        size = simg.size()
        extents: list[tuple[int, int]] = []
        simg.diff_iterate(0, size, None,
                          lambda off, length, exists: extents.append((off, length)) or 0 if exists else 0,
                          whole_object=True)
        total = sum(length for _, length in extents) or 1
        with _Side(dst), dst.use() as dr, ioctx(dr, dst_pool) as dio:
            try:
                rbd.RBD().create(dio, dst_name, size, old_format=False)
            except rbd.ImageExists:
                raise conflict(f"image {dst_pool}/{dst_name} already exists") from None
            done = written = 0
            try:
                with rbd.Image(dio, dst_name) as dimg:
                    aio = _Aio(dimg)
                    for off, length in extents:
                        pos = off
                        while pos < off + length:
                            if progress.is_cancelled:
                                raise failed("the migration was cancelled")
                            guard()
                            n = min(BLOCK, off + length - pos)
                            with _Side(src):
                                data = simg.read(pos, n)
                            if not _zero(data, zeros):
                                aio.write(data, pos)
                                written += n
                            pos += n
                            done += n
                            progress.report(done, total, f"copying {src_pool}/{name}")
                    aio.drain()
            except BaseException:
                try:
                    rbd.RBD().remove(dio, dst_name)
                except Exception:
                    pass
                raise
    return {"size": size, "written": written}
