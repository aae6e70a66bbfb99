"""One supervised dnsmasq per started PXE server.

dnsmasq runs in the foreground (``-k``) as the agent's child, in its own
session, with its own configuration, pid, lease, log and stderr files in the
server's directory.  Start waits until dnsmasq wrote its pid file (it has
bound its sockets by then) or exited (its stderr names why), so a start that
fails leaves nothing running.  If it dies later, the supervisor starts it
again with a growing backoff.  A dnsmasq left behind by an agent that was
killed is recognised by its pid file and command line, and stopped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable


from agent import errors
from agent.runner import Runner

log = logging.getLogger("node_agent.baremetal.pxe")

READY_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
FS_TIMEOUT = 10.0            # a read of /proc or of the state dir, in the plugin's pool
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
STABLE_SECONDS = 60.0          # a run this long resets the backoff
LOG_ROTATE_BYTES = 10 << 20


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, is not)."""
    import psutil   # lazy, like agent/runner.py: ~2 MB of RSS an agent without PXE never needs
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group(pgid: int) -> list[int]:
    """The live (not zombie) members of a process group (dnsmasq and its lease-script
    helper, which init may have adopted already: a process tree would miss it)."""
    import psutil
    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and _alive(pid):
                out.append(pid)
        except ProcessLookupError:
            continue
    return out


def _cmdline(pid: int) -> str:
    import psutil
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


class Dnsmasq:
    def __init__(self, name: str, binary: str, workdir: Path, runner: Runner,
                 on_change: Callable[[], None] | None = None) -> None:
        self.name = name
        self.runner = runner              # the plugin's bounded pool: /proc and pid-file reads
        self.binary = binary
        self.dir = workdir
        self.conf = workdir / "dnsmasq.conf"
        self.pid_file = workdir / "dnsmasq.pid"
        self.log_file = workdir / "dnsmasq.log"
        self.stderr_file = workdir / "dnsmasq.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.reason: str | None = None       # why it is not running, while it should
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self._on_change = on_change or (lambda: None)

    @property
    def pid(self) -> int | None:
        p = self.proc
        return p.pid if p is not None and p.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # ---- start / stop ------------------------------------------------------------
    def kill_stale(self) -> None:
        """Stop a dnsmasq of this server that a killed agent left behind."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if pid <= 1 or pid == os.getpid() or not _alive(pid) or str(self.conf) not in _cmdline(pid):
            return
        log.warning("PXE server %s: stopping the dnsmasq (pid %d) left by a previous agent",
                    self.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while (_alive(pid) or _group(pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            if _alive(pid) or _group(pid):
                os.killpg(pid, signal.SIGKILL)     # its own session and group: the helper too

    async def _spawn(self) -> asyncio.subprocess.Process:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        fd = os.open(self.stderr_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary, "--keep-in-foreground", f"--conf-file={self.conf}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=fd,
                start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise errors.Unavailable(f"dnsmasq ('{self.binary}') is not installed",
                                     code="PXE.1008") from None
        finally:
            os.close(fd)
        try:
            return await self._wait_ready(proc)
        except BaseException:            # failed, timed out or cancelled: leave nothing running
            await asyncio.shield(self._terminate(proc))
            raise

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.returncode is not None:
                raise errors.OperationFailed(
                    f"dnsmasq of PXE server {self.name} failed to start: {self.stderr_tail()}",
                    code="PXE.1007")
            try:
                if int(self.pid_file.read_text().split()[0]) == proc.pid:
                    return proc
            except (OSError, ValueError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise errors.OperationFailed(
                    f"dnsmasq of PXE server {self.name} did not get ready within "
                    f"{READY_TIMEOUT:g} s: {self.stderr_tail() or 'no error output'}",
                    code="PXE.1007")
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.02)
            except TimeoutError:
                pass

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_file.read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = [ln.removeprefix("dnsmasq: ") for ln in text.splitlines() if ln.strip()]
        return "; ".join(lines[-3:])[:500]

    async def start(self) -> None:
        """Start and supervise; raises (with dnsmasq's own words) if it cannot start."""
        if self.running:
            return
        self._stopping = False
        await self.runner.call(self.kill_stale, timeout=FS_TIMEOUT)
        self.proc = await self._spawn()
        self.reason = None
        log.info("PXE server %s: dnsmasq started (pid %d)", self.name, self.proc.pid)
        self._watch = asyncio.create_task(self._supervise(), name=f"dnsmasq-{self.name}")
        self._on_change()

    def adopt_failure(self, reason: str) -> None:
        """Start failed at agent start-up: keep trying in the background."""
        self._stopping = False
        self.reason = reason
        self._watch = asyncio.create_task(self._supervise(initial_failure=True),
                                          name=f"dnsmasq-{self.name}")

    async def _supervise(self, initial_failure: bool = False) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            if not initial_failure:
                started = time.monotonic()
                proc = self.proc
                assert proc is not None
                rotate = asyncio.create_task(self._rotate_logs(proc))
                try:
                    rc = await proc.wait()
                finally:
                    rotate.cancel()
                if self._stopping:
                    return
                if time.monotonic() - started > STABLE_SECONDS:
                    backoff = BACKOFF_FIRST
                self.reason = (f"dnsmasq exited with {'signal ' + str(-rc) if rc < 0 else 'code ' + str(rc)}"
                               + (f": {self.stderr_tail()}" if self.stderr_tail() else ""))
                log.warning("PXE server %s: %s; restarting it in %.1f s", self.name, self.reason, backoff)
                self._on_change()
            initial_failure = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self._stopping:
                return
            try:
                await self.runner.call(self.kill_stale, timeout=FS_TIMEOUT)
                self.proc = await self._spawn()
            except errors.ApiError as e:
                self.reason = e.description
                log.warning("PXE server %s: %s; retrying in %.1f s", self.name, e.description, backoff)
                initial_failure = True
                continue
            self.restarts += 1
            self.reason = None
            log.info("PXE server %s: dnsmasq restarted (pid %d, restart %d)", self.name,
                     self.proc.pid, self.restarts)
            self._on_change()

    async def _rotate_logs(self, proc: asyncio.subprocess.Process) -> None:
        """log-dhcp is verbose: keep one old log, dnsmasq reopens its log on SIGUSR2."""
        while proc.returncode is None:
            await asyncio.sleep(30)
            try:
                if self.log_file.stat().st_size > LOG_ROTATE_BYTES:
                    os.replace(self.log_file, self.log_file.with_suffix(".log.1"))
                    proc.send_signal(signal.SIGUSR2)
            except (OSError, ProcessLookupError):
                pass

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM dnsmasq; its lease-script helper (same process group, it ignores
        SIGTERM) runs the scripts still queued and exits after it.  Whatever of the
        group is left after STOP_TIMEOUT gets SIGKILL."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_TIMEOUT)
        except TimeoutError:
            pass
        while (left := await self.runner.call(_group, proc.pid, timeout=FS_TIMEOUT)) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if self.proc is not None:
            await self._terminate(self.proc)
            log.info("PXE server %s: dnsmasq stopped", self.name)
        self.reason = None
        self._on_change()

    def reload(self) -> None:
        """Re-read the hosts file (reservations)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
