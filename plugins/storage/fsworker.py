"""The hang-proof helper: every filesystem call on a registered storage runs here.

One long-lived process per storage, started by the agent as
``python -S fsworker.py serve ROOT TAG`` and spoken to in JSON lines over its
stdin/stdout (one request at a time).  A dead NFS server (or a hung FUSE
daemon) blocks this process in the kernel, never a thread of the agent: the
agent gives each call a timeout, and when it runs out it SIGKILLs this process
and abandons it (a process in D state cannot die before the kernel lets go),
then starts a fresh one for the next call.

The same file also runs the *writer* (``write [CHANNEL]``, see ``write``): it
takes a stream of frames, piped on its stdin or straight from the connection
of the request that carries it, and writes them into a hidden temporary file
under the storage, hashing in the same pass; a file only gets its final name
on an explicit COMMIT from the agent, so a crash of either side leaves nothing
visible under the final name.  And ``unlink ROOT PATH``, a one-shot removal.

Only the standard library is used (and xxhash for the migration checksum,
found where the agent says), and the script is run with ``-S``, so it starts
in a few milliseconds.  Paths are always relative to the storage root
and are walked one component at a time with ``O_NOFOLLOW``: no ``..``, no
absolute paths, no symlink anywhere on the way.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import struct
import sys
import time

ID_FILE = ".node-agent-storage.json"
PROBE_PREFIX = ".node-agent-probe-"
PART_MARK = ".part-"           # hidden temporaries: .<name>.part-<tag>-<random>
QCOW2_MAGIC = b"QFI\xfb"

# Frames of the data stream (migration and downloads):
#   b"D" + offset:u64 + length:u64 + data     a data extent
#   b"E" + size:u64 + digestlen:u64 + digest  the end: logical file size, sender's digest
FRAME = struct.Struct(">cQQ")
FRAME_DATA, FRAME_END = b"D", b"E"
WRITE_CHUNK = 1 << 20          # the writer's buffers: received into by one thread, written by another
WRITE_BUFFERS = 8


class Confinement(Exception):
    """A path that would leave the storage root (or goes through a symlink)."""


# --- confined paths -----------------------------------------------------------

def split_rel(rel: str) -> list[str]:
    """Validate a storage-relative path: no absolute, no '..', '.', '' or NUL parts."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\0" in rel:
        raise Confinement(f"{rel!r} is not a relative path inside the storage")
    parts = rel.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise Confinement(f"{rel!r} has an empty, '.' or '..' component")
    return parts


