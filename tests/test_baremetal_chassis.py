"""Baremetal chassis against fake BMCs (UDP on loopback, one subprocess each).

Real agent processes over HTTP; ipmitool -I lanplus as a second client
cross-checking what the agent did; the fake BMC's state file as the record of
every command it received.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
import uuid as uuidlib
from pathlib import Path

import aiohttp
import pytest

from bmcproc import FakeBmcProcess, free_udp_port
from conftest import run_job, submit, wait_for

CHASSIS = "/v1/baremetal/chassis"


@pytest.fixture
def bmcs(tmp_path):
    started: list[FakeBmcProcess] = []

    def make(**kw) -> FakeBmcProcess:
        b = FakeBmcProcess(tmp_path, **kw).start()
        started.append(b)
        return b
    yield make
    for b in started:
        b.stop()


@pytest.fixture
def bm_agent(agent_factory):
    return agent_factory({"baremetal": {"retry_backoff_seconds": 0.1}}).start()


async def register(http, agent, bmc: FakeBmcProcess, **over) -> dict:
    status, body = await run_job(http, agent, "POST", CHASSIS, {"params": bmc.params(**over)})
    assert status == 200, body
    return body["inventory"]


async def get(http, agent, path: str, **params) -> tuple[int, dict]:
    async with http.get(agent.url + path, headers=agent.headers, params=params) as r:
        return r.status, await r.json()


async def act(http, agent, chassis: str, name: str, params: dict | None = None, timeout=30):
    return await run_job(http, agent, "PUT", f"{CHASSIS}/{chassis}/actions",
                         {name: params or {}}, timeout=timeout)


async def connect_events(http, agent, receiver) -> None:
    status, body = await run_job(http, agent, "PUT", "/v1/host/actions", {"connectHost": {
        "hostUuid": uuidlib.uuid4().hex, "managementServerUrl": receiver.url("/events")}})
    assert status == 200, body


def event_of(kind: str, **data):
    def pred(r):
        b = r["body"] or {}
        return (b.get("type") == kind
                and all(b.get("data", {}).get(k) == v for k, v in data.items()))
    return pred


# ------------------------------------------------------------------ registration

async def test_register_query_get_and_hardware_info(bm_agent, http, bmcs):
    a, b = bmcs(serial="SER-A"), bmcs(serial="SER-B")
    inv_a = await register(http, bm_agent, a, name="rack1-a")
    inv_b = await register(http, bm_agent, b)
    assert inv_a["status"] == "Unprovisioned" and inv_a["name"] == "rack1-a"
    assert inv_a["ipmiAddress"] == "127.0.0.1" and inv_a["ipmiPort"] == str(a.port)
    assert inv_a["ipmiUsername"] == "admin" and "ipmiPassword" not in inv_a
    assert inv_a["inspectionUrl"].startswith(bm_agent.url + "/v1/baremetal/inspection/")

    status, body = await get(http, bm_agent, CHASSIS)
    assert status == 200 and {i["uuid"] for i in body["inventories"]} == {inv_a["uuid"], inv_b["uuid"]}
    assert all("ipmiPassword" not in i for i in body["inventories"])
    status, body = await get(http, bm_agent, CHASSIS, q=f"ipmiPort={b.port}")
    assert [i["uuid"] for i in body["inventories"]] == [inv_b["uuid"]]
    status, body = await get(http, bm_agent, CHASSIS, q="name~=rack1%", fields="uuid,name")
    assert body["inventories"] == [{"uuid": inv_a["uuid"], "name": "rack1-a"}]
    status, body = await get(http, bm_agent, CHASSIS, q="ipmiPassword=password")
    assert status == 400 and "ipmiPassword" in body["error"]["description"]
    status, body = await get(http, bm_agent, f"{CHASSIS}/{inv_b['uuid']}")
    assert status == 200 and body["inventory"] == inv_b

    # The BMC's FRU inventory and sensors are read in the background after registration.
    async def hw():
        s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo", q="type=bmc")
        return body["inventories"] if len(body["inventories"]) == 2 else None
    infos = {i["chassisUuid"]: i for i in await wait_for(hw, what="hardware info")}
    content = json.loads(infos[inv_a["uuid"]]["content"])
    system = content["inventory"]["System"]
    assert system["Serial Number"] == "SER-A" and system["Product name"] == "FakeServer 1U"
    assert system["Board serial number"] == "BRD-SER-A" and system["UUID"]
    sensors = {s["name"]: s for s in content["sensors"]}
    assert sensors["CPU Temp"]["value"] == 45.0 and sensors["CPU Temp"]["units"] == "°C"
    assert sensors["FAN1"]["value"] == 5400.0 and sensors["FAN1"]["health"] == "ok"
    assert json.loads(infos[inv_b["uuid"]]["content"])["inventory"]["System"]["Serial Number"] == "SER-B"
    # Cross-check: ipmitool reads the same FRU from the same BMC.
    assert "SER-A" in a.ipmitool("fru", "print")
    s, one = await get(http, bm_agent, f"/v1/baremetal/hardwareinfo/{infos[inv_a['uuid']]['uuid']}")
    assert s == 200 and one["inventory"]["chassisUuid"] == inv_a["uuid"]
    s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo", q="content~=%SER-B%")
    assert [i["chassisUuid"] for i in body["inventories"]] == [inv_b["uuid"]]


async def test_wrong_password_unknown_user_and_unreachable(bm_agent, http, bmcs):
    bmc = bmcs()
    t0 = time.monotonic()
    status, body = await run_job(http, bm_agent, "POST", CHASSIS,
                                 {"params": bmc.params(ipmiPassword="not-the-one")})
    assert status == 503 and body["error"]["code"] == "BM.1102", body
    assert f"127.0.0.1:{bmc.port}" in body["error"]["description"]
    assert "ipmiPassword" in body["error"]["description"]
    assert "not-the-one" not in json.dumps(body)
    status, body = await run_job(http, bm_agent, "POST", CHASSIS,
                                 {"params": bmc.params(ipmiUsername="nobody")})
    assert status == 503 and body["error"]["code"] == "BM.1102", body
    assert time.monotonic() - t0 < 5, "a refused login must fail at once"

    port = free_udp_port()             # nothing listens there
    t0 = time.monotonic()
    status, body = await run_job(http, bm_agent, "POST", CHASSIS, {"params": {
        "ipmiAddress": "127.0.0.1", "ipmiPort": port, "ipmiUsername": "admin",
        "ipmiPassword": "password"}})
    elapsed = time.monotonic() - t0
    assert status == 503 and body["error"]["code"] == "BM.1101", body
    assert f"127.0.0.1:{port}" in body["error"]["description"]
    assert elapsed < 15, f"unreachable BMC took {elapsed:.1f} s"

    status, body = await run_job(http, bm_agent, "POST", CHASSIS, {"params": {
        "ipmiAddress": "no-such-bmc.invalid", "ipmiUsername": "admin", "ipmiPassword": "x"}})
    assert status == 503 and body["error"]["code"] == "BM.1101"
    assert "no-such-bmc.invalid:623" in body["error"]["description"]

    # Nothing was stored by any of them.
    s, body = await get(http, bm_agent, CHASSIS)
    assert body["inventories"] == []
    s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo")
    assert body["inventories"] == []


async def test_bad_input_is_4xx_and_stores_nothing(bm_agent, http, bmcs):
    bmc = bmcs()
    inv = await register(http, bm_agent, bmc)
    bad = [
        ({"ipmiAddress": "not an address", "ipmiUsername": "a", "ipmiPassword": "p"}, "ipmiAddress"),
        ({"ipmiAddress": "300.1.1.1", "ipmiUsername": "a", "ipmiPassword": "p"}, "ipmiAddress"),
        ({"ipmiAddress": "10.0.0.1", "ipmiPort": 0, "ipmiUsername": "a", "ipmiPassword": "p"}, "ipmiPort"),
        ({"ipmiAddress": "10.0.0.1", "ipmiPort": "70000", "ipmiUsername": "a", "ipmiPassword": "p"}, "ipmiPort"),
        ({"ipmiAddress": "10.0.0.1", "ipmiPort": "six", "ipmiUsername": "a", "ipmiPassword": "p"}, "ipmiPort"),
        ({"ipmiAddress": "10.0.0.1", "ipmiPassword": "p"}, "ipmiUsername"),
        ({"ipmiAddress": "10.0.0.1", "ipmiUsername": "a"}, "ipmiPassword"),
        ({"ipmiAddress": "10.0.0.1", "ipmiUsername": "a", "ipmiPassword": "p" * 21}, "ipmiPassword"),
        ({"ipmiAddress": "10.0.0.1", "ipmiUsername": "a", "ipmiPassword": "p", "color": 1}, "color"),
    ]
    for params, field in bad:
        status, body = await submit(http, bm_agent, "POST", CHASSIS, {"params": params})
        assert status == 400, (params, body)
        assert field in body["error"]["description"], (field, body)
        assert "p" * 21 not in json.dumps(body)
    # The same BMC twice (the port as a number this time): 409 naming the chassis.
    status, body = await submit(http, bm_agent, "POST", CHASSIS,
                                {"params": bmc.params(ipmiPort=bmc.port)})
    assert status == 409 and body["error"]["code"] == "BM.1109"
    assert inv["uuid"] in body["error"]["description"]

    unknown = uuidlib.uuid4().hex
    s, body = await get(http, bm_agent, f"{CHASSIS}/{unknown}")
    assert s == 404 and body["error"]["code"] == "BM.1104"
    s, body = await get(http, bm_agent, f"{CHASSIS}/{unknown}/power")
    assert s == 404
    s, body = await get(http, bm_agent, f"{CHASSIS}/not-a-uuid")
    assert s == 404
    for name in ("powerOnBaremetalHost", "powerOffBaremetalHost", "powerResetBaremetalHost",
                 "powerStatusBaremetalHost", "provisionBaremetalHost", "updateBaremetalChassis",
                 "refreshBaremetalHardwareInfo"):
        status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{unknown}/actions", {name: {}})
        assert status == 404 and body["error"]["code"] == "BM.1104", (name, body)
    status, body = await submit(http, bm_agent, "DELETE", f"{CHASSIS}/{unknown}")
    assert status == 404
    status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{inv['uuid']}/actions",
                                {"powerOffBaremetalHost": {"method": "gentle"}})
    assert status == 400 and "method" in body["error"]["description"]
    status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{inv['uuid']}/actions",
                                {"blinkBaremetalHost": {}})
    assert status == 400 and body["error"]["code"] == "SYS.1006"
    status, body = await submit(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                {"params": {"chassisUuid": unknown}})
    assert status == 404
    s, body = await get(http, bm_agent, CHASSIS)
    assert [i["uuid"] for i in body["inventories"]] == [inv["uuid"]]


# ------------------------------------------------------------------ power

async def test_power_on_off_soft_hard_reset_cross_checked(bm_agent, http, bmcs):
    bmc = bmcs()
    c = (await register(http, bm_agent, bmc))["uuid"]
    power = f"{CHASSIS}/{c}/power"
    assert (await get(http, bm_agent, power)) == (200, {"status": "off"})
    assert "off" in bmc.ipmitool("power", "status")

    assert await act(http, bm_agent, c, "powerOnBaremetalHost") == (200, {})
    assert "Chassis Power is on" in bmc.ipmitool("power", "status")
    assert (await get(http, bm_agent, power)) == (200, {"status": "on"})
    assert await act(http, bm_agent, c, "powerStatusBaremetalHost") == (200, {"status": "on"})

    assert await act(http, bm_agent, c, "powerOffBaremetalHost",
                     {"method": "soft", "waitSeconds": 10}) == (200, {})
    assert bmc.events()[-1]["event"] == "power_shutdown"
    assert "Chassis Power is off" in bmc.ipmitool("power", "status")

    # A reset needs the host on: refused with the reason, nothing sent.
    status, body = await act(http, bm_agent, c, "powerResetBaremetalHost")
    assert status == 503 and body["error"]["code"] == "BM.1103"
    assert "powered off" in body["error"]["description"]
    assert not bmc.events("power_reset")

    bmc.ipmitool("power", "on")         # the other client changes it: the agent sees it
    assert (await get(http, bm_agent, power)) == (200, {"status": "on"})
    assert await act(http, bm_agent, c, "powerResetBaremetalHost") == (200, {})
    assert len(bmc.events("power_reset")) == 1
    assert await act(http, bm_agent, c, "powerOffBaremetalHost") == (200, {})   # hard by default
    assert bmc.events()[-1]["event"] == "power_off"
    assert "Chassis Power is off" in bmc.ipmitool("power", "status")
    assert await act(http, bm_agent, c, "powerOffBaremetalHost", {"method": "hard"}) == (200, {})


async def test_sha1_only_bmc_busy_bmc_and_bmc_restart(bm_agent, http, bmcs):
    # A stock pyghmi BMC (as virtualbmc) answers a SHA-256 proposal with SHA-1.
    stock = bmcs(stock_rakp=True)
    c = (await register(http, bm_agent, stock))["uuid"]
    assert await act(http, bm_agent, c, "powerOnBaremetalHost") == (200, {})
    assert "on" in stock.ipmitool("power", "status")

    # "Node busy" twice, then the command goes through: retried with backoff.
    busy = bmcs(busy=2)
    c2 = (await register(http, bm_agent, busy))["uuid"]
    assert await act(http, bm_agent, c2, "powerOnBaremetalHost") == (200, {})
    assert [e["event"] for e in busy.events() if e["event"] in ("busy", "power_on")] == \
        ["busy", "busy", "power_on"]
    # Busy for longer than the retries: a clear 503 naming the BMC.
    busy.busy = 10
    busy.restart()
    status, body = await act(http, bm_agent, c2, "powerOnBaremetalHost")
    assert status == 503 and body["error"]["code"] in ("BM.1105", "BM.1103"), body
    assert f"127.0.0.1:{busy.port}" in body["error"]["description"]

    # The BMC reboots: the agent's session is gone, the next call logs in again.
    stock.restart()
    status, body = await get(http, bm_agent, f"{CHASSIS}/{c}/power")
    assert (status, body) == (200, {"status": "off"}), body


# ------------------------------------------------------------------ provisioning

async def test_provision_pxe_once_then_on_or_reset(bm_agent, http, bmcs, receiver):
    await connect_events(http, bm_agent, receiver)
    bmc = bmcs()
    c = (await register(http, bm_agent, bmc))["uuid"]

    status, body = await act(http, bm_agent, c, "provisionBaremetalHost")
    assert status == 200 and body["inventory"]["status"] == "Provisioning", body
    evs = [e for e in bmc.events() if e["event"] in ("set_bootdev", "power_on", "power_reset")]
    assert [e["event"] for e in evs] == ["set_bootdev", "power_on"]
    assert evs[0]["bootdev"] == "network" and evs[0]["persistent"] is False
    assert evs[1]["bootdev"] == "network"
    boot = bmc.ipmitool("chassis", "bootparam", "get", "5")
    assert "Force PXE" in boot and "only next boot" in boot
    assert "on" in bmc.ipmitool("power", "status")
    await receiver.wait_for(event_of("BaremetalChassisStatusChanged", chassisUuid=c,
                                     status="Provisioning", previousStatus="Unprovisioned"))

    # A provision is running (until the installed host calls back): refused at once.
    status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{c}/actions",
                                {"provisionBaremetalHost": {}})
    assert status == 409 and body["error"]["code"] == "BM.1110", body
    # Deleting is refused only while the provisioning job itself runs: here it has ended.

    # Start over while the host is on: PXE once, then a reset.
    assert (await act(http, bm_agent, c, "updateBaremetalChassis",
                      {"status": "Unprovisioned"}))[0] == 200
    bmc.ipmitool("chassis", "bootdev", "disk")
    status, body = await act(http, bm_agent, c, "provisionBaremetalHost")
    assert status == 200, body
    last = bmc.events()[-1]
    assert last["event"] == "power_reset" and last["bootdev"] == "network"
    assert len(bmc.events("power_on")) == 1

    # Two provisions at once: one runs, the other is refused (409).
    assert (await act(http, bm_agent, c, "updateBaremetalChassis",
                      {"status": "Unprovisioned"}))[0] == 200
    results = await asyncio.gather(*(submit(http, bm_agent, "PUT", f"{CHASSIS}/{c}/actions",
                                            {"provisionBaremetalHost": {}}) for _ in range(2)))
    assert sorted(s for s, _ in results) == [202, 409], results


async def test_provision_fails_cleanly_when_bmc_is_gone(bm_agent, http, bmcs):
    bmc = bmcs()
    c = (await register(http, bm_agent, bmc))["uuid"]
    bmc.stop()
    status, body = await act(http, bm_agent, c, "provisionBaremetalHost", timeout=90)
    assert status == 503 and body["error"]["code"] in ("BM.1101", "BM.1105"), body
    assert f"127.0.0.1:{bmc.port}" in body["error"]["description"]
    s, inv = await get(http, bm_agent, f"{CHASSIS}/{c}")
    assert inv["inventory"]["status"] == "Unprovisioned"     # nothing half-done
    bmc.start()
    # The BMC is taken as down until the background probe (every 5 s) reaches it again. A
    # probe that began before the simulator was back listening times out first (8 s), so
    # allow two probe rounds (2 x (5 + 8) s) plus the simulator's own start on a busy machine.

    async def answers():
        return (await get(http, bm_agent, f"{CHASSIS}/{c}/power"))[0] == 200
    await wait_for(answers, timeout=40, what="the restarted BMC answering", interval=0.5)
    status, body = await act(http, bm_agent, c, "provisionBaremetalHost")
    assert status == 200 and body["inventory"]["status"] == "Provisioning"


async def test_mark_provisioned_with_a_real_agent_context(tmp_path, bmcs):
    """The PXE half's callback contract, on the plugin inside a real agent context."""
    from agent.app import check_sections
    from agent.config import load_config
    from agent.context import AgentContext
    from agent import errors
    from plugins.baremetal import BaremetalPlugin
    from plugins.baremetal.chassis import CreateChassis

    bmc = bmcs()
    config = load_config(overrides={"state": {"dir": str(tmp_path / "state")}})
    ctx = AgentContext(config)
    await ctx.open()
    settings = check_sections(config, {"baremetal": BaremetalPlugin})["baremetal"]
    plugin = BaremetalPlugin(ctx, settings)
    life = plugin.lifecycle()
    await life.__anext__()

    class Job:
        uuid, caller = "test", None

        def progress(self, *a, **k):
            pass
    try:
        # Called without the core, so the test decides the resourceUuid as the core would.
        params = CreateChassis.model_validate({**bmc.params(), "resourceUuid": uuidlib.uuid4().hex})
        created = await plugin.create_chassis(Job(), params)
        u = created["inventory"]["uuid"]
        assert await plugin.chassis_exists(u) and await plugin.chassis_exists(u.upper())
        assert not await plugin.chassis_exists(uuidlib.uuid4().hex)
        await plugin.provision(Job(), None, u)
        await plugin.mark_provisioned(u)
        assert (await plugin.get_chassis(u))["inventory"]["status"] == "Provisioned"
        evs = [e for e in await ctx.events.since(0) if e["type"] == "BaremetalChassisStatusChanged"]
        assert [e["data"]["status"] for e in evs] == ["Provisioning", "Provisioned"]
        with pytest.raises(errors.NotFound):
            await plugin.mark_provisioned(uuidlib.uuid4().hex)
    finally:
        with pytest.raises(StopAsyncIteration):
            await life.__anext__()
        await ctx.close()


