"""Bad requests against a real agent: each gets a clear 4xx with the contract's
error body, and nothing is run or stored (the job count does not move, a
script's marker file never appears)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agentproc import AgentProcess
from conftest import run_job, submit

MAX_BODY = 4096
ACTIONS = ("connectHost", "kvmRunShell", "reconnectHost", "updateHostOS")
_UNSET = object()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One agent for the module (shell allowed, small body limit): fast."""
    a = AgentProcess(tmp_path_factory.mktemp("shared"),
                     {"host": {"allow_run_shell": True}, "server": {"max_body_bytes": MAX_BODY}})
    a.start()
    yield a
    a.stop()


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "ran"


async def job_total(http, agent: AgentProcess) -> int:
    async with http.get(agent.url + "/v1/api-jobs", params={"count": "true"}, headers=agent.headers) as r:
        assert r.status == 200
        return (await r.json())["total"]


async def refused(http, agent: AgentProcess, method: str, path: str, *, status: int,
                  code: str | None = None, words: tuple[str, ...] = (), body: Any = _UNSET,
                  data: bytes | None = None, headers: dict | None = None, token: bool = True,
                  params: Any = None, marker: Path | None = None):
    """Send one bad request; check the 4xx, the error body, and that nothing happened."""
    before = await job_total(http, agent)
    h = dict(agent.headers) if token else {}
    h.update(headers or {})
    kw: dict[str, Any] = {}
    if body is not _UNSET:
        kw["json"] = body
    elif data is not None:
        kw["data"] = data
        h.setdefault("Content-Type", "application/json")
    async with http.request(method, agent.url + path, headers=h, params=params, **kw) as r:
        assert r.status == status, (r.status, await r.text())
        assert r.content_type == "application/json"
        reply = await r.json()
        resp_headers = r.headers
    err = reply["error"]
    assert set(reply) == {"error"} and set(err) == {"code", "description", "details",
                                                   "elaboration", "opaque", "cause"}, reply
    if code:
        assert err["code"] == code, err
    assert isinstance(err["description"], str) and err["description"]
    for w in words:
        assert w.lower() in err["description"].lower(), (w, err["description"])
    if marker is not None:
        await asyncio.sleep(0.3)      # time enough for a script that wrongly started
        assert not marker.exists()
    assert await job_total(http, agent) == before
    return err, resp_headers


def shell(marker: Path, **extra: Any) -> dict:
    return {"kvmRunShell": {"script": f"touch {marker}", **extra}}


# -- the body ------------------------------------------------------------------------

async def test_malformed_json(shared, http, marker):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1003",
                  words=("not valid JSON",), data=f'{{"kvmRunShell": {{"script": "touch {marker}"'.encode(),
                  marker=marker)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"kvmRunShell"', b"42", b"null", b""])
async def test_body_not_an_object(shared, http, raw):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, data=raw,
                  words=("must be a JSON object",))


async def test_unknown_action_lists_the_known_ones(shared, http):
    err, _ = await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1006",
                           body={"startTheWorld": {}}, words=("unknown action", "startTheWorld", *ACTIONS))


async def test_two_actions_in_one_body(shared, http, marker):
    body = {**shell(marker), "reconnectHost": {}}
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1006", body=body,
                  words=("exactly one action", "got 2"), marker=marker)


async def test_deeply_nested_json(shared, http):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, data=b"[" * 3000,
                  words=("JSON",))


async def test_action_params_not_an_object(shared, http):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, body={"kvmRunShell": "echo"},
                  words=("kvmRunShell", "JSON object"))


@pytest.mark.parametrize("action", ["reconnectHost", "kvmRunShell", "connectHost"])
async def test_action_params_null_is_not_an_object(shared, http, action):
    # Issue 10.5: the schema says an object; null is refused like any other non-object.
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, body={action: None},
                  words=(action, "JSON object"))


