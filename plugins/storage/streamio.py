"""Data movers that talk HTTP themselves: the migration sender and the image fetcher.

``send``: streams a volume file's data extents to another agent (below).
``fetch``: downloads an image into a hidden file of the storage (see ``fetch``).

Run by the agent as ``python -S streamio.py send|fetch`` with its settings as one
JSON line on stdin (a token never appears in argv, where ``ps`` would show it).  It
is a process of its own, like every reader of a storage, so a hung filesystem blocks
it and not the agent, which kills it after a stall.

Sparse-aware: only the data extents (SEEK_DATA/SEEK_HOLE) are sent, each as a frame
with its offset; the end frame carries the file's size (trailing holes) and the
digest of every frame (headers and data: the extent map is covered too), which the
destination checks before the file gets its final name.

Over plain HTTP the data goes from the page cache to the socket with sendfile (no
copy through this process) while a second thread hashes the same extents; over
HTTPS a reader thread reads and hashes while the main thread sends.  The HTTP
request is written by hand (http.client alone costs 40 ms of start-up): a PUT with
Content-Length and ``Connection: close``; the reply is read back whole.

Progress goes to stdout as JSON lines: {"sent": bytes, "total": bytes}, and at
the end {"done": true, "status": HTTP status, "body": reply}.  With ``then_remove``
the sender then waits for "REMOVE <hidden name>" on stdin and removes the moved
source itself (``remove_moved``), the agent's stdin staying open for that line.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import socket
import struct
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
HASH_CHUNK = 1 << 20           # the sender hashes its extents read in pieces this big


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


class Stall(OSError):
    pass


def connect(url: str, verify: bool, cafile: str | None, timeout: float):
    """A connected socket (TLS-wrapped for https) and the request target.

    Plain sockets stay blocking, with SO_SNDTIMEO/SO_RCVTIMEO as the stall limit, so
    that sendfile can push a whole frame in one call; TLS sockets use Python's timeout."""
    u = urllib.parse.urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    port = u.port or (443 if u.scheme == "https" else 80)
    sock = socket.create_connection((u.hostname, port), timeout=timeout)
    try:
        if u.scheme == "https":
            import ssl
            ctx = ssl.create_default_context(cafile=cafile)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=u.hostname)
            return sock, target, f"{u.hostname}:{port}", True
        sock.settimeout(None)
        # The end frame must not wait for an ACK (Nagle and a delayed ACK: up to 40 ms);
        # frame headers are sent with MSG_MORE, so they still go out with their data.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        return sock, target, f"{u.hostname}:{port}", False
    except BaseException:
        sock.close()
        raise


def _stalled(e: OSError, timeout: float, what: str) -> OSError:
    if isinstance(e, (BlockingIOError, TimeoutError)):
        return Stall(errno.ETIMEDOUT, f"{what}: no progress for {timeout:g} s")
    return e


