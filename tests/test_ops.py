"""Operating the agent: config refusal, flags, TLS, logs, systemd, metrics,
doctor, the call CLI and the OpenAPI document, all against real processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentproc import REPO, AgentProcess, free_port, write_toml
from conftest import run_job, submit, wait_job


def cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


# -- 1. bad config refused at start --------------------------------------------

BAD_CONFIGS = {
    "port_not_int": ('[server]\nport = "x"\n', ["server.port", "valid integer"]),
    "port_too_big": ("[server]\nport = 70000\n", ["server.port", "65535"]),
    "unknown_key": ('[server]\nport = {port}\nhots = "0.0.0.0"\n', ["server.hots", "not permitted"]),
    "unknown_section": ("[server]\nport = {port}\n[bogus]\nx = 1\n", ["unknown config section", "bogus"]),
    "bad_bool": ('[server]\nport = {port}\n[host]\nallow_run_shell = "maybe"\n',
                 ["host.allow_run_shell", "boolean"]),
    "toml_syntax": ("[server\nport = {port}\n", ["not valid TOML"]),
    "cert_without_key": ('[server]\nport = {port}\ntls_cert = "/nonexistent/cert.pem"\n',
                         ["tls_cert", "tls_key"]),
    "bad_log_level": ('[server]\nport = {port}\n[log]\nlevel = "bogus"\n', ["log.level"]),
}


@pytest.mark.parametrize("case", [
    *BAD_CONFIGS,
])
def test_bad_config_refused_with_key_and_reason(tmp_path, case):
    text, words = BAD_CONFIGS[case]
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[state]\ndir = {json.dumps(str(tmp_path / 'state'))}\n"
                   + text.replace("{port}", str(port)))
    r = cli("serve", "--config", str(cfg), timeout=10)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert refused(port)
    assert not (tmp_path / "state" / "token").exists()


def test_missing_config_file_refused(tmp_path):
    port = free_port()
    missing = tmp_path / "nope.toml"
    r = cli("serve", "--config", str(missing), "--port", str(port),
            "--state-dir", str(tmp_path / "state"), timeout=10)
    assert r.returncode == 2, r.stderr
    assert str(missing) in r.stderr and "does not exist" in r.stderr, r.stderr
    assert refused(port)


# -- 2. flags override the file ------------------------------------------------------

async def test_flags_override_the_file(agent_factory, tmp_path, http):
    a = agent_factory()
    file_port, flag_port = a.port, free_port()
    state, token_file = tmp_path / "flagstate", tmp_path / "secrets" / "api-token"
    a.port = flag_port
    a.args = ["--port", str(flag_port), "--state-dir", str(state), "--token-file", str(token_file)]
    a.start()
    assert refused(file_port)
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert (state / "state.db").exists()
    assert not (state / "token").exists() and not a.state_dir.exists()
    token = token_file.read_text().strip()
    async with http.get(f"http://127.0.0.1:{flag_port}/v1/host/ping",
                        headers={"Authorization": f"OAuth {token}"}) as r:
        assert r.status == 200


# -- 3. TLS and client certificates ------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=node-agent test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, eku, san in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
                           ("client", "clientAuth", "")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       f"extendedKeyUsage={eku}\n{san}")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    return d


def _client_ctx(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    return ctx


async def test_tls_serves_https(agent_factory, pki):
    a = agent_factory({"server": {"tls_cert": str(pki / "server.pem"),
                                  "tls_key": str(pki / "server.key")}}).start()
    assert a.url.startswith("https://")
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/v1/host/ping", headers=a.headers,
                         ssl=_client_ctx(pki, False)) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            # The system trust store does not know our CA.
            async with s.get(a.url + "/v1/health", ssl=ssl.create_default_context()):
                pass
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{a.port}/v1/health") as r:
                await r.read()


async def test_mtls_requires_a_client_certificate(agent_factory, pki):
    a = agent_factory({"server": {"tls_cert": str(pki / "server.pem"),
                                  "tls_key": str(pki / "server.key"),
                                  "tls_client_ca": str(pki / "ca.pem")}})
    a.start(wait=False)
    good = _client_ctx(pki, True)
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as s:
        while True:
            assert a.proc.poll() is None, a.log()
            try:
                async with s.get(a.url + "/v1/health", ssl=good) as r:
                    assert r.status == 200
                    break
            except aiohttp.ClientConnectorError:
                assert time.monotonic() < deadline, a.log()
                await asyncio.sleep(0.05)
        async with s.get(a.url + "/v1/host/ping", headers=a.headers, ssl=good) as r:
            assert r.status == 200
    async with aiohttp.ClientSession() as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with s.get(a.url + "/v1/host/ping", headers=a.headers,
                             ssl=_client_ctx(pki, False)) as r:
                await r.read()


# -- 4. logging ----------------------------------------------------------------

SECRET = "S3CRET-VALUE-123"
SCRIPT = f"echo {SECRET} > /dev/null; echo ok"


async def _traffic(http, a: AgentProcess) -> str:
    """Three pings, a shell job, one 404; returns the job's uuid."""
    for _ in range(3):
        async with http.get(a.url + "/v1/host/ping", headers=a.headers) as r:
            assert r.status == 200
    status, reply = await submit(http, a, "PUT", "/v1/host/actions", {"kvmRunShell": {"script": SCRIPT}})
    assert status == 202
    status, result = await wait_job(http, a, reply["location"])
    assert status == 200 and result["returnCode"] == 0
    async with http.get(a.url + "/v1/no/such/url", headers=a.headers) as r:
        assert r.status == 404
    await asyncio.sleep(0.5)   # the log is buffered and flushed every 0.2 s
    return reply["location"].rsplit("/", 1)[1]


