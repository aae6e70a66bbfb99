"""Runner: real processes and threads, no mocks."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from agent.errors import OperationFailed, Timeout
from agent.runner import ProcessResult, Runner
from conftest import process_gone

# A hang is a bug here: fail fast instead of waiting for the global timeout.
pytestmark = [pytest.mark.timeout(10),
              pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]


@pytest.fixture
def runner():
    r = Runner("test", max_threads=2, max_processes=3)
    yield r
    r.close()


async def _all_gone(pids: list[int], within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return True
        await asyncio.sleep(0.02)
    return False


async def _read_pids(path, count: int, within: float = 2.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().split()
            if len(lines) >= count:
                return [int(x) for x in lines]
        await asyncio.sleep(0.02)
    raise AssertionError(f"script did not write {count} pids to {path}")


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
    [pid] = await _read_pids(pidfile, 1)
    # Our own child: it must be reaped, not even a zombie.
    assert not os.path.exists(f"/proc/{pid}")
    assert runner.stats()["processesRunning"] == 0


async def test_timeout_kills_tree(runner, tmp_path):
    pidfile = tmp_path / "pids"
    with pytest.raises(Timeout):
        await runner.run(_tree_script(pidfile), timeout=0.7)
    pids = await _read_pids(pidfile, 2)
    assert await _all_gone(pids), pids


async def test_timeout_kills_orphan_holding_pipe(runner, tmp_path):
    # The shell exits at once, its background child keeps stdout open.
    pidfile = tmp_path / "pid"
    with pytest.raises(Timeout):
        await runner.run(["bash", "-c", f"sleep 102 & echo $! > {pidfile}"], timeout=0.5)
    pids = await _read_pids(pidfile, 1)
    assert await _all_gone(pids), pids


async def test_timeout_while_flooding_output(runner):
    # The readers are busy (and may be paused on a full buffer) when the kill comes.
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        await runner.run(["cat", "/dev/zero"], timeout=0.3, max_output=100)
    assert time.monotonic() - t0 < 1.0


async def test_timeout_with_escaped_pipe_holder(runner, tmp_path):
    # A double fork + setsid leaves sleep 103 outside the tree, still holding
    # stdout: the run must still end (after the reap grace), not hang.
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    try:
        with pytest.raises(Timeout):
            await runner.run(["bash", "-c", f"(setsid sleep 103 & echo $! > {pidfile}); "
                                            "sleep 30"], timeout=0.3)
        assert time.monotonic() - t0 < 2.0
        assert runner.stats()["processesRunning"] == 0
    finally:
        for pid in await _read_pids(pidfile, 1):
            os.kill(pid, 9)


async def test_cancel_kills_tree(runner, tmp_path):
    pidfile = tmp_path / "pids"
    task = asyncio.create_task(runner.run(_tree_script(pidfile), timeout=30))
    pids = await _read_pids(pidfile, 2)
    assert runner.stats()["processesRunning"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _all_gone(pids), pids
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
    assert 0.55 < elapsed < 1.0, elapsed


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


async def test_close_kills_live_trees(tmp_path):
    r = Runner("c")
    pidfile = tmp_path / "pids"
    task = asyncio.create_task(r.run(_tree_script(pidfile), timeout=30))
    pids = await _read_pids(pidfile, 2)
    r.close()
    res = await task  # killed: the run ends with the SIGKILL return code
    assert res.returncode == -9
    assert await _all_gone(pids), pids

