"""The guard every job subprocess runs under, so that it dies with the agent.

    python -S jobguard.py <agent pid> <command> [args...]

Started by the agent in a new session; it runs the command as its child and
stays until the command has exited and nothing it spawned holds the job's
output any more (what the agent waits for too).  It is a child
subreaper (PR_SET_CHILD_SUBREAPER): a grandchild whose parent exits, even one
that double-forked and setsid'd away, is re-parented to the guard instead of
init, so the whole tree stays below it.  It watches the agent with a pidfd,
which reports the agent *process* exiting (a kill -9 included), unlike
PR_SET_PDEATHSIG, which fires on the exit of the forking thread and is not
inherited by the command's own children.  When the agent is gone, or on
SIGTERM (the agent ending a job), it freezes and kills the tree, reaps it and
exits by SIGKILL, so the agent sees the same -9 as for a direct kill.

Stdlib only and started with -S: it costs a few milliseconds per process.
The command's exit status is the guard's (a signal death is re-raised); a
command that cannot be executed exits 127 with the reason on stderr.
"""

from __future__ import annotations

import ctypes
import os
import select
import stat
import _signal as signal   # the C module: signal.py would import enum (startup time)
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
_REAP_LIMIT = 5.0   # a process stuck in the kernel (a hung NFS) cannot be waited for


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def _descendants() -> set[int]:
    found: set[int] = set()
    stack = _children(os.getpid())
    while stack:
        p = stack.pop()
        if p not in found:
            found.add(p)
            stack += _children(p)
    return found


def _pipe_inodes() -> set[int]:
    """The pipes of our stdout and stderr: the agent reads the job's output from them."""
    found = set()
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode):
            found.add(st.st_ino)
    return found


def _holds_pipe(pid: int, pipes: set[int]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("pipe:[") and int(link[6:-1]) in pipes:
            return True
    return False


def _kill_all() -> None:
    """Freeze the tree (no new forks between scan and kill), then kill every member."""
    stopped: set[int] = set()
    for _ in range(20):
        new = _descendants() - stopped
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except OSError:
                pass
        stopped |= new
    for p in stopped | _descendants():
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _reap_all(deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            _kill_all()             # re-parented orphans show up here too
            time.sleep(0.01)


def _die() -> None:
    _kill_all()
    _reap_all(time.monotonic() + _REAP_LIMIT)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    agent_pid, argv = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write("jobguard: PR_SET_CHILD_SUBREAPER failed\n")
        sys.exit(126)
    try:
        agent = os.pidfd_open(agent_pid)
    except ProcessLookupError:
        sys.exit(137)
    if os.getppid() != agent_pid:       # the agent died before we watched it
        sys.exit(137)

    # SIGCHLD and SIGTERM wake the select below through this pipe.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    terminate = []
    signal.signal(signal.SIGTERM, lambda *_: terminate.append(1))

    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        os.close(err_r)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(err_w, f"{e.errno}".encode())
        os._exit(127)
    os.close(err_w)
    failed = os.read(err_r, 32)
    os.close(err_r)
    if failed:
        code = int(failed)
        sys.stderr.write(f"jobguard: cannot execute {argv[0]}: {os.strerror(code)}\n")
    # The command owns stdin/stdout/stderr: holding them would keep a writer
    # blocked on a full stdin pipe, or the agent's readers from seeing EOF.
    pipes = _pipe_inodes()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    # The job lasts while the command runs and while anything it started holds its
    # output (the agent waits for EOF too).  A daemon it started that let go of
    # the output (mount.nfs starting rpc.statd) is not the job's: once the command
    # has exited, the guard leaves it (to init) instead of waiting for it.
    status = None
    while True:
        if terminate:
            _die()
        if status is not None and not any(_holds_pipe(p, pipes) for p in _descendants()):
            _exit_like(status)
        try:
            ready, _, _ = select.select([agent, wake_r], [], [],
                                       None if status is None else 0.1)
        except InterruptedError:
            continue
        if agent in ready:
            _die()
        try:
            os.read(wake_r, 512)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                _exit_like(status)
            if pid == 0:
                break
            if pid == child:
                status = st


def _exit_like(status: int | None) -> None:
    if status is None:
        os._exit(127)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)        # a signal that does not kill by default
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        os._exit(130)
