"""Durability of jobs, webhooks and events (API.md sections 1 and 4), against real
agent processes that are killed (-9), stopped (SIGTERM) and restarted on the
same state directory, with the real webhook Receiver on the other side."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp

from conftest import Receiver, process_gone, run_job, submit, wait_for, wait_job

ACTIONS = "/v1/host/actions"
SHELL = {"host": {"allow_run_shell": True}}


# --- helpers -------------------------------------------------------------------

def new_job_uuid() -> str:
    return uuid.uuid4().hex


def job_url(agent, job: str) -> str:
    return f"{agent.url}/v1/api-jobs/{job}"


async def poll(http, agent, job: str) -> tuple[int, dict]:
    """One GET of the job, no long-poll."""
    async with http.get(job_url(agent, job), headers=agent.headers) as r:
        return r.status, await r.json()


async def wait_pid_file(path: Path, timeout: float = 10) -> int:
    def ready():
        return path.exists() and path.read_text().strip().isdigit()
    await wait_for(ready, timeout, f"{path} written")
    return int(path.read_text())


def kill_group(pgid: int | None) -> None:
    """The script runs in its own session (pid == pgid): kill what kill -9 orphaned."""
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def long_script(marker: Path, pgid_file: Path) -> str:
    return f"echo run >> {marker}; echo $$ > {pgid_file}; sleep 300"


def hooks_for(receiver: Receiver, job: str) -> list[dict]:
    return [r for r in receiver.received if r["headers"].get("X-Job-UUID") == job]


def events_of(receiver: Receiver) -> list[dict]:
    return [r for r in receiver.received if "X-Event-Type" in r["headers"]]


async def job_uuids_listed(http, agent) -> set[str]:
    async with http.get(agent.url + "/v1/api-jobs", headers=agent.headers) as r:
        assert r.status == 200
        return {i["uuid"] for i in (await r.json())["inventories"]}


async def connect(http, agent, receiver_url: str, host_uuid: str | None = None) -> str:
    host_uuid = host_uuid or uuid.uuid4().hex
    status, body = await run_job(http, agent, "PUT", ACTIONS,
                                 {"connectHost": {"hostUuid": host_uuid,
                                                  "managementServerUrl": receiver_url}})
    assert status == 200, body
    assert body["inventory"]["hostUuid"] == host_uuid
    return host_uuid


async def reconnect(http, agent) -> dict:
    status, body = await run_job(http, agent, "PUT", ACTIONS, {"reconnectHost": {}})
    assert status == 200, body
    return body


def parse_time(s: str) -> datetime:
    assert s.endswith("Z"), s
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


class SSE:
    """A minimal server-sent-events reader over an aiohttp response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float) -> dict[str, str | list[str]]:
        """The next block (up to a blank line): fields, and comment lines under ':'."""
        block: dict = {"comments": []}
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no complete SSE block within {timeout} s; partial {block}")
            raw = await asyncio.wait_for(self.resp.content.readline(), left)
            if not raw:
                raise AssertionError(f"the event stream ended; partial {block}")
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if len(block) > 1 or block["comments"]:
                    return block
                continue
            if line.startswith(":"):
                block["comments"].append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            block[key] = value[1:] if value.startswith(" ") else value

    async def until(self, predicate, timeout: float) -> tuple[list[dict], dict]:
        """Blocks read before the first one matching predicate, and that one."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            block = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(block):
                return seen, block
            seen.append(block)


def sse_stream(http, agent, last_event_id: str | None = None):
    headers = dict(agent.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return http.get(agent.url + "/v1/events", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None))


# --- 1. kill -9 in the middle of a job -----------------------------------------

async def test_kill9_mid_job_reports_interrupted_and_keeps_finished(agent, http, receiver, tmp_path):
    marker, pgid_file = tmp_path / "runs", tmp_path / "pgid"
    pgid = None
    try:
        done = new_job_uuid()
        status, done_body = await run_job(http, agent, "PUT", ACTIONS,
                                          {"kvmRunShell": {"script": "echo before"}},
                                          {"X-Job-UUID": done})
        assert status == 200 and done_body["stdout"] == "before\n"

        job = new_job_uuid()
        body = {"kvmRunShell": {"script": long_script(marker, pgid_file), "timeout": 600}}
        hdrs = {"X-Job-UUID": job, "X-Web-Hook": receiver.url("/hook")}
        status, reply = await submit(http, agent, "PUT", ACTIONS, body, hdrs)
        assert status == 202 and reply["location"] == job_url(agent, job)
        pgid = await wait_pid_file(pgid_file)
        status, running = await poll(http, agent, job)
        assert status == 202 and running["location"] == job_url(agent, job)

        agent.kill9()
        # The script dies with the agent (its job guard kills it: issue 11.3), so a
        # resubmission never runs alongside it; the outcome is still unknown.
        await wait_for(lambda: process_gone(pgid), timeout=2, what="the script to die")
        agent.start()

        status, failed = await poll(http, agent, job)
        assert status == 503, (status, failed)
        assert failed["error"]["code"] == "JOB.1001"
        assert "interrupted by an agent restart" in failed["error"]["description"]
        # the long-poll form agrees, and does not wait for a job that is over
        t0 = time.monotonic()
        async with http.get(job_url(agent, job), params={"wait": "5"}, headers=agent.headers) as r:
            assert r.status == 503 and await r.json() == failed
        assert time.monotonic() - t0 < 2

        # the job that finished before the kill is served as it was
        assert await poll(http, agent, done) == (200, done_body)

        # the webhook of the interrupted job says it failed, with the polled body
        [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == job)
        assert hook["path"] == "/hook"
        assert hook["headers"]["X-Job-Success"] == "false"
        assert hook["body"] == failed

        # the same request under the same id is the same job: not run again
        status, again = await submit(http, agent, "PUT", ACTIONS, body, hdrs)
        assert status == 202 and again == reply
        assert await poll(http, agent, job) == (503, failed)
        # a different request under the used id is refused
        other = {"kvmRunShell": {"script": "echo other", "timeout": 600}}
        status, conflict = await submit(http, agent, "PUT", ACTIONS, other, {"X-Job-UUID": job})
        assert status == 409 and conflict["error"]["code"] == "JOB.1009"

        async with http.get(agent.url + "/v1/api-jobs", params={"q": f"uuid={job}"},
                            headers=agent.headers) as r:
            [inv] = (await r.json())["inventories"]
        assert inv["state"] == "Failed" and inv["success"] is False and inv["finishDate"]

        await asyncio.sleep(0.5)
        assert marker.read_text() == "run\n"
        assert len(hooks_for(receiver, job)) == 1
    finally:
        kill_group(pgid)


# --- 2. webhook on success (and on failure) -------------------------------------

async def test_webhook_carries_result_and_success_headers(agent, http, receiver):
    ok, bad = new_job_uuid(), new_job_uuid()
    status, ok_body = await run_job(http, agent, "PUT", ACTIONS,
                                    {"kvmRunShell": {"script": "echo hooked"}},
                                    {"X-Job-UUID": ok, "X-Web-Hook": receiver.url("/done?x=1")})
    assert status == 200 and ok_body["stdout"] == "hooked\n"
    status, bad_body = await run_job(http, agent, "PUT", ACTIONS,
                                     {"kvmRunShell": {"script": "sleep 10", "timeout": 1}},
                                     {"X-Job-UUID": bad, "X-Web-Hook": receiver.url("/done")})
    assert status == 503 and bad_body["error"]["code"] == "HOST.1408"

    [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == ok)
    assert hook["path"] == "/done"
    assert hook["headers"]["X-Job-Success"] == "true"
    assert hook["headers"]["Content-Type"].startswith("application/json")
    assert hook["body"] == ok_body == (await poll(http, agent, ok))[1]

    [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == bad)
    assert hook["headers"]["X-Job-Success"] == "false"
    assert hook["body"] == bad_body


# --- 3. webhook retried with backoff ----------------------------------------------

async def test_webhook_retried_with_backoff_delivered_once(agent, http, receiver):
    receiver.fail_next = 3
    job = new_job_uuid()
    status, body = await run_job(http, agent, "PUT", ACTIONS, {"kvmRunShell": {"script": "echo retry"}},
                                 {"X-Job-UUID": job, "X-Web-Hook": receiver.url()})
    assert status == 200
    t0 = time.monotonic()
    [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == job, timeout=15)
    elapsed = time.monotonic() - t0
    assert receiver.fail_next == 0          # three refused attempts, then this one
    # backoff 1 + 2 + 4 s, each +-20 %: at least 5.6 s, at most 8.4 s (plus slack)
    assert 5.0 <= elapsed <= 11, elapsed
    assert hook["headers"]["X-Job-Success"] == "true" and hook["body"] == body
    await asyncio.sleep(1.0)
    assert len(hooks_for(receiver, job)) == 1


# --- 4. webhook survives a restart -------------------------------------------------

async def test_webhook_pending_across_kill9_is_delivered(agent, http, receiver):
    port = receiver.port
    await receiver.stop()                   # the hook's URL: nobody listens there now
    job = new_job_uuid()
    status, body = await run_job(http, agent, "PUT", ACTIONS, {"kvmRunShell": {"script": "echo later"}},
                                 {"X-Job-UUID": job, "X-Web-Hook": receiver.url("/later")})
    assert status == 200

    def attempted():
        return re.search(r"delivery of webhook \d+ to \S+/later failed", agent.log())
    await wait_for(attempted, 10, "a failed webhook delivery in the agent's log")

    agent.kill9()
    await receiver.start(port)
    assert receiver.port == port
    agent.start()

    [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == job, timeout=15)
    assert hook["path"] == "/later"
    assert hook["headers"]["X-Job-Success"] == "true"
    assert hook["body"] == body == (await poll(http, agent, job))[1]
    await asyncio.sleep(0.5)
    assert len(hooks_for(receiver, job)) == 1


# --- 5. events pushed to the controller ----------------------------------------------

async def test_connect_and_reconnect_push_events(agent_factory, http, receiver):
    fresh = agent_factory(SHELL, name="fresh").start()
    status, body = await submit(http, fresh, "PUT", ACTIONS, {"reconnectHost": {}})
    assert status == 409 and body["error"]["code"] == "HOST.1009", body
    assert await job_uuids_listed(http, fresh) == set()      # refused: no job stored

    agent = agent_factory(SHELL, name="connected").start()
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        before = (await r.json())["hostUuid"]
    host_uuid = uuid.uuid4().hex
    assert before != host_uuid
    await connect(http, agent, receiver.url("/events"), host_uuid)
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        assert r.status == 200 and (await r.json())["hostUuid"] == host_uuid

    [ev] = await receiver.wait_for(lambda r: r["headers"].get("X-Event-Type") == "HostConnected")
    assert ev["path"] == "/events"
    assert ev["headers"]["Content-Type"].startswith("application/json")
    assert set(ev["body"]) == {"type", "hostUuid", "time", "data"}
    assert ev["body"]["type"] == "HostConnected" and ev["body"]["hostUuid"] == host_uuid
    assert isinstance(ev["body"]["data"], dict)
    connected_at = parse_time(ev["body"]["time"])

    await reconnect(http, agent)
    [ev] = await receiver.wait_for(lambda r: r["headers"].get("X-Event-Type") == "HostReconnected")
    assert set(ev["body"]) == {"type", "hostUuid", "time", "data"}
    assert ev["body"]["type"] == "HostReconnected" and ev["body"]["hostUuid"] == host_uuid
    assert parse_time(ev["body"]["time"]) >= connected_at
    # a reconnect is allowed after a restart: the registration is durable
    agent.restart()
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        assert (await r.json())["hostUuid"] == host_uuid
    await reconnect(http, agent)
    await receiver.wait_for(lambda r: len([e for e in events_of(receiver)
                                           if e["body"]["type"] == "HostReconnected"]) == 2)


# --- 6. events in order, across kill -9 -------------------------------------------------

async def test_events_queued_while_controller_down_survive_kill9_in_order(agent, http, receiver):
    port = receiver.port
    await receiver.stop()
    host_uuid = await connect(http, agent, receiver.url("/events"))
    await reconnect(http, agent)
    await reconnect(http, agent)
    agent.kill9()
    await receiver.start(port)
    agent.start()

    await receiver.wait_for(lambda r: len(events_of(receiver)) >= 3, timeout=15)
    await asyncio.sleep(0.5)                # nothing more, nothing twice
    evs = events_of(receiver)
    assert [e["body"]["type"] for e in evs] == ["HostConnected", "HostReconnected", "HostReconnected"]
    assert all(e["headers"]["X-Event-Type"] == e["body"]["type"] for e in evs)
    assert all(e["body"]["hostUuid"] == host_uuid for e in evs)
    times = [parse_time(e["body"]["time"]) for e in evs]
    assert times == sorted(times)


# --- 7. the local event stream ------------------------------------------------------------

async def test_event_stream_live_and_replay(agent, http, receiver):
    async with sse_stream(http, agent, "not-a-number") as r:
        assert r.status == 400
    await connect(http, agent, receiver.url("/events"))

    async with sse_stream(http, agent) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        stream = SSE(r)
        before, _ = await stream.until(lambda b: "connected" in b["comments"], 5)
        assert not [b for b in before if "event" in b]   # no replay without Last-Event-ID
        await reconnect(http, agent)
        _, ev = await stream.until(lambda b: "event" in b, 5)
        assert ev["event"] == "HostReconnected"
        assert ev["id"].isdigit()
        data = json.loads(ev["data"])
        assert data["type"] == "HostReconnected" and data["seq"] == int(ev["id"])
        live_id = int(ev["id"])

    async with sse_stream(http, agent, "0") as r:
        assert r.status == 200
        replayed, _ = await SSE(r).until(lambda b: "connected" in b["comments"], 5)
    replayed = [b for b in replayed if "event" in b]
    assert [b["event"] for b in replayed] == ["HostConnected", "HostReconnected"]
    ids = [int(b["id"]) for b in replayed]
    assert ids == sorted(ids) and ids[-1] == live_id

    # resuming after the first id replays only what came after it
    async with sse_stream(http, agent, str(ids[0])) as r:
        rest, _ = await SSE(r).until(lambda b: "connected" in b["comments"], 5)
    assert [b["event"] for b in rest if "event" in b] == ["HostReconnected"]
    # the server side of a closed stream only notices on its next write: publish once
    # more so those handlers end now, not at the agent's 5 s shutdown timeout
    await reconnect(http, agent)


# --- 8. result expiry ---------------------------------------------------------------------

async def test_results_expire_after_ttl(agent_factory, http):
    agent = agent_factory({**SHELL, "state": {"result_ttl_seconds": 2}}).start()
    # a job running longer than the TTL does not expire while it runs
    status, reply = await submit(http, agent, "PUT", ACTIONS,
                                 {"kvmRunShell": {"script": "sleep 4; echo long"}})
    assert status == 202
    long_job = reply["location"].rsplit("/", 1)[1]

    status, reply = await submit(http, agent, "PUT", ACTIONS, {"kvmRunShell": {"script": "echo short"}})
    job = reply["location"].rsplit("/", 1)[1]
    status, body = await wait_job(http, agent, reply["location"])
    t_done = time.monotonic()
    assert status == 200 and body["stdout"] == "short\n"
    assert job in await job_uuids_listed(http, agent)

    async def gone():
        status, body = await poll(http, agent, job)
        if status == 404:
            return body
        assert status == 200, (status, body)
        return None
    body = await wait_for(gone, 6, "the result expiring")
    assert body["error"]["code"] == "JOB.1004"
    assert time.monotonic() - t_done >= 1.0        # kept for the TTL, not dropped at once
    # the long job, older than the TTL by now, is still running, not expired
    assert (await poll(http, agent, long_job))[0] == 202
    await wait_for(lambda: _not_listed(http, agent, job), 5, "the job leaving /v1/api-jobs")

    # and it still has its result when it ends
    status, body = await wait_job(http, agent, job_url(agent, long_job))
    assert status == 200 and body["stdout"] == "long\n"


async def _not_listed(http, agent, job: str) -> bool:
    return job not in await job_uuids_listed(http, agent)


# --- 9. graceful stop during a job ------------------------------------------------------

async def test_sigterm_mid_job_is_failed_not_success(agent, http, tmp_path):
    marker, pgid_file = tmp_path / "runs", tmp_path / "pgid"
    pgid = None
    try:
        job = new_job_uuid()
        status, _ = await submit(http, agent, "PUT", ACTIONS,
                                 {"kvmRunShell": {"script": long_script(marker, pgid_file), "timeout": 600}},
                                 {"X-Job-UUID": job})
        assert status == 202
        pgid = await wait_pid_file(pgid_file)
        assert (await poll(http, agent, job))[0] == 202

        t0 = time.monotonic()
        assert await asyncio.to_thread(agent.stop) == 0
        assert time.monotonic() - t0 < 5
        # a graceful stop kills the job's process tree
        await wait_for(lambda: process_gone(pgid), 3, "the script killed on stop")
        agent.start()

        status, body = await poll(http, agent, job)
        assert status == 503, (status, body)
        assert body["error"]["code"] == "JOB.1001"
        async with http.get(agent.url + "/v1/api-jobs", params={"q": f"uuid={job}"},
                            headers=agent.headers) as r:
            [inv] = (await r.json())["inventories"]
        assert inv["state"] == "Failed" and inv["success"] is False
        assert marker.read_text() == "run\n"
    finally:
        kill_group(pgid)


# --- regressions of bugs found while writing these tests ----------------------------------

async def test_sigterm_with_webhook_job_running_exits_promptly(agent, http, receiver, tmp_path):
    marker, pgid_file = tmp_path / "runs", tmp_path / "pgid"
    pgid = None
    try:
        job = new_job_uuid()
        status, _ = await submit(http, agent, "PUT", ACTIONS,
                                 {"kvmRunShell": {"script": long_script(marker, pgid_file), "timeout": 600}},
                                 {"X-Job-UUID": job, "X-Web-Hook": receiver.url("/hook")})
        assert status == 202
        pgid = await wait_pid_file(pgid_file)
        agent.proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(agent.proc.wait, 5)
        except subprocess.TimeoutExpired:
            agent.kill9()                   # hung: do not leave it to the fixture's 15 s stop
            rc = None
        assert rc == 0, "the agent did not exit within 5 s of SIGTERM"
        agent.start()
        status, body = await poll(http, agent, job)
        assert status == 503 and body["error"]["code"] == "JOB.1001"
        [hook] = await receiver.wait_for(lambda r: r["headers"].get("X-Job-UUID") == job)
        assert hook["headers"]["X-Job-Success"] == "false" and hook["body"] == body
    finally:
        kill_group(pgid)


async def test_reconnect_host_retries_pending_events_at_once(agent, http, receiver):
    port = receiver.port
    await receiver.stop()
    await connect(http, agent, receiver.url("/events"))

    def third_failure():
        return re.search(r"delivery of event \d+ .*attempt 3$", agent.log(), re.M)
    await wait_for(third_failure, 10, "three failed deliveries of HostConnected")
    # the next attempt is now 4 s +-20 % away
    await receiver.start(port)
    t0 = time.monotonic()
    await reconnect(http, agent)
    await receiver.wait_for(lambda r: r["headers"].get("X-Event-Type") == "HostConnected", timeout=2.0)
    assert time.monotonic() - t0 < 2.0


async def test_expired_job_is_not_listed_before_the_purge(agent_factory, http):
    agent = agent_factory({**SHELL, "state": {"result_ttl_seconds": 3600}}).start()
    status, reply = await submit(http, agent, "PUT", ACTIONS, {"kvmRunShell": {"script": "true"}})
    job = reply["location"].rsplit("/", 1)[1]
    assert (await wait_job(http, agent, reply["location"]))[0] == 200
    # age the finished job past the TTL (the purge loop next runs in 600 s)
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        db.execute("UPDATE jobs SET finished = finished - 7200 WHERE uuid = ?", (job,))
    assert (await poll(http, agent, job))[0] == 404
    assert job not in await job_uuids_listed(http, agent)


async def test_event_replay_is_the_same_event(agent, http, receiver):
    first = await connect(http, agent, receiver.url("/events"))
    second = await connect(http, agent, receiver.url("/events"))
    assert first != second
    await receiver.wait_for(lambda r: len(events_of(receiver)) >= 2)
    pushed = [e["body"] for e in events_of(receiver)]
    assert [e["hostUuid"] for e in pushed] == [first, second]
    async with sse_stream(http, agent, "0") as r:
        replayed, _ = await SSE(r).until(lambda b: "connected" in b["comments"], 5)
    await reconnect(http, agent)            # lets the closed stream's handler end now
    replayed = [json.loads(b["data"]) for b in replayed if "event" in b][:2]
    assert [{k: e[k] for k in ("type", "hostUuid", "time", "data")} for e in replayed] == pushed
