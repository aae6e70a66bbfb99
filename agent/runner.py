"""Run blocking calls and subprocesses off the event loop, bounded and with timeouts.

Each plugin owns one Runner: a small thread pool for blocking library calls
(libvirt, rados, filesystem) and a semaphore bounding its subprocesses.  Every
call has a timeout that also covers waiting for a slot.  A subprocess that
times out or whose caller is cancelled is killed together with everything it
spawned, so a stuck job never leaves processes behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from agent.errors import OperationFailed, Timeout, Unavailable

_READ_CHUNK = 64 * 1024
_REAP_GRACE = 1.0  # after SIGKILL, pipes normally reach EOF at once


@dataclass
class ProcessResult:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration: float


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process, read from /proc/<pid>/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # exited while we were scanning
            continue
        # The command name (field 2) may hold spaces or ')': split after the last ')'.
        fields = data[data.rindex(b")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _tree(pid: int, table: dict[int, tuple[int, int]]) -> set[int]:
    """pid, the members of its process group, and all their descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for p, (ppid, _) in table.items():
        children[ppid].append(p)
    # Group members count even when orphaned (their parent died, ppid is now init).
    found = {p for p, (_, pgid) in table.items() if pgid == pid}
    if pid in table:
        found.add(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL pid's process group and every descendant, even those that setsid'd away.

    Synchronous: /proc lives in memory, so the scan takes milliseconds, and doing
    it inline means the kill happens even while the caller is being cancelled.
    """
    if pid <= 1 or pid == os.getpid():
        raise ValueError(f"refusing to kill the process tree of pid {pid}")
    # Freeze first so nothing forks new children between the scan and the kill;
    # rescan until no new process shows up (bounded, in case of a fork storm).
    stopped: set[int] = set()
    for _ in range(10):
        new = _tree(pid, _proc_table()) - stopped
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        stopped |= new
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in stopped:
        _signal(p, signal.SIGKILL)  # a stopped process still dies on SIGKILL


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    buf = bytearray()
    truncated = False
    # Keep draining past the cap: a child blocked on a full pipe would never exit.
    while chunk := await stream.read(_READ_CHUNK):
        room = cap - len(buf)
        if len(chunk) > room:
            truncated = True
            chunk = chunk[:max(room, 0)]
        buf += chunk
    return bytes(buf), truncated


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    try:
        stdin.write(data)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child exited or closed stdin without reading everything
    finally:
        stdin.close()


async def _reap(proc: asyncio.subprocess.Process, tasks: list[asyncio.Task]) -> None:
    """Wait for a killed process and its pipes.

    asyncio reports the exit only once every pipe reached EOF, so the readers
    must keep draining; a reader left paused on a full buffer would hang wait().
    """
    try:
        async with asyncio.timeout(_REAP_GRACE):
            await asyncio.wait(tasks)
            await proc.wait()
    except TimeoutError:
        # Something outside the tree still holds a pipe: stop listening to it.
        for t in tasks:
            t.cancel()
        _close_pipes(proc)
        await proc.wait()


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    transport = getattr(proc, "_transport", None)   # no public API closes a Process's pipes
    if transport is not None and not transport.is_closing():
        transport.close()


class Runner:
    def __init__(self, name: str, *, max_threads: int = 4, max_processes: int = 8) -> None:
        self.name = name
        self._max_threads = max_threads
        self._max_processes = max_processes
        self._pool = ThreadPoolExecutor(max_workers=max_threads,
                                        thread_name_prefix=f"runner-{name}")
        self._procs = asyncio.Semaphore(max_processes)
        self._live: dict[int, asyncio.subprocess.Process] = {}
        self._busy = 0
        self._lock = threading.Lock()
        self._closed = False

    async def call(self, fn: Callable[..., Any], /, *args: Any, timeout: float,
                   **kwargs: Any) -> Any:
        """Run blocking fn in the bounded thread pool; timeout covers queueing too.

        On timeout the caller is freed with Timeout; a thread already running fn
        cannot be killed and is abandoned (it keeps its pool slot until fn returns).
        """
        if self._closed:
            raise Unavailable(f"runner {self.name} is closed")
        ctx = contextvars.copy_context()  # keep log/request context in the thread
        work = functools.partial(ctx.run, self._counted, fn, args, kwargs)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, work)
        try:
            # Cancelling a still-queued future also cancels it in the pool.
            # asyncio.timeout, not wait_for: 3.11's wait_for may swallow a cancel.
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise Timeout(f"runner {self.name}: {_fn_name(fn)} did not finish within "
                          f"{timeout:g} s") from None

    def _counted(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with self._lock:
            self._busy += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1

    async def run(self, argv: list[str], *, timeout: float, input: bytes | None = None,
                  max_output: int = 1 << 20, env: dict | None = None, cwd: str | None = None,
                  check: bool = False) -> ProcessResult:
        """Run argv (never a shell string) with a timeout covering the wait for a slot.

        env, if given, replaces the environment.  On timeout or cancellation the
        whole process tree is killed and reaped before Timeout / CancelledError.
        """
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not a shell string")
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise ValueError("argv is empty")
        if self._closed:
            raise Unavailable(f"runner {self.name} is closed")
        try:
            async with asyncio.timeout(timeout):
                async with self._procs:
                    result = await self._spawn(argv, input, max_output, env, cwd)
        except TimeoutError:
            raise Timeout(f"runner {self.name}: {argv[0]} did not finish within "
                          f"{timeout:g} s; its process tree was killed") from None
        if check and result.returncode != 0:
            raise OperationFailed(
                f"{argv[0]} failed with exit code {result.returncode}", code="SYS.1510",
                details=result.stderr[-2000:].decode(errors="replace"))
        return result

    async def _spawn(self, argv: list[str], input: bytes | None, max_output: int,
                     env: dict | None, cwd: str | None) -> ProcessResult:
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, start_new_session=True,  # own group: killable as one
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._live[proc.pid] = proc
        tasks = [asyncio.ensure_future(_read_capped(proc.stdout, max_output)),
                 asyncio.ensure_future(_read_capped(proc.stderr, max_output))]
        if input is not None:
            tasks.append(asyncio.ensure_future(_feed(proc.stdin, input)))
        try:
            # asyncio.wait, unlike gather, leaves the readers running if we are
            # cancelled: they must keep draining for the kill path below.
            await asyncio.wait(tasks)
            (out, out_cut), (err, err_cut) = tasks[0].result(), tasks[1].result()
            # A grandchild holding a pipe open keeps us waiting above: on purpose,
            # it ends in a timeout that kills the grandchild too.
            rc = await proc.wait()
        except BaseException:  # timeout (a cancel from asyncio.timeout) or cancellation
            kill_tree(proc.pid)
            # Shielded so a second cancel cannot leave the pipes and the process behind.
            await asyncio.shield(_reap(proc, tasks))
            raise
        finally:
            self._live.pop(proc.pid, None)
        return ProcessResult(argv, rc, out, err, out_cut, err_cut, time.monotonic() - start)

    def stats(self) -> dict:
        return {"name": self.name, "threadsBusy": self._busy,
                "threadsMax": self._max_threads, "processesRunning": len(self._live),
                "processesMax": self._max_processes}

    def close(self) -> None:
        """Stop accepting work, drop queued calls, kill live process trees."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self._live.values()):
            if proc.returncode is None:
                kill_tree(proc.pid)
                # Its run() waits for the pipes: bound that wait as the kill path does.
                try:
                    asyncio.get_running_loop().call_later(_REAP_GRACE, _close_pipes, proc)
                except RuntimeError:
                    pass


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