# ------------------------------------------------------------------ in-band inspection

async def test_inspection_post_one_time_url(bm_agent, http, bmcs, receiver):
    await connect_events(http, bm_agent, receiver)
    bmc = bmcs()
    inv = await register(http, bm_agent, bmc)
    c, url = inv["uuid"], inv["inspectionUrl"]
    data = {"cpu_model": "Intel(R) Xeon(R) CPU L5520", "cpu_core": "16",
            "memory": "16416452 kB", "nics": [{"mac": "52:54:00:12:34:56"}]}
    async with http.post(url, json=data) as r:            # no Authorization header
        assert r.status == 200, await r.text()
        stored = (await r.json())["inventory"]
    assert stored["chassisUuid"] == c and stored["type"] == "inspection"
    assert json.loads(stored["content"]) == data
    await receiver.wait_for(event_of("BaremetalHardwareInfo", chassisUuid=c, type="inspection"))
    s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo",
                        q=[f"chassisUuid={c}", "type=inspection"])
    assert [i["uuid"] for i in body["inventories"]] == [stored["uuid"]]

    # Used once: the same URL is now unknown, the chassis shows a new one.
    async with http.post(url, json=data) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "BM.1115"
    s, body = await get(http, bm_agent, f"{CHASSIS}/{c}")
    new_url = body["inventory"]["inspectionUrl"]
    assert new_url != url
    async with http.post(new_url, data=b"[1, 2]") as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "BM.1117"
    s, body = await get(http, bm_agent, f"{CHASSIS}/{c}")
    newer = body["inventory"]["inspectionUrl"]
    async with http.post(newer, data=b"x" * (2 << 20)) as r:
        assert r.status == 413
    async with http.post(bm_agent.url + "/v1/baremetal/inspection/" + "A" * 43, json={}) as r:
        assert r.status == 404
    s, body = await get(http, bm_agent, f"{CHASSIS}/{c}")
    async with http.post(body["inventory"]["inspectionUrl"], json={"memory": "1 GB"}) as r:
        assert r.status == 200
    s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo", q="type=inspection")
    assert [json.loads(i["content"]) for i in body["inventories"]] == [{"memory": "1 GB"}]

    status, body = await act(http, bm_agent, c, "refreshBaremetalHardwareInfo")
    assert status == 200 and body["inventory"]["type"] == "bmc"
    assert json.loads(body["inventory"]["content"])["inventory"]["System"]["Serial Number"] == bmc.serial


