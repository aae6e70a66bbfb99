"""Ceph primary and backup storage against a real cluster, over HTTP, cross-checked
with the ceph and rbd CLIs.

One cluster for the session (ceph_fixture), one agent for the module with short
timeouts.  The tests run in order and share the storages registered by the
module fixtures; the last one stops the mon and starts it again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agentproc import AgentProcess, free_port
from ceph_fixture import MicroCeph, ceph_cluster, free_port_pair  # noqa: F401 (fixture)
from conftest import run_job, submit, wait_job
from plugins.ceph.secrets import check_key as secrets_check_key

PS = "/v1/primary-storage/ceph"
BS = "/v1/backup-storage/ceph"
TIMEOUTS = {"mount_timeout": 3, "mon_op_timeout": 3, "osd_op_timeout": 8, "health_interval": 1}
MIB = 1 << 20


# --- helpers ------------------------------------------------------------------------------

def sync_job(agent: AgentProcess, method: str, path: str, body=None, timeout: float = 60):
    """Submit and wait, without an event loop (for module fixtures)."""
    def call(m, url, data=None):
        req = urllib.request.Request(url, method=m, data=None if data is None else json.dumps(data).encode(),
                                     headers={**agent.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
    status, reply = call(method, agent.url + path, body)
    deadline = time.monotonic() + timeout
    while status == 202 and "location" in reply:
        loc = reply["location"]
        while True:
            status, reply = call("GET", loc + "?wait=5")
            if status != 202 or time.monotonic() > deadline:
                break
        break
    return status, reply


async def get(http, agent, path, **params):
    async with http.get(agent.url + path, headers=agent.headers, params=params) as r:
        return r.status, await r.json()


async def job(http, agent, method, path, body=None, timeout=60):
    return await run_job(http, agent, method, path, body, timeout=timeout)


async def events_since(http, agent, since: int, predicate, timeout: float):
    """The first event after seq ``since`` matching predicate (from /v1/events)."""
    deadline = time.monotonic() + timeout
    last = since
    while time.monotonic() < deadline:
        try:
            async with http.get(agent.url + "/v1/events", params={"since": str(last)},
                                headers=agent.headers,
                                timeout=aiohttp.ClientTimeout(total=max(deadline - time.monotonic(), 0.5))) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        ev = json.loads(line[6:])
                        last = ev["seq"]
                        if predicate(ev):
                            return ev
        except (asyncio.TimeoutError, aiohttp.ClientPayloadError):
            pass
    raise AssertionError(f"no matching event within {timeout} s")


async def last_seq(http, agent) -> int:
    seq = 0
    try:
        async with http.get(agent.url + "/v1/events", params={"since": "0"}, headers=agent.headers,
                            timeout=aiohttp.ClientTimeout(total=1.5)) as r:
            async for line in r.content:
                if line.startswith(b"id: "):
                    seq = int(line[4:])
                elif line.startswith(b": connected"):
                    break
    except asyncio.TimeoutError:
        pass
    return seq


def no_secret_anywhere(agent: AgentProcess, key: str) -> None:
    """The key is in no file of the state directory but its own 0600 keyring, nor in the log."""
    assert key not in agent.log()
    keys_dir = agent.state_dir / "ceph" / "keys"
    for p in agent.state_dir.rglob("*"):
        if p.is_file() and p.parent != keys_dir:
            assert key.encode() not in p.read_bytes(), p


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cagent(tmp_path_factory, ceph_cluster):  # noqa: F811
    a = AgentProcess(tmp_path_factory.mktemp("ceph-agent"), {"ceph": TIMEOUTS}).start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def primary(cagent, ceph_cluster):  # noqa: F811
    status, body = sync_job(cagent, "POST", PS, {"params": {
        "name": "ceph-ps", "monUrls": [f"127.0.0.1:{ceph_cluster.port}"], "key": ceph_cluster.key,
        "rootVolumePoolName": "ps-root", "dataVolumePoolName": "ps-data",
        "imageCachePoolName": "ps-cache"}, "systemTags": []})
    assert status == 200, body
    return body["inventory"]


@pytest.fixture(scope="module")
def backups(cagent, ceph_cluster):  # noqa: F811
    out = []
    for pool in ("bs-one", "bs-two"):
        status, body = sync_job(cagent, "POST", BS, {"params": {
            "name": pool, "monUrls": [f"v2:127.0.0.1:{ceph_cluster.port}"], "user": "client.admin",
            "keyringPath": str(ceph_cluster.keyring), "poolName": pool}})
        assert status == 200, body
        out.append(body["inventory"])
    return out


@pytest.fixture
async def image_server(tmp_path):
    """A local HTTP server for imports: files under tmp_path/www; /missing is a 404."""
    www = tmp_path / "www"
    www.mkdir()
    app = web.Application()
    app.router.add_static("/files/", www)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield www, f"http://127.0.0.1:{port}/files"
    await runner.cleanup()


# --- the plugin without its bindings ---------------------------------------------------------

async def test_bindings_missing_reports_unavailable_agent_still_starts(agent_factory, http, tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "rados.py").write_text("raise ImportError('no librados here (test stub)')\n")
    a = agent_factory(env={"PYTHONPATH": str(stub)}).start()
    async with http.get(a.url + "/v1/health") as r:
        ceph = next(p for p in (await r.json())["plugins"] if p["name"] == "ceph")
    assert ceph["available"] is False
    assert "python3-rados" in ceph["reason"] and "no librados here" in ceph["reason"]
    # Bad input is a 400 first (issue 10.4: whether or not the plugin is up); a valid request, 503.
    status, body = await submit(http, a, "POST", PS, {"params": {"monUrls": ["127.0.0.1"], "key": "x"}})
    assert status == 400, body
    key = "AQAA8VNlAAAAABAAAAECAwQFBgcICQoLDA0ODw=="      # well-formed, for no cluster
    status, body = await submit(http, a, "POST", PS, {"params": {"monUrls": ["127.0.0.1"], "key": key}})
    assert status == 503 and body["error"]["code"] == "SYS.1504"
    status, _ = await get(http, a, "/v1/host/ping")
    assert status == 200


# --- registration ------------------------------------------------------------------------------

async def test_register_primary_storage(cagent, primary, ceph_cluster, http):
    c = ceph_cluster
    assert primary["fsid"] == c.fsid == c.ceph("fsid")["fsid"]
    assert primary["status"] == "Connected" and primary["health"] == "HEALTH_OK"
    assert primary["type"] == "Ceph" and primary["user"] == "admin"
    assert "key" not in json.dumps(primary).lower().replace("keyring", "")
    assert [m["status"] for m in primary["mons"]] == ["Connected"]
    detail = {p["pool_name"]: p for p in c.ceph("osd", "pool", "ls", "detail")}
    for name in ("ps-root", "ps-data", "ps-cache"):
        assert "rbd" in detail[name]["application_metadata"], name
    # the key: in one 0600 file, nowhere else
    keyring = cagent.state_dir / "ceph" / "keys" / f"{primary['uuid']}.keyring"
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyring.parent.stat().st_mode) == 0o700
    assert c.key in keyring.read_text()
    no_secret_anywhere(cagent, c.key)
    # listed with the query API, and by uuid
    status, body = await get(http, cagent, PS, q=f"name={primary['name']}", fields="uuid,fsid")
    assert status == 200 and body["inventories"] == [{"uuid": primary["uuid"], "fsid": c.fsid}]
    status, body = await get(http, cagent, f"{PS}/{primary['uuid']}")
    assert status == 200 and body["inventory"]["rootVolumePoolName"] == "ps-root"
    status, body = await get(http, cagent, f"{PS}/{uuidlib.uuid4().hex}")
    assert status == 404 and body["error"]["code"] == "CEPH.1004"
    status, body = await get(http, cagent, PS, q="nosuchfield=1")
    assert status == 400


async def test_capacity_one_df_matches_ceph_df(cagent, primary, ceph_cluster, http):
    status, cap = await get(http, cagent, f"{PS}/{primary['uuid']}/capacity")
    assert status == 200, cap
    df = ceph_cluster.ceph("df")
    assert cap["totalCapacity"] == df["stats"]["total_bytes"]
    assert abs(cap["availableCapacity"] - df["stats"]["total_avail_bytes"]) < 64 * MIB
    assert {p["poolName"] for p in cap["pools"]} == {"ps-root", "ps-data", "ps-cache"}
    for p in cap["pools"]:
        if p["reported"]:
            assert p["maxAvailable"] > 0 and p["quotaBytes"] == 0


async def test_bad_registrations_are_refused_clearly(cagent, ceph_cluster, http):
    c = ceph_cluster
    mon = f"127.0.0.1:{c.port}"
    wrong = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True).stdout.strip()
    uuid = uuidlib.uuid4().hex
    t0 = time.monotonic()
    status, body = await job(http, cagent, "POST", PS, {"params": {"uuid": uuid, "monUrls": [mon], "key": wrong}})
    assert status == 503 and body["error"]["code"] == "CEPH.1401", body
    assert "refused the credentials" in body["error"]["description"]
    assert wrong not in json.dumps(body) and time.monotonic() - t0 < 5
    assert not (cagent.state_dir / "ceph" / "keys" / f"{uuid}.keyring").exists()
    status, body = await get(http, cagent, f"{PS}/{uuid}")
    assert status == 404
    # a malformed key: 400 naming the field, never echoing it
    bad_key = "AQBnotreallyakey" + "x" * 20
    status, body = await submit(http, cagent, "POST", PS, {"params": {"monUrls": [mon], "key": bad_key}})
    assert status == 400 and "'key'" in body["error"]["description"]
    assert bad_key not in json.dumps(body)
    # bad pool names, no mons, a missing keyring, a wrong user in a keyring, bad mon URLs
    for params, words in [
        ({"monUrls": [mon], "key": c.key, "dataVolumePoolName": "bad/pool"}, "pool name 'bad/pool'"),
        ({"monUrls": [mon], "key": c.key, "rootVolumePoolName": "-x"}, "is not allowed"),
        ({"monUrls": [], "key": c.key}, "monurls"),
        ({"monUrls": [mon]}, "key"),
        ({"monUrls": [mon], "keyringPath": "/nonexistent/keyring"}, "does not exist"),
        ({"monUrls": [mon], "keyringPath": str(c.keyring), "user": "nobody"}, "no section [client.nobody]"),
        ({"monUrls": ["127.0.0.1:99999"], "key": c.key}, "out of range"),
        ({"monUrls": ["root:secretpw@bad host/?monPort=6789"], "key": c.key}, "neither an ip"),
        ({"monUrls": [mon], "key": c.key, "pgNum": 0}, "pgnum"),
    ]:
        status, body = await submit(http, cagent, "POST", PS, {"params": params})
        assert status == 400, (params, body)
        assert words.lower() in body["error"]["description"].lower(), (words, body)
        assert c.key not in json.dumps(body) and "secretpw" not in json.dumps(body)
    # nothing answers at that address: an error within client_mount_timeout (3 s)
    dead = free_port()
    t0 = time.monotonic()
    status, body = await job(http, cagent, "POST", BS, {"params": {"monUrls": [f"127.0.0.1:{dead}"], "key": c.key}})
    assert status == 503 and body["error"]["code"] == "CEPH.1408", body
    assert time.monotonic() - t0 < 3 + 3
    no_secret_anywhere(cagent, c.key)


def not_cephx_keys(real: str) -> dict[str, str]:
    """Keys that are 28 bytes of base64 (the old length check passed them) but no cephx secret."""
    raw = base64.b64decode(real)
    typ, sec, nsec, length = struct.unpack_from("<HIIH", raw)
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"type": enc(struct.pack("<HIIH", 5, sec, nsec, length) + raw[12:]),
            "declared length": enc(struct.pack("<HIIH", typ, sec, nsec, 32) + raw[12:]),
            "creation time": enc(struct.pack("<HIIH", typ, sec, 2_000_000_000, length) + raw[12:])}


async def test_a_key_that_is_no_cephx_secret_is_400_and_never_logged(cagent, ceph_cluster, http, tmp_path):
    c = ceph_cluster
    mon = f"127.0.0.1:{c.port}"
    real = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True).stdout.strip()
    assert secrets_check_key(real) is None          # what ceph-authtool makes passes
    for why, key in not_cephx_keys(real).items():
        uuid = uuidlib.uuid4().hex
        status, body = await submit(http, cagent, "POST", PS, {"params": {
            "uuid": uuid, "monUrls": [mon], "key": key}})
        assert status == 400 and "'key'" in body["error"]["description"], (why, body)
        assert "not a cephx secret" in body["error"]["description"], (why, body)
        assert key not in json.dumps(body) and key not in cagent.log(), why
        assert not (cagent.state_dir / "ceph" / "keys" / f"{uuid}.keyring").exists()
    # an operator's keyring with such a key: librados refuses it, and what librados
    # prints about it (the keyring line, key included) stays out of the agent's log
    bad = not_cephx_keys(real)["type"]
    keyring = tmp_path / "bad.keyring"
    keyring.write_text(f"[client.admin]\n\tkey = {bad}\n")
    status, body = await job(http, cagent, "POST", PS, {"params": {"monUrls": [mon], "keyringPath": str(keyring)}})
    assert status == 503, body
    assert bad not in json.dumps(body) and bad not in cagent.log()
    # a real key the cluster does not know: a clean auth error, the key nowhere
    status, body = await job(http, cagent, "POST", PS, {"params": {"monUrls": [mon], "key": real}})
    assert status == 503 and body["error"]["code"] == "CEPH.1401", body
    assert real not in json.dumps(body) and real not in cagent.log()


async def test_register_the_same_uuid_twice_is_409(cagent, primary, ceph_cluster, http):
    status, body = await submit(http, cagent, "POST", PS, {"params": {
        "uuid": primary["uuid"], "monUrls": [f"127.0.0.1:{ceph_cluster.port}"], "key": ceph_cluster.key}})
    assert status == 409 and body["error"]["code"] == "SYS.1009"      # the core's resourceUuid rule
    status, body = await submit(http, cagent, "POST", PS, {"params": {
        "resourceUuid": primary["uuid"].upper(), "monUrls": [f"127.0.0.1:{ceph_cluster.port}"],
        "key": ceph_cluster.key}})
    assert status == 409 and body["error"]["code"] == "SYS.1009"


# --- pools ------------------------------------------------------------------------------------

async def test_pools_add_query_update_delete(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/pools", {"params": {
        "poolName": "fast", "aliasName": "fast pool", "description": "for tests", "pgNum": 16}})
    assert status == 200, body
    pool = body["inventory"]
    assert pool["poolName"] == "fast" and pool["pgNum"] == 16 and pool["applications"] == ["rbd"]
    assert pool["type"] == "Data" and pool["primaryStorageUuid"] == u
    detail = {p["pool_name"]: p for p in c.ceph("osd", "pool", "ls", "detail")}
    assert detail["fast"]["pg_num"] == 16 and "rbd" in detail["fast"]["application_metadata"]
    # the query API over the storage's pools, and the manual's path across storages
    status, body = await get(http, cagent, f"{PS}/{u}/pools", q="pgNum>8", fields="poolName")
    assert body["inventories"] == [{"poolName": "fast"}]
    status, body = await get(http, cagent, f"{PS}/pools", q="aliasName=fast pool")
    assert [p["uuid"] for p in body["inventories"]] == [pool["uuid"]]
    # update: alias and quotas, read back from the cluster
    status, body = await job(http, cagent, "PUT", f"{PS}/{u}/pools/{pool['uuid']}/actions", {
        "updateCephPrimaryStoragePool": {"aliasName": "renamed", "quotaBytes": 10 * MIB, "quotaObjects": 1000}})
    assert status == 200, body
    assert body["inventory"]["aliasName"] == "renamed" and body["inventory"]["quotaBytes"] == 10 * MIB
    detail = {p["pool_name"]: p for p in c.ceph("osd", "pool", "ls", "detail")}
    assert detail["fast"]["quota_max_bytes"] == 10 * MIB and detail["fast"]["quota_max_objects"] == 1000
    # stats come from the mgr, a moment after the pool exists
    for _ in range(40):
        status, body = await get(http, cagent, f"{PS}/{u}/pools/{pool['uuid']}")
        if body["inventory"]["stats"] is not None:
            break
        await asyncio.sleep(0.25)
    stats = body["inventory"]["stats"]
    assert stats["objects"] == 0 and stats["maxAvailable"] > 0
    # the manual's path for update
    status, body = await job(http, cagent, "PUT", f"{PS}/pools/{pool['uuid']}/actions", {
        "updateCephPrimaryStoragePool": {"quotaBytes": 0, "description": "d2"}})
    assert status == 200 and body["inventory"]["quotaBytes"] == 0 and body["inventory"]["description"] == "d2"
    # a pool in use is not deleted unless forced
    c.rbd("create", "--size", "8M", "fast/in-use")
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/pools/{pool['uuid']}")
    assert status == 409 and "holds 1 image(s) (in-use)" in body["error"]["description"], body
    assert "fast" in c.ceph("osd", "pool", "ls")
    status, body = await job(http, cagent, "DELETE", f"{PS}/{u}/pools/{pool['uuid']}?force=true")
    assert status == 200, body
    assert "fast" not in c.ceph("osd", "pool", "ls")
    status, body = await get(http, cagent, f"{PS}/{u}/pools/{pool['uuid']}")
    assert status == 404


async def test_pools_adopt_keep_and_bad_input(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    c.ceph_ok("osd", "pool", "create", "byhand", "8")
    status, body = await submit(http, cagent, "POST", f"{PS}/{u}/pools", {"params": {"poolName": "byhand"}})
    assert status == 409 and "isCreate=false" in body["error"]["description"]
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/pools",
                             {"params": {"poolName": "byhand", "isCreate": False}})
    assert status == 200 and body["inventory"]["applications"] == ["rbd"], body
    adopted = body["inventory"]
    status, body = await submit(http, cagent, "POST", f"{PS}/{u}/pools", {"params": {"poolName": "byhand"}})
    assert status == 409
    status, body = await submit(http, cagent, "POST", f"{PS}/{u}/pools",
                                {"params": {"poolName": "nothere", "isCreate": False}})
    assert status == 404 and "does not exist" in body["error"]["description"]
    for params, words in [({"poolName": "has space"}, "pool name 'has space'"),
                          ({"poolName": "a@b"}, "is not allowed"),
                          ({"poolName": "p", "pgNum": 0}, "pgnum"),
                          ({"poolName": "p", "pgNum": 70000}, "pgnum"),
                          ({"poolName": "p", "pgNum": "8"}, "pgnum")]:
        status, body = await submit(http, cagent, "POST", f"{PS}/{u}/pools", {"params": params})
        assert status == 400 and words in body["error"]["description"].lower(), (params, body)
    # within Ceph's absolute range but over this cluster's per-OSD limit: the cluster refuses
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/pools", {"params": {"poolName": "huge", "pgNum": 4096}})
    assert status == 503 and body["error"]["code"] == "CEPH.1502", body
    assert "pg_num" in body["error"]["description"] and "huge" not in c.ceph("osd", "pool", "ls")
    # the storage's own pools are protected; keep=true only forgets
    roles = {p["poolName"]: p for p in (await get(http, cagent, f"{PS}/{u}/pools"))[1]["inventories"]}
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/pools/{roles['ps-root']['uuid']}")
    assert status == 409 and "rootVolumePoolName" in body["error"]["description"]
    status, body = await job(http, cagent, "DELETE", f"{PS}/pools/{adopted['uuid']}?keep=true")
    assert status == 200
    assert "byhand" in c.ceph("osd", "pool", "ls")
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/pools/{uuidlib.uuid4().hex}")
    assert status == 404
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/pools/{roles['ps-root']['uuid']}?force=maybe")
    assert status == 400
    c.ceph_ok("osd", "pool", "delete", "byhand", "byhand", "--yes-i-really-really-mean-it")


# --- RBD volumes -----------------------------------------------------------------------------

async def test_volumes_lifecycle(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    vol = uuidlib.uuid4().hex
    base = f"{PS}/{u}/volumes"
    status, body = await job(http, cagent, "POST", base, {"params": {"volumeUuid": vol, "size": 64 * MIB}})
    assert status == 200, body
    inv = body["inventory"]
    assert inv["uuid"] == vol and inv["poolName"] == "ps-data" and inv["installPath"] == f"ceph://ps-data/{vol}"
    assert c.rbd_json("info", f"ps-data/{vol}")["size"] == 64 * MIB
    # data written through librados, read back by rbd export after a rollback
    r = c.rados()
    try:
        import rbd
        with r.open_ioctx("ps-data") as io, rbd.Image(io, vol) as img:
            img.write(b"A" * 4096, 0)
        status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                                 {"createVolumeSnapshot": {"snapshotName": "s1"}})
        assert status == 200 and [s["name"] for s in body["inventory"]["snapshots"]] == ["s1"]
        with r.open_ioctx("ps-data") as io, rbd.Image(io, vol) as img:
            img.write(b"B" * 4096, 0)
    finally:
        r.shutdown()
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"rollbackVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 200, body
    assert c.rbd("export", f"ps-data/{vol}", "-", binary=True)[:4096] == b"A" * 4096
    # grow; shrinking needs allowShrink
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions", {"resizeVolume": {"size": 128 * MIB}})
    assert status == 200 and body["inventory"]["size"] == 128 * MIB
    assert c.rbd_json("info", f"ps-data/{vol}")["size"] == 128 * MIB
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions", {"resizeVolume": {"size": 32 * MIB}})
    assert status == 503 and body["error"]["code"] == "CEPH.1009" and "allowShrink" in body["error"]["description"]
    # protect, clone, and the parent is then pinned
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"protectVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 200 and body["inventory"]["snapshots"][0]["protected"] is True
    assert c.rbd_json("snap", "ls", f"ps-data/{vol}")[0]["protected"] == "true"
    clone = uuidlib.uuid4().hex
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions", {"cloneVolume": {
        "snapshotName": "s1", "volumeUuid": clone, "poolName": "ps-root"}})
    assert status == 200, body
    assert body["inventory"]["parent"] == {"poolName": "ps-data", "imageName": vol, "snapshotName": "s1"}
    assert c.rbd_json("info", f"ps-root/{clone}")["parent"]["image"] == vol
    status, body = await get(http, cagent, f"{base}/{vol}")
    assert status == 200 and body["inventory"]["snapshots"][0]["children"] == [f"ps-root/{clone}"]
    assert body["inventory"]["actualSize"] >= 4096
    status, same = await job(http, cagent, "PUT", f"{base}/{vol}/actions", {"getVolumeInfo": {}})
    assert status == 200 and same["inventory"]["snapshots"] == body["inventory"]["snapshots"]
    status, body = await submit(http, cagent, "DELETE", f"{base}/{vol}")
    assert status == 409 and "s1" in body["error"]["description"] and clone in body["error"]["description"]
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"unprotectVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 503 and body["error"]["code"] == "CEPH.1009" and "has clones" in body["error"]["description"]
    # flatten (a long job: progress reported), then the snapshot can go
    status, reply = await submit(http, cagent, "PUT", f"{base}/{clone}/actions", {"flattenVolume": {}})
    assert status == 202
    status, body = await wait_job(http, cagent, reply["location"])
    assert status == 200 and body["inventory"]["parent"] is None, body
    assert "parent" not in c.rbd_json("info", f"ps-root/{clone}")
    async with http.get(reply["location"], headers=cagent.headers) as r:
        assert r.status == 200
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"deleteVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 503 and "protected" in body["error"]["description"]
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"unprotectVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 200
    status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions",
                             {"deleteVolumeSnapshot": {"snapshotName": "s1"}})
    assert status == 200 and body["inventory"]["snapshots"] == []
    assert c.rbd_json("snap", "ls", f"ps-data/{vol}") == []
    # the list, with the query API
    status, body = await get(http, cagent, base, q=f"uuid?={vol},{clone}", sort="+uuid", fields="uuid,poolName")
    assert status == 200 and sorted(i["uuid"] for i in body["inventories"]) == sorted([vol, clone])
    # delete both
    for v, pool in ((vol, "ps-data"), (clone, "ps-root")):
        status, body = await job(http, cagent, "DELETE", f"{base}/{v}")
        assert status == 200, body
        assert v not in c.rbd("ls", pool).split()


async def test_volume_force_delete_and_bad_input(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    base = f"{PS}/{u}/volumes"
    status, body = await job(http, cagent, "POST", base, {"params": {"name": "named-vol", "size": 8 * MIB,
                                                                      "type": "Root"}})
    assert status == 200 and body["inventory"]["poolName"] == "ps-root"
    vol = body["inventory"]["uuid"]
    for action in ({"createVolumeSnapshot": {"snapshotName": "a", "protect": True}},
                   {"cloneVolume": {"snapshotName": "a", "name": "named-clone"}}):
        status, body = await job(http, cagent, "PUT", f"{base}/{vol}/actions", action)
        assert status == 200, body
    status, body = await job(http, cagent, "DELETE", f"{base}/{vol}?force=true")
    assert status == 200, body
    assert "named-vol" not in c.rbd("ls", "ps-root").split()
    assert "parent" not in c.rbd_json("info", "ps-root/named-clone")     # flattened first
    # by image name (no record): found in the storage's pools
    status, body = await get(http, cagent, f"{base}/named-clone")
    assert status == 200 and body["inventory"]["name"] == "named-clone"
    status, body = await job(http, cagent, "DELETE", f"{base}/named-clone")
    assert status == 200
    for params, words in [({"name": "bad/name", "size": MIB}, "image name 'bad/name'"),
                          ({"name": "x@y", "size": MIB}, "is not allowed"),
                          ({"size": 0}, "size"),
                          ({"size": MIB, "poolName": "notmine"}, "not a pool of")]:
        status, body = await submit(http, cagent, "POST", base, {"params": params})
        assert status == 400 and words in body["error"]["description"], (params, body)
    status, body = await get(http, cagent, f"{base}/{uuidlib.uuid4().hex}")
    assert status == 404 and body["error"]["code"] == "CEPH.1004"
    status, body = await job(http, cagent, "PUT", f"{base}/{uuidlib.uuid4().hex}/actions", {"flattenVolume": {}})
    assert status == 503 and body["error"]["code"] == "CEPH.1004"
    status, body = await submit(http, cagent, "PUT", f"{base}/x/actions",
                                {"createVolumeSnapshot": {"snapshotName": "bad name"}})
    assert status == 400 and "snapshot name" in body["error"]["description"]


# --- mons ------------------------------------------------------------------------------------

async def test_clean_up_image_cache_removes_what_nothing_clones_from(cagent, primary, ceph_cluster, http, tmp_path):
    """Issue 12.3: cleanUpImageCacheOnPrimaryStorage for Ceph primary storage."""
    c, u = ceph_cluster, primary["uuid"]
    cache = primary["imageCachePoolName"]
    data = tmp_path / "img"
    data.write_bytes(os.urandom(2 * MIB))
    for name in ("cached-a", "cached-b", "cached-c"):
        c.rbd("import", str(data), f"{cache}/{name}")
    for name in ("cached-a", "cached-b"):
        c.rbd("snap", "create", f"{cache}/{name}@image")
        c.rbd("snap", "protect", f"{cache}/{name}@image")
    c.rbd("clone", f"{cache}/cached-a@image", f"{primary['rootVolumePoolName']}/from-a")
    # a volume the agent created in the cache pool is never cleaned up
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/volumes", {"params": {
        "size": MIB, "poolName": cache, "name": "agent-vol"}})
    assert status == 200, body
    status, body = await job(http, cagent, "PUT", f"{PS}/{u}/actions", {"cleanUpImageCacheOnPrimaryStorage": {}})
    assert status == 200, body
    assert sorted(body["removedImageUuids"]) == ["cached-b", "cached-c"], body
    assert sorted(body["keptImageUuids"]) == ["agent-vol", "cached-a"], body
    assert body["removedBytes"] >= 2 * 2 * MIB, body
    assert sorted(c.rbd_json("ls", cache)) == ["agent-vol", "cached-a"]
    # the clone still reads its parent's data
    assert c.rbd("export", f"{primary['rootVolumePoolName']}/from-a", "-", binary=True)[:MIB] == data.read_bytes()[:MIB]
    # once the clone is gone, its parent goes too
    c.rbd("rm", f"{primary['rootVolumePoolName']}/from-a")
    status, body = await job(http, cagent, "PUT", f"{PS}/{u}/actions", {"cleanUpImageCacheOnPrimaryStorage": {}})
    assert status == 200 and body["removedImageUuids"] == ["cached-a"], body
    assert c.rbd_json("ls", cache) == ["agent-vol"]
    status, body = await job(http, cagent, "DELETE", f"{PS}/{u}/volumes/{'agent-vol'}")
    # a storage whose cache pool is also its data pool: refused, nothing removed
    status, body = await job(http, cagent, "POST", PS, {"params": {
        "name": "shared-pools", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key,
        "rootVolumePoolName": "sp-root", "dataVolumePoolName": "sp-both",
        "imageCachePoolName": "sp-both"}})
    assert status == 200, body
    other = body["inventory"]["uuid"]
    c.rbd("create", "--size", "1", "sp-both/keep-me")
    status, body = await submit(http, cagent, "PUT", f"{PS}/{other}/actions", {"cleanUpImageCacheOnPrimaryStorage": {}})
    assert status == 409 and "also a volume pool" in body["error"]["description"], body
    assert c.rbd_json("ls", "sp-both") == ["keep-me"]
    c.rbd("rm", "sp-both/keep-me")
    status, body = await job(http, cagent, "DELETE", f"{PS}/{other}")
    assert status == 200, body


async def test_second_mon_added_and_removed_live(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    await asyncio.to_thread(c.script, "add-mon", "b", "127.0.0.2")
    assert sorted(c.ceph("quorum_status")["quorum_names"]) == ["a", "b"]
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/mons", {"params": {"monUrls": [f"127.0.0.2:{c.port}"]}})
    assert status == 200, body
    status, body = await get(http, cagent, f"{PS}/{u}/mons", sort="+hostname")
    assert status == 200
    mons = body["inventories"]
    assert [(m["hostname"], m["monName"], m["inQuorum"], m["status"]) for m in mons] == [
        ("127.0.0.1", "a", True, "Connected"), ("127.0.0.2", "b", True, "Connected")]
    mon_b = mons[1]["monUuid"]
    status, body = await submit(http, cagent, "POST", f"{PS}/{u}/mons", {"params": {"monUrls": [f"127.0.0.2:{c.port}"]}})
    assert status == 409
    # the agent keeps working through mon b alone
    status, body = await job(http, cagent, "DELETE", f"{PS}/{u}/mons?monHostnames=127.0.0.1")
    assert status == 200 and [m["hostname"] for m in body["inventory"]["mons"]] == ["127.0.0.2"]
    status, body = await get(http, cagent, f"{PS}/{u}/capacity")
    assert status == 200
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/mons?monHostnames=127.0.0.2")
    assert status == 409 and "without a mon" in body["error"]["description"]
    status, body = await job(http, cagent, "POST", f"{PS}/{u}/mons", {"params": {"monUrls": [f"127.0.0.1:{c.port}"]}})
    assert status == 200, body
    # update: a port where nothing answers is refused (within the mount timeout); the right one saved
    t0 = time.monotonic()
    status, body = await job(http, cagent, "PUT", f"{PS}/{u}/mons/{mon_b}/actions",
                             {"updateCephPrimaryStorageMon": {"monPort": free_port(), "sshPassword": "pw"}})
    assert status == 503 and body["error"]["code"] == "CEPH.1408" and time.monotonic() - t0 < 6
    status, body = await job(http, cagent, "PUT", f"{PS}/mons/{mon_b}/actions",
                             {"updateCephPrimaryStorageMon": {"hostname": f"v1:127.0.0.2:{c.port + 1}"}})
    assert status == 200, body
    b = next(m for m in body["inventory"]["mons"] if m["monUuid"] == mon_b)
    assert (b["monPort"], b["protocol"], b["inQuorum"]) == (c.port + 1, "v1", True)
    # mon b leaves the cluster: the agent shows it, then forgets it
    await asyncio.to_thread(c.script, "remove-mon", "b")
    status, body = await get(http, cagent, f"{PS}/{u}/mons", q="hostname=127.0.0.2")
    assert body["inventories"][0]["inMonmap"] is False and body["inventories"][0]["status"] == "Disconnected"
    status, body = await job(http, cagent, "DELETE", f"{PS}/{u}/mons?monHostnames={mon_b}")
    assert status == 200 and [m["monName"] for m in body["inventory"]["mons"]] == ["a"]
    # an unknown mon
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/mons?monHostnames=10.9.9.9")
    assert status == 404 and "10.9.9.9 is not a mon" in body["error"]["description"]
    status, body = await submit(http, cagent, "PUT", f"{PS}/{u}/mons/{uuidlib.uuid4().hex}/actions",
                                {"updateCephPrimaryStorageMon": {"monPort": 1234}})
    assert status == 404
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}/mons")
    assert status == 400


async def test_a_mon_of_another_cluster_is_refused(cagent, primary, ceph_cluster, http, tmp_path):
    c, u = ceph_cluster, primary["uuid"]
    other = MicroCeph(Path(f"/tmp/node-agent-ceph-other-{os.getpid()}"), free_port_pair(("127.0.0.1",)),
                      env={"MON_ONLY": "1", "ADMIN_KEYRING": str(c.keyring)})
    other.purge()
    await asyncio.to_thread(other.start)
    try:
        assert other.fsid != c.fsid
        status, body = await job(http, cagent, "POST", f"{PS}/{u}/mons",
                                 {"params": {"monUrls": [f"127.0.0.1:{other.port}"]}})
        assert status == 503 and body["error"]["code"] == "CEPH.1409", body
        assert other.fsid in body["error"]["description"] and c.fsid in body["error"]["description"]
        mon_a = (await get(http, cagent, f"{PS}/{u}/mons"))[1]["inventories"][0]["monUuid"]
        status, body = await job(http, cagent, "PUT", f"{PS}/{u}/mons/{mon_a}/actions",
                                 {"updateCephPrimaryStorageMon": {"monPort": other.port}})
        assert status == 503 and body["error"]["code"] == "CEPH.1409", body
        status, body = await get(http, cagent, f"{PS}/{u}/mons")
        assert [m["monPort"] for m in body["inventories"]] == [c.port]
    finally:
        await asyncio.to_thread(other.purge)


# --- backup storage ---------------------------------------------------------------------------

def make_qcow2(path: Path) -> bytes:
    """A 64 MiB qcow2 with two written extents; returns its raw content."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 3M", "-c", "write -P 0xcd 40M 1M", str(path)],
                   check=True, capture_output=True)
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


