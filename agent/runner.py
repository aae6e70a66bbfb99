"""Run blocking calls and subprocesses off the event loop, bounded and with timeouts.

Each plugin owns one Runner: a small thread pool for blocking library calls
(libvirt, rados, filesystem) and a semaphore bounding its subprocesses.  Every
call has a timeout that also covers waiting for a slot.  A subprocess that
times out or whose caller is cancelled is killed together with everything it
spawned, so a stuck job never leaves processes behind.

Every subprocess runs under ``jobguard.py`` (a subreaper that kills its whole
tree when the agent process exits, even by kill -9), and is recorded in the
state database by pid and start time: an agent restarting on that state dir
kills whatever a previous one left behind before it answers (see ProcessLedger).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from agent.errors import OperationFailed, Timeout, Unavailable

log = logging.getLogger("node_agent.runner")

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
    """pid -> (ppid, pgid) of every process."""
    import psutil   # lazy: most agents never kill a tree
    table = {}
    for p in psutil.process_iter(["ppid"]):
        try:
            table[p.pid] = (p.info["ppid"], os.getpgid(p.pid))
        except (ProcessLookupError, PermissionError):  # exited while we were scanning
            continue
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


# The job whose task is running (set by JobManager): its subprocesses run guarded.
IN_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("node_agent_job", default=None)

JOBGUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobguard.py")


def guarded(argv: list[str]) -> list[str]:
    """argv run under the job guard: it and all it spawns die with the agent.

    For subprocesses started outside Runner.run (long-lived helpers): start them
    with start_new_session=True and end them with end_guarded().
    """
    return [sys.executable, "-S", JOBGUARD, str(os.getpid()), *argv]


def end_guarded(pid: int) -> None:
    """Ask a guard to kill and reap its whole tree (it then exits by SIGKILL)."""
    _signal(pid, signal.SIGTERM)


async def _reap(proc: asyncio.subprocess.Process, tasks: list[asyncio.Task]) -> None:
    """Wait for a guard told to end its tree, and for its pipes.

    asyncio reports the exit only once every pipe reached EOF, so the readers
    must keep draining; a reader left paused on a full buffer would hang wait().
    """
    try:
        async with asyncio.timeout(_REAP_GRACE):
            await asyncio.wait(tasks)
            await proc.wait()
    except TimeoutError:
        # The guard did not finish in time (a member stuck in the kernel, or the
        # guard itself stopped): kill everything from here, stop listening.
        kill_tree(proc.pid)
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
        self._guarded: set[int] = set()
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
                  check: bool = False, guard: bool | None = None) -> ProcessResult:
        """Run argv (never a shell string) with a timeout covering the wait for a slot.

        env, if given, replaces the environment.  On timeout or cancellation the
        whole process tree is killed and reaped before Timeout / CancelledError.
        guard: run under the job guard, so the tree dies with the agent (see
        jobguard.py); by default a job's subprocesses are, and the short commands
        of a read (an ``ip addr`` of GET /v1/host) are not: the guard's start
        (a ``python -S``, ~25 ms) would be most of their time.
        """
        if guard is None:
            guard = IN_JOB.get() is not None
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
                    result = await self._spawn(argv, input, max_output, env, cwd, guard)
        except TimeoutError:
            raise Timeout(f"runner {self.name}: {argv[0]} did not finish within "
                          f"{timeout:g} s; its process tree was killed") from None
        if check and result.returncode != 0:
            raise OperationFailed(
                f"{argv[0]} failed with exit code {result.returncode}", code="SYS.1510",
                details=result.stderr[-2000:].decode(errors="replace"))
        return result

    async def _spawn(self, argv: list[str], input: bytes | None, max_output: int,
                     env: dict | None, cwd: str | None, guard: bool) -> ProcessResult:
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *(guarded(argv) if guard else argv), env=env, cwd=cwd,
            start_new_session=True,  # own group: killable as one
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._live[proc.pid] = proc
        if guard:
            self._guarded.add(proc.pid)
            LEDGER.add(proc.pid, self.name, argv[0])
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
            self._end(proc.pid)
            # Shielded so a second cancel cannot leave the pipes and the process behind.
            await asyncio.shield(_reap(proc, tasks))
            raise
        finally:
            self._live.pop(proc.pid, None)
            if guard:
                self._guarded.discard(proc.pid)
                if proc.returncode is not None:
                    LEDGER.remove(proc.pid)
        return ProcessResult(argv, rc, out, err, out_cut, err_cut, time.monotonic() - start)

    def _end(self, pid: int) -> None:
        """A guard is told to end its tree (and reap it); an unguarded tree is killed here."""
        if pid in self._guarded:
            end_guarded(pid)
        else:
            kill_tree(pid)

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
                self._end(proc.pid)
                # Its run() waits for the pipes: bound that wait as the kill path does.
                try:
                    asyncio.get_running_loop().call_later(_REAP_GRACE, _force_end, proc)
                except RuntimeError:
                    kill_tree(proc.pid)


def _force_end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        kill_tree(proc.pid)
    _close_pipes(proc)


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# -- what a previous agent left running ---------------------------------------------------

LEDGER_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS job_processes (
        pid INTEGER PRIMARY KEY,
        start_time REAL NOT NULL,
        runner TEXT NOT NULL,
        command TEXT NOT NULL)""",
]