# ------------------------------------------------------------------ serial console

async def ws_read_until(ws, needle: bytes, timeout: float = 15.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen on the console; got {seen!r}")
        msg = await ws.receive(timeout=left)
        if msg.type == aiohttp.WSMsgType.BINARY:
            seen += msg.data
        elif msg.type == aiohttp.WSMsgType.TEXT:
            seen += b"<" + msg.data.encode() + b">"
        else:
            raise AssertionError(f"console closed ({msg.type}); got {seen!r}")
    return seen


async def test_console_both_ways_one_at_a_time(bm_agent, http, bmcs):
    bmc = bmcs()
    c = (await register(http, bm_agent, bmc))["uuid"]
    assert await act(http, bm_agent, c, "powerOnBaremetalHost") == (200, {})

    status, body = await run_job(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                 {"params": {"chassisUuid": c}})
    assert status == 200, body
    grant = body["inventory"]
    assert grant["chassisUuid"] == c and grant["url"].startswith("ws://127.0.0.1:")
    assert grant["url"].endswith(grant["token"]) and len(grant["token"]) >= 40
    # One console per chassis: a second request is refused while the first is granted.
    status, body = await submit(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                {"params": {"chassisUuid": c}})
    assert status == 409 and body["error"]["code"] == "BM.1111"
    # A plain GET (no upgrade) is not a websocket.
    async with http.get(grant["url"].replace("ws://", "http://")) as r:
        assert r.status == 400

    async with http.ws_connect(grant["url"]) as ws:      # no Authorization: the token is it
        first = await ws.receive_json(timeout=15)
        assert first == {"event": "connected", "chassisUuid": c}
        await ws_read_until(ws, b"SOL console ready")
        await ws.send_bytes(b"hello from the controller\r")
        echoed = await ws_read_until(ws, b"controller")
        assert b"hello from" in echoed
        await ws.send_str("ls -l\r")
        await ws_read_until(ws, b"ls -l")
        assert "".join(e["data"] for e in bmc.events("sol_in")).startswith(
            "hello from the controller\rls -l")
        # BMC -> agent -> websocket while something else drives the chassis.
        assert await act(http, bm_agent, c, "powerResetBaremetalHost") == (200, {})
        await ws_read_until(ws, b"Booting from")
        # Still one console: open, so another request is refused.
        status, body = await submit(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                    {"params": {"chassisUuid": c}})
        assert status == 409
        # The token was used: a second socket with it is refused.
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            async with http.ws_connect(grant["url"]):
                pass
        assert e.value.status == 404

    await wait_for(lambda: _async(bool(bmc.events("sol_deactivate"))), what="SOL deactivated")
    # Closed: a new console can be had, and it works again.
    status, body = await run_job(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                 {"params": {"chassisUuid": c}})
    assert status == 200, body
    async with http.ws_connect(body["inventory"]["url"]) as ws:
        assert (await ws.receive_json(timeout=15))["event"] == "connected"
        await ws.send_bytes(b"again\r")
        await ws_read_until(ws, b"again")


async def test_console_error_when_sol_cannot_start(bm_agent, http, bmcs):
    bmc = bmcs()             # powered off: the fake refuses SOL activation ("SOL is disabled")
    c = (await register(http, bm_agent, bmc))["uuid"]
    status, body = await run_job(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                 {"params": {"chassisUuid": c}})
    async with http.ws_connect(body["inventory"]["url"]) as ws:
        msg = await ws.receive_json(timeout=20)
        assert msg["event"] == "error" and f"127.0.0.1:{bmc.port}" in msg["message"]
        assert "SOL is disabled" in msg["message"]
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # The slot is free again.
    status, body = await run_job(http, bm_agent, "POST", "/v1/baremetal/consoles",
                                 {"params": {"chassisUuid": c}})
    assert status == 200


async def _async(value):
    return value


# ------------------------------------------------------------------ update, delete, many

async def test_update_checks_credentials_then_delete(bm_agent, http, bmcs):
    a, b = bmcs(), bmcs(password="other-pass")
    c = (await register(http, bm_agent, a, name="one"))["uuid"]
    # Wrong password for the new BMC: refused, nothing changed.
    status, body = await act(http, bm_agent, c, "updateBaremetalChassis",
                             {"ipmiPort": str(b.port), "ipmiPassword": "password"})
    assert status == 503 and body["error"]["code"] == "BM.1102"
    s, inv = await get(http, bm_agent, f"{CHASSIS}/{c}")
    assert inv["inventory"]["ipmiPort"] == str(a.port)
    assert await act(http, bm_agent, c, "powerOnBaremetalHost") == (200, {})
    assert "on" in a.ipmitool("power", "status")
    # Right password: moved to the other BMC; calls now go there.
    status, body = await act(http, bm_agent, c, "updateBaremetalChassis",
                             {"ipmiPort": b.port, "ipmiPassword": "other-pass", "name": "two"})
    assert status == 200 and body["inventory"]["ipmiPort"] == str(b.port)
    assert body["inventory"]["name"] == "two"
    assert await act(http, bm_agent, c, "powerOnBaremetalHost") == (200, {})
    assert "on" in b.ipmitool("power", "status")
    # Onto a BMC another chassis has: 409.
    other = (await register(http, bm_agent, a))["uuid"]
    status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{other}/actions",
                                {"updateBaremetalChassis": {"ipmiPort": b.port}})
    assert status == 409 and body["error"]["code"] == "BM.1109"
    status, body = await act(http, bm_agent, c, "updateBaremetalChassis", {"status": "Provisioned"})
    assert body["inventory"]["status"] == "Provisioned"
    status, body = await submit(http, bm_agent, "PUT", f"{CHASSIS}/{c}/actions",
                                {"updateBaremetalChassis": {"status": "Broken"}})
    assert status == 400 and "status" in body["error"]["description"]

    status, body = await run_job(http, bm_agent, "DELETE", f"{CHASSIS}/{c}")
    assert (status, body) == (200, {})
    s, body = await get(http, bm_agent, f"{CHASSIS}/{c}")
    assert s == 404
    s, body = await get(http, bm_agent, "/v1/baremetal/hardwareinfo", q=f"chassisUuid={c}")
    assert body["inventories"] == []
    status, body = await submit(http, bm_agent, "DELETE", f"{CHASSIS}/{c}")
    assert status == 404