async def test_backup_storage_import_export_migrate_delete(cagent, backups, ceph_cluster, http, image_server):
    c = ceph_cluster
    one, two = backups
    www, base = image_server
    assert one["poolName"] == "bs-one" and one["user"] == "admin" and one["mons"][0]["protocol"] == "v2"
    assert not (cagent.state_dir / "ceph" / "keys" / f"{one['uuid']}.keyring").exists()  # used in place
    status, body = await get(http, cagent, BS, q="poolName=bs-two")
    assert [b["uuid"] for b in body["inventories"]] == [two["uuid"]]
    status, cap = await get(http, cagent, f"{BS}/{one['uuid']}/capacity")
    assert status == 200 and [p["poolName"] for p in cap["pools"]] == ["bs-one"]

    raw_of_qcow2 = make_qcow2(www / "disk.qcow2")
    qcow2_md5 = hashlib.md5((www / "disk.qcow2").read_bytes()).hexdigest()
    raw_file = os.urandom(4 * MIB) + bytes(4 * MIB) + os.urandom(MIB + 123)   # a hole in the middle
    (www / "disk.raw").write_bytes(raw_file)
    images = f"{BS}/{one['uuid']}/images"

    # qcow2 -> raw RBD, md5 checked
    img1 = uuidlib.uuid4().hex
    status, body = await job(http, cagent, "POST", images, {"params": {
        "imageUuid": img1, "name": "cirros", "url": f"{base}/disk.qcow2", "md5Sum": qcow2_md5}})
    assert status == 200, body
    inv = body["inventory"]
    assert (inv["status"], inv["originalFormat"], inv["format"], inv["size"], inv["md5Sum"]) == \
        ("Ready", "qcow2", "raw", 64 * MIB, qcow2_md5)
    assert c.rbd_json("info", f"bs-one/{img1}")["size"] == 64 * MIB
    assert hashlib.md5(c.rbd("export", f"bs-one/{img1}", "-", binary=True)).digest() == \
        hashlib.md5(raw_of_qcow2).digest()
    # raw, streamed, sha256 checked, zero blocks left sparse
    img2 = uuidlib.uuid4().hex
    sha = hashlib.sha256(raw_file).hexdigest()
    status, body = await job(http, cagent, "POST", images, {"params": {
        "imageUuid": img2, "url": f"{base}/disk.raw", "checksum": f"sha256:{sha}"}})
    assert status == 200, body
    assert body["inventory"]["originalFormat"] == "raw" and body["inventory"]["size"] == len(raw_file)
    assert c.rbd("export", f"bs-one/{img2}", "-", binary=True) == raw_file
    du = c.rbd_json("du", f"bs-one/{img2}")["images"][0]
    assert du["used_size"] < len(raw_file)
    # a wrong checksum, a 404, a non-qcow2 called qcow2: failed, nothing left behind
    bad = uuidlib.uuid4().hex
    for params, code in [({"url": f"{base}/disk.raw", "md5Sum": "0" * 32}, "CEPH.1521"),
                         ({"url": f"{base}/missing"}, "CEPH.1520"),
                         ({"url": f"{base}/disk.raw", "format": "qcow2"}, "CEPH.1522")]:
        status, body = await job(http, cagent, "POST", images, {"params": dict(params, imageUuid=bad)})
        assert status == 503 and body["error"]["code"] == code, (params, body)
        assert bad not in c.rbd("ls", "bs-one").split()
        status, _ = await get(http, cagent, f"{images}/{bad}")
        assert status == 404
    for params in ({"url": "ftp://x/y"}, {"url": f"{base}/disk.raw", "checksum": "crc:12"},
                   {"url": f"{base}/disk.raw", "md5Sum": "xyz"}):
        status, body = await submit(http, cagent, "POST", images, {"params": params})
        assert status == 400, (params, body)
    status, body = await submit(http, cagent, "POST", images, {"params": {"url": f"{base}/disk.raw", "imageUuid": img2}})
    assert status == 409
    status, body = await get(http, cagent, images, q="originalFormat=qcow2", fields="uuid,name")
    assert body["inventories"] == [{"uuid": img1, "name": "cirros"}]

    # export: a URL that needs no token header; Range; revoked -> 404
    status, body = await job(http, cagent, "PUT", f"{images}/{img2}/actions", {"exportImageFromBackupStorage": {}})
    assert status == 200, body
    url = body["imageUrl"]
    assert url.startswith(cagent.url + f"{BS}/{one['uuid']}/exports/{img2}?token=") and body["size"] == len(raw_file)
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == raw_file
    async with http.get(url, headers={"Range": "bytes=100-199"}) as r:
        assert r.status == 206 and await r.read() == raw_file[100:200]
        assert r.headers["Content-Range"] == f"bytes 100-199/{len(raw_file)}"
    async with http.get(url, headers={"Range": f"bytes={len(raw_file)}-"}) as r:
        assert r.status == 416
    token = url.split("token=")[1]
    assert token not in cagent.log()
    async with http.get(url.replace(token, "x" + token[1:])) as r:
        assert r.status == 404
    status, body = await job(http, cagent, "PUT", f"{images}/{img2}/actions", {"deleteExportedImageFromBackupStorage": {}})
    assert status == 200
    async with http.get(url) as r:
        assert r.status == 404

    # migrate to the other backup storage (progress reported), then delete
    status, body = await job(http, cagent, "PUT", f"{images}/{img1}/actions", {"migrateImage": {"destination": two["uuid"]}})
    assert status == 200, body
    assert body["inventory"]["backupStorageUuid"] == two["uuid"] and body["inventory"]["poolName"] == "bs-two"
    assert hashlib.md5(c.rbd("export", f"bs-two/{img1}", "-", binary=True)).digest() == \
        hashlib.md5(raw_of_qcow2).digest()
    status, body = await submit(http, cagent, "PUT", f"{images}/{img1}/actions", {"migrateImage": {"destination": two["uuid"]}})
    assert status == 409
    status, body = await submit(http, cagent, "PUT", f"{images}/{img1}/actions", {"migrateImage": {"destination": one["uuid"]}})
    assert status == 400
    status, body = await submit(http, cagent, "PUT", f"{images}/{img1}/actions", {"migrateImage": {}})
    assert status == 400
    for storage, image, pool in ((one, img1, "bs-one"), (one, img2, "bs-one"), (two, img1, "bs-two")):
        status, body = await job(http, cagent, "DELETE", f"{BS}/{storage['uuid']}/images/{image}")
        assert status == 200, body
        assert image not in c.rbd("ls", pool).split()
    status, body = await submit(http, cagent, "DELETE", f"{images}/{img1}")
    assert status == 404


