"""Job subprocesses die with the agent (issue 11.3), on real agent processes.

kvmRunShell scripts stand for every job subprocess: they all run under the job
guard of agent/runner.py and are recorded in the state database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time

import pytest

from conftest import all_gone, process_gone, read_pids, submit, wait_job

pytestmark = pytest.mark.timeout(90)


def _script(pidfile, marker, delay: float) -> str:
    # The script and a background grandchild both write the side effect later.
    return (f"echo $$ >> {pidfile}\n"
            f"(sleep {delay}; touch {marker}) &\n"
            f"echo $! >> {pidfile}\n"
            f"sleep {delay}\ntouch {marker}\n")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[1])


async def test_kill9_mid_run_shell_kills_the_script_tree(agent, http, tmp_path):
    pidfile, marker = tmp_path / "pids", tmp_path / "marker"
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": _script(pidfile, marker, 2)}})
    assert status == 202, reply
    pids = await read_pids(pidfile, 2, within=10.0)
    agent.kill9()
    assert await all_gone(pids, 1.0), "the script outlived the agent"
    await asyncio.sleep(2.5)
    assert not marker.exists(), "the killed agent's script still ran its side effect"

    agent.start()
    status, body = await wait_job(http, agent, reply["location"], timeout=5)
    assert status != 200 and body["error"]["code"] == "JOB.1001", body
    assert "interrupted" in body["error"]["description"]


async def test_restart_kills_a_leftover_recorded_in_state(agent, http, tmp_path):
    # The guard itself is killed with the agent (as an OOM kill of both would):
    # nothing is left to end the script but the next agent on this state dir.
    pidfile, marker = tmp_path / "pids", tmp_path / "marker"
    delay = 20.0     # longer than a restart takes on a loaded machine
    t0 = time.monotonic()
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": _script(pidfile, marker, delay)}})
    assert status == 202, reply
    shell, child = await read_pids(pidfile, 2, within=10.0)
    guard = _ppid(shell)
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        recorded = [r[0] for r in db.execute("SELECT pid FROM job_processes")]
    assert recorded == [guard]
    os.kill(guard, signal.SIGKILL)
    agent.kill9()
    await asyncio.sleep(0.3)
    assert not process_gone(shell) and not process_gone(child)   # orphans, still running

    agent.start()
    # Killed before the agent answered its first request.
    assert await all_gone([shell, child], 0.2), "a leftover job process survived the restart"
    assert "left running by the previous agent" in agent.log(), agent.log()[-3000:]
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        assert db.execute("SELECT COUNT(*) FROM job_processes").fetchone()[0] == 0
    assert time.monotonic() - t0 < delay, "the restart took longer than the script's sleep"
    await asyncio.sleep(delay + 0.5 - (time.monotonic() - t0))
    assert not marker.exists()
    status, body = await wait_job(http, agent, reply["location"], timeout=5)
    assert body["error"]["code"] == "JOB.1001", body