async def test_many_bmcs_in_parallel(bm_agent, http, bmcs):
    fakes = [bmcs() for _ in range(6)]
    invs = await asyncio.gather(*(register(http, bm_agent, f) for f in fakes))
    results = await asyncio.gather(*(act(http, bm_agent, i["uuid"], "powerOnBaremetalHost")
                                     for i in invs))
    assert all(r == (200, {}) for r in results)
    t0 = time.monotonic()
    states = await asyncio.gather(*(get(http, bm_agent, f"{CHASSIS}/{i['uuid']}/power")
                                    for i in invs))
    assert all(s == (200, {"status": "on"}) for s in states)
    assert time.monotonic() - t0 < 5
    assert all("on" in f.ipmitool("power", "status") for f in fakes)


# ------------------------------------------------------------------ a dead BMC (issue 11.1)

async def power_timed(http, agent, chassis: str, client_timeout: float | None = None):
    """(seconds, status, error code) of GET .../power; status None if the client gave up."""
    t0 = time.monotonic()
    try:
        async with http.get(f"{agent.url}{CHASSIS}/{chassis}/power", headers=agent.headers,
                            timeout=aiohttp.ClientTimeout(total=client_timeout)) as r:
            body = await r.json()
            return time.monotonic() - t0, r.status, (body.get("error") or {}).get("code"), body
    except asyncio.TimeoutError:
        return time.monotonic() - t0, None, None, None


