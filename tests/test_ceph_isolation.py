"""Two real Ceph clusters side by side: one dead cluster slows nothing on the other.

The session cluster (ceph_fixture) stays healthy; a second micro cluster is
started for this module, registered on the same agent, and its mon is stopped
while 20 capacity calls are in flight on it (issue 11.2); then its daemons are
frozen (SIGSTOP) while imports into it are stuck mid-transfer, and an import into
the healthy cluster must not notice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiohttp import web

from agentproc import AgentProcess
from ceph_fixture import MicroCeph, ceph_cluster, free_port_pair  # noqa: F401 (fixture)
from conftest import run_job, submit, wait_for, wait_job
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


# --- bulk I/O: imports, exports (issue 11.2, the part left after the control calls) ---------

BS = "/v1/backup-storage/ceph"
OSD_OP = TIMEOUTS["osd_op_timeout"]


@pytest.fixture(scope="module")
def two_backups(two_storages, ceph_cluster, second_cluster):  # noqa: F811
    a = two_storages[0]
    out = []
    for name, c in (("healthy", ceph_cluster), ("doomed", second_cluster)):
        status, body = sync_job(a, "POST", BS, {"params": {
            "name": f"{name}-bs", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key,
            "poolName": f"iso-{name}-bs"}})
        assert status == 200, body
        out.append(body["inventory"]["uuid"])
    return out[0], out[1]


@pytest.fixture
async def slow_source():
    """An HTTP image source: /raw is 8 MiB at once; /stall sends one 4 MiB block of a
    64 MiB image, then nothing until the test releases it (a slow upstream)."""
    raw = os.urandom(8 << 20)
    release = asyncio.Event()
    started: list[int] = []

    async def whole(request):
        return web.Response(body=raw, content_type="application/octet-stream")

    async def stall(request):
        resp = web.StreamResponse(headers={"Content-Length": str(64 << 20)})
        await resp.prepare(request)
        await resp.write(os.urandom(4 << 20))
        await resp.write(os.urandom(4096))      # past the first block: the sink has started
        started.append(1)
        await release.wait()
        return resp                              # short: the import fails, as it should
    app = web.Application()
    app.router.add_get("/raw", whole)
    app.router.add_get("/stall", stall)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", started, release
    release.set()
    await runner.cleanup()


def signal_cluster(c: MicroCeph, sig: int) -> None:
    """SIGSTOP/SIGCONT every daemon of the cluster: a cluster that hangs, not refuses."""
    for f in (c.base / "run").glob("*.pid"):
        try:
            os.kill(int(f.read_text().strip()), sig)
        except (ValueError, ProcessLookupError):
            pass


async def timed_job(http, agent, method, path, body, timeout=60):
    t = time.monotonic()
    status, reply = await run_job(http, agent, method, path, body, timeout=timeout)
    return time.monotonic() - t, status, reply


async def test_dead_cluster_transfers_never_delay_a_healthy_import(
        two_storages, two_backups, second_cluster, slow_source, http):
    agent = two_storages[0]
    healthy, doomed = two_backups
    url, started, release = slow_source
    base, status, body = await timed_job(http, agent, "POST", f"{BS}/{healthy}/images",
                                         {"params": {"url": f"{url}/raw"}})
    assert status == 200, body
    healthy_img = body["inventory"]["uuid"]
    # an image of the doomed cluster and an export URL of it, made while it is alive
    took, status, body = await timed_job(http, agent, "POST", f"{BS}/{doomed}/images",
                                         {"params": {"url": f"{url}/raw"}})
    assert status == 200, body
    img = body["inventory"]["uuid"]
    took, status, body = await timed_job(http, agent, "PUT", f"{BS}/{doomed}/images/{img}/actions",
                                         {"exportImageFromBackupStorage": {}})
    assert status == 200, body
    export_url = body["imageUrl"]

    # 10 imports into the doomed cluster, each stuck mid-transfer (more than the 8 threads
    # the one shared bulk pool had), then the cluster hangs
    stuck = []
    for _ in range(10):
        status, reply = await submit(http, agent, "POST", f"{BS}/{doomed}/images",
                                     {"params": {"url": f"{url}/stall"}})
        assert status == 202, reply
        stuck.append(reply["location"])
    await wait_for(lambda: len(started) >= 10, 30, "10 stalled downloads")
    await asyncio.sleep(0.5)
    await asyncio.to_thread(signal_cluster, second_cluster, signal.SIGSTOP)
    try:
        took, status, body = await timed_job(http, agent, "POST", f"{BS}/{healthy}/images",
                                             {"params": {"url": f"{url}/raw"}}, timeout=30)
        assert status == 200, body
        assert took < max(3 * base, base + 2.0), (base, took)

        # once known Disconnected, the doomed cluster's transfers fail fast
        async def disconnected():
            status, body = await get(http, agent, f"{BS}/{doomed}")
            return body["inventory"]["status"] == "Disconnected"
        await wait_for(disconnected, 20, "the doomed cluster Disconnected")
        took, status, body = await timed_job(http, agent, "POST", f"{BS}/{doomed}/images",
                                             {"params": {"url": f"{url}/raw"}})
        assert status == 503 and body["error"]["code"] == "CEPH.1504", body
        assert took < 1.5, took
        t = time.monotonic()
        async with http.get(export_url) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "CEPH.1504"
        assert time.monotonic() - t < 0.5
        took, status, body = await timed_job(
            http, agent, "PUT", f"{BS}/{healthy}/images/{healthy_img}/actions",
            {"migrateImage": {"destination": doomed}})
        assert status == 503 and body["error"]["code"] == "CEPH.1504" and took < 1.5, (took, body)
        # and the stuck ones end (no thread left waiting on the dead cluster or the upstream):
        # each within one OSD op timeout (a write in flight), not when the upstream resumes
        t = time.monotonic()
        for loc in stuck:
            status, body = await wait_job(http, agent, loc, OSD_OP + 10)
            assert status == 503 and body["error"]["code"] in ("CEPH.1504", "CEPH.1408"), body
        assert time.monotonic() - t < OSD_OP + 5
        assert not release.is_set()
        # the healthy cluster is still as fast
        took, status, body = await timed_job(http, agent, "POST", f"{BS}/{healthy}/images",
                                             {"params": {"url": f"{url}/raw"}}, timeout=30)
        assert status == 200 and took < max(3 * base, base + 2.0), (base, took, body)
    finally:
        await asyncio.to_thread(signal_cluster, second_cluster, signal.SIGCONT)
        release.set()

    async def connected():
        status, body = await get(http, agent, f"{BS}/{doomed}")
        return body["inventory"]["status"] == "Connected"
    await wait_for(connected, 60, "the doomed cluster Connected again")