async def test_image_url_is_parsed_whole(cagent, backups, http):
    """Issue 10.5: the image URL was checked by its prefix only."""
    images = f"{BS}/{backups[0]['uuid']}/images"
    status, before = await get(http, cagent, images)
    for url in ["http://127.0.0.1/x.qcow2\nX-Injected: 1", "http://127.0.0.1/a b", "http://h\x00/",
                "ftp://127.0.0.1/x", "http://", "http:///x", "http://127.0.0.1:0/x",
                "http://127.0.0.1:70000/x", "http://127.0.0.1/../../etc/passwd",
                "http://127.0.0.1/a/./b", "http://bad_host/x", "http://[zz::x]/x",
                "https://127.0.0.1:80:80/x", "file:///etc/passwd", " http://127.0.0.1/x"]:
        status, body = await submit(http, cagent, "POST", images, {"params": {"url": url}})
        assert status == 400 and "'url'" in body["error"]["description"], (url, body)
    status, after = await get(http, cagent, images)
    assert after["inventories"] == before["inventories"]
    # well-formed URLs (IPv6, a port, credentials, a query) get past the check
    for url in ["http://[::1]:1/x.qcow2", "https://u:p@example.invalid:8443/a%20b?x=1"]:
        status, body = await submit(http, cagent, "POST", images, {"params": {"url": url}})
        assert status == 202, (url, body)
        status, body = await wait_job(http, cagent, body["location"], 30)
        assert status != 400, (url, body)