async def wait_hwinfo(http, agent, chassis: str) -> None:
    async def stored():
        s, body = await get(http, agent, "/v1/baremetal/hardwareinfo", q=f"chassisUuid={chassis}")
        return body["inventories"]
    await wait_for(stored, timeout=120, what="the hardware info read after registration",
                   interval=0.5)


async def test_dead_bmc_fails_fast_without_a_queue_then_recovers(agent_factory, http, bmcs):
    # Whole-call bound 6 s; a BMC found down is probed every second.
    agent = agent_factory({"baremetal": {"call_timeout_seconds": 6,
                                         "probe_interval_seconds": 1}}).start()
    dead, alive = bmcs(), bmcs()
    c = (await register(http, agent, dead))["uuid"]
    c_alive = (await register(http, agent, alive))["uuid"]
    assert (await power_timed(http, agent, c))[1] == 200
    os.kill(dead.proc.pid, signal.SIGSTOP)          # the BMC stops answering
    try:
        # 20 concurrent callers, plus 10 that give up after 1 s (their connections close).
        t0 = time.monotonic()
        calls = [power_timed(http, agent, c) for _ in range(20)]
        leavers = [power_timed(http, agent, c, client_timeout=1) for _ in range(10)]
        healthy = power_timed(http, agent, c_alive)
        results = await asyncio.gather(*calls, *leavers, healthy)
        stayed, left, other = results[:20], results[20:30], results[30]
        worst = max(r[0] for r in stayed)
        assert worst < 6 + 1.5, f"20 calls to a dead BMC: the last answered after {worst:.1f} s"
        for seconds, status, code, body in stayed:
            assert status == 503 and code == "BM.1101", body
            assert f"127.0.0.1:{dead.port}" in body["error"]["description"]
        assert all(r[1] is None for r in left)
        assert other[1] == 200 and other[0] < 2, f"a healthy BMC waited {other[0]:.1f} s"
        # Known down: the next calls fail at once, naming the address.
        for _ in range(3):
            seconds, status, code, body = await power_timed(http, agent, c)
            assert status == 503 and code == "BM.1101" and seconds < 1, (seconds, body)
            assert f"127.0.0.1:{dead.port}" in body["error"]["description"]
            assert "probe" in body["error"]["description"]
        status, body = await act(http, agent, c, "powerOnBaremetalHost")
        assert status == 503 and body["error"]["code"] == "BM.1101", body
        assert time.monotonic() - t0 < 20
    finally:
        os.kill(dead.proc.pid, signal.SIGCONT)      # revived: a probe sees it again

    async def answers():
        seconds, status, code, body = await power_timed(http, agent, c)
        return status == 200
    await wait_for(answers, timeout=20, what="the revived BMC answering again", interval=0.5)
    assert await act(http, agent, c, "powerOnBaremetalHost") == (200, {})
    assert "on" in dead.ipmitool("power", "status")
    assert "is down" in agent.log() and "answers again" in agent.log()