# -- verbs and URLs ---------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allow", [
    ("POST", "/v1/host/actions", "PUT"),
    ("GET", "/v1/host/actions", "PUT"),
    ("DELETE", "/v1/host", "GET"),
    ("PUT", "/v1/host/ping", "GET"),
    ("POST", "/v1/api-jobs", "GET"),
])
async def test_wrong_verb_405_with_allow(shared, http, marker, method, path, allow):
    err, headers = await refused(http, shared, method, path, status=405, code="SYS.1005",
                                 body=shell(marker), words=(method, path, allow), marker=marker)
    assert headers["Allow"] == allow


@pytest.mark.parametrize("path", ["/v1/nothing-here", "/nope", "/v1/host/nope", "/v1/host/actions/x"])
async def test_unknown_url_404_with_error_body(shared, http, path):
    await refused(http, shared, "GET", path, status=404, code="SYS.1004", words=("no such URL", path))


# -- parameters -------------------------------------------------------------------------

async def test_missing_field(shared, http):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1002",
                  body={"kvmRunShell": {"timeout": 5}}, words=("kvmRunShell", "'script'", "required"))


async def test_extra_field(shared, http, marker):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1002",
                  body=shell(marker, bogusField=1), words=("'bogusField'", "unknown field"), marker=marker)


@pytest.mark.parametrize("timeout", ["abc", "60", 1.5, [1], None, True])
async def test_mistyped_field(shared, http, marker, timeout):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1002",
                  body=shell(marker, timeout=timeout), words=("'timeout'",), marker=marker)


async def test_run_shell_timeout_above_the_max(shared, http, marker):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="HOST.1002",
                  body=shell(marker, timeout=3601), words=("timeout", "3600"), marker=marker)


@pytest.mark.parametrize("excluded", [["-o", "--foo"], ["--foo"], ["vim", "-oDpkg::Options::=x"]])
async def test_update_host_os_refuses_options_as_package_names(shared, http, excluded):
    bad = next(p for p in excluded if p.startswith("-"))
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1002",
                  body={"updateHostOS": {"excludePackages": excluded, "dryRun": True}},
                  words=("not a package name", bad))


async def _ping_host_uuid(http, agent) -> str:
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        return (await r.json())["hostUuid"]


@pytest.mark.parametrize("params,field", [
    ({"hostUuid": "not-a-uuid", "managementServerUrl": "http://127.0.0.1:9/"}, "hostUuid"),
    ({"hostUuid": "g" * 32, "managementServerUrl": "http://127.0.0.1:9/"}, "hostUuid"),
    ({"hostUuid": uuid.uuid4().hex, "managementServerUrl": "not a url"}, "managementServerUrl"),
    ({"hostUuid": uuid.uuid4().hex, "managementServerUrl": "ftp://controller/"}, "managementServerUrl"),
    ({"hostUuid": uuid.uuid4().hex}, "managementServerUrl"),
])
async def test_connect_host_bad_params(shared, http, params, field):
    before = await _ping_host_uuid(http, shared)
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="SYS.1002",
                  body={"connectHost": params}, words=(f"'{field}'",))
    assert await _ping_host_uuid(http, shared) == before
    # Nothing was registered: reconnecting is still refused.
    await refused(http, shared, "PUT", "/v1/host/actions", status=409, code="HOST.1009",
                  body={"reconnectHost": {}}, words=("connectHost",))


@pytest.mark.parametrize("bad", ["-" * 36, "0123456789abcdef-0123456789abcdef012"])
async def test_connect_host_uuid_with_dashes_must_be_a_uuid(agent, http, bad):
    await refused(http, agent, "PUT", "/v1/host/actions", status=400,
                  body={"connectHost": {"hostUuid": bad, "managementServerUrl": "http://127.0.0.1:9/"}},
                  words=("'hostUuid'",))


# -- headers ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["not-a-uuid", str(uuid.uuid4()), uuid.uuid1().hex, "0" * 32,
                                 uuid.uuid4().hex + "0", ""])
async def test_invalid_x_job_uuid(shared, http, marker, bad):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="JOB.1400",
                  body=shell(marker), headers={"X-Job-UUID": bad}, words=("X-Job-UUID",), marker=marker)


