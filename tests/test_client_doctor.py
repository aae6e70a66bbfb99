"""The controller-side client and `node-agent doctor`, against a small real
aiohttp server that imitates the wire contract (the real server is tested on
its own).  No mocks: real sockets, real files, the libvirt test driver."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.client import AgentClient, AgentError, default_base_url, read_token
from agent.config import AuthConfig, Config, ServerConfig, StateConfig
from agent.doctor import Check, exit_code, render_table, run_checks, to_json

TOKEN = "s3cret-token"


# -- the imitation agent -----------------------------------------------------

def _error(status: int, code: str, description: str, details: str | None = None):
    return web.json_response({"error": {"code": code, "description": description,
                                        "details": details, "cause": None}}, status=status)


STATE = web.AppKey("state", dict)


def make_app() -> web.Application:
    app = web.Application()
    state = app[STATE] = {
        "seen": [],            # (method, path, headers) of every request
        "jobs": {},            # uuid -> job state
        "waits": [],           # ?wait values as received
    }

    @web.middleware
    async def auth(request, handler):
        state["seen"].append((request.method, request.path, dict(request.headers)))
        if request.path != "/v1/health":
            given = request.headers.get("Authorization", "")
            if given not in (f"OAuth {TOKEN}", f"Bearer {TOKEN}"):
                return _error(401, "AUTH.1001", "missing or wrong token")
        return await handler(request)

    app.middlewares.append(auth)

    async def health(request):
        return web.json_response({"status": "ok", "version": "9.9.9", "plugins": [
            {"name": "host", "available": True, "reason": None},
            {"name": "ceph", "available": False, "reason": "ceph CLI not installed"}]})

    async def ping(request):
        return web.json_response({"status": "ok"})

    async def things_get(request):
        return web.json_response({"inventories": [], "query": list(request.query.items())})

    async def submit(request):
        job_uuid = request.headers.get("X-Job-UUID") or uuid.uuid4().hex
        body = await request.json() if request.can_read_body else None
        kind = request.match_info["kind"]
        state["jobs"][job_uuid] = {"kind": kind, "polls": 0, "body": body,
                                 "webhook": request.headers.get("X-Web-Hook"),
                                 "done_at": time.monotonic() + 0.3}
        if kind == "sync":        # a misbehaving server: 200 instead of 202
            return web.json_response({"inventory": {}})
        if kind == "bad":
            return _error(400, "SYS.1001", "name is required", details="params.name")
        return web.json_response({"location": f"{request.url.origin()}/v1/api-jobs/{job_uuid}"},
                                 status=202)

    async def job(request):
        j = state["jobs"].get(request.match_info["uuid"])
        if j is None:
            return _error(404, "JOB.1004", "no such job; results are kept 2 days")
        wait = float(request.query.get("wait", 0))
        state["waits"].append(request.query.get("wait"))
        j["polls"] += 1
        running = {"location": str(request.url.with_query(None))}
        if j["kind"] == "twice":            # 202, 202, then done; ignores ?wait
            if j["polls"] <= 2:
                return web.json_response(running, status=202)
            return web.json_response({"inventory": {"echo": j["body"]}})
        if j["kind"] == "fail":
            return _error(503, "VM.1503", "libvirt refused to start the VM",
                          details="internal error: no space left")
        if j["kind"] == "never":           # honours ?wait, never ends
            await asyncio.sleep(wait)
            return web.json_response(running, status=202)
        # "timed": done 0.3 s after submit; honours ?wait by holding the poll
        deadline = time.monotonic() + wait
        while time.monotonic() < j["done_at"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if time.monotonic() < j["done_at"]:
            return web.json_response(running, status=202)
        return web.json_response({"returnCode": 0})

    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/host/ping", ping)
    app.router.add_get("/v1/things", things_get)
    app.router.add_route("*", "/v1/things/{kind}", submit)
    app.router.add_get("/v1/api-jobs/{uuid}", job)
    return app


@pytest.fixture
async def server():
    srv = TestServer(make_app(), host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def client(server):
    async with AgentClient(str(server.make_url("/")), TOKEN, timeout=5) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- client ------------------------------------------------------------------

async def test_get_sends_oauth_and_params(client, server):
    body = await client.get("/v1/things", {"q": "name=a", "count": True})
    assert body["query"] == [["q", "name=a"], ["count", "true"]]
    method, path, headers = server.app[STATE]["seen"][-1]
    assert (method, path) == ("GET", "/v1/things")
    assert headers["Authorization"] == f"OAuth {TOKEN}"


async def test_submit_returns_job_uuid_and_sends_headers(client, server):
    job_uuid = uuid.uuid4().hex
    got = await client.submit("PUT", "/v1/things/twice", {"startVmInstance": {}},
                              job_uuid=job_uuid, webhook="http://ctl/hook")
    assert got == job_uuid
    _, _, headers = server.app[STATE]["seen"][-1]
    assert headers["X-Job-UUID"] == job_uuid
    assert headers["X-Web-Hook"] == "http://ctl/hook"
    assert server.app[STATE]["jobs"][job_uuid]["body"] == {"startVmInstance": {}}

    # Without them, none are sent and the uuid comes from the location.
    got = await client.submit("DELETE", "/v1/things/twice")
    _, _, headers = server.app[STATE]["seen"][-1]
    assert "X-Job-UUID" not in headers and "X-Web-Hook" not in headers
    assert got in server.app[STATE]["jobs"] and len(got) == 32


async def test_job_202_twice_then_200(client, server):
    job_uuid = await client.submit("POST", "/v1/things/twice", {"params": {"name": "x"}})
    assert (await client.job(job_uuid))[0] == 202
    status, body = await client.job(job_uuid, wait=1)
    assert status == 202 and body["location"].endswith(job_uuid)
    assert await client.job(job_uuid) == (200, {"inventory": {"echo": {"params": {"name": "x"}}}})
    assert server.app[STATE]["waits"] == [None, "1", None]


async def test_wait_polls_until_done(client):
    job_uuid = await client.submit("POST", "/v1/things/twice", {"params": {}})
    assert await client.wait(job_uuid, timeout=10) == {"inventory": {"echo": {"params": {}}}}


async def test_wait_long_polls_instead_of_busy_polling(client, server):
    job_uuid = await client.submit("PUT", "/v1/things/timed", {"x": {}})
    assert await client.wait(job_uuid, timeout=10) == {"returnCode": 0}
    assert server.app[STATE]["waits"] == ["10"]   # one held poll did it


async def test_wait_503_raises_the_error_body(client):
    job_uuid = await client.submit("PUT", "/v1/things/fail", {"startVmInstance": {}})
    with pytest.raises(AgentError) as info:
        await client.wait(job_uuid, timeout=5)
    e = info.value
    assert (e.status, e.code, e.job_uuid) == (503, "VM.1503", job_uuid)
    assert e.description == "libvirt refused to start the VM"
    assert e.details == "internal error: no space left"
    assert "VM.1503" in str(e) and "libvirt refused" in str(e)


async def test_unknown_job_is_404(client):
    status, body = await client.job("0" * 32)
    assert status == 404 and body["error"]["code"] == "JOB.1004"
    with pytest.raises(AgentError) as info:
        await client.wait("0" * 32, timeout=5)
    assert (info.value.status, info.value.code) == (404, "JOB.1004")


async def test_wait_times_out(client):
    job_uuid = await client.submit("PUT", "/v1/things/never", {"x": {}})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.wait(job_uuid, timeout=1)
    assert time.monotonic() - started < 3


async def test_call_get_and_async(client):
    assert (await client.call("GET", "/v1/things", {"limit": 5}))["query"] == [["limit", "5"]]
    assert await client.call("PUT", "/v1/things/timed", {"x": {}}, timeout=10) == {"returnCode": 0}


async def test_wrong_token_is_401(server):
    async with AgentClient(str(server.make_url("/")), "wrong") as c:
        with pytest.raises(AgentError) as info:
            await c.get("/v1/host/ping")
        assert (info.value.status, info.value.code) == (401, "AUTH.1001")
        with pytest.raises(AgentError) as info:
            await c.submit("POST", "/v1/things/twice", {})
        assert info.value.status == 401
        with pytest.raises(AgentError) as info:       # a 401 is not a job status
            await c.job("0" * 32)
        assert info.value.status == 401


async def test_error_mapping_for_submit_and_plain_text(client):
    with pytest.raises(AgentError) as info:
        await client.submit("POST", "/v1/things/bad", {})
    assert (info.value.status, info.value.code, info.value.details) == (400, "SYS.1001", "params.name")
    with pytest.raises(AgentError) as info:           # 2xx but not the 202 of a job
        await client.submit("POST", "/v1/things/sync", {})
    assert info.value.status == 200
    with pytest.raises(AgentError) as info:           # aiohttp's own text 404
        await client.get("/v1/nowhere")
    e = info.value
    assert (e.status, e.code) == (404, None) and "Not Found" in str(e)


def test_read_token_and_default_base_url(tmp_path):
    (tmp_path / "t").write_text("  abc \n")
    assert read_token(tmp_path / "t") == "abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        read_token(tmp_path / "empty")
    assert default_base_url(Config(server=ServerConfig(host="0.0.0.0", port=7071))) == \
        "http://127.0.0.1:7071"
    assert default_base_url(Config(server=ServerConfig(host="::", tls_cert="/c.pem"))) == \
        "https://127.0.0.1:7070"
    assert default_base_url(Config(server=ServerConfig(host="::1"))) == "http://[::1]:7070"


# -- doctor ------------------------------------------------------------------

def _config(tmp_path, mode: int = 0o600, port: int = 7070) -> Config:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    token = state / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, mode)
    # The libvirt test driver answers without a daemon, so this is deterministic.
    return Config(server=ServerConfig(host="0.0.0.0", port=port),
                  state=StateConfig(dir=state),
                  plugins={"libvirt": {"uri": "test:///default"}})


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


ALWAYS = ["config", "state dir", "token file", "agent", "auth", "libvirt",
          "/dev/kvm", "cpu virtualization", "iommu"]


async def test_doctor_healthy_agent(tmp_path, server):
    checks = await run_checks(_config(tmp_path), base_url=str(server.make_url("/")))
    by = _by_name(checks)
    assert [c.name for c in checks] == ALWAYS[:5] + ["plugin host", "plugin ceph"] + ALWAYS[5:]
    for name in ("config", "state dir", "token file", "agent", "auth", "plugin host", "libvirt"):
        assert by[name].status == "ok", by[name]
    assert "9.9.9" in by["agent"].detail
    assert by["plugin ceph"].status == "warn" and "ceph CLI not installed" in by["plugin ceph"].detail
    assert by["libvirt"].detail.startswith("test:///default: libvirt ")
    assert all(c.status in ("ok", "warn", "fail", "skip") and c.detail for c in checks)
    assert not list((tmp_path / "state").glob(".doctor-*"))   # the probe file is gone
    _, _, headers = server.app[STATE]["seen"][0]
    assert "Authorization" not in headers                      # health goes without auth

    table = render_table(checks)
    assert table.splitlines()[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert all(c.name in table for c in checks)
    assert all(len(line) <= 80 for line in table.splitlines())
    parsed = json.loads(to_json(checks))
    assert [c["name"] for c in parsed["checks"]] == [c.name for c in checks]


async def test_doctor_uses_config_address(tmp_path, server):
    # No base_url: the doctor derives it (0.0.0.0 -> 127.0.0.1) from the config.
    checks = await run_checks(_config(tmp_path, port=server.port))
    assert _by_name(checks)["auth"].status == "ok"


async def test_doctor_token_readable_by_others_fails(tmp_path, server):
    checks = await run_checks(_config(tmp_path, mode=0o644), base_url=str(server.make_url("/")))
    token = _by_name(checks)["token file"]
    assert token.status == "fail" and "chmod 600" in token.detail
    assert exit_code(checks) == 1


async def test_doctor_wrong_token_rejected(tmp_path, server):
    config = _config(tmp_path)
    config.token_file.write_text("not-the-token")
    checks = await run_checks(config, base_url=str(server.make_url("/")))
    auth = _by_name(checks)["auth"]
    assert auth.status == "fail" and "token rejected" in auth.detail


async def test_doctor_agent_unreachable(tmp_path):
    config = _config(tmp_path, port=_free_port())
    checks = await run_checks(config)
    by = _by_name(checks)
    for name in ("agent", "auth", "plugins"):
        assert by[name].status == "fail" and "systemctl start node-agent" in by[name].detail
    assert "refused" in by["agent"].detail
    assert by["token file"].status == "ok"     # local checks still ran
    assert exit_code(checks) == 1
    assert all(c.name in render_table(checks) for c in checks)


async def test_doctor_hung_agent_times_out(tmp_path):
    # Accepts the connection, never answers: the 3 s health timeout decides.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        started = time.monotonic()
        checks = await run_checks(_config(tmp_path, port=listener.getsockname()[1]))
        assert time.monotonic() - started < 8
    finally:
        listener.close()
    agent = _by_name(checks)["agent"]
    assert agent.status == "fail" and "no answer" in agent.detail


async def test_doctor_broken_state_dir_and_missing_token(tmp_path, server):
    config = Config(state=StateConfig(dir=tmp_path / "file"),
                    auth=AuthConfig(token_file=tmp_path / "nope"),
                    plugins={"libvirt": {"uri": "test:///default"}})
    (tmp_path / "file").write_text("")
    checks = await run_checks(config, base_url=str(server.make_url("/")))
    by = _by_name(checks)
    assert by["state dir"].status == "fail" and "not a directory" in by["state dir"].detail
    assert by["token file"].status == "fail" and "missing" in by["token file"].detail
    assert by["auth"].status == "fail" and "cannot read the token" in by["auth"].detail
    assert exit_code(checks) == 1


def test_exit_code_and_render():
    assert exit_code([Check("a", "ok", "x"), Check("b", "warn", "y")]) == 0
    assert exit_code([Check("a", "ok", "x"), Check("b", "fail", "y")]) == 1
    table = render_table([Check("short", "ok", "fine"),
                          Check("a longer name", "fail", "word " * 40)])
    lines = table.splitlines()
    assert len(lines) > 3 and all(len(line) <= 80 for line in lines)
    detail_col = lines[0].index("DETAIL")
    assert lines[1].index("fine") == detail_col and lines[3][:detail_col].strip() == ""


# -- doctor's IOMMU hint: the vendor's own flag (issue 13.9) -----------------------------------

def _host_tree(root, vendor: str, flags: str, cmdline: str = "BOOT_IMAGE=/vmlinuz ro quiet"):
    """/proc and /sys of a node without IOMMU groups, as the [iommu] root reads them."""
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(
        "".join(f"processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: test cpu\n"
                f"flags\t\t: fpu vme de pse tsc msr {flags} lm\n\n" for n in range(2)))
    (root / "proc/cmdline").write_text(cmdline + "\n")
    (root / "sys/kernel/iommu_groups").mkdir(parents=True)


def _doctor_process(tmp_path, root) -> dict[str, dict]:
    """`node-agent doctor --json` as an operator runs it, with [iommu] root = the tree."""
    import subprocess
    import sys

    from agentproc import REPO, free_port, write_toml
    state = tmp_path / "state"
    state.mkdir()
    (state / "token").write_text(TOKEN + "\n")
    os.chmod(state / "token", 0o600)
    cfg = write_toml(tmp_path / "agent.toml", {"server": {"port": free_port()},
                                               "state": {"dir": str(state)},
                                               "iommu": {"root": str(root)}})
    out = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(cfg), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    return {c["name"]: c for c in json.loads(out.stdout)["checks"]}


@pytest.mark.parametrize("vendor, flags, cmdline, want, unwanted", [
    # AMD with SVM off in the firmware (or a guest without nested SVM): no svm flag
    ("AuthenticAMD", "", "ro quiet", "add amd_iommu=on to the kernel command line", "intel"),
    ("AuthenticAMD", "svm", "ro quiet", "add amd_iommu=on", "intel"),
    ("HygonGenuine", "", "ro quiet", "add amd_iommu=on", "intel"),
    ("GenuineIntel", "", "ro quiet", "add intel_iommu=on", "amd"),
    ("GenuineIntel", "vmx", "ro intel_iommu=on", "enable VT-d in firmware", "amd"),
    ("AuthenticAMD", "", "ro amd_iommu=on", "enable AMD-Vi (IOMMU) in firmware", "intel"),
    ("CentaurHauls", "", "ro quiet", "intel_iommu=on (Intel) or amd_iommu=on (AMD)", None),
])
def test_doctor_iommu_hint_uses_the_vendors_flag(tmp_path, vendor, flags, cmdline, want, unwanted):
    root = tmp_path / "host"
    _host_tree(root, vendor, flags, cmdline)
    checks = _doctor_process(tmp_path, root)
    iommu = checks["iommu"]
    assert iommu["status"] == "warn" and want in iommu["detail"], iommu
    if unwanted:
        assert unwanted not in iommu["detail"].lower(), iommu
    virt = checks["cpu virtualization"]
    if not flags:
        assert virt["status"] == "fail"
        if vendor == "AuthenticAMD":
            assert "enable AMD-V (SVM) in firmware" in virt["detail"], virt
    else:
        assert virt["status"] == "ok"
