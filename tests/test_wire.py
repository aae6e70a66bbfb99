"""The wire contract of API.md section 1, against a real agent process."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid

from conftest import run_job, submit, wait_job


async def test_ready_fast_token_private_and_health_open(agent, http):
    assert agent.ready_seconds < 1.5, agent.ready_seconds
    mode = stat.S_IMODE(os.stat(agent.state_dir / "token").st_mode)
    assert mode == 0o600
    async with http.get(agent.url + "/v1/health") as r:
        assert r.status == 200
        body = await r.json()
    host = next(p for p in body["plugins"] if p["name"] == "host")
    assert body["status"] == "ok" and host["available"] is True and host["reason"] is None


async def test_auth_oauth_bearer_missing_wrong(agent, http):
    url = agent.url + "/v1/host/ping"
    async with http.get(url) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "AUTH.1001"
    async with http.get(url, headers={"Authorization": "OAuth wrong"}) as r:
        assert r.status == 401
        assert agent.token not in await r.text()
    async with http.get(url, headers={"Authorization": f"Bearer {agent.token}"}) as r:
        assert r.status == 200
    async with http.get(url, headers=agent.headers) as r:
        body = await r.json()
    assert set(body) == {"hostUuid", "version", "uptime"}


async def test_uvloop_when_asked_for(agent_factory, http):
    agent = agent_factory({"server": {"event_loop": "uvloop"}, "host": {"allow_run_shell": True}}).start()
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        assert r.status == 200
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "echo hi"}})
    status, result = await wait_job(http, agent, reply["location"])
    assert status == 200 and result["stdout"] == "hi\n"
    assert "uvloop" in open(f"/proc/{agent.proc.pid}/maps").read()


async def test_action_is_a_job_202_then_200(agent, http):
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "echo hello; echo oops >&2; exit 3"}})
    assert status == 202
    assert reply["location"].startswith(agent.url + "/v1/api-jobs/")
    status, result = await wait_job(http, agent, reply["location"])
    assert status == 200
    assert result == {"returnCode": 3, "stdout": "hello\n", "stderr": "oops\n",
                      "stdoutTruncated": False, "stderrTruncated": False}


async def test_polling_202_with_progress_then_result(agent, http):
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "sleep 1; echo done"}})
    async with http.get(reply["location"], headers=agent.headers) as r:
        assert r.status == 202
        assert (await r.json())["location"] == reply["location"]
    t0 = asyncio.get_running_loop().time()
    async with http.get(reply["location"], params={"wait": "10"}, headers=agent.headers) as r:
        assert r.status == 200
        assert (await r.json())["stdout"] == "done\n"
    assert asyncio.get_running_loop().time() - t0 < 5


async def test_failed_job_is_503_with_error_body(agent, http):
    status, body = await run_job(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "sleep 10", "timeout": 1}})
    assert status == 503
    err = body["error"]
    assert err["code"] == "HOST.1408" and "1 s" in err["description"]


async def test_unknown_job_404(agent, http):
    async with http.get(f"{agent.url}/v1/api-jobs/{uuid.uuid4().hex}", headers=agent.headers) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "JOB.1004"


async def test_x_job_uuid_idempotent_and_conflict(agent, http, tmp_path):
    marker = tmp_path / "runs"
    job = uuid.uuid4().hex
    body = {"kvmRunShell": {"script": f"echo run >> {marker}"}}
    s1, r1 = await submit(http, agent, "PUT", "/v1/host/actions", body, {"X-Job-UUID": job})
    s2, r2 = await submit(http, agent, "PUT", "/v1/host/actions", body, {"X-Job-UUID": job})
    assert s1 == s2 == 202 and r1 == r2 and r1["location"].endswith(job)
    assert (await wait_job(http, agent, r1["location"]))[0] == 200
    s3, r3 = await submit(http, agent, "PUT", "/v1/host/actions", body, {"X-Job-UUID": job})
    assert s3 == 202 and r3 == r1
    other = {"kvmRunShell": {"script": "echo other"}}
    s4, r4 = await submit(http, agent, "PUT", "/v1/host/actions", other, {"X-Job-UUID": job})
    assert s4 == 409 and r4["error"]["code"] == "JOB.1009"
    assert marker.read_text() == "run\n"


async def test_concurrent_copies_of_one_request_run_once(agent, http, tmp_path):
    marker = tmp_path / "runs"
    job = uuid.uuid4().hex
    body = {"kvmRunShell": {"script": f"echo run >> {marker}"}}
    replies = await asyncio.gather(*(submit(http, agent, "PUT", "/v1/host/actions", body,
                                            {"X-Job-UUID": job}) for _ in range(20)))
    assert {s for s, _ in replies} == {202}
    await wait_job(http, agent, replies[0][1]["location"])
    assert marker.read_text() == "run\n"


async def test_bad_job_uuid_400(agent, http):
    for bad in ["not-a-uuid", str(uuid.uuid4()), uuid.uuid1().hex, "0" * 32]:
        status, body = await submit(http, agent, "PUT", "/v1/host/actions",
                                    {"kvmRunShell": {"script": "true"}}, {"X-Job-UUID": bad})
        assert status == 400 and body["error"]["code"] == "JOB.1400", bad


async def test_cancel_running_job_kills_its_processes(agent, http, tmp_path):
    pidfile = tmp_path / "pid"
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": f"sleep 300 & echo $! > {pidfile}; wait",
                                                  "timeout": 600}})
    job = reply["location"].rsplit("/", 1)[1]
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    child = int(pidfile.read_text())
    assert os.path.exists(f"/proc/{child}")
    status, result = await run_job(http, agent, "DELETE", f"/v1/api-jobs/{job}")
    assert status == 200 and result["inventory"]["state"] == "Failed"
    status, body = await wait_job(http, agent, reply["location"])
    assert status == 503 and body["error"]["code"] == "JOB.1002"
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}"):
            break
        await asyncio.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")
    # cancelling again: the job has ended
    async with http.delete(f"{agent.url}/v1/api-jobs/{job}", headers=agent.headers) as r:
        assert r.status == 409
    async with http.delete(f"{agent.url}/v1/api-jobs/{uuid.uuid4().hex}", headers=agent.headers) as r:
        assert r.status == 404


async def test_query_api_on_jobs(agent, http):
    for i in range(3):
        await run_job(http, agent, "PUT", "/v1/host/actions", {"kvmRunShell": {"script": f"exit {i}"}})
    await run_job(http, agent, "PUT", "/v1/host/actions", {"kvmRunShell": {"script": "sleep 5", "timeout": 1}})
    async def q(params):
        async with http.get(agent.url + "/v1/api-jobs", params=params, headers=agent.headers) as r:
            return r.status, await r.json()
    status, body = await q([("q", "state=Succeeded"), ("replyWithCount", "true"), ("limit", "2"),
                            ("sort", "-createDate"), ("fields", "uuid,state")])
    assert status == 200 and body["total"] == 3 and len(body["inventories"]) == 2
    assert all(set(i) == {"uuid", "state"} for i in body["inventories"])
    status, body = await q([("q", "state!=Succeeded"), ("count", "true")])
    assert body == {"total": 1}
    status, body = await q([("q", "action~=kvmRun%"), ("q", "finishDate not null"), ("count", "true")])
    assert body == {"total": 4}
    status, body = await q([("q", "nosuchfield=1")])
    assert status == 400 and "nosuchfield" in body["error"]["description"]
    status, body = await q([("q", "state = Running")])
    assert status == 400 and "state = Running" in body["error"]["description"]
    status, body = await q([("fields", "uuid,bogus")])
    assert status == 400 and "bogus" in body["error"]["description"]


async def test_1000_concurrent_jobs_tracked(agent, http):
    async def one(i):
        status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                     {"kvmRunShell": {"script": f"echo {i}"}})
        assert status == 202
        return i, reply["location"]
    jobs = await asyncio.gather(*(one(i) for i in range(1000)))
    assert len({loc for _, loc in jobs}) == 1000
    results = await asyncio.gather(*(wait_job(http, agent, loc, timeout=120) for _, loc in jobs))
    for (i, _), (status, body) in zip(jobs, results):
        assert status == 200 and body["stdout"] == f"{i}\n"
    async with http.get(agent.url + "/v1/api-jobs", params={"q": "state=Succeeded", "count": "true"},
                        headers=agent.headers) as r:
        assert (await r.json())["total"] == 1000