async def test_reused_x_job_uuid_with_another_body(shared, http, marker, tmp_path):
    job = uuid.uuid4().hex
    status, result = await run_job(http, shared, "PUT", "/v1/host/actions",
                                   {"kvmRunShell": {"script": "echo first"}}, {"X-Job-UUID": job})
    assert status == 200 and result["stdout"] == "first\n"
    await refused(http, shared, "PUT", "/v1/host/actions", status=409, code="JOB.1009",
                  body=shell(marker), headers={"X-Job-UUID": job}, words=(job, "already used"),
                  marker=marker)
    async with http.get(f"{shared.url}/v1/api-jobs/{job}", headers=shared.headers) as r:
        assert r.status == 200 and (await r.json())["stdout"] == "first\n"


@pytest.mark.parametrize("hook", ["ftp://x", "javascript:alert(1)", "http://", "/relative/hook",
                                  "http:///nohost", "not a url at all"])
async def test_webhook_must_be_an_http_url(shared, http, marker, hook):
    await refused(http, shared, "PUT", "/v1/host/actions", status=400, code="JOB.1401",
                  body=shell(marker), headers={"X-Web-Hook": hook}, words=("X-Web-Hook", "http"),
                  marker=marker)


@pytest.mark.parametrize("auth", [None, "OAuth wrong-token", "Basic dXNlcjpwYXNz", "OAuth", "Bearer "])
async def test_missing_or_wrong_token_401(shared, http, marker, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    err, _ = await refused(http, shared, "PUT", "/v1/host/actions", status=401, code="AUTH.1001",
                           body=shell(marker), token=False, headers=headers, words=("token",),
                           marker=marker)
    assert shared.token not in json.dumps(err)


# -- size --------------------------------------------------------------------------------

async def test_oversize_body_413(shared, http, marker):
    body = shell(marker)
    body["kvmRunShell"]["script"] += "\n#" + "x" * 10_000
    await refused(http, shared, "PUT", "/v1/host/actions", status=413, code="SYS.1013",
                  data=json.dumps(body).encode(), words=("larger than", str(MAX_BODY)),
                  marker=marker)


# -- the jobs collection and polling ---------------------------------------------------

@pytest.mark.parametrize("params,word", [
    ([("q", "state = Running")], "state = Running"),
    ([("q", "nosuchfield=1")], "nosuchfield"),
    ([("q", "")], "q"),
    ([("fields", "uuid,bogus")], "bogus"),
    ([("limit", "-1")], "limit"),
    ([("limit", "ten")], "limit"),
    ([("sort", "+nosuchfield")], "nosuchfield"),
])
async def test_jobs_query_refuses_bad_conditions_and_fields(shared, http, params, word):
    await refused(http, shared, "GET", "/v1/api-jobs", status=400, params=params, words=(word,))


@pytest.mark.parametrize("wait", ["-1", "abc", "nan", ""])
async def test_poll_with_bad_wait_400(shared, http, wait):
    status, reply = await submit(http, shared, "PUT", "/v1/host/actions", {"kvmRunShell": {"script": "true"}})
    assert status == 202
    path = reply["location"].split(shared.url, 1)[1]
    await refused(http, shared, "GET", path, status=400, code="JOB.1402", params={"wait": wait},
                  words=("wait",))


# -- a disabled action -------------------------------------------------------------------

async def test_run_shell_disabled_503_nothing_stored(agent_factory, http, marker):
    a = agent_factory({"host": {"allow_run_shell": False}}, name="noshell").start()
    await refused(http, a, "PUT", "/v1/host/actions", status=503, code="HOST.1003",
                  body=shell(marker), words=("disabled", "allow_run_shell"), marker=marker)
    job = uuid.uuid4().hex
    await refused(http, a, "PUT", "/v1/host/actions", status=503, code="HOST.1003",
                  body=shell(marker), headers={"X-Job-UUID": job}, marker=marker)
    async with http.get(f"{a.url}/v1/api-jobs/{job}", headers=a.headers) as r:
        assert r.status == 404
    assert await job_total(http, a) == 0