async def test_callers_that_leave_hold_no_place_in_a_bmcs_queue(agent_factory, http, bmcs):
    # A slow but healthy BMC: 1 s over each command, so each call holds the BMC's turn ~1 s.
    agent = agent_factory({"baremetal": {"call_timeout_seconds": 30}}).start()
    slow = bmcs()
    c = (await register(http, agent, slow))["uuid"]
    await wait_hwinfo(http, agent, c)       # the registration's reads are over
    slow.delay_ms = 1000                    # then it gets slow: ~1 s over each command
    slow.restart()
    r = await power_timed(http, agent, c)
    assert r[1] == 200, r
    # 10 callers give up after 0.5 s: 10 s of queue if their places were kept.
    left = await asyncio.gather(*(power_timed(http, agent, c, client_timeout=0.5)
                                  for _ in range(10)))
    assert all(r[1] is None for r in left)
    seconds, status, code, body = await power_timed(http, agent, c)
    assert status == 200, body
    # At most the one call already at the BMC (~1 s) and our own (~1 s).
    assert seconds < 3.5, f"a new caller waited {seconds:.1f} s behind callers that left"


async def test_a_bmcs_queue_is_bounded(agent_factory, http, bmcs):
    agent = agent_factory({"baremetal": {"call_timeout_seconds": 30,
                                         "max_waiting_calls": 3}}).start()
    slow = bmcs()
    c = (await register(http, agent, slow))["uuid"]
    await wait_hwinfo(http, agent, c)       # the registration's reads are over
    slow.delay_ms = 1000                    # then it gets slow: ~1 s over each command
    slow.restart()
    results = await asyncio.gather(*(power_timed(http, agent, c) for _ in range(8)))
    codes = sorted((r[1], r[2]) for r in results)
    assert codes.count((200, None)) == 4, codes          # one at the BMC, three waiting
    refused = [r for r in results if r[1] == 503]
    assert len(refused) == 4 and all(r[2] == "BM.1105" and r[0] < 1 for r in refused), refused
    assert "wait for this BMC" in refused[0][3]["error"]["description"]