def start_time(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), None when it is gone."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_start(a: float | None, b: float) -> bool:
    # Both come from /proc/<pid>/stat in clock ticks: equal to well under a tick.
    return a is not None and abs(a - b) < 0.005


def leftovers(pid: int, started: float, before: float) -> set[int]:
    """The processes of a recorded guard that still run: the guard itself if pid still
    names the process started at ``started``, and the members of its session.

    The kernel never reuses a pid while it is still a session id, so the members
    of session ``pid`` are the guard's as long as the guard runs or they do.  Were
    the pid reused after the whole session ended, the new process has another
    start time, and members of a session it made started after it: only members
    started between the guard's start and ``before`` (this agent's start) count.
    """
    import psutil
    found: set[int] = set()
    leader = start_time(pid)
    if leader is not None and not _same_start(leader, started):
        return found                      # pid reused by an unrelated process
    if leader is not None:
        found.add(pid)
    for p in psutil.process_iter(["create_time"]):
        try:
            if os.getsid(p.pid) != pid or p.pid == os.getpid():
                continue
        except OSError:
            continue
        t = p.info["create_time"]
        if t is not None and started - 0.005 <= t <= before:
            found.add(p.pid)
    return found


def kill_leftovers(records: list[tuple[int, float]], before: float) -> list[int]:
    """SIGKILL what the records name (frozen first, so nothing forks meanwhile)."""
    victims: set[int] = set()
    for pid, started in records:
        victims |= leftovers(pid, started, before)
    for p in victims:
        _signal(p, signal.SIGSTOP)
    for p in victims:
        _signal(p, signal.SIGKILL)
    return sorted(victims)


class ProcessLedger:
    """Every running job subprocess, by pid and start time, in the state database.

    Its guard normally kills a tree whose agent died; the ledger covers the rest
    (a guard killed along with the agent, a tree member stuck in the kernel) and
    is swept by the next agent on the same state dir before it serves anything.
    Plain Runners outside an agent (tests, tools) record nothing.
    """

    def __init__(self) -> None:
        self.db = None
        self._pending: set[asyncio.Task] = set()

    async def open(self, db: Any, agent_started: float) -> list[int]:
        await db.migrate(LEDGER_SCHEMA)
        rows = await db.fetchall("SELECT pid, start_time, command FROM job_processes")
        killed: list[int] = []
        if rows:
            killed = await asyncio.to_thread(
                kill_leftovers, [(r["pid"], r["start_time"]) for r in rows], agent_started)
            await db.execute("DELETE FROM job_processes")
            if killed:
                log.warning("killed %d process(es) left running by the previous agent: %s",
                            len(killed), killed)
        self.db = db
        return killed

    def close(self) -> None:
        self.db = None

    def add(self, pid: int, runner: str, command: str) -> None:
        started = start_time(pid)
        if started is not None:
            self._write("INSERT OR REPLACE INTO job_processes(pid, start_time, runner, command) "
                        "VALUES(?,?,?,?)", (pid, started, runner, os.path.basename(command)))

    def remove(self, pid: int) -> None:
        self._write("DELETE FROM job_processes WHERE pid=?", (pid,))

    def _write(self, sql: str, params: tuple) -> None:
        if self.db is None:
            return
        # Fire and forget, in order (one database thread): a spawn never waits for
        # a disk write, and the guard protects the tree until the row lands.
        task = asyncio.get_running_loop().create_task(self._run(self.db, sql, params))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _run(db: Any, sql: str, params: tuple) -> None:
        try:
            await db.execute(sql, params)
        except Exception:
            log.exception("could not record a job process")


LEDGER = ProcessLedger()