def open_dir(root: str, parts: list[str], create: bool = False) -> int:
    """An fd of root/parts..., each component opened with O_NOFOLLOW (no symlinks)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for p in parts:
            try:
                nfd = os.open(p, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(p, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(p, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Confinement(f"'{p}' is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def parent_of(root: str, rel: str, create: bool = False) -> tuple[int, str]:
    parts = split_rel(rel)
    return open_dir(root, parts[:-1], create), parts[-1]


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _entry(st: os.stat_result) -> dict:
    return {"type": _kind(st.st_mode), "size": st.st_size, "allocated": st.st_blocks * 512,
            "mtime": st.st_mtime}


# --- operations of the serving helper ------------------------------------------

class Worker:
    def __init__(self, root: str, tag: str) -> None:
        self.root = root
        self.tag = tag

    def op_ping(self) -> str:
        return "pong"

    def op_statvfs(self) -> dict:
        s = os.statvfs(self.root)
        return {"total": s.f_blocks * s.f_frsize, "free": s.f_bfree * s.f_frsize,
                "avail": s.f_bavail * s.f_frsize}

    def op_realpath(self) -> dict:
        """The root with every symlink resolved (the deepest existing part of it, then the rest)."""
        return {"realpath": os.path.realpath(self.root)}

    def op_prepare_root(self, create: bool = False) -> dict:
        """The root exists (made when asked) and is a directory; its device and real path."""
        if create:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
        st = os.stat(self.root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.root)
        return {"dev": st.st_dev, "realpath": os.path.realpath(self.root)}

    def op_probe(self, size: int = 4096) -> dict:
        """Write, read back and delete a small file, with O_DIRECT where the fs allows it."""
        t0 = time.monotonic()
        name = f"{PROBE_PREFIX}{self.tag}-{os.getpid()}"
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        buf = mmap.mmap(-1, size)          # page aligned, as O_DIRECT wants
        pattern = (f"node-agent probe {time.time()} ".encode() * (size // 16 + 1))[:size]
        buf.write(pattern)
        direct = True
        base = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(name, base | os.O_DIRECT, 0o600, dir_fd=dfd)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                direct = False     # tmpfs and some FUSE filesystems refuse O_DIRECT
                fd = os.open(name, base | os.O_DSYNC, 0o600, dir_fd=dfd)
            try:
                if os.write(fd, buf) != size:
                    raise OSError(errno.EIO, "short write on the probe file")
                os.fsync(fd)
                back = mmap.mmap(-1, size)
                if os.preadv(fd, [back], 0) != size or back[:] != pattern:
                    raise OSError(errno.EIO, "the probe file did not read back what was written")
            finally:
                os.close(fd)
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)
        return {"ms": round((time.monotonic() - t0) * 1000, 2), "direct": direct}

    def op_claim(self, uuid: str, take: bool = True) -> dict:
        """Read (and when free, write) the id file that ties the directory to one storage."""
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            owner = None
            try:
                fd = os.open(ID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                with os.fdopen(fd, "rb") as f:
                    owner = json.loads(f.read(65536) or b"{}").get("primaryStorageUuid")
            except FileNotFoundError:
                pass
            except (ValueError, AttributeError):
                owner = "(unreadable id file)"
            if owner is None and take:
                tmp = f"{ID_FILE}{PART_MARK}{self.tag}-{os.getpid()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dfd)
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps({"primaryStorageUuid": uuid, "claimed": time.time()}).encode())
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, ID_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
                owner = uuid
            return {"owner": owner}
        finally:
            os.close(dfd)

    def op_unclaim(self, uuid: str) -> dict:
        owner = self.op_claim(uuid, take=False)["owner"]
        if owner == uuid:
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.unlink(ID_FILE, dir_fd=dfd)
            finally:
                os.close(dfd)
            return {"removed": True}
        return {"removed": False, "owner": owner}

    def op_lookup(self, path: str) -> dict:
        """lstat of a confined path: exists, type, size, allocated bytes."""
        try:
            dfd, name = parent_of(self.root, path)
        except FileNotFoundError:
            return {"exists": False, "parentExists": False}
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return {"exists": False, "parentExists": True}
        finally:
            os.close(dfd)
        return {"exists": True, "parentExists": True, **_entry(st)}

    def op_stat_many(self, paths: list[str]) -> list[dict]:
        out = []
        for p in paths:
            try:
                out.append({"path": p, **self.op_lookup(p)})
            except (Confinement, OSError) as e:
                out.append({"path": p, "exists": False, "error": str(e)})
        return out

    def op_mkdirs(self, path: str) -> dict:
        """Create the parent directories of a confined path."""
        dfd, _ = parent_of(self.root, path, create=True)
        os.close(dfd)
        return {}

    def op_unlink(self, path: str, missing_ok: bool = False) -> dict:
        """Delete one regular file (never a symlink's target, never a directory)."""
        try:
            dfd, name = parent_of(self.root, path)
        except FileNotFoundError:
            if missing_ok:
                return {"removed": False}
            raise
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                if missing_ok:
                    return {"removed": False}
                raise
            if not stat.S_ISREG(st.st_mode):
                raise Confinement(f"{path!r} is a {_kind(st.st_mode)}, not a regular file")
            os.unlink(name, dir_fd=dfd)
            return {"removed": True}
        finally:
            os.close(dfd)

    def op_rename(self, src: str, dst: str) -> dict:
        """Rename within the storage, never replacing an existing file."""
        sfd, sname = parent_of(self.root, src)
        try:
            dfd, dname = parent_of(self.root, dst, create=True)
            try:
                _rename_noreplace(sname, dname, sfd, dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        return {}

    def op_listdir(self, path: str = "") -> list[dict]:
        dfd = open_dir(self.root, split_rel(path) if path else [])
        try:
            out = []
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append({"name": name, **_entry(st)})
            return out
        finally:
            os.close(dfd)

    def op_walk_images(self, skip: list[str] = (), max_depth: int = 8, limit: int = 100000) -> list[dict]:
        """Every regular non-hidden file under the root (not under skip), with its first bytes."""
        found: list[dict] = []
        skip_set = set(skip)

        def walk(dfd: int, prefix: str, depth: int) -> None:
            for name in sorted(os.listdir(dfd)):
                if name.startswith(".") or len(found) >= limit:
                    continue
                rel = prefix + name
                if rel in skip_set:
                    continue
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode) and depth < max_depth:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dfd)
                    try:
                        walk(sub, rel + "/", depth + 1)
                    finally:
                        os.close(sub)
                elif stat.S_ISREG(st.st_mode):
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        head = os.read(fd, 4)
                    finally:
                        os.close(fd)
                    found.append({"path": rel, "qcow2": head == QCOW2_MAGIC, **_entry(st)})

        dfd = open_dir(self.root, [])
        try:
            walk(dfd, "", 0)
        finally:
            os.close(dfd)
        return found

    def op_sweep(self, max_depth: int = 8) -> list[str]:
        """Remove this node's leftover temporaries (.<name>.part-<tag>-*) anywhere under the root."""
        removed: list[str] = []
        mark = f"{PART_MARK}{self.tag}-"

        def walk(dfd: int, prefix: str, depth: int) -> None:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and name.startswith(".") and mark in name:
                    os.unlink(name, dir_fd=dfd)
                    removed.append(prefix + name)
                elif stat.S_ISDIR(st.st_mode) and depth < max_depth and not name.startswith("."):
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dfd)
                    try:
                        walk(sub, prefix + name + "/", depth + 1)
                    finally:
                        os.close(sub)

        dfd = open_dir(self.root, [])
        try:
            walk(dfd, "", 0)
        finally:
            os.close(dfd)
        return removed

    def op_sleep(self, seconds: float) -> dict:
        """For tests of the timeout path without a hung filesystem."""
        time.sleep(seconds)
        return {}