async def test_jobs_of_callers_that_left_end_sensibly(bm_agent, http, bmcs):
    bmc = bmcs()
    c = (await register(http, bm_agent, bmc))["uuid"]
    ids = []
    for i in range(30):     # callers leaving at every point of the submission
        job = uuidlib.uuid4().hex
        ids.append(job)
        try:
            async with http.put(f"{bm_agent.url}{CHASSIS}/{c}/actions",
                                json={"powerStatusBaremetalHost": {}},
                                headers=dict(bm_agent.headers, **{"X-Job-UUID": job}),
                                timeout=aiohttp.ClientTimeout(total=0.002 * (i % 15))) as r:
                await r.read()
        except asyncio.TimeoutError:
            pass

    async def all_ended():
        for job in ids:
            async with http.get(f"{bm_agent.url}/v1/api-jobs/{job}",
                                headers=bm_agent.headers) as r:
                if r.status == 202:
                    return False
                assert r.status in (200, 404), await r.text()
                if r.status == 200:
                    assert (await r.json())["status"] in ("on", "off")
        return True
    await wait_for(all_ended, timeout=30, what="every submitted job ended")
    # A caller that left can submit the same X-Job-UUID again and gets the job's result.
    status, body = await run_job(http, bm_agent, "PUT", f"{CHASSIS}/{c}/actions",
                                 {"powerStatusBaremetalHost": {}},
                                 headers={"X-Job-UUID": ids[0]})
    assert status == 200 and body["status"] in ("on", "off"), body


