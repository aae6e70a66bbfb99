"""Hang-proof storage I/O (issue 4 item 5): a FUSE filesystem that hangs on demand (the
dead NFS server), inside the agent's private mount namespace.  Every hang path answers a
clear STORAGE error within its timeout, ping stays fast, the other storage is unaffected,
and StorageStatusChanged follows Connected -> Hung -> Connected -> Hung -> Disconnected."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from conftest import submit
from storage_helpers import (NS_WRAPPER, PS, FuseMount, abort_fuse, add_storage, connect_events,
                             fast_storage, get, job, status_events, uid, wait_for, wait_status_event)

CALL_TIMEOUT = 1.5


@pytest.fixture
def ns_agent(agent_factory):
    a = agent_factory(fast_storage(call_timeout_seconds=CALL_TIMEOUT, probe_timeout_seconds=CALL_TIMEOUT,
                                   max_stuck_helpers=2),
                      name="hang", wrapper=NS_WRAPPER).start()
    yield a
    abort_fuse(a)       # nothing stays hung, whatever the test did


@pytest.fixture
def make_fuse(ns_agent):
    mounts: list[FuseMount] = []

    def make(*args, **kw) -> FuseMount:
        m = FuseMount(ns_agent, *args, **kw)
        mounts.append(m)
        return m
    yield make
    abort_fuse(ns_agent)
    for m in mounts:
        m.stop()


class Pinger:
    """Sequential pings in the background: latencies and failures."""

    def __init__(self, http, agent) -> None:
        self.http, self.agent = http, agent
        self.lat: list[float] = []
        self.failures: list[str] = []
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                async with self.http.get(self.agent.url + "/v1/host/ping", headers=self.agent.headers) as r:
                    await r.read()
                    if r.status != 200:
                        self.failures.append(str(r.status))
            except Exception as e:  # counted, not raised: the test reads them
                self.failures.append(repr(e))
            self.lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)

    def start(self) -> "Pinger":
        self.task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def p99(self) -> float:
        return statistics.quantiles(self.lat, n=100)[98] if len(self.lat) >= 2 else 0.0


async def timed(coro):
    t0 = time.monotonic()
    out = await coro
    return out, time.monotonic() - t0


async def test_every_hang_path_answers_in_time_ping_and_others_unaffected(ns_agent, make_fuse, http,
                                                                          receiver, tmp_path):
    a = ns_agent
    await connect_events(http, a, receiver)
    fuse = make_fuse(tmp_path / "backing", "/mnt/hang", tmp_path / "hang.ctl")
    hung_ps, ok_ps = uid(), uid()
    status, body = await add_storage(http, a, "local", {"uuid": hung_ps, "url": "/mnt/hang/ps"})
    assert status == 200 and body["inventory"]["status"] == "Connected", body
    status, body = await add_storage(http, a, "local", {"uuid": ok_ps, "url": str(tmp_path / "ok")})
    assert status == 200, body
    v = uid()
    assert (await job(http, a, "POST", f"{PS}/{hung_ps}/volumes", {"params": {"uuid": v, "size": 1 << 30}}))[0] == 200

    idle = Pinger(http, a).start()
    await asyncio.sleep(1.5)
    await idle.stop()
    pinger = Pinger(http, a).start()

    # 1. statvfs hangs (the probe's open/write/read still work)
    fuse.hang("statfs")
    (status, body), took = await timed(get(http, a, f"{PS}/{hung_ps}/capacity"))
    assert status == 503 and body["error"]["code"] == "STORAGE.1408", body
    assert took < CALL_TIMEOUT + 1.0, took
    assert "did not answer within" in body["error"]["description"]
    (status, _), took = await timed(get(http, a, f"{PS}/{ok_ps}/capacity"))
    assert status == 200 and took < 1.0, took
    # 50 concurrent statvfs on the hung storage: each answers 503 within its timeout
    results = await asyncio.gather(*(timed(get(http, a, f"{PS}/{hung_ps}/capacity")) for _ in range(50)))
    assert {s for (s, _), _ in results} == {503}
    assert max(t for _, t in results) < CALL_TIMEOUT + 1.5, max(t for _, t in results)
    await wait_status_event(receiver, hung_ps, "Hung")
    fuse.release()
    await wait_status_event(receiver, hung_ps, "Connected", after=1)

    # 2. everything hangs: probe, listing, volume creation, deletion
    n = len(status_events(receiver, hung_ps))
    fuse.hang("all")
    hung = await wait_status_event(receiver, hung_ps, "Hung", after=n)
    assert hung["oldStatus"] == "Connected" and "within" in hung["reason"]
    (status, body), took = await timed(get(http, a, f"{PS}/{hung_ps}/volumes"))
    assert status == 503 and body["error"]["code"] == "STORAGE.1408" and took < CALL_TIMEOUT + 1.0
    (status, body), took = await timed(job(http, a, "POST", f"{PS}/{hung_ps}/volumes",
                                           {"params": {"size": 1 << 20, "path": "x/new.qcow2"}}))
    assert status == 503 and body["error"]["code"].startswith("STORAGE.14"), body
    assert took < 2 * CALL_TIMEOUT + 1.0, took
    (status, body), took = await timed(job(http, a, "DELETE", f"{PS}/{hung_ps}/volumes/{v}"))
    assert status == 503 and took < CALL_TIMEOUT + 1.5, (status, body, took)
    # the storage list never touches a storage; the other storage works
    (status, body), took = await timed(get(http, a, PS))
    assert status == 200 and took < 0.5
    assert {i["uuid"]: i["status"] for i in body["inventories"]} == {hung_ps: "Hung", ok_ps: "Connected"}
    (status, body), took = await timed(job(http, a, "POST", f"{PS}/{ok_ps}/volumes", {"params": {"size": 1 << 20}}))
    assert status == 200 and took < 3, took
    async with http.get(a.url + "/metrics", headers=a.headers) as r:
        text = await r.text()
    assert f'node_agent_storage_status{{primary_storage_uuid="{hung_ps}",status="Hung"}} 1.0' in text
    assert f'node_agent_storage_stuck_helpers{{primary_storage_uuid="{hung_ps}"}}' in text

    # back: the stuck helpers finish, the probe passes, Connected again; the volume is still there
    fuse.release()
    back = await wait_status_event(receiver, hung_ps, "Connected", after=n + 1)
    assert back["oldStatus"] == "Hung"
    status, body = await get(http, a, f"{PS}/{hung_ps}/volumes")
    assert status == 200 and [i["uuid"] for i in body["inventories"]] == [v]

    await pinger.stop()
    assert pinger.failures == []
    assert len(pinger.lat) > 100
    assert pinger.p99() < max(0.2, 4 * idle.p99()), (pinger.p99(), idle.p99())

    # 3. hung, then the connection is aborted (umount -f of a dead NFS): Disconnected
    n = len(status_events(receiver, hung_ps))
    fuse.hang("all")
    await wait_status_event(receiver, hung_ps, "Hung", after=n)
    fuse.abort()
    gone = await wait_status_event(receiver, hung_ps, "Disconnected", after=n + 1)
    assert gone["oldStatus"] == "Hung"
    status, body = await get(http, a, f"{PS}/{hung_ps}/capacity")
    assert status == 503
    seq = [e["newStatus"] for e in status_events(receiver, hung_ps)]
    assert seq == ["Connected", "Hung", "Connected", "Hung", "Connected", "Hung", "Disconnected"], seq
    assert status_events(receiver, hung_ps)[0]["oldStatus"] == "Connecting"   # the registration


async def test_registration_on_a_hung_filesystem_fails_in_time(ns_agent, make_fuse, http, tmp_path):
    a = ns_agent
    fuse = make_fuse(tmp_path / "backing", "/mnt/hang2", tmp_path / "hang.ctl")
    (tmp_path / "backing" / "ps").mkdir()
    fuse.hang("all")
    ps = uid()
    (status, body), took = await timed(add_storage(http, a, "local", {"uuid": ps, "url": "/mnt/hang2/ps"}))
    assert status == 503 and body["error"]["code"] == "STORAGE.1408", body
    assert took < 2 * CALL_TIMEOUT + 1.5, took
    status, body = await get(http, a, PS)
    assert body["inventories"] == []
    (status, _), took = await timed(get(http, a, "/v1/host/ping"))
    assert status == 200 and took < 0.2
    fuse.release()
    await wait_for(lambda: True, 0.1, "")
    status, body = await add_storage(http, a, "local", {"uuid": ps, "url": "/mnt/hang2/ps"})
    assert status == 200 and body["inventory"]["status"] == "Connected", body


async def test_a_timed_out_call_marks_the_storage_hung_at_once(agent_factory, http, tmp_path):
    """Issue 11.6: one timed-out capacity call (one stuck helper, below max_stuck) is Hung
    at once, with its event on /v1/events; the probe (whose own I/O still works) keeps it
    Hung while the call is stuck, and Connected comes back when the hang is released."""
    import json
    from test_durability import SSE, sse_stream
    a = agent_factory(fast_storage(call_timeout_seconds=CALL_TIMEOUT, probe_timeout_seconds=CALL_TIMEOUT,
                                   probe_interval_seconds=0.5, max_stuck_helpers=3),
                      name="hang1", wrapper=NS_WRAPPER).start()
    fuse = FuseMount(a, tmp_path / "backing", "/mnt/hang1", tmp_path / "hang.ctl")
    try:
        ps = uid()
        for _ in range(3):   # a fresh FUSE mount on a loaded machine may miss the 1.5 s once
            status, body = await add_storage(http, a, "local", {"uuid": ps, "url": "/mnt/hang1/ps"})
            if status != 503:
                break
        assert status == 200 and body["inventory"]["status"] == "Connected", body

        def changed_to(block, new):
            return block.get("event") == "StorageStatusChanged" and \
                json.loads(block["data"])["data"]["newStatus"] == new

        async with sse_stream(http, a) as events:
            sse = SSE(events)
            fuse.hang("statfs")
            status, body = await get(http, a, f"{PS}/{ps}/capacity")
            assert status == 503 and body["error"]["code"] == "STORAGE.1408", body
            status, body = await get(http, a, f"{PS}/{ps}")
            assert body["inventory"]["status"] == "Hung", body
            assert "did not answer within" in body["inventory"]["statusReason"]
            await sse.until(lambda b: changed_to(b, "Hung"), 5)
            await asyncio.sleep(1.5)                    # probes pass meanwhile
            status, body = await get(http, a, f"{PS}/{ps}")
            assert body["inventory"]["status"] == "Hung", body
            fuse.release()
            await sse.until(lambda b: changed_to(b, "Connected"), 10)
        status, body = await get(http, a, f"{PS}/{ps}/capacity")
        assert status == 200, body
    finally:
        abort_fuse(a)
        fuse.stop()


async def test_a_helper_blocked_in_a_call_dies_with_the_agent(ns_agent, make_fuse, http, tmp_path):
    """Issue 11.3: an idle helper ends at EOF on stdin, but one blocked in the filesystem
    (unkillable while the server holds the request) would go on with its operation when
    the server answers, after the agent died.  PR_SET_PDEATHSIG leaves a SIGKILL pending:
    it dies at the first return from the kernel, so mkdirs of a/b/c stops after a."""
    import psutil
    a = ns_agent
    fuse = make_fuse(tmp_path / "backing", "/mnt/hang3", tmp_path / "hang.ctl")
    ps = uid()
    for _ in range(3):   # a fresh FUSE mount on a loaded machine may miss the 1.5 s once
        status, body = await add_storage(http, a, "local", {"uuid": ps, "url": "/mnt/hang3/ps"})
        if status != 503:
            break
    assert status == 200, body
    fuse.hang("mkdir")
    call = asyncio.ensure_future(submit(http, a, "POST", f"{PS}/{ps}/volumes",
                                        {"params": {"size": 1 << 20, "path": "a/b/c/v.qcow2"}}))
    await asyncio.sleep(0.5)                       # the helper waits in mkdir("a")
    helpers = [p.pid for p in psutil.Process(a.proc.pid).children()
               if "fsworker.py" in " ".join(p.cmdline())]
    assert helpers
    a.kill9()
    await asyncio.gather(call, return_exceptions=True)
    fuse.release()
    await asyncio.sleep(1.0)
    assert (tmp_path / "backing" / "ps" / "a").is_dir()      # the request in flight
    assert not (tmp_path / "backing" / "ps" / "a" / "b").exists(), \
        "a helper went on with its operation after the agent died"
    assert not [p for p in helpers if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
