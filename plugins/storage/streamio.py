"""Data movers that talk HTTP themselves: the migration sender and the image fetcher.

``send``: streams a volume file's data extents to another agent (below).
``fetch``: downloads an image into a hidden file of the storage (see ``fetch``).

Run by the agent as ``python -S streamio.py send|fetch`` with its settings as one
JSON line on stdin (a token never appears in argv, where ``ps`` would show it).  It is a process of its own, like every reader of a storage, so a
hung filesystem blocks it and not the agent, which kills it after a stall.

Sparse-aware: only the data extents (SEEK_DATA/SEEK_HOLE) are sent, each as a
frame with its offset; the end frame carries the file's size (trailing holes)
and the digest of every frame, which the destination checks before the file
gets its final name.  A reader thread reads and hashes while the main thread
sends, so the two overlap on two cores.

Progress goes to stdout as JSON lines: {"sent": bytes, "total": bytes}, and at
the end {"done": true, "status": HTTP status, "body": reply}.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import queue
import ssl
import sys
import threading
import time
import urllib.parse

try:
    from . import fsworker
except ImportError:            # run as a script
    import fsworker  # type: ignore[no-redef]

FRAME = fsworker.FRAME
FRAME_SIZE = 4 << 20
BUFFERS = 4


def extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each data extent; the whole file where holes cannot be found."""
    out = []
    off = 0
    try:
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # no data after off: the rest is a hole
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, size) - data))
            off = hole
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return [(o, n) for o, n in out if n > 0]


def frames(exts: list[tuple[int, int]], frame: int) -> list[tuple[int, int]]:
    out = []
    for off, length in exts:
        while length > 0:
            n = min(frame, length)
            out.append((off, n))
            off += n
            length -= n
    return out


def connect(url: str, verify: bool, cafile: str | None, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    target = u.path + (f"?{u.query}" if u.query else "")
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    return conn, target


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def send(cfg: dict) -> int:
    sys.setswitchinterval(0.0002)   # two threads hand buffers back and forth: switch fast
    root, rel = cfg["root"], cfg["path"]
    alg = cfg.get("alg", "sha256")
    frame_size = int(cfg.get("frame", FRAME_SIZE))
    dfd, name = fsworker.parent_of(root, rel)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    size = os.fstat(fd).st_size
    plan = frames(extents(fd, size), frame_size)
    total = sum(n for _, n in plan)
    h = hashlib.new(alg)
    dlen = h.digest_size * 2
    length = sum(FRAME.size + n for _, n in plan) + FRAME.size + dlen

    conn, target = connect(cfg["url"], cfg.get("verify", True), cfg.get("cafile"),
                           float(cfg.get("timeout", 120)))
    conn.putrequest("PUT", target, skip_accept_encoding=True)
    headers = dict(cfg.get("headers") or {})
    headers.update({"Authorization": f"OAuth {cfg['token']}", "Content-Type": "application/octet-stream",
                    "Content-Length": str(length), "X-File-Size": str(size),
                    "X-Data-Bytes": str(total), "X-Checksum-Algorithm": alg})
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    sock = conn.sock

    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(BUFFERS):
        free.put(bytearray(frame_size))
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            for off, n in plan:
                buf = free.get()
                if buf is None:
                    return
                view = memoryview(buf)[:n]
                got = 0
                while got < n:
                    r = os.preadv(fd, [view[got:]], off + got)
                    if r == 0:
                        raise OSError(errno.EIO, f"the file shrank while being sent (at {off + got})")
                    got += r
                head = FRAME.pack(fsworker.FRAME_DATA, off, n)
                h.update(head)
                h.update(view)
                ready.put((head, buf, n))
        except BaseException as e:      # reported by the sending thread
            failure.append(e)
        finally:
            ready.put(None)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    last = 0.0
    send_error: BaseException | None = None
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            head, buf, n = item
            sock.sendall(head)
            sock.sendall(memoryview(buf)[:n])
            free.put(buf)
            sent += n
            now = time.monotonic()
            if now - last >= 0.25:
                last = now
                emit({"sent": sent, "total": total})
        if failure:
            raise failure[0]
        digest = h.hexdigest().encode()
        sock.sendall(FRAME.pack(fsworker.FRAME_END, size, len(digest)) + digest)
        emit({"sent": sent, "total": total})
    except (BrokenPipeError, ConnectionResetError) as e:
        send_error = e          # the destination may have answered early: read its reply below
    finally:
        free.put(None)
    try:
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as e:
        emit({"done": True, "status": 0, "error": f"{type(send_error or e).__name__}: {send_error or e}"})
        return 1
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"raw": raw[:2000].decode(errors="replace")}
    emit({"done": True, "status": resp.status, "body": body, "sent": sent, "total": total})
    return 0 if resp.status == 200 else 1