# ------------------------------------------------------------------ secrets

async def test_password_never_in_responses_logs_argv_or_state(agent_factory, http, bmcs):
    secret = "Zq8-" + uuidlib.uuid4().hex[:12]          # 16 characters, unique to this test
    agent = agent_factory({"baremetal": {}}).start()
    bmc = bmcs(password=secret)
    replies = []
    status, body = await run_job(http, agent, "POST", CHASSIS, {"params": bmc.params()})
    replies.append(body)
    c = body["inventory"]["uuid"]
    for name, params in (("powerOnBaremetalHost", {}), ("provisionBaremetalHost", {}),
                         ("updateBaremetalChassis", {"ipmiPassword": secret, "name": "x"}),
                         ("refreshBaremetalHardwareInfo", {})):
        replies.append((await act(http, agent, c, name, params))[1])
    status, body = await act(http, agent, c, "updateBaremetalChassis",
                             {"ipmiPassword": secret[::-1]})
    assert status == 503 and body["error"]["code"] == "BM.1102"
    replies.append(body)
    for path in (CHASSIS, f"{CHASSIS}/{c}", "/v1/baremetal/hardwareinfo", "/v1/api-jobs"):
        replies.append((await get(http, agent, path))[1])
    async with http.get(agent.url + "/v1/openapi.json", headers=agent.headers) as r:
        replies.append(await r.json())
    text = json.dumps(replies)
    assert secret not in text and secret[::-1] not in text

    # argv of every process on the machine, while the agent and the BMC run
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert secret.encode() not in cmdline, f"password in argv of pid {pid}"
    agent.stop()
    assert secret not in agent.log() and secret[::-1] not in agent.log()
    state = agent.state_dir
    for f in state.iterdir():
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data, f"password in plaintext in {f.name}"
    key = state / "baremetal.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The stored password still works after a restart (decrypted with the key file).
    agent.start()
    assert (await get(http, agent, f"{CHASSIS}/{c}/power")) == (200, {"status": "on"})
    # A lost key: a clear 503 telling what to do, not garbage sent to the BMC.
    agent.stop()
    key.unlink()
    agent.start()
    s, body = await get(http, agent, f"{CHASSIS}/{c}/power")
    assert s == 503 and body["error"]["code"] == "BM.1106"
    assert "updateBaremetalChassis" in body["error"]["description"]
    status, body = await act(http, agent, c, "updateBaremetalChassis", {"ipmiPassword": secret})
    assert status == 200, body
    assert (await get(http, agent, f"{CHASSIS}/{c}/power")) == (200, {"status": "on"})
