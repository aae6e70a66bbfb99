"""Runner: real processes and threads, no mocks."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from agent.errors import OperationFailed, Timeout
from agent.runner import ProcessResult, Runner
from conftest import all_gone, process_gone, read_pids

# A hang is a bug here: fail fast instead of waiting for the global timeout.
pytestmark = [pytest.mark.timeout(10),
              pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]


class _Runner(Runner):
    """A Runner whose run() defaults to one guard mode (agent.runner: jobs run guarded)."""

    def __init__(self, *args, guard: bool, **kw) -> None:
        super().__init__(*args, **kw)
        self.guard = guard

    async def run(self, argv, **kw):
        kw.setdefault("guard", self.guard)
        return await super().run(argv, **kw)


@pytest.fixture(params=[False, True], ids=["direct", "guarded"])
def runner(request):
    r = _Runner("test", max_threads=2, max_processes=3, guard=request.param)
    yield r
    r.close()


# A parent with a child in its group and a child that setsid'd into its own.
def _tree_script(pidfile) -> list[str]:
    return ["bash", "-c", f"sleep 100 & echo $! >> {pidfile}; "
                          f"setsid sleep 101 & echo $! >> {pidfile}; wait"]


async def test_run_normal(runner):
    res = await runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=5)
    assert isinstance(res, ProcessResult)
    assert res.argv[0] == "sh"
    assert (res.returncode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
    assert not res.stdout_truncated and not res.stderr_truncated
    assert 0 <= res.duration < 5
    assert runner.stats()["processesRunning"] == 0


async def test_run_input_env_cwd(runner, tmp_path):
    res = await runner.run(["cat"], timeout=5, input=b"hello")
    assert res.stdout == b"hello"
    # Large input and output at once must not deadlock on the pipes.
    big = os.urandom(3 << 20)
    res = await runner.run(["cat"], timeout=5, input=big, max_output=4 << 20)
    assert res.stdout == big
    res = await runner.run(["sh", "-c", "echo $FOO; pwd"], timeout=5,
                           env={"FOO": "bar", "PATH": os.environ["PATH"]}, cwd=str(tmp_path))
    assert res.stdout.decode().split() == ["bar", str(tmp_path)]


async def test_output_capped(runner):
    t0 = time.monotonic()
    res = await runner.run(["bash", "-c", "head -c 10000000 /dev/zero; "
                                          "head -c 5000000 /dev/zero >&2"],
                           timeout=5, max_output=1000)
    assert time.monotonic() - t0 < 5
    assert res.returncode == 0
    assert len(res.stdout) == 1000 and res.stdout_truncated
    assert len(res.stderr) == 1000 and res.stderr_truncated


async def test_timeout_kills(runner, tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(Timeout) as ei:
        await runner.run(["bash", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - t0 < 1.0
    assert "0.5" in ei.value.description and "bash" in ei.value.description
    [pid] = await read_pids(pidfile, 1)
    # Our own child: it must be reaped, not even a zombie.
    assert not os.path.exists(f"/proc/{pid}")
    assert runner.stats()["processesRunning"] == 0


async def test_timeout_kills_tree(runner, tmp_path):
    pidfile = tmp_path / "pids"
    with pytest.raises(Timeout):
        await runner.run(_tree_script(pidfile), timeout=0.7)
    pids = await read_pids(pidfile, 2)
    assert await all_gone(pids), pids


async def test_timeout_kills_orphan_holding_pipe(runner, tmp_path):
    # The shell exits at once, its background child keeps stdout open.
    pidfile = tmp_path / "pid"
    with pytest.raises(Timeout):
        await runner.run(["bash", "-c", f"sleep 102 & echo $! > {pidfile}"], timeout=0.5)
    pids = await read_pids(pidfile, 1)
    assert await all_gone(pids), pids


async def test_timeout_while_flooding_output(runner):
    # The readers are busy (and may be paused on a full buffer) when the kill comes.
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        await runner.run(["cat", "/dev/zero"], timeout=0.3, max_output=100)
    assert time.monotonic() - t0 < 1.0


async def test_timeout_with_escaped_pipe_holder(runner, tmp_path):
    # A double fork + setsid takes sleep 103 out of the group and the parentage,
    # still holding stdout: the run must still end (after the reap grace), not hang;
    # under the job guard (a subreaper, which adopts it) it dies too.
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    try:
        with pytest.raises(Timeout):
            await runner.run(["bash", "-c", f"(setsid sleep 103 & echo $! > {pidfile}); "
                                            "sleep 30"], timeout=0.3)
        assert time.monotonic() - t0 < 2.0
        assert runner.stats()["processesRunning"] == 0
        if runner.guard:
            assert await all_gone(await read_pids(pidfile, 1))
    finally:
        for pid in await read_pids(pidfile, 1):
            if not process_gone(pid):
                os.kill(pid, 9)


async def test_cancel_kills_tree(runner, tmp_path):
    pidfile = tmp_path / "pids"
    task = asyncio.create_task(runner.run(_tree_script(pidfile), timeout=30))
    pids = await read_pids(pidfile, 2)
    assert runner.stats()["processesRunning"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_gone(pids), pids
    assert runner.stats()["processesRunning"] == 0


async def test_check_raises(runner):
    with pytest.raises(OperationFailed) as ei:
        await runner.run(["sh", "-c", "echo x >&2; head -c 5000 /dev/zero | tr '\\0' y >&2; "
                                      "echo boom >&2; exit 7"], timeout=5, check=True)
    err = ei.value
    assert err.code == "SYS.1510"
    assert "sh" in err.description and "7" in err.description
    assert len(err.details) == 2000 and err.details.endswith("boom\n")
    assert (await runner.run(["true"], timeout=5, check=True)).returncode == 0


async def test_str_argv_rejected(runner):
    with pytest.raises(TypeError):
        await runner.run("echo hi", timeout=5)
    with pytest.raises(TypeError):
        await runner.run(b"echo hi", timeout=5)


async def test_max_processes(runner):
    t0 = time.monotonic()
    results = await asyncio.gather(*(runner.run(["sleep", "0.3"], timeout=5) for _ in range(6)))
    elapsed = time.monotonic() - t0
    assert all(r.returncode == 0 for r in results)
    # Two waves of 0.3 s; a guard's start (a python -S) adds to each on a busy machine.
    assert 0.55 < elapsed < (2.0 if runner.guard else 1.0), elapsed


async def test_process_queue_counts_against_timeout():
    r = Runner("q", max_processes=1)
    try:
        first = asyncio.create_task(r.run(["sleep", "1"], timeout=5))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            await r.run(["true"], timeout=0.3)
        assert time.monotonic() - t0 < 0.6
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        r.close()


async def test_call_returns_and_raises(runner):
    assert await runner.call(lambda a, b=0: a + b, 1, b=2, timeout=1) == 3
    with pytest.raises(ZeroDivisionError):
        await runner.call(lambda: 1 / 0, timeout=1)


async def test_call_timeout_frees_caller_loop_stays_responsive(runner):
    worst = 0.0
    stop = False

    async def ticker():
        nonlocal worst
        while not stop:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - t)

    tick = asyncio.create_task(ticker())
    t0 = time.monotonic()
    with pytest.raises(Timeout) as ei:
        await runner.call(time.sleep, 1.0, timeout=0.2)
    elapsed = time.monotonic() - t0
    stop = True
    await tick
    assert elapsed < 0.4, elapsed
    assert worst < 0.06, worst
    d = ei.value.description
    assert "test" in d and "sleep" in d and "0.2" in d


async def test_call_bounded_by_max_threads(runner):
    seen = []

    async def watch():
        for _ in range(20):
            seen.append(runner.stats()["threadsBusy"])
            await asyncio.sleep(0.02)

    t0 = time.monotonic()
    await asyncio.gather(watch(), *(runner.call(time.sleep, 0.3, timeout=5) for _ in range(4)))
    elapsed = time.monotonic() - t0
    assert 0.55 < elapsed < 0.9, elapsed
    assert max(seen) == 2
    assert runner.stats() == {"name": "test", "threadsBusy": 0, "threadsMax": 2,
                              "processesRunning": 0, "processesMax": 3}


async def test_call_queue_counts_against_timeout():
    r = Runner("q", max_threads=1)
    ran = []
    try:
        busy = asyncio.create_task(r.call(time.sleep, 0.4, timeout=5))
        await asyncio.sleep(0.02)
        with pytest.raises(Timeout):
            await r.call(ran.append, 1, timeout=0.1)
        await busy
        await asyncio.sleep(0.05)
        assert ran == []  # the queued call was dropped, never run
    finally:
        r.close()


@pytest.mark.parametrize("guard", [False, True], ids=["direct", "guarded"])
async def test_close_kills_live_trees(tmp_path, guard):
    r = _Runner("c", guard=guard)
    pidfile = tmp_path / "pids"
    task = asyncio.create_task(r.run(_tree_script(pidfile), timeout=30))
    pids = await read_pids(pidfile, 2)
    r.close()
    res = await task  # killed: the run ends with the SIGKILL return code
    assert res.returncode == -9
    assert await all_gone(pids), pids



async def test_signal_death_and_missing_command(runner):
    # The job guard passes the command's end through unchanged.
    res = await runner.run(["sh", "-c", "kill -TERM $$"], timeout=5)
    assert res.returncode == -15
    if runner.guard:     # like a shell: 127 and the reason
        res = await runner.run(["/nonexistent/cmd"], timeout=5)
        assert res.returncode == 127 and b"cannot execute /nonexistent/cmd" in res.stderr
    else:
        with pytest.raises(FileNotFoundError):
            await runner.run(["/nonexistent/cmd"], timeout=5)


async def test_job_subprocesses_run_guarded_by_default(tmp_path):
    from agent.runner import IN_JOB
    r = Runner("t")
    try:
        script = ["bash", "-c", "cat /proc/$PPID/cmdline"]
        assert b"jobguard.py" not in (await r.run(script, timeout=5)).stdout

        async def in_a_job():
            IN_JOB.set("a" * 32)
            return (await r.run(script, timeout=5)).stdout
        assert b"jobguard.py" in await asyncio.create_task(in_a_job())
        assert IN_JOB.get() is None          # the job's task had its own context
    finally:
        r.close()


async def test_unread_input_does_not_block(runner):
    # The guard must not hold stdin open: a child that never reads ends the run.
    res = await runner.run(["true"], input=b"x" * (4 << 20), timeout=5)
    assert res.returncode == 0


async def test_background_child_output_is_waited_for(runner):
    res = await runner.run(["bash", "-c", "(sleep 0.3; echo late) &"], timeout=5)
    assert (res.returncode, res.stdout) == (0, b"late\n")


_FAKE_AGENT = """
import asyncio, sys
from agent.runner import Runner
async def main():
    await Runner("t").run(["bash", "-c", sys.argv[1]], timeout=60, guard=True)