def fetch(cfg: dict) -> int:
    """GET an http(s) URL into a new hidden file of the storage, hashing in the same pass.

    The socket is read in the main thread while a second thread hashes and writes, so
    the two overlap.  The file keeps its temporary name until a "COMMIT <path>" line
    arrives on stdin; EOF or anything else removes it.
    """
    root, tmp = cfg["root"], cfg["tmp"]
    h = hashlib.new(cfg.get("alg", "sha256"))
    dfd, name = fsworker.parent_of(root, tmp, create=True)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dfd)
    committed = False
    try:
        conn, target = connect(cfg["url"], cfg.get("verify", True), cfg.get("cafile"),
                               float(cfg.get("timeout", 120)))
        conn.request("GET", target, headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        if resp.status != 200:
            emit({"done": True, "status": resp.status, "error": f"HTTP {resp.status} {resp.reason}"})
            return 1
        total = resp.length
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            free.put(bytearray(FRAME_SIZE))
        failure: list[BaseException] = []

        def sink() -> None:
            offset = 0
            try:
                while (item := ready.get()) is not None:
                    buf, n = item
                    view = memoryview(buf)[:n]
                    h.update(view)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], offset + done)
                    offset += n
                    free.put(buf)
            except BaseException as e:
                failure.append(e)
                free.put(None)

        t = threading.Thread(target=sink, daemon=True)
        t.start()
        got, last = 0, 0.0
        try:
            while not failure:
                buf = free.get()
                if buf is None:
                    break
                n = resp.readinto(memoryview(buf))
                if not n:
                    free.put(buf)
                    break
                ready.put((buf, n))
                got += n
                now = time.monotonic()
                if now - last >= 0.25:
                    last = now
                    emit({"got": got, "total": total})
        finally:
            ready.put(None)
            t.join()
        if failure:
            raise failure[0]
        if total is not None and got != total:
            raise OSError(errno.EIO, f"the server sent {got} of {total} bytes")
        os.fsync(fd)
        emit({"done": True, "status": 200, "digest": h.hexdigest(), "bytes": got, "total": total})
        control = sys.stdin.readline().split()
        if control[:1] == ["COMMIT"] and len(control) == 2:
            fdst, final = fsworker.parent_of(root, control[1], create=True)
            try:
                fsworker._rename_noreplace(name, final, dfd, fdst)
                os.fsync(fdst)
            finally:
                os.close(fdst)
            committed = True
            emit({"ok": True, "committed": control[1]})
            return 0
        return 1
    finally:
        os.close(fd)
        if not committed:
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        os.close(dfd)


def die_with_parent(parent: int) -> None:
    """SIGKILL when the agent dies (kill -9 included): no stream goes on without its agent,
    so an interrupted migration can never complete at the destination behind its back."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)          # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:             # it died before the prctl
        os._exit(1)


def main() -> int:
    if sys.argv[1:] not in (["send"], ["fetch"]):
        sys.stderr.write("usage: streamio.py send|fetch  (settings as one JSON line on stdin)\n")
        return 2
    cfg = json.loads(sys.stdin.readline())
    die_with_parent(int(cfg.get("parent", os.getppid())))
    try:
        return send(cfg) if sys.argv[1] == "send" else fetch(cfg)
    except fsworker.Confinement as e:
        emit({"done": True, "status": 0, "error": f"path refused: {e}"})
    except (OSError, http.client.HTTPException, ssl.SSLError) as e:
        emit({"done": True, "status": 0, "error": f"{type(e).__name__}: {e}"})
    return 1


if __name__ == "__main__":
    sys.exit(main())
