"""Stopping with requests in flight (issue 11.5), against a real agent process."""

from __future__ import annotations

import asyncio
import signal
import time

from conftest import submit


async def test_stop_with_a_long_poll_in_flight_is_quick_and_answers_503(agent, http):
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "sleep 60", "timeout": 120}})
    assert status == 202, reply

    async def long_poll():
        async with http.get(reply["location"], params={"wait": "60"}, headers=agent.headers) as r:
            return r.status, await r.json()
    poll = asyncio.create_task(long_poll())
    await asyncio.sleep(0.5)                      # the poll now waits in the agent
    assert not poll.done()
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    status, body = await asyncio.wait_for(poll, 10)
    answered = time.monotonic() - t0
    await asyncio.get_running_loop().run_in_executor(None, agent.proc.wait, 15)
    stopped = time.monotonic() - t0
    # the job ended first, so the long-poller got the job's end, not a dropped connection
    assert status == 503, body
    assert body["error"]["code"] == "JOB.1001" and "shutting down" in body["error"]["description"]
    assert answered < 1.0, answered
    # aiohttp's shutdown_timeout is 5 s, and it waited for the poll twice (10 s) before
    assert stopped < 2.0, stopped
    assert agent.proc.returncode == 0
    log = agent.log()
    assert "Traceback" not in log and " ERROR " not in log, log