async def test_delete_storage_forgets_it_and_its_key(cagent, ceph_cluster, http):
    c = ceph_cluster
    status, body = await job(http, cagent, "POST", BS, {"params": {
        "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key, "poolName": "bs-gone"}})
    assert status == 200, body
    u = body["inventory"]["uuid"]
    keyring = cagent.state_dir / "ceph" / "keys" / f"{u}.keyring"
    assert keyring.exists()
    status, body = await job(http, cagent, "DELETE", f"{BS}/{u}")
    assert status == 200 and body == {"uuid": u, "deleted": True}
    assert not keyring.exists()
    status, _ = await get(http, cagent, f"{BS}/{u}")
    assert status == 404
    assert "bs-gone" in c.ceph("osd", "pool", "ls")      # the data stays
    c.ceph_ok("osd", "pool", "delete", "bs-gone", "bs-gone", "--yes-i-really-really-mean-it")
    status, body = await submit(http, cagent, "DELETE", f"{PS}/{u}")    # not a primary storage
    assert status == 404
    # registered by the operator's ceph.conf and keyring: the mons come from the live monmap
    status, body = await job(http, cagent, "POST", BS, {"params": {
        "confPath": str(c.conf), "keyringPath": str(c.keyring), "poolName": "bs-one"}})
    assert status == 200, body
    inv = body["inventory"]
    assert [(m["hostname"], m["monPort"], m["monName"]) for m in inv["mons"]] == [("127.0.0.1", c.port, "a")]
    status, body = await job(http, cagent, "DELETE", f"{BS}/{inv['uuid']}")
    assert status == 200
    assert c.keyring.exists()          # the operator's keyring is never deleted


async def test_agent_restart_keeps_storages_and_keys(cagent, primary, backups, ceph_cluster, http):
    await asyncio.to_thread(cagent.restart)
    status, body = await get(http, cagent, PS, fields="uuid,status,fsid")
    assert {"uuid": primary["uuid"], "status": "Connected", "fsid": ceph_cluster.fsid} in body["inventories"]
    status, body = await get(http, cagent, BS)
    assert {b["uuid"] for b in backups} <= {b["uuid"] for b in body["inventories"]}
    status, cap = await get(http, cagent, f"{PS}/{primary['uuid']}/capacity")
    assert status == 200, cap
    status, body = await get(http, cagent, f"{BS}/{backups[0]['uuid']}/mons")
    assert status == 200 and body["inventories"][0]["inQuorum"] is True


def test_lazy_module_first_used_by_two_threads_is_whole(tmp_path, monkeypatch):
    """The 500 after a restart: the health checks of two clusters first touched the lazily
    imported rados in two threads at once, and the second got the half-initialised module
    (NameError "cstr", AttributeError).  A real module whose import takes 0.3 s."""
    from agent.lazy import LazyModule
    name = f"slow_mod_{uuidlib.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import time\ntime.sleep(0.3)\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = LazyModule(name)
    got: list = []

    def use(delay: float) -> None:
        time.sleep(delay)
        try:
            got.append(lazy.VALUE)
        except Exception as e:      # the bug: AttributeError from the half-imported module
            got.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=use, args=(i * 0.05,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.modules.pop(name, None)
    assert got == [42] * 4, got


async def test_requests_right_after_restart_never_500(cagent, primary, backups, http):
    """Restart, then ask both clusters at once (their health checks start together):
    before the fix, 9 of 30 such restarts answered 500."""
    paths = [f"{PS}/{primary['uuid']}/capacity", f"{BS}/{backups[0]['uuid']}/mons",
             f"{PS}/{primary['uuid']}/mons", f"{BS}/{backups[0]['uuid']}/capacity"]
    for _ in range(4):
        await asyncio.to_thread(cagent.restart)
        results = await asyncio.gather(*[get(http, cagent, p) for p in paths])
        for p, (status, body) in zip(paths, results):
            assert status == 200, (p, body)


# --- health, events, and the mon stopped (keep last) ---------------------------------------

async def test_health_change_publishes_an_event(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    since = await last_seq(http, cagent)
    c.ceph_ok("osd", "set", "noout")
    try:
        ev = await events_since(http, cagent, since, lambda e: e["type"] == "StorageStatusChanged"
                                and e["data"]["storageUuid"] == u and e["data"]["health"] == "HEALTH_WARN", 15)
        assert ev["data"]["previousHealth"] == "HEALTH_OK" and ev["data"]["status"] == "Connected"
        assert "OSDMAP_FLAGS" in [h["name"] for h in ev["data"]["healthChecks"]]
        status, body = await get(http, cagent, f"{PS}/{u}")
        assert body["inventory"]["health"] == "HEALTH_WARN"
    finally:
        c.ceph_ok("osd", "unset", "noout")
    await events_since(http, cagent, ev["seq"], lambda e: e["type"] == "StorageStatusChanged"
                       and e["data"]["storageUuid"] == u and e["data"]["health"] == "HEALTH_OK", 15)


async def test_mon_stopped_errors_within_timeout_ping_stays_fast(cagent, primary, ceph_cluster, http):
    c, u = ceph_cluster, primary["uuid"]
    since = await last_seq(http, cagent)
    await asyncio.to_thread(c.script, "stop-mon", "a")
    try:
        lat: list[float] = []
        stop = asyncio.Event()

        async def pinger():
            while not stop.is_set():
                t = time.monotonic()
                status, _ = await get(http, cagent, "/v1/host/ping")
                assert status == 200
                lat.append(time.monotonic() - t)
                await asyncio.sleep(0.05)
        task = asyncio.create_task(pinger())
        try:
            t0 = time.monotonic()
            status, body = await get(http, cagent, f"{PS}/{u}/capacity")
            took = time.monotonic() - t0
            assert status == 503 and body["error"]["code"] == "CEPH.1408", body
            assert TIMEOUTS["mon_op_timeout"] - 0.5 < took < TIMEOUTS["mon_op_timeout"] + 2, took
            assert "did not answer" in body["error"]["description"]
            t0 = time.monotonic()
            status, body = await get(http, cagent, f"{PS}/{u}/pools")
            assert status == 503 and time.monotonic() - t0 < TIMEOUTS["mon_op_timeout"] + 2
            t0 = time.monotonic()
            status, body = await job(http, cagent, "POST", f"{PS}/{u}/volumes", {"params": {"size": MIB}})
            assert status in (200, 503) and time.monotonic() - t0 < TIMEOUTS["osd_op_timeout"] + 4
        finally:
            stop.set()
            await task
        assert len(lat) > 20 and max(lat) < 0.5, (len(lat), max(lat))
        ev = await events_since(http, cagent, since, lambda e: e["type"] == "StorageStatusChanged"
                                and e["data"]["storageUuid"] == u and e["data"]["status"] == "Disconnected", 15)
        assert ev["data"]["previousStatus"] == "Connected" and ev["data"]["reason"]
        status, body = await get(http, cagent, f"{PS}/{u}")
        assert body["inventory"]["status"] == "Disconnected"
    finally:
        await asyncio.to_thread(c.script, "start-mon", "a")
    # back: the same handle recovers, the status follows
    deadline = time.monotonic() + 60
    while True:
        status, body = await get(http, cagent, f"{PS}/{u}/capacity")
        if status == 200:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.5)
    await events_since(http, cagent, ev["seq"], lambda e: e["type"] == "StorageStatusChanged"
                       and e["data"]["storageUuid"] == u and e["data"]["status"] == "Connected", 20)
    status, body = await get(http, cagent, f"{PS}/{u}/mons")
    assert status == 200 and body["inventories"][0]["inQuorum"] is True
    status, body = await job(http, cagent, "PUT", f"{PS}/{u}/actions", {"reconnectPrimaryStorage": {}})
    assert status == 200 and body["inventory"]["status"] == "Connected"
    no_secret_anywhere(cagent, c.key)