asyncio.run(main())
"""


async def test_tree_dies_with_its_agent(tmp_path):
    # An agent killed with -9 cannot kill anything: the guard must, for the
    # script, its background grandchild and one that setsid'd away.
    marker, pidfile = tmp_path / "marker", tmp_path / "pids"
    script = (f"(sleep 1.5; touch {marker}) & echo $! >> {pidfile}; "
              f"setsid bash -c 'sleep 1.5; touch {marker}' & echo $! >> {pidfile}; "
              f"echo $$ >> {pidfile}; sleep 1.5; touch {marker}")
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FAKE_AGENT, script,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        pids = await read_pids(pidfile, 3)
        agent.kill()
        await agent.wait()
        assert await all_gone(pids), pids
        await asyncio.sleep(2.0)
        assert not marker.exists()
    finally:
        if agent.returncode is None:
            agent.kill()


async def test_leftover_needs_the_recorded_start_time(tmp_path):
    # A pid cannot be made to be reused on demand; what protects a reused pid is
    # the start-time check, tested here on a real live process.
    from agent.db import Database
    from agent.runner import LEDGER_SCHEMA, ProcessLedger, start_time
    import subprocess
    lookalike = subprocess.Popen(["sleep", "30"], start_new_session=True)
    leftover = subprocess.Popen(["bash", "-c", "sleep 31 & wait"], start_new_session=True)
    db = Database(tmp_path / "state.db")
    await db.open()
    try:
        await db.migrate(LEDGER_SCHEMA)
        await db.execute("INSERT INTO job_processes VALUES(?,?,?,?)",
                         (lookalike.pid, start_time(lookalike.pid) - 3.0, "t", "sleep"))
        await db.execute("INSERT INTO job_processes VALUES(?,?,?,?)",
                         (leftover.pid, start_time(leftover.pid), "t", "bash"))
        await asyncio.sleep(0.1)   # the bash's sleep has started
        [grandchild] = [int(p) for p in open(f"/proc/{leftover.pid}/task/{leftover.pid}/children").read().split()]
        killed = await ProcessLedger().open(db, time.time())
        assert sorted(killed) == sorted([leftover.pid, grandchild])
        assert leftover.wait(2) == -9
        assert await all_gone([grandchild])
        assert lookalike.poll() is None, "a process with another start time was killed"
        assert await db.fetchall("SELECT * FROM job_processes") == []
    finally:
        await db.close()
        for p in (lookalike, leftover):
            p.kill()
            p.wait()


def test_host_load_reads_this_host():
    from agent.metrics import read_host_load
    load = read_host_load()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert load["mem_total"] == total and 0 < load["mem_available"] <= total
    with open("/proc/stat") as f:
        idle = int(f.readline().split()[4]) / os.sysconf("SC_CLK_TCK")
    assert idle <= load["cpu_idle"] < idle + 5
    assert load["load1"] == pytest.approx(os.getloadavg()[0], abs=5)


async def test_a_daemon_that_let_go_of_the_output_does_not_hold_the_job(runner, tmp_path):
    # mount.nfs starting rpc.statd: the command ends, its daemon (output closed) stays.
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    res = await runner.run(["bash", "-c", f"setsid sleep 30 </dev/null >/dev/null 2>&1 & "
                                          f"echo $! > {pidfile}; echo done"], timeout=10)
    try:
        assert (res.returncode, res.stdout) == (0, b"done\n")
        assert time.monotonic() - t0 < 2.0
        [daemon] = await read_pids(pidfile, 1)
        assert not process_gone(daemon)
    finally:
        for pid in await read_pids(pidfile, 1):
            if not process_gone(pid):
                os.kill(pid, 9)