async def test_text_access_and_audit_log(agent, http):
    job = await _traffic(http, agent)
    log = agent.log()
    lines = log.splitlines()
    ping = [l for l in lines if re.search(r"node_agent\.access: GET /v1/host/ping 200 \d+\.\dms$", l)]
    assert len(ping) == 3, log
    put = [l for l in lines if "PUT /v1/host/actions" in l]
    assert len(put) == 1 and re.search(rf"PUT /v1/host/actions 202 \d+\.\dms job={job}$", put[0]), put
    # an unrouted URL is logged without its dynamic part (issue 13.8)
    assert any(re.search(r"GET /v1/<unrouted> 404 \d+\.\dms$", l) for l in lines), log
    digest = hashlib.sha256(SCRIPT.encode()).hexdigest()
    audit = [l for l in lines if "node_agent.audit" in l]
    assert len(audit) == 1, log
    assert f"sha256={digest}" in audit[0] and "rc=0" in audit[0] and f"job={job}" in audit[0]
    assert SECRET not in log


@pytest.mark.parametrize("how", ["flag", "config"])
async def test_json_access_and_audit_log(agent_factory, http, how):
    config = {"host": {"allow_run_shell": True}}
    if how == "config":
        config["log"] = {"format": "json"}
    a = agent_factory(config, args=["--log-format", "json"] if how == "flag" else []).start()
    job = await _traffic(http, a)
    log = a.log()
    records = []
    for line in log.splitlines():
        if line.startswith("{") or "/v1/" in line:
            records.append(json.loads(line))     # every log record is one JSON object
    access = [r for r in records if r["logger"] == "node_agent.access"]
    pings = [r["http"] for r in access if r["http"]["path"] == "/v1/host/ping"]
    assert len(pings) == 3
    for h in pings:
        assert h["method"] == "GET" and h["status"] == 200 and isinstance(h["ms"], (int, float))
        assert h["job"] is None
    puts = [r["http"] for r in access if r["http"]["method"] == "PUT"]
    assert len(puts) == 1 and puts[0]["status"] == 202 and puts[0]["job"] == job
    assert puts[0]["path"] == "/v1/host/actions"
    audit = [r["audit"] for r in records if "audit" in r]
    assert audit == [{"action": "kvmRunShell", "job": job, "caller": "127.0.0.1",
                      "sha256": hashlib.sha256(SCRIPT.encode()).hexdigest(),
                      "bytes": len(SCRIPT), "rc": 0}]
    assert SECRET not in log