def _rename_noreplace(sname: str, dname: str, sfd: int, dfd: int) -> None:
    try:
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links here: check, then rename (the agent serializes writers per path).
        try:
            os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "the target exists", dname)
        except FileNotFoundError:
            pass
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    os.unlink(sname, dir_fd=sfd)


def error_reply(rid, e: BaseException) -> dict:
    if isinstance(e, Confinement):
        return {"id": rid, "ok": False, "kind": "confinement", "error": str(e), "errno": None}
    if isinstance(e, OSError):
        return {"id": rid, "ok": False, "kind": "oserror", "errno": e.errno,
                "error": f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")}
    return {"id": rid, "ok": False, "kind": "bad", "error": f"{type(e).__name__}: {e}", "errno": None}


def serve(root: str, tag: str) -> int:
    worker = Worker(root, tag)
    out = sys.stdout
    for line in sys.stdin:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            fn = getattr(worker, "op_" + req["op"], None)
            if fn is None:
                raise ValueError(f"unknown operation {req['op']!r}")
            reply = {"id": rid, "ok": True, "result": fn(**(req.get("args") or {}))}
        except Exception as e:  # every failure goes back to the agent as an answer
            reply = error_reply(rid, e)
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


# --- the writer -------------------------------------------------------------------

def new_hash(alg: str, pypath: list[str] | None = None):
    """A hash object: hashlib's algorithms, or xxh3_128/xxh3_64 of the xxhash package.

    The helpers run with ``-S`` (no site-packages), so the agent passes the
    directories where it found xxhash in ``pypath``."""
    if alg.startswith("xxh3_"):
        for p in pypath or ():
            if p not in sys.path:
                sys.path.append(p)
        import xxhash
        return getattr(xxhash, alg)()
    import hashlib          # here, not at the top: the serving helper starts faster without it
    return hashlib.new(alg)


def preload(pypath: list[str]) -> None:
    """Import xxhash ahead (a spare has the time): new_hash then finds it loaded."""
    try:
        new_hash("xxh3_128", pypath)
    except ImportError:
        pass


def huge_page_buffers(count: int, size: int) -> list[memoryview]:
    """count buffers of size bytes, in one anonymous mapping that asks for transparent huge
    pages (MADV_HUGEPAGE: this system's THP setting is "madvise").  Copying 512 MiB out of
    a socket into 4 KiB pages misses the TLB every page, and in a VM every miss is a nested
    page walk: with 2 MiB pages the writer took 0.58 CPU-s instead of 0.88 (bench/RESULTS.md).
    Where huge pages are refused, the mapping still works with small ones."""
    arena = mmap.mmap(-1, count * size)
    try:
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    view = memoryview(arena)
    return [view[i * size:(i + 1) * size] for i in range(count)]


class _Body:
    """The request body as the writer reads it: from stdin (the agent pipes it), or from
    the connection itself (the agent hands its socket over), after ``prefix``, the bytes
    the agent had already read from that connection."""

    def __init__(self, stdin, sock=None, prefix: bytes = b"", length: int = 0,
                 timeout: float = 120.0) -> None:
        self.stdin, self.sock = stdin, sock
        self.prefix = memoryview(prefix)
        self.left = length - len(prefix)        # on the socket
        self.timeout = timeout
        if sock is not None:
            import select
            self.poll = select.poll()
            self.poll.register(sock.fileno(), select.POLLIN)

    def readinto(self, view: memoryview) -> int:
        if self.sock is None:
            n = self.stdin.readinto(view)
        elif self.prefix:
            n = min(len(view), len(self.prefix))
            view[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
        else:
            if self.left <= 0:
                raise EOFError("the frames go on past the end of the request body")
            while True:
                # Non-blocking (the agent shares the descriptor's flags), polled only when
                # there is nothing to read: one system call per read while data flows.
                try:
                    n = self.sock.recv_into(view, min(len(view), self.left))
                    break
                except BlockingIOError:
                    if not self.poll.poll(self.timeout * 1000):
                        raise OSError(errno.ETIMEDOUT, "the sender sent nothing for "
                                      f"{self.timeout:g} s") from None
            self.left -= n
        if not n:
            raise EOFError("the stream ended in the middle of a frame")
        return n

    def read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            got += self.readinto(view[got:])
        return bytes(buf)


def write(channel: int | None = None) -> int:
    """Receive frames into a new hidden file; report; COMMIT <final> or remove it.

    Settings come as the first line on stdin (JSON): root, tmp, alg, scope and
    pypath; for a stream taken over from the agent's connection also sock
    ("channel": the descriptor of the connection comes with SCM_RIGHTS on the
    unix socket ``channel``, as the writer was started ahead, see spares.py),
    prefix (how many body bytes follow on stdin: what the agent had already read
    from the connection) and length (the Content-Length).  Nothing is created
    before that line: EOF instead of it is a clean exit (an unneeded spare).

    scope "stream": the digest covers every frame (headers and data), as the
    migration sender computes it; scope "content": only the data, in order.

    The body is read by the main thread while a second thread hashes and writes,
    so receiving and writing overlap.  Once stdin carries nothing but the control
    line, a third thread watches it: EOF before COMMIT (the agent died) removes
    the temporary file and ends the process at once, even in the middle of a
    stream that comes straight from the connection.
    """
    import queue
    import threading
    import socket
    out = sys.stdout
    stdin = sys.stdin.buffer
    line = stdin.readline()
    if not line:
        return 1                     # a spare that was not needed
    try:
        cfg = json.loads(line)
        root, tmp, scope = cfg["root"], cfg["tmp"], cfg.get("scope", "stream")
        h = new_hash(cfg["alg"], cfg.get("pypath"))
        sock = None
        if cfg.get("sock") is not None:
            prefix = stdin.read(int(cfg.get("prefix", 0)))
            if len(prefix) != int(cfg.get("prefix", 0)):
                raise EOFError("the agent's pipe closed before the start of the stream")
            if cfg["sock"] == "channel":
                with socket.socket(fileno=channel) as chan:
                    channel = None
                    _, fds, _, _ = socket.recv_fds(chan, 1, 1)
                if len(fds) != 1:
                    raise OSError(errno.EBADF, "no connection came on the writer's channel")
                conn_fd = fds[0]
            else:
                conn_fd = int(cfg["sock"])
            sock = socket.socket(fileno=conn_fd)
            # Non-blocking, as the agent's loop needs it (the file status is shared): never
            # setblocking(True) on a descriptor that the agent holds too.
            sock.setblocking(False)
            body = _Body(stdin, sock, prefix, int(cfg["length"]), float(cfg.get("stall", 120)))
        else:
            body = _Body(stdin)
        if channel is not None:
            os.close(channel)
        dfd, name = parent_of(root, tmp, create=True)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise
    except Exception as e:           # nothing was created: say why
        out.write(json.dumps(error_reply(None, e)) + "\n")
        out.flush()
        return 1
    lock = threading.Lock()
    state = {"keep": False}         # True once COMMIT came (or the files are closed)
    control: queue.SimpleQueue = queue.SimpleQueue()

    def remove_temp() -> None:
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass

    def watch_stdin() -> None:
        while True:
            ctl = stdin.readline()
            with lock:
                if not ctl:
                    if not state["keep"]:
                        remove_temp()           # the agent is gone: nothing may stay behind
                        os._exit(1)
                    control.put(b"")
                    return
                if ctl.startswith(b"COMMIT "):
                    state["keep"] = True
            control.put(ctl)

    watcher = threading.Thread(target=watch_stdin, daemon=True)
    if sock is not None:
        watcher.start()
    committed = False
    received = 0
    try:
        free: queue.SimpleQueue = queue.SimpleQueue()
        ready: queue.SimpleQueue = queue.SimpleQueue()
        for buf in huge_page_buffers(WRITE_BUFFERS, WRITE_CHUNK):
            free.put(buf)
        failure: list[BaseException] = []

        def sink() -> None:
            try:
                while (item := ready.get()) is not None:
                    if type(item) is bytes:          # a frame header, hashed in stream order
                        h.update(item)
                        continue
                    buf, n, offset = item
                    chunk = memoryview(buf)[:n]
                    h.update(chunk)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, chunk[done:], offset + done)
                    free.put(buf)
            except BaseException as e:
                failure.append(e)
                free.put(None)                       # wakes the reader, which reports it

        sink_thread = threading.Thread(target=sink, daemon=True)
        sink_thread.start()
        end = 0
        last = time.monotonic()
        try:
            while True:
                head = body.read_exact(FRAME.size)
                kind, a, b = FRAME.unpack(head)
                if kind == FRAME_DATA:
                    if scope == "stream":
                        ready.put(head)
                    offset, left = a, b
                    end = max(end, offset + left)
                    while left:
                        buf = free.get()
                        if buf is None:
                            raise failure[0]
                        view = memoryview(buf)
                        want = min(left, len(buf))
                        n = 0
                        while n < want:
                            n += body.readinto(view[n:want])
                        ready.put((buf, n, offset))
                        offset += n
                        left -= n
                        received += n
                        now = time.monotonic()
                        if sock is not None and now - last >= 0.25:
                            last = now       # the agent's stall timer (it feeds no pipe here)
                            out.write(json.dumps({"got": received}) + "\n")
                            out.flush()
                elif kind == FRAME_END:
                    size, dlen = a, b
                    if dlen > 1024:
                        raise ValueError(f"bad end frame (a digest of {dlen} bytes)")
                    claimed = body.read_exact(dlen).decode(errors="replace") if dlen else ""
                    break
                else:
                    raise ValueError(f"bad frame type {kind!r}")
        finally:
            ready.put(None)
            sink_thread.join()
        if failure:
            raise failure[0]
        if sock is not None:
            if body.left:
                raise ValueError(f"{body.left} bytes of the request body follow its end frame")
            sock.close()             # our copy only: the agent answers on the connection
            sock = None
        if end > size:
            raise ValueError(f"a data frame ends at {end}, past the file size {size}")
        os.ftruncate(fd, size)       # trailing holes come back as a hole
        os.fsync(fd)
        allocated = os.fstat(fd).st_blocks * 512
        out.write(json.dumps({"ok": True, "digest": h.hexdigest(), "claimed": claimed,
                              "size": size, "bytes": received, "allocated": allocated}) + "\n")
        out.flush()
        if cfg.get("sock") is None:
            watcher.start()          # piped: stdin carries only the control line from here
        ctl = control.get().decode(errors="replace").split()
        if ctl[:1] == ["COMMIT"] and len(ctl) == 2:
            fdst, final_name = parent_of(root, ctl[1], create=True)
            try:
                _rename_noreplace(name, final_name, dfd, fdst)
                os.fsync(fdst)
            finally:
                os.close(fdst)
            committed = True
            out.write(json.dumps({"ok": True, "committed": ctl[1]}) + "\n")
            out.flush()
            return 0
        return 1
    except Exception as e:
        try:
            out.write(json.dumps(error_reply(None, e)) + "\n")
            out.flush()
        except OSError:
            pass
        return 1
    finally:
        with lock:
            state["keep"] = True     # from here the watcher leaves the files alone
            os.close(fd)
            if not committed:
                remove_temp()
            os.close(dfd)
        if sock is not None:
            sock.close()


def die_with_parent() -> None:
    """SIGKILL when the agent dies (kill -9 included).  PR_SET_PDEATHSIG is enough here,
    unlike for job scripts (see agent/jobguard.py): a helper never starts a process,
    and the agent starts it from its event-loop thread, which lives as long as it."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)   # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:             # it died before the prctl
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent()
    if len(argv) == 3 and argv[0] == "serve":
        return serve(argv[1], argv[2])
    if len(argv) == 3 and argv[0] == "unlink":
        # one-shot, for a big file whose blocks take a while to free (run in the background)
        try:
            print(json.dumps(Worker(argv[1], "").op_unlink(argv[2], missing_ok=True)))
            return 0
        except (Confinement, OSError) as e:
            print(json.dumps(error_reply(None, e)))
            return 1
    if argv[:1] == ["write"]:
        if len(argv) > 2:                # an idle spare: import the checksum module meanwhile
            preload(argv[2:])
        rc = write(int(argv[1]) if len(argv) >= 2 else None)
        sys.stdout.flush()
        # At once: a normal interpreter exit would wait (1 s) for the stdin lock that the
        # watching thread holds in its readline.
        os._exit(rc)
    sys.stderr.write("usage: fsworker.py serve ROOT TAG | unlink ROOT PATH | write [CHANNEL_FD "
                     "[PYPATH...]]  (settings as one JSON line on stdin)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
