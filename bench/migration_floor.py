#!/usr/bin/env python3
"""What this machine allows for a volume moved over TCP, next to `cp`: the floor under
the agent's migration (issue 4: at least 0.8x cp).

The same 1 GiB file, half holes (1 MiB of data every 2 MiB, as bench/storage_bench.py),
under /dev/shm, copied in the same run by:

* ``cp``: ``cp --sparse=always --reflink=never`` (storage_bench's baseline);
* ``tcp-1``: a sender process ``sendfile``s each data extent over loopback TCP to a
  receiver that ``recv_into`` one buffer and ``pwrite``s it: the least any
  network copy does, in one thread, with no hashing, no HTTP, no job;
* ``tcp-2``: the same with the receiver's writes in a second thread (4 buffers), as the
  agent's writer does, so that receiving and writing overlap;
* ``tcp-2+hash``: tcp-2 plus what the migration must add: xxh3-128 of the data on both
  sides (the sender hashes its file with ``pread`` in a thread beside ``sendfile``).

No agent runs here: these are lower bounds for any agent-to-agent transfer on this
machine. Rounds alternate; medians are reported and appended to bench/RESULTS.md
(``--no-append`` to skip).

    .venv/bin/python bench/migration_floor.py            # about 30 s
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import xxhash

from benchlib import cpu_model, fill_half_holes

GIB = 1 << 30
CHUNK = 1 << 20
RESULTS = Path(__file__).with_name("RESULTS.md")


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        off = end
    return out


def sender(port: int, src: Path, hashing: bool) -> None:
    """The child: send every data extent as (offset, length) + bytes."""
    sock = socket.create_connection(("127.0.0.1", port))
    fd = os.open(src, os.O_RDONLY)
    size = os.fstat(fd).st_size
    exts = data_extents(fd, size)
    hasher = None
    if hashing:
        def hash_all() -> None:
            h, buf = xxhash.xxh3_128(), bytearray(CHUNK)
            for off, length in exts:
                for pos in range(off, off + length, CHUNK):
                    n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, off + length - pos)]], pos)
                    h.update(memoryview(buf)[:n])
        hasher = threading.Thread(target=hash_all)
        hasher.start()
    for off, length in exts:
        sock.sendall(off.to_bytes(8, "little") + length.to_bytes(8, "little"))
        sent = 0
        while sent < length:
            sent += os.sendfile(sock.fileno(), fd, off + sent, length - sent)
    sock.sendall(size.to_bytes(8, "little") + (0).to_bytes(8, "little"))
    if hasher:
        hasher.join()
    sock.close()


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n


def receive(sock: socket.socket, fd: int, threads: int, hashing: bool) -> None:
    head = bytearray(16)
    h = xxhash.xxh3_128() if hashing else None
    if threads == 1:
        buf = memoryview(bytearray(CHUNK))
        while True:
            recv_exact(sock, memoryview(head))
            off, length = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
            if not length:
                os.ftruncate(fd, off)
                return
            while length:
                n = sock.recv_into(buf, min(CHUNK, length))
                if not n:
                    raise EOFError
                os.pwrite(fd, buf[:n], off)
                if h:
                    h.update(buf[:n])
                off += n
                length -= n
    free: queue.SimpleQueue = queue.SimpleQueue()
    ready: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(4):
        free.put(bytearray(CHUNK))

    def sink() -> None:
        while (item := ready.get()) is not None:
            buf, n, off = item
            view = memoryview(buf)[:n]
            if h:
                h.update(view)
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:], off + done)
            free.put(buf)
    writer = threading.Thread(target=sink)
    writer.start()
    while True:
        recv_exact(sock, memoryview(head))
        off, length = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        if not length:
            ready.put(None)
            writer.join()
            os.ftruncate(fd, off)
            return
        while length:
            buf = free.get()
            n = sock.recv_into(buf, min(CHUNK, length))
            if not n:
                raise EOFError
            ready.put((buf, n, off))
            off += n
            length -= n


def run_tcp(src: Path, dst: Path, threads: int, hashing: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of sender + receiver)."""
    wall, receiver, sender = run_tcp_split(src, dst, threads, hashing)
    return wall, receiver + sender


def run_tcp_split(src: Path, dst: Path, threads: int, hashing: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the receiver, of the sender): the receiver is this
    process, the sender a forked child."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    before = resource.getrusage(resource.RUSAGE_SELF)
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            sender(port, src, hashing)
        finally:
            os._exit(0)
    conn, _ = listener.accept()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        receive(conn, fd, threads, hashing)
        os.fsync(fd)
    finally:
        os.close(fd)
        conn.close()
        listener.close()
    os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
            kids.ru_utime - kids_before.ru_utime + kids.ru_stime - kids_before.ru_stime)


def run_cp(src: Path, dst: Path) -> tuple[float, float]:
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", "--reflink=never", str(src), str(dst)], check=True)
    wall = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (kids.ru_utime - kids_before.ru_utime + kids.ru_stime - kids_before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir) / f"migration-floor-{os.getpid()}"
    work.mkdir()
    runs: dict[str, list[tuple[float, float]]] = {"cp": [], "tcp-1": [], "tcp-2": [], "tcp-2+hash": []}
    load0 = os.getloadavg()[0]
    try:
        src = work / "src.raw"
        fill_half_holes(src, GIB)
        for _ in range(args.rounds):
            for name in runs:
                dst = work / f"dst-{name}.raw"
                if name == "cp":
                    runs[name].append(run_cp(src, dst))
                else:
                    runs[name].append(run_tcp(src, dst, 1 if name == "tcp-1" else 2,
                                              name.endswith("hash")))
                assert os.stat(dst).st_blocks * 512 <= GIB // 2 + (8 << 20), "holes were filled"
                dst.unlink()
                time.sleep(0.3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp_wall = statistics.median(w for w, _ in runs["cp"])
    lines = [
        f"### Migration floor, run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`bench/migration_floor.py`: 1 GiB, half holes, under {args.dir}; {args.rounds} alternating "
        f"rounds, medians. Machine: nproc {os.cpu_count()}, {cpu_model()}, kernel "
        f"{platform.release()}, Python {platform.python_version()}; load average {load0:.2f} at "
        f"start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| contender | median s | runs (s) | CPU-s (median) | throughput vs cp |",
        "|---|---:|---|---:|---:|",
    ]
    for name, values in runs.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        lines.append(f"| {name} | {wall:.3f} | {' / '.join(f'{w:.2f}' for w, _ in values)} | "
                     f"{cpu:.2f} | {cp_wall / wall:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + report)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