# -- 5. systemd notify end to end ------------------------------------------------------

def test_systemd_notify_ready_watchdog_stopping(agent_factory):
    sockdir = tempfile.mkdtemp(prefix="na-notify-")    # AF_UNIX paths must stay short
    path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        a = agent_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""})
        a.start()

        def recv(timeout: float) -> str | None:
            sock.settimeout(timeout)
            try:
                return sock.recv(4096).decode()
            except TimeoutError:
                return None

        first = recv(5)
        assert first is not None and "READY=1" in first.split("\n"), first
        while (m := recv(0.01)) is not None:     # whatever was queued during start-up
            assert m == "WATCHDOG=1", m
        pets, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 1.0:
            m = recv(max(0.01, 1.0 - (time.monotonic() - t0)))
            if m is not None:
                assert m == "WATCHDOG=1", m
                pets += 1
        assert pets >= 2, pets
        a.proc.send_signal(15)
        deadline = time.monotonic() + 10
        seen = []
        while "STOPPING=1" not in seen:
            assert time.monotonic() < deadline, seen
            m = recv(1)
            if m is not None:
                seen.append(m)
        assert a.proc.wait(10) == 0
    finally:
        sock.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(sockdir)


# -- 6. /metrics ---------------------------------------------------------------------

async def test_metrics(agent, http):
    async with http.get(agent.url + "/metrics") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "AUTH.1001"
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        assert r.status == 200
    status, _ = await run_job(http, agent, "PUT", "/v1/host/actions", {"kvmRunShell": {"script": "true"}})
    assert status == 200
    async with http.get(agent.url + "/metrics", headers=agent.headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def find(name, **labels):
        return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    assert find("node_agent_http_requests_total", method="GET", route="/v1/host/ping", status="200")[0].value >= 1
    assert find("node_agent_http_requests_total", method="PUT", route="/v1/host/actions", status="202")
    assert find("node_agent_http_requests_total", method="GET", route="/metrics", status="401")
    assert find("node_agent_http_request_seconds_bucket", method="GET", route="/v1/host/ping", le="+Inf")
    assert find("node_agent_jobs", state="Succeeded")[0].value >= 1
    assert {s.labels["kind"] for s in find("node_agent_outbox_backlog")} == {"webhook", "event"}
    assert find("node_agent_host_memory_bytes", kind="total")[0].value > 0


# -- 7. doctor against the running agent ---------------------------------------------------

def _checks(out: str) -> dict[str, dict]:
    doc = json.loads(out)
    assert isinstance(doc["checks"], list) and isinstance(doc["ok"], bool)
    return {c["name"]: c for c in doc["checks"]}


def test_doctor_against_running_agent(agent):
    cfg = str(agent.workdir / "agent.toml")
    r = cli("doctor", "--config", cfg)
    assert r.stdout.splitlines()[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert re.search(r"^OK\s+agent\s+http://127\.0\.0\.1:\d+: version 0\.1\.0, status ok$",
                     r.stdout, re.M), r.stdout
    assert re.search(r"^OK\s+token file\s+/", r.stdout, re.M), r.stdout   # long paths wrap
    assert re.search(r"^OK\s+auth\s+token accepted", r.stdout, re.M), r.stdout
    assert re.search(r"^OK\s+plugin host\s+available$", r.stdout, re.M), r.stdout

    r = cli("doctor", "--config", cfg, "--json")
    checks = _checks(r.stdout)
    assert checks["agent"]["status"] == "ok" and "version 0.1.0" in checks["agent"]["detail"]
    assert checks["token file"]["status"] == "ok"
    assert checks["plugin host"]["status"] == "ok"
    assert r.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)

    token = agent.state_dir / "token"
    os.chmod(token, 0o644)
    r = cli("doctor", "--config", cfg, "--json")
    checks = _checks(r.stdout)
    assert checks["token file"]["status"] == "fail" and "chmod 600" in checks["token file"]["detail"]
    assert r.returncode == 1
    os.chmod(token, 0o600)

    agent.stop()
    r = cli("doctor", "--config", cfg, "--json")
    checks = _checks(r.stdout)
    assert checks["agent"]["status"] == "fail" and "connection refused" in checks["agent"]["detail"]
    assert checks["token file"]["status"] == "ok"
    assert r.returncode == 1


# -- 8. the call CLI ----------------------------------------------------------------

def test_call_cli(agent):
    cfg = str(agent.workdir / "agent.toml")
    r = cli("call", "GET", "/v1/host", "--config", cfg)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert {"cpu", "memory", "os", "kvm", "versions"} <= set(facts)

    r = cli("call", "PUT", "/v1/host/actions", '{"kvmRunShell": {"script": "echo hi"}}', "--config", cfg)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["stdout"] == "hi\n" and result["returnCode"] == 0

    r = cli("call", "PUT", "/v1/host/actions", '{"noSuchAction": {}}', "--config", cfg)
    assert r.returncode == 1 and r.stdout == ""
    assert "SYS.1006" in r.stderr and "noSuchAction" in r.stderr, r.stderr

    r = cli("call", "PUT", "/v1/host/actions", '{"kvmRunShell": {"script": "sleep 5", "timeout": 1}}',
            "--config", cfg)
    assert r.returncode == 1 and "HOST.1408" in r.stderr, r.stderr


# -- 9. the OpenAPI document -------------------------------------------------------

EXPECTED_ROUTES = {
    "/v1/health": {"get"}, "/v1/openapi.json": {"get"}, "/metrics": {"get"},
    "/v1/api-jobs": {"get"}, "/v1/api-jobs/{uuid}": {"get", "delete"}, "/v1/events": {"get"},
    "/v1/host": {"get"}, "/v1/host/ping": {"get"}, "/v1/hypervisor-types": {"get"},
    "/v1/host/actions": {"put"},
}
VERBS = ("get", "put", "post", "delete", "patch")


async def test_openapi_document(agent, http):
    async with http.get(agent.url + "/v1/openapi.json", headers=agent.headers) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    for path, verbs in EXPECTED_ROUTES.items():
        assert path in paths, path
        assert verbs <= set(paths[path]), (path, set(paths[path]))
    body = paths["/v1/host/actions"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    names = {k for alt in body["oneOf"] for k in alt["properties"]}
    assert {"connectHost", "reconnectHost", "kvmRunShell", "updateHostOS"} <= names

    schemas = doc["components"]["schemas"]

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)
    all_refs = set(refs(doc))
    assert all_refs
    for ref in all_refs:
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref

    # The document matches what the agent answers: every documented verb is
    # routed, every undocumented one is 405.
    for path, ops in paths.items():
        url = agent.url + re.sub(r"\{[^}]+\}", uuid.uuid4().hex, path)
        for verb in VERBS:
            async with http.request(verb.upper(), url, headers=agent.headers) as r:
                if verb in ops:
                    assert r.status != 405, (verb, path)
                    if r.status == 404:
                        assert (await r.json())["error"]["code"] != "SYS.1004", (verb, path)
                else:
                    assert r.status == 405, (verb, path, r.status)
                    allowed = {m.lower() for m in r.headers["Allow"].split(", ")}
                    assert allowed == set(ops) & set(VERBS), (path, allowed)
