"""Two real Ceph clusters side by side: one dead cluster slows nothing on the other.

The session cluster (ceph_fixture) stays healthy; a second micro cluster is
started for this module, registered on the same agent, and its mon is stopped
while 20 capacity calls are in flight on it (issue 11.2).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agentproc import AgentProcess
from ceph_fixture import MicroCeph, ceph_cluster, free_port_pair  # noqa: F401 (fixture)
from test_ceph import PS, TIMEOUTS, get, sync_job

MON_OP = TIMEOUTS["mon_op_timeout"]


@pytest.fixture(scope="module")
def second_cluster():
    c = MicroCeph(Path(f"/tmp/node-agent-ceph2-{os.getpid()}"), free_port_pair())
    c.purge()
    c.start()
    yield c
    c.purge()


@pytest.fixture(scope="module")
def two_storages(tmp_path_factory, ceph_cluster, second_cluster):  # noqa: F811
    a = AgentProcess(tmp_path_factory.mktemp("ceph-iso-agent"), {"ceph": TIMEOUTS}).start()
    out = []
    for name, c in (("healthy", ceph_cluster), ("doomed", second_cluster)):
        status, body = sync_job(a, "POST", PS, {"params": {
            "name": name, "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key,
            "rootVolumePoolName": f"iso-{name}-root", "dataVolumePoolName": f"iso-{name}-data",
            "imageCachePoolName": f"iso-{name}-cache"}})
        assert status == 200, body
        out.append(body["inventory"]["uuid"])
    yield a, out[0], out[1]
    a.stop()


async def timed_get(http, agent, path):
    t = time.monotonic()
    status, body = await get(http, agent, path)
    return time.monotonic() - t, status, body


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


async def test_dead_cluster_fails_fast_and_healthy_one_stays_fast(two_storages, second_cluster, http):
    agent, healthy, doomed = two_storages
    for u in (healthy, doomed):
        took, status, body = await timed_get(http, agent, f"{PS}/{u}/capacity")
        assert status == 200, body
    base = [(await timed_get(http, agent, f"{PS}/{healthy}/capacity"))[0] for _ in range(20)]

    await asyncio.to_thread(second_cluster.script, "stop-mon", "a")
    try:
        t0 = time.monotonic()
        dead_calls = [asyncio.create_task(timed_get(http, agent, f"{PS}/{doomed}/capacity"))
                      for _ in range(20)]
        await asyncio.sleep(0.2)           # all 20 are in flight on the dead cluster
        during: list[float] = []
        while not all(t.done() for t in dead_calls) or len(during) < 20:
            took, status, body = await timed_get(http, agent, f"{PS}/{healthy}/capacity")
            assert status == 200, body
            during.append(took)
        dead = [t.result() for t in dead_calls]
        # all 20 answered within one call's bound (mon op timeout + margin), not queued
        assert time.monotonic() - t0 < MON_OP + 1.5, [d[0] for d in dead]
        assert all(d[1] == 503 for d in dead), dead
        codes = {d[2]["error"]["code"] for d in dead}
        assert codes <= {"CEPH.1408", "CEPH.1504"} and "CEPH.1504" in codes, codes
        # the healthy cluster did not notice: p99 under 1 s (it was ~10 s with a shared pool)
        assert max(during) < 1.0 and p99(during) < max(0.5, 5 * p99(base)), (base, during)

        # known Disconnected: each call now fails at once, with a clear 503
        took, status, body = await timed_get(http, agent, f"{PS}/{doomed}")
        assert body["inventory"]["status"] == "Disconnected"
        for _ in range(5):
            took, status, body = await timed_get(http, agent, f"{PS}/{doomed}/capacity")
            assert status == 503 and body["error"]["code"] == "CEPH.1504", body
            assert took < 0.5, took
            assert "Disconnected" in body["error"]["description"]
    finally:
        await asyncio.to_thread(second_cluster.script, "start-mon", "a")
    # revived: the health check (every second here) sees it back and calls go through again
    deadline = time.monotonic() + 60
    while True:
        took, status, body = await timed_get(http, agent, f"{PS}/{doomed}/capacity")
        if status == 200:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.5)
    took, status, body = await timed_get(http, agent, f"{PS}/{doomed}")
    assert body["inventory"]["status"] == "Connected"
    took, status, body = await timed_get(http, agent, f"{PS}/{healthy}/capacity")
    assert status == 200