def sendfile_all(sock: socket.socket, fd: int, offset: int, count: int, timeout: float) -> None:
    out = sock.fileno()
    while count:
        try:
            n = os.sendfile(out, fd, offset, count)
        except OSError as e:
            raise _stalled(e, timeout, "sending") from None
        if n == 0:
            raise OSError(errno.EIO, f"the file shrank while being sent (at {offset})")
        offset += n
        count -= n


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """Status and body of the reply (Content-Length, chunked, or up to the close)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "the destination closed the "
                                           "connection without an answer")
            data += chunk
            if len(data) > 1 << 20:
                raise ValueError("the reply's header is too long")
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            want = int(headers["content-length"])
            while len(rest) < want:
                chunk = sock.recv(max(65536, want - len(rest)))
                if not chunk:
                    break
                rest += chunk
            return status, rest[:want]
        while chunk := sock.recv(65536):
            rest += chunk
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, pos = b"", 0
            while True:
                eol = rest.index(b"\r\n", pos)
                n = int(rest[pos:eol].split(b";")[0], 16)
                if n == 0:
                    break
                body += rest[eol + 2:eol + 2 + n]
                pos = eol + 4 + n
            return status, body
        return status, rest
    except OSError as e:
        raise _stalled(e, timeout, "waiting for the destination's answer") from None


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def send(cfg: dict) -> int:
    root, rel = cfg["root"], cfg["path"]
    timeout = float(cfg.get("timeout", 120))
    dfd, name = fsworker.parent_of(root, rel)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except BaseException:
        os.close(dfd)
        raise
    try:
        rc = _send_file(cfg, fd, timeout)
    finally:
        os.close(fd)
    try:
        if rc == 0 and cfg.get("then_remove"):
            remove_moved(dfd, name)
    finally:
        os.close(dfd)
    return rc


def remove_moved(dfd: int, name: str) -> None:
    """After the destination's 200, the agent may say "REMOVE <hidden name>" on stdin (once
    the volume's row is gone there): rename the source away (out of view at once), say so,
    then free its blocks (a while for a big file; the agent does not wait for that).  EOF
    instead: the source stays.  This saves starting another process to remove it."""
    control = sys.stdin.readline().split()
    if control[:1] != ["REMOVE"] or len(control) != 2 or "/" in control[1] \
            or not control[1].startswith(".") or fsworker.PART_MARK not in control[1]:
        return                 # only ever to a hidden temporary beside it
    hidden = control[1]
    os.rename(name, hidden, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    emit({"renamed": hidden})
    os.unlink(hidden, dir_fd=dfd)
    emit({"removed": hidden})


def _send_file(cfg: dict, fd: int, timeout: float) -> int:
    alg = cfg.get("alg", "sha256")
    frame_size = int(cfg.get("frame", FRAME_SIZE))
    size = os.fstat(fd).st_size
    plan = frames(extents(fd, size), frame_size)
    total = sum(n for _, n in plan)
    h = fsworker.new_hash(alg, cfg.get("pypath"))
    dlen = h.digest_size * 2
    length = sum(FRAME.size + n for _, n in plan) + FRAME.size + dlen

    sock, target, host, tls = connect(cfg["url"], cfg.get("verify", True), cfg.get("cafile"), timeout)
    headers = dict(cfg.get("headers") or {})
    headers.update({"Host": host, "Authorization": f"OAuth {cfg['token']}",
                    "Content-Type": "application/octet-stream", "Content-Length": str(length),
                    "Connection": "close", "X-File-Size": str(size), "X-Data-Bytes": str(total),
                    "X-Checksum-Algorithm": alg})
    lines = [f"PUT {target} HTTP/1.1"]
    for k, v in headers.items():
        v = str(v)
        if any(c in k + v for c in "\r\n\0") or ":" in k:
            raise ValueError(f"header {k!r} has a line break or a NUL")
        lines.append(f"{k}: {v}")
    request_head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    sent = 0
    send_error: BaseException | None = None
    try:
        sock.sendall(request_head)
        if tls or not cfg.get("sendfile", True):
            sent = _send_buffered(sock, fd, plan, h, frame_size, total)
        else:
            sent = _send_zero_copy(sock, fd, plan, h, total, timeout)
        digest = h.hexdigest().encode()
        sock.sendall(FRAME.pack(fsworker.FRAME_END, size, len(digest)) + digest)
        emit({"sent": sent, "total": total})
    except (BrokenPipeError, ConnectionResetError) as e:
        send_error = e          # the destination may have answered early: read its reply below
    except OSError as e:
        raise _stalled(e, timeout, "sending") from None
    try:
        status, raw = read_response(sock, timeout)
    except (OSError, ValueError) as e:
        emit({"done": True, "status": 0, "error": f"{type(send_error or e).__name__}: {send_error or e}"})
        return 1
    finally:
        sock.close()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"raw": raw[:2000].decode(errors="replace")}
    emit({"done": True, "status": status, "body": body, "sent": sent, "total": total})
    return 0 if status == 200 else 1


def hash_read(fd: int, plan: list[tuple[int, int]], h) -> None:
    """Hash the frames (headers and data), read in pieces into one buffer on huge pages:
    cheaper than hashing through a mapping of the file (a page fault per 4 KiB), and
    reading into 4 KiB pages cost this VM 3x more CPU (bench/RESULTS.md, 2026-12-07)."""
    view = fsworker.huge_page_buffers(1, HASH_CHUNK)[0]
    for off, n in plan:
        h.update(FRAME.pack(fsworker.FRAME_DATA, off, n))
        end = off + n
        while off < end:
            k = os.preadv(fd, [view[:min(HASH_CHUNK, end - off)]], off)
            if k == 0:
                raise OSError(errno.EIO, f"the file shrank while being sent (at {off})")
            h.update(view[:k])
            off += k


def _send_zero_copy(sock, fd: int, plan: list[tuple[int, int]], h, total: int, timeout: float) -> int:
    """sendfile from the page cache to the socket while a thread hashes the same extents
    (hash_read: it runs ahead of the sending, and is done after a third of the time)."""
    failure: list[BaseException] = []

    def hasher() -> None:
        try:
            hash_read(fd, plan, h)
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=hasher, daemon=True)
    t.start()
    sent, last = 0, 0.0
    for off, n in plan:
        if failure:
            break
        sock.sendall(FRAME.pack(fsworker.FRAME_DATA, off, n), socket.MSG_MORE)
        sendfile_all(sock, fd, off, n, timeout)
        sent += n
        now = time.monotonic()
        if now - last >= 0.25:
            last = now
            emit({"sent": sent, "total": total})
    t.join()
    if failure:
        raise failure[0]
    return sent


def _send_buffered(sock, fd: int, plan: list[tuple[int, int]], h, frame_size: int, total: int) -> int:
    """A reader thread reads and hashes, the main thread sends (TLS: no sendfile)."""
    sys.setswitchinterval(0.0002)   # two threads hand buffers back and forth: switch fast
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for b in fsworker.huge_page_buffers(BUFFERS, frame_size):    # see hash_read
        free.put(b)
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
    sent, last = 0, 0.0
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
    finally:
        free.put(None)
    if failure:
        raise failure[0]
    return sent


def http_connect(url: str, verify: bool, cafile: str | None, timeout: float):
    """An http.client connection (for fetch, where its response handling is worth it)."""
    import http.client
    u = urllib.parse.urlsplit(url)
    target = u.path + (f"?{u.query}" if u.query else "")
    if u.scheme == "https":
        import ssl
        ctx = ssl.create_default_context(cafile=cafile)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    return conn, target


def fetch(cfg: dict) -> int:
    """GET an http(s) URL into a new hidden file of the storage, hashing in the same pass.

    The socket is read in the main thread into huge-page buffers (see huge_page_buffers)
    while one thread hashes and another writes, so the three overlap.  The file keeps its
    temporary name until a "COMMIT <path>" line arrives on stdin; EOF or anything else
    removes it.
    """
    root, tmp = cfg["root"], cfg["tmp"]
    h = fsworker.new_hash(cfg.get("alg", "sha256"))
    # more digests of the same pass (the image store: sha256 names the blob, md5 is checked)
    extra = {a: fsworker.new_hash(a) for a in cfg.get("extra_algs", ())}
    sparse = bool(cfg.get("sparse"))     # zero blocks become holes (the image store's blobs)
    side = None
    if extra:
        from concurrent.futures import ThreadPoolExecutor
        side = ThreadPoolExecutor(1)
    dfd, name = fsworker.parent_of(root, tmp, create=True)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dfd)
    committed = False
    try:
        if cfg.get("file"):             # file:// on this node, its path checked by the agent
            resp = LocalSource(cfg["file"])
        else:
            conn, target = http_connect(cfg["url"], cfg.get("verify", True), cfg.get("cafile"),
                                        float(cfg.get("timeout", 120)))
            conn.request("GET", target, headers={"Accept-Encoding": "identity"})
            resp = conn.getresponse()
        if resp.status != 200:
            emit({"done": True, "status": resp.status, "error": f"HTTP {resp.status} {resp.reason}"})
            return 1
        total = resp.length
        # the socket is read here; a hasher and a writer each take every buffer in their
        # own thread, and it comes back free once both are done with it (hashing alone is
        # most of the CPU: hash-then-write in one thread made that thread the bottleneck)
        free: queue.Queue = queue.Queue()
        for b in fsworker.huge_page_buffers(BUFFERS, FRAME_SIZE):
            free.put(b)
        users: dict[int, int] = {}
        users_lock = threading.Lock()
        failure: list[BaseException] = []

        def done_with(buf: memoryview) -> None:
            with users_lock:
                users[id(buf)] -= 1
                last = not users[id(buf)]
            if last:
                free.put(buf)

        def consumer(work) -> tuple[queue.Queue, threading.Thread]:
            q: queue.Queue = queue.Queue()

            def run() -> None:
                try:
                    while (item := q.get()) is not None:
                        work(*item)
                        done_with(item[0])
                except BaseException as e:
                    failure.append(e)
                    free.put(None)         # wakes the reader, which then stops
            t = threading.Thread(target=run, daemon=True)
            t.start()
            return q, t

        def hash_frame(buf: memoryview, n: int, offset: int) -> None:
            view = buf[:n]
            # the extra digests in a thread of their own (hashlib drops the GIL):
            # md5 beside sha256 costs no extra wall time on another core
            more = side.submit(_update_all, extra, view) if side else None
            h.update(view)
            if more is not None:
                more.result()

        def write_frame(buf: memoryview, n: int, offset: int) -> None:
            if sparse:
                _write_sparse(fd, buf, n, offset)
            else:
                _pwrite_all(fd, buf[:n], offset)

        consumers = [consumer(hash_frame), consumer(write_frame)]
        got, last = 0, 0.0
        try:
            while not failure:
                buf = free.get()
                if buf is None:
                    break
                n = resp.readinto(buf)
                if not n:
                    break
                users[id(buf)] = len(consumers)
                for q, _ in consumers:
                    q.put((buf, n, got))
                got += n
                now = time.monotonic()
                if now - last >= 0.25:
                    last = now
                    emit({"got": got, "total": total})
        finally:
            for q, t in consumers:
                q.put(None)
                t.join()
        if failure:
            raise failure[0]
        if total is not None and got != total:
            raise OSError(errno.EIO, f"the server sent {got} of {total} bytes")
        if sparse:
            os.ftruncate(fd, got)          # a trailing hole
        os.fsync(fd)
        emit({"done": True, "status": 200, "digest": h.hexdigest(), "bytes": got, "total": total,
              "digests": {a: x.hexdigest() for a, x in extra.items()}})
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


def _update_all(hashes: dict, view: memoryview) -> None:
    for x in hashes.values():
        x.update(view)


SPARSE_BLOCK = 1 << 20
_ZERO = bytes(SPARSE_BLOCK)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _write_sparse(fd: int, buf: memoryview, n: int, offset: int) -> None:
    """pwrite buf[:n] at offset, leaving each all-zero SPARSE_BLOCK a hole.  A block whose
    first or last byte is not zero is data at once (no scan); only the rest is compared
    (through a copy: comparing a memoryview itself goes byte by byte, 50x slower)."""
    start = 0
    while start < n:
        end = min(n, start + SPARSE_BLOCK)
        block = buf[start:end]
        if end - start == SPARSE_BLOCK and not buf[start] and not buf[end - 1] and \
                block.tobytes() == _ZERO:
            start = end
            continue
        _pwrite_all(fd, block, offset + start)
        start = end


class LocalSource:
    """A file of this node read like an HTTP response, the path the agent checked (symlink-free)
    and nothing else: O_NOFOLLOW (a symlink put there since is refused), O_NONBLOCK (a FIFO
    cannot hold the open), a regular file, and the opened file's own path the one asked for
    (a directory on the way swapped for a symlink since the check is refused too)."""
    status, reason = 200, "OK"

    def __init__(self, path: str) -> None:
        self.f = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC),
                      "rb", buffering=0)
        st = os.fstat(self.f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if os.readlink(f"/proc/self/fd/{self.f.fileno()}") != path:
            raise OSError(errno.ELOOP, f"{path} resolves elsewhere (a symlink on the way)")
        self.length = st.st_size

    def readinto(self, view: memoryview) -> int:
        return self.f.readinto(view)


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
    if sys.argv[1:2] not in (["send"], ["fetch"]):
        sys.stderr.write("usage: streamio.py send|fetch [PYPATH...]  (settings as one JSON line "
                         "on stdin)\n")
        return 2
    die_with_parent(os.getppid())
    if sys.argv[2:]:                   # an idle spare: import the checksum module meanwhile
        fsworker.preload(sys.argv[2:])
    line = sys.stdin.readline()       # a spare waits here (see spares.py); EOF: not needed
    if not line:
        return 0
    cfg = json.loads(line)
    if os.getppid() != int(cfg.get("parent", os.getppid())):
        return 1
    try:
        return send(cfg) if sys.argv[1] == "send" else fetch(cfg)
    except fsworker.Confinement as e:
        emit({"done": True, "status": 0, "error": f"path refused: {e}"})
    except Exception as e:      # OSError (ssl.SSLError too), http.client.HTTPException, ValueError
        emit({"done": True, "status": 0, "error": f"{type(e).__name__}: {e}"})
    return 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)            # no interpreter teardown: the agent is waiting for this exit
