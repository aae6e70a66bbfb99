"""The VM plugin over HTTP: real agent processes, a real isolated libvirtd with
QEMU (TCG guests with no OS: they boot into nothing, which is enough), and
libvirt's test driver for scale (1000 domains)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from conftest import run_job, submit, wait_job
from libvirt_fixture import Libvirtd, libvirtd  # noqa: F401

libvirt.registerErrorHandler(lambda *_: None, None)

PASSWORD = "s3cr3t!"


# ------------------------------------------------------------------ helpers

def vm_config(uri: str, **vm) -> dict:
    return {"libvirt": {"uri": uri},
            "vm": {"stats_interval_seconds": 1, "domain_type": "qemu", **vm}}


async def health_vm(http, agent) -> dict:
    async with http.get(agent.url + "/v1/health") as r:
        body = await r.json()
    return next(p for p in body["plugins"] if p["name"] == "vm")


async def wait_libvirt(http, agent, up: bool = True, timeout: float = 10) -> float:
    t0 = time.monotonic()
    while True:
        vm = await health_vm(http, agent)
        if vm["capabilities"].get("libvirt", {}).get("available") is up:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"libvirt capability not {up} after {timeout} s: {vm}")
        await asyncio.sleep(0.05)


async def get(http, agent, path, **params) -> tuple[int, dict]:
    async with http.get(agent.url + path, params=params, headers=agent.headers) as r:
        return r.status, await r.json()


async def act(http, agent, uuid, name, params=None, timeout=60) -> tuple[int, dict]:
    return await run_job(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                         {name: params or {}}, timeout=timeout)


def make_disk(tmp_path, name="disk.qcow2") -> str:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return str(path)


def spec(name: str, disk: str, **kw) -> dict:
    s = {"name": name, "cpuNum": 1, "memorySize": 64 << 20,
         "disks": [{"path": disk, "format": "qcow2"}]}
    s.update(kw)
    return s


async def define(http, agent, s: dict) -> dict:
    status, body = await run_job(http, agent, "POST", "/v1/vm-instances", {"params": s})
    assert status == 200, body
    return body["inventory"]


async def connect_host(http, agent, receiver) -> None:
    status, body = await run_job(http, agent, "PUT", "/v1/host/actions", {"connectHost": {
        "hostUuid": uuidlib.uuid4().hex, "managementServerUrl": receiver.url("/events")}})
    assert status == 200, body


def vm_events(receiver, uuid: str) -> list[dict]:
    return [r["body"]["data"] for r in receiver.received
            if r["body"] and r["body"].get("type") == "VmStateChanged"
            and r["body"]["data"]["vmInstanceUuid"] == uuid]


async def wait_event(receiver, uuid: str, state: str, timeout: float = 10, since: int = 0) -> dict:
    """The first VmStateChanged of this VM to `state` among its events from index `since`."""
    deadline = time.monotonic() + timeout
    while True:
        for ev in vm_events(receiver, uuid)[since:]:
            if ev["state"] == state:
                return ev
        if time.monotonic() > deadline:
            raise AssertionError(f"no {state} event for {uuid} in {timeout} s: {vm_events(receiver, uuid)}")
        await asyncio.sleep(0.05)


@pytest.fixture
def lv(libvirtd):  # noqa: F811
    """A direct connection for checks behind the agent's back; cleans up test domains."""
    conn = libvirt.open(libvirtd.uri)
    yield conn
    try:
        conn.close()
    except libvirt.libvirtError:
        pass                  # died with a restarted libvirtd
    conn = libvirt.open(libvirtd.uri)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("t-vm-"):
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
    finally:
        conn.close()


def name() -> str:
    return f"t-vm-{uuidlib.uuid4().hex[:8]}"


# ------------------------------------------------------------------ real libvirtd + QEMU

async def test_define_list_get_query_hostdevs_and_delete(agent_factory, http, libvirtd, lv, tmp_path):  # noqa: F811
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    disk = make_disk(tmp_path)
    vm_name = name()
    wanted = uuidlib.uuid4().hex
    s = spec(vm_name, disk, uuid=wanted, description="a <test> & \"quotes\"",
             disks=[{"path": disk, "format": "qcow2"}, {"device": "cdrom"}],
             nics=[{"bridge": "br-none0", "mac": "52:54:00:AB:CD:EF", "model": "e1000"},
                   {"network": "nonet"}],
             graphics={"type": "vnc", "listen": "127.0.0.1", "password": PASSWORD},
             hostdevs=[{"type": "pci", "pciDeviceAddress": "0000:03:00.0"},
                       {"type": "usb", "idVendor": "1d6b", "idProduct": "0002"}])
    inv = await define(http, agent, s)
    assert inv["uuid"] == wanted and inv["name"] == vm_name
    assert inv["state"] == "Stopped" and inv["persistent"] is True
    assert inv["cpuNum"] == 1 and inv["memorySize"] == 64 << 20
    assert inv["hypervisorType"] == "KVM" and inv["domainType"] == "qemu"
    assert inv["description"] == "a <test> & \"quotes\""
    assert [(d["device"], d["bus"], d["target"], d["format"]) for d in inv["disks"]] == \
        [("disk", "virtio", "vda", "qcow2"), ("cdrom", "sata", "sda", "raw")]
    assert inv["nics"][0] == {"mac": "52:54:00:ab:cd:ef", "bridge": "br-none0", "network": None,
                              "model": "e1000", "target": None}
    assert inv["nics"][1]["network"] == "nonet" and inv["nics"][1]["mac"]   # generated
    assert inv["graphics"] == [{"type": "vnc", "listen": "127.0.0.1", "port": None, "autoport": True}]
    assert inv["hostdevs"] == [{"type": "pci", "pciDeviceAddress": "0000:03:00.0",
                                "idVendor": None, "idProduct": None},
                               {"type": "usb", "pciDeviceAddress": None,
                                "idVendor": "1d6b", "idProduct": "0002"}]
    assert inv["serialConsole"]["type"] == "pty"

    # The hostdevs and the password are in the persistent config libvirt keeps...
    dom = lv.lookupByUUIDString(wanted)
    xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    assert xml.find("devices/hostdev/source/address").get("bus") == "0x03"
    assert xml.find("devices/hostdev/source/vendor").get("id") == "0x1d6b"
    assert xml.find("devices/graphics").get("passwd") == PASSWORD
    assert xml.findtext("description") == "a <test> & \"quotes\""

    # ... and never come back out, nor go to the log.
    status, body = await get(http, agent, f"/v1/vm-instances/{wanted}")
    assert status == 200 and body["inventory"] == inv
    status, listed = await get(http, agent, "/v1/vm-instances", q=f"name={vm_name}")
    assert status == 200 and listed["inventories"] == [inv]
    assert PASSWORD not in json.dumps(listed) and PASSWORD not in agent.log()
    status, body = await get(http, agent, "/v1/vm-instances", q=["disks.format=qcow2", "hostdevs.type=usb",
                                                                 f"uuid={wanted}"], fields="uuid,state")
    assert body == {"inventories": [{"uuid": wanted, "state": "Stopped"}]}
    status, body = await get(http, agent, "/v1/vm-instances", q="nosuchfield=1")
    assert status == 400 and body["error"]["code"] == "SYS.1100"

    # The definition was streamed as an event (SSE, from the start).
    seen = await read_sse(http, agent, lambda ev: ev["type"] == "VmStateChanged"
                          and ev["data"]["vmInstanceUuid"] == wanted)
    assert seen["data"] == {"vmInstanceUuid": wanted, "name": vm_name, "state": "Stopped",
                            "reason": "defined"}

    # Same uuid or name again: 409 at submission, nothing defined.
    # (A used uuid is the core's resourceUuid rule: SYS.1009, whatever the resource.)
    for clash, code in ((spec(vm_name, disk), "VM.1010"), (spec(name(), disk, uuid=wanted), "SYS.1009"),
                        (spec(name(), disk, resourceUuid=wanted), "SYS.1009")):
        status, body = await submit(http, agent, "POST", "/v1/vm-instances", {"params": clash})
        assert status == 409 and body["error"]["code"] == code, body

    status, body = await run_job(http, agent, "DELETE", f"/v1/vm-instances/{wanted}")
    assert status == 200 and body == {}
    status, body = await get(http, agent, f"/v1/vm-instances/{wanted}")
    assert status == 404 and body["error"]["code"] == "VM.1004"
    with pytest.raises(libvirt.libvirtError):
        lv.lookupByUUIDString(wanted)
    assert (await read_sse(http, agent, lambda ev: ev["type"] == "VmStateChanged"
                           and ev["data"]["state"] == "Destroyed"))["data"]["vmInstanceUuid"] == wanted


async def read_sse(http, agent, predicate, timeout: float = 10) -> dict:
    """The first event on GET /v1/events (replayed from the start) matching predicate."""
    headers = dict(agent.headers, **{"Last-Event-ID": "0"})
    async with http.get(agent.url + "/v1/events", headers=headers,
                        timeout=__import__("aiohttp").ClientTimeout(total=timeout)) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: "):
                ev = json.loads(line[6:])
                if predicate(ev):
                    return ev
    raise AssertionError("no matching event")


async def test_spec_validation_and_unknown_vm(agent_factory, http, libvirtd, tmp_path):  # noqa: F811
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    disk = make_disk(tmp_path)
    bad = [
        ({"disks": [{"path": "relative.qcow2", "format": "qcow2"}]}, "absolute"),
        ({"disks": [{"path": "/tmp/../etc/passwd", "format": "raw"}]}, ".."),
        ({"disks": [{"path": disk}]}, "format"),
        ({"disks": [{"path": str(tmp_path / "missing.qcow2"), "format": "qcow2"}]}, "does not exist"),
        ({"disks": [{"device": "cdrom", "bus": "virtio"}]}, "sata or ide"),
        ({"nics": [{"bridge": "br0", "mac": "01:00:5e:00:00:01"}]}, "unicast"),
        ({"nics": [{"bridge": "br0", "mac": "52:54:00:zz:00:01"}]}, "hex"),
        ({"nics": [{"bridge": "br0", "network": "default"}]}, "exactly one"),
        ({"graphics": {"type": "vnc", "password": "123456789"}}, "1 to 8"),
        ({"graphics": {"type": "vnc", "listen": "example.com"}}, "IP address"),
        ({"hostdevs": [{"type": "pci", "pciDeviceAddress": "03:00.0"}]}, "0000:03:00.0"),
        ({"hostdevs": [{"type": "usb", "idVendor": "1d6b"}]}, "idProduct"),
        ({"memorySize": 1000}, "memorySize"),
        ({"memorySize": (64 << 20) + 1}, "multiple of 1 MiB"),
        ({"uuid": "not-a-uuid"}, "32 hex"),
        ({"name": "a/b"}, "'/'"),
    ]
    for change, words in bad:
        s = spec(name(), disk)
        s.update(change)
        status, body = await submit(http, agent, "POST", "/v1/vm-instances", {"params": s})
        assert status == 400, (change, body)
        text = body["error"]["description"] + (body["error"]["details"] or "")
        assert words.lower() in text.lower() or words in json.dumps(body), (change, body)
        assert "123456789" not in json.dumps(body) and "Traceback" not in json.dumps(body)

    unknown = uuidlib.uuid4().hex
    status, body = await get(http, agent, f"/v1/vm-instances/{unknown}")
    assert status == 404 and body["error"]["code"] == "VM.1004"
    for action in ("startVmInstance", "stopVmInstance", "pauseVmInstance", "migrateVm"):
        params = {"destination": "qemu+tcp://nowhere/system"} if action == "migrateVm" else {}
        status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{unknown}/actions",
                                    {action: params})
        assert status == 404 and body["error"]["code"] == "VM.1004", (action, body)
    status, body = await submit(http, agent, "DELETE", f"/v1/vm-instances/{unknown}")
    assert status == 404
    status, body = await get(http, agent, "/v1/vm-instances/xyz")
    assert status == 404 and body["error"]["code"] == "SYS.1004"
    status, body = await get(http, agent, f"/v1/vm-instances/{unknown}0")   # 33 hex digits
    assert status == 400 and body["error"]["code"] == "VM.1001"
    status, body = await submit(http, agent, "DELETE", "/v1/vm-instances/stats")
    assert status == 405


async def test_lifecycle_events_stats_and_wrong_states(agent_factory, http, libvirtd, lv,  # noqa: F811
                                                       tmp_path, receiver):
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    await connect_host(http, agent, receiver)
    inv = await define(http, agent, spec(name(), make_disk(tmp_path)))
    uuid = inv["uuid"]
    await wait_event(receiver, uuid, "Stopped")

    # Wrong states are refused at submission, before any job exists.
    for action in ("stopVmInstance", "pauseVmInstance", "resumeVmInstance", "rebootVmInstance",
                   "destroyVmInstance"):
        status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions", {action: {}})
        assert status == 409 and body["error"]["code"] == "VM.1009", (action, body)
    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                {"migrateVm": {"destination": "qemu+tcp://nowhere/system"}})
    assert status == 409 and "Stopped" in body["error"]["description"]

    status, body = await act(http, agent, uuid, "startVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Running", body
    assert body["inventory"]["serialConsole"]["path"].startswith("/dev/pts/")
    ev = await wait_event(receiver, uuid, "Running")
    assert ev["previousState"] == "Stopped" and ev["reason"] == "booted"
    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                {"startVmInstance": {}})
    assert status == 409 and body["error"]["code"] == "VM.1009"
    status, body = await submit(http, agent, "DELETE", f"/v1/vm-instances/{uuid}")
    assert status == 409 and "force=true" in body["error"]["description"]

    # Stats: from the background sample (every 1 s here), with their age.
    deadline = time.monotonic() + 10
    while True:
        status, body = await get(http, agent, "/v1/vm-instances/stats", q=f"uuid={uuid}")
        assert status == 200, body
        entry = (body["inventories"] or [{}])[0]
        if entry.get("state") == "Running" and entry.get("cpuTimeSeconds"):
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)
    assert 0 <= entry["ageSeconds"] < 3
    assert entry["balloonMaximum"] == 64 << 20 and entry["balloonCurrent"] > 0
    assert entry["disks"][0]["name"] == "vda" and entry["blockReadBytes"] >= 0
    assert entry["blockWriteBytes"] is not None
    status, body = await get(http, agent, "/v1/vm-instances/stats", q="state=Running", count="true")
    assert body["total"] >= 1
    async with http.get(agent.url + "/metrics", headers=agent.headers) as r:
        metrics = await r.text()
    assert f'node_agent_vm_cpu_seconds{{name="{inv["name"]}",uuid="{uuid}"}}' in metrics
    assert "node_agent_vm_stats_sample_seconds" in metrics

    status, body = await act(http, agent, uuid, "pauseVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Paused"
    assert (await wait_event(receiver, uuid, "Paused"))["previousState"] == "Running"
    for action in ("pauseVmInstance", "startVmInstance"):
        status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions", {action: {}})
        assert status == 409, (action, body)
    n = len(vm_events(receiver, uuid))
    status, body = await act(http, agent, uuid, "resumeVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Running"
    await wait_event(receiver, uuid, "Running", since=n)
    count = len(vm_events(receiver, uuid))

    # A reboot (stop then start) is no stop for the controller.
    status, body = await act(http, agent, uuid, "rebootVmInstance", {"type": "cold"})
    assert status == 200 and body["inventory"]["state"] == "Running", body
    await asyncio.sleep(2.5)           # longer than the hold window
    assert vm_events(receiver, uuid)[count:] == []

    # No OS answers ACPI: a grace stop falls back to destroy after its timeout.
    t0 = time.monotonic()
    status, body = await act(http, agent, uuid, "stopVmInstance", {"type": "grace", "timeout": 1})
    assert status == 200, body
    assert body["forced"] is True and body["inventory"]["state"] == "Stopped"
    assert 1 <= time.monotonic() - t0 < 6
    ev = await wait_event(receiver, uuid, "Stopped", since=count)
    assert ev["previousState"] == "Running" and ev["reason"] == "destroyed"

    # Force delete of a running VM: destroyed, then undefined, reported in that order.
    n = len(vm_events(receiver, uuid))
    await act(http, agent, uuid, "startVmInstance")
    await wait_event(receiver, uuid, "Running", since=n)
    status, body = await run_job(http, agent, "DELETE", f"/v1/vm-instances/{uuid}?force=true")
    assert status == 200, body
    await wait_event(receiver, uuid, "Destroyed")
    states = [e["state"] for e in vm_events(receiver, uuid)]
    assert states == ["Stopped", "Running", "Paused", "Running", "Stopped", "Running", "Stopped",
                      "Destroyed"], states


def virsh_xml(uri: str, uuid: str, inactive: bool = False) -> ET.Element:
    argv = ["virsh", "-c", uri, "dumpxml", str(uuidlib.UUID(uuid))] + (["--inactive"] if inactive else [])
    return ET.fromstring(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


async def test_usb_redirect_on_a_default_vm(agent_factory, http, libvirtd, lv, tmp_path):  # noqa: F811
    """Issue 13.5: a VM defined with default settings takes USB redirection, running."""
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    inv = await define(http, agent, spec(name(), make_disk(tmp_path), graphics={"type": "spice"}))
    uuid = inv["uuid"]
    status, body = await act(http, agent, uuid, "startVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Running", body
    usb = virsh_xml(libvirtd.uri, uuid).findall("devices/controller[@type='usb']")
    assert [(c.get("model"), c.get("ports")) for c in usb] == [("qemu-xhci", "15")]
    status, body = await act(http, agent, uuid, "setVmUsbRedirect", {"enable": True})
    assert (status, body) == (200, {"enable": True})
    for inactive in (False, True):
        redirs = virsh_xml(libvirtd.uri, uuid, inactive).findall("devices/redirdev")
        assert [(r.get("bus"), r.get("type")) for r in redirs] == [("usb", "spicevmc")] * 2, inactive
    status, body = await act(http, agent, uuid, "setVmUsbRedirect", {"enable": False})
    assert (status, body) == (200, {"enable": False})
    for inactive in (False, True):
        assert virsh_xml(libvirtd.uri, uuid, inactive).findall("devices/redirdev") == [], inactive
    status, body = await act(http, agent, uuid, "setVmUsbRedirect", {"enable": True})
    assert status == 200 and len(virsh_xml(libvirtd.uri, uuid).findall("devices/redirdev")) == 2

    # The spec chooses the model: the old default (2 ports, one taken by the tablet) has
    # no room for two channels, and says so; usbController none is refused with a tablet.
    old = await define(http, agent, spec(name(), make_disk(tmp_path, "old.qcow2"),
                                         graphics={"type": "spice"}, usbController="piix3-uhci"))
    status, body = await act(http, agent, old["uuid"], "startVmInstance")
    assert status == 200, body
    usb = virsh_xml(libvirtd.uri, old["uuid"]).findall("devices/controller[@type='usb']")
    assert [c.get("model") for c in usb] == ["piix3-uhci"]
    status, body = await act(http, agent, old["uuid"], "setVmUsbRedirect", {"enable": True})
    assert status == 503 and "USB" in body["error"]["code"], body
    assert virsh_xml(libvirtd.uri, old["uuid"], True).findall("devices/redirdev") == []
    status, body = await submit(http, agent, "POST", "/v1/vm-instances", {"params": spec(
        name(), make_disk(tmp_path, "none.qcow2"), graphics={"type": "spice"}, usbController="none")})
    assert status == 400 and "usbController none" in body["error"]["description"], body
    status, body = await submit(http, agent, "POST", "/v1/vm-instances", {"params": spec(
        name(), make_disk(tmp_path, "bad.qcow2"), usbController="xhci'/><evil")})
    assert status == 400, body


async def test_stats_show_a_started_vm_within_a_second(agent_factory, http, libvirtd, lv, tmp_path):  # noqa: F811
    """Issue 13.6: a lifecycle change wakes the sampler (the interval here is 60 s)."""
    agent = agent_factory(vm_config(libvirtd.uri, stats_interval_seconds=60)).start()
    await wait_libvirt(http, agent)
    status, body = await get(http, agent, "/v1/vm-instances/stats")    # the first pass is done
    assert status == 200, body

    async def seen(uuid: str, state: str) -> float:
        t0 = time.monotonic()
        while True:
            status, body = await get(http, agent, "/v1/vm-instances/stats", q=f"uuid={uuid}")
            assert status == 200, body
            if body["inventories"] and body["inventories"][0]["state"] == state:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < 5, (state, body)
            await asyncio.sleep(0.05)

    inv = await define(http, agent, spec(name(), make_disk(tmp_path)))
    assert await seen(inv["uuid"], "Stopped") < 1.0
    status, body = await act(http, agent, inv["uuid"], "startVmInstance")
    assert status == 200, body
    took = await seen(inv["uuid"], "Running")
    assert took < 1.0, took
    status, body = await get(http, agent, "/v1/vm-instances/stats", q=f"uuid={inv['uuid']}")
    assert body["inventories"][0]["ageSeconds"] < 1.0
    status, body = await act(http, agent, inv["uuid"], "stopVmInstance", {"type": "cold"})
    assert status == 200, body
    assert await seen(inv["uuid"], "Stopped") < 4.0       # the Stopped event is held 2 s


async def test_one_stuck_vm_does_not_stall_the_others(agent_factory, http, libvirtd, lv,  # noqa: F811
                                                      tmp_path, receiver):
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    await connect_host(http, agent, receiver)
    a = await define(http, agent, spec(name(), make_disk(tmp_path, "a.qcow2")))
    b = await define(http, agent, spec(name(), make_disk(tmp_path, "b.qcow2")))
    for vm in (a, b):
        assert (await act(http, agent, vm["uuid"], "startVmInstance"))[0] == 200

    async def stats() -> dict[str, dict]:
        status, body = await get(http, agent, "/v1/vm-instances/stats")
        return {e["uuid"]: e for e in body["inventories"]}

    deadline = time.monotonic() + 10
    while True:
        seen = await stats()
        if all(seen.get(vm["uuid"], {}).get("cpuTimeSeconds") for vm in (a, b)):
            break
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.2)

    # Freeze A's QEMU; a shutdown then waits on A's monitor, holding A's job.
    # (Right after a statistics pass, so that the next pass finds the job taken.)
    while (await stats())[a["uuid"]]["ageSeconds"] > 0.2:
        await asyncio.sleep(0.02)
    pid = int((libvirtd.base / "run" / "qemu" / f"{a['name']}.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        status, reply = await submit(http, agent, "PUT", f"/v1/vm-instances/{a['uuid']}/actions",
                                     {"stopVmInstance": {"type": "grace", "timeout": 60}})
        assert status == 202
        await asyncio.sleep(0.3)
        for _ in range(2):
            t0 = time.monotonic()
            status, body = await get(http, agent, f"/v1/vm-instances/{b['uuid']}")
            assert status == 200 and body["inventory"]["state"] == "Running"
            n = len(vm_events(receiver, b["uuid"]))
            assert (await act(http, agent, b["uuid"], "pauseVmInstance"))[0] == 200
            await wait_event(receiver, b["uuid"], "Paused", since=n, timeout=2)
            assert (await act(http, agent, b["uuid"], "resumeVmInstance"))[0] == 200
            assert time.monotonic() - t0 < 2.5
        # The bulk sample goes on (NOWAIT): B is fresh, A keeps its last figures, aging.
        await asyncio.sleep(2.5)
        now = await stats()
        assert now[b["uuid"]]["ageSeconds"] < 2, now[b["uuid"]]
        assert now[a["uuid"]]["ageSeconds"] >= 2 and now[a["uuid"]]["cpuTimeSeconds"], now[a["uuid"]]
        status, body = await run_job(http, agent, "DELETE",
                                     "/v1/api-jobs/" + reply["location"].rsplit("/", 1)[1])
        assert status == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    status, body = await act(http, agent, a["uuid"], "destroyVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Stopped", body


async def test_migrate_failure_is_clean(agent_factory, http, libvirtd, lv, tmp_path):  # noqa: F811
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    inv = await define(http, agent, spec(name(), make_disk(tmp_path)))
    uuid = inv["uuid"]
    await act(http, agent, uuid, "startVmInstance")
    status, body = await act(http, agent, uuid, "migrateVm",
                             {"destination": "qemu+unix:///system?socket=/nonexistent/sock"})
    assert status == 503 and body["error"]["code"] == "VM.1601", body
    assert "nonexistent" in body["error"]["description"] and "Traceback" not in json.dumps(body)
    status, body = await get(http, agent, f"/v1/vm-instances/{uuid}")
    assert body["inventory"]["state"] == "Running"
    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                {"migrateVm": {"destination": "not a uri"}})
    assert status == 400


@pytest.fixture
def libvirtd2(libvirtd):  # noqa: F811
    """A second isolated libvirtd on this machine: the destination of migrations."""
    d = Libvirtd(Path(f"/tmp/node-agent-libvirt2-{os.getpid()}"))
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.base, ignore_errors=True)


async def test_migrate_live_progress_cancel_and_success(agent_factory, http, libvirtd, libvirtd2,  # noqa: F811
                                                        lv, tmp_path, receiver):
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    await connect_host(http, agent, receiver)
    # 2 GiB of untouched memory at 1 MiB/s: slow enough to watch and cancel.
    inv = await define(http, agent, spec(name(), make_disk(tmp_path), memorySize=2 << 30))
    uuid = inv["uuid"]
    await act(http, agent, uuid, "startVmInstance")
    await wait_event(receiver, uuid, "Running")
    migrate = {"destination": libvirtd2.uri, "migrateUri": "tcp://127.0.0.1",
               "unsafe": True}   # both daemons see the same file, but not as shared storage

    status, reply = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                 {"migrateVm": dict(migrate, bandwidth=1)})
    assert status == 202, reply
    location = reply["location"]
    deadline = time.monotonic() + 15
    while True:
        async with http.get(location, headers=agent.headers) as r:
            assert r.status == 202, await r.text()
            progress = (await r.json()).get("progress") or {}
        if progress.get("percent") is not None and progress.get("dataTotal"):
            break
        assert time.monotonic() < deadline, progress
        await asyncio.sleep(0.1)
    assert 0 <= progress["percent"] < 100 and progress["message"] == "migrating"
    status, body = await get(http, agent, f"/v1/vm-instances/{uuid}")
    assert body["inventory"]["state"] == "Migrating"
    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                {"pauseVmInstance": {}})
    assert status == 409 and body["error"]["code"] == "VM.1011"
    job = location.rsplit("/", 1)[1]
    status, body = await run_job(http, agent, "DELETE", f"/v1/api-jobs/{job}")
    assert status == 200, body
    status, body = await wait_job(http, agent, location)
    assert status == 503 and body["error"]["code"] == "JOB.1002"
    status, body = await get(http, agent, f"/v1/vm-instances/{uuid}")
    assert body["inventory"]["state"] == "Running"          # still here, still running
    dest = libvirt.open(libvirtd2.uri)
    try:
        assert [d.name() for d in dest.listAllDomains(0)] == []

        status, body = await act(http, agent, uuid, "migrateVm", migrate)
        assert status == 200, body
        assert body["vmInstanceUuid"] == uuid and body["destination"] == libvirtd2.uri
        moved = dest.lookupByUUIDString(uuid)
        assert moved.isActive() and moved.isPersistent()
        status, body = await get(http, agent, f"/v1/vm-instances/{uuid}")
        assert status == 404                                  # undefined at the source
        ev = await wait_event(receiver, uuid, "Migrated")
        assert ev["previousState"] == "Running" and ev["reason"] == "migrated"
        await asyncio.sleep(0.5)
        assert [e["state"] for e in vm_events(receiver, uuid)] == ["Stopped", "Running", "Migrated"]
        moved.destroy()
        moved.undefine()
    finally:
        dest.close()


async def test_libvirtd_restart_under_the_agent(agent_factory, http, libvirtd, lv, tmp_path,  # noqa: F811
                                                receiver):
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)
    await connect_host(http, agent, receiver)
    inv = await define(http, agent, spec(name(), make_disk(tmp_path)))
    uuid = inv["uuid"]

    await asyncio.get_running_loop().run_in_executor(None, libvirtd.stop)
    await wait_libvirt(http, agent, up=False, timeout=10)
    status, body = await get(http, agent, "/v1/vm-instances")
    assert status == 503 and "unreachable" in body["error"]["description"], body
    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{uuid}/actions",
                                {"startVmInstance": {}})
    assert status == 503
    vm = await health_vm(http, agent)
    assert vm["available"] is True and "unreachable" in vm["capabilities"]["libvirt"]["reason"]

    await asyncio.get_running_loop().run_in_executor(None, libvirtd.start)
    t0 = time.monotonic()
    while True:
        status, body = await get(http, agent, "/v1/vm-instances", q=f"uuid={uuid}")
        if status == 200:
            break
        assert time.monotonic() - t0 < 5, body
        await asyncio.sleep(0.1)
    assert body["inventories"][0]["state"] == "Stopped"
    lv2 = libvirt.open(libvirtd.uri)     # the fixture's connection died with the daemon
    try:
        status, body = await act(http, agent, uuid, "startVmInstance")
        assert status == 200, body
        ev = await wait_event(receiver, uuid, "Running")   # the agent subscribed again
        assert ev["reason"] == "booted"
        n = len(vm_events(receiver, uuid))
        lv2.lookupByUUIDString(uuid).destroy()             # behind the agent's back
        ev = await wait_event(receiver, uuid, "Stopped", since=n)
        assert ev["reason"] == "destroyed"
        status, body = await run_job(http, agent, "DELETE", f"/v1/vm-instances/{uuid}")
        assert status == 200
    finally:
        lv2.close()


async def wait_libvirt_reason(http, agent, text: str) -> dict:
    for _ in range(100):
        vm = await health_vm(http, agent)
        if text in (vm["capabilities"]["libvirt"]["reason"] or ""):
            return vm
        await asyncio.sleep(0.05)
    raise AssertionError(f"no '{text}' in the libvirt capability: {vm}")


def loaded_libvirt(pid: int) -> bool:
    return "libvirt.so" in Path(f"/proc/{pid}/maps").read_text()


async def test_libvirt_unreachable_at_start(agent_factory, http, tmp_path):
    sock = tmp_path / "no-such-sock"
    agent = agent_factory(vm_config(f"qemu+unix:///system?socket={sock}")).start()
    vm = await wait_libvirt_reason(http, agent, "libvirtd is not running")
    assert vm["available"] is True
    cap = vm["capabilities"]["libvirt"]
    assert cap["available"] is False and "unreachable" in cap["reason"] and "no-such-sock" in cap["reason"]
    # Without a daemon to talk to, the binding (~12 MB) is not even loaded.
    assert not loaded_libvirt(agent.proc.pid)
    for path in ("/v1/vm-instances", "/v1/vm-instances/stats", f"/v1/vm-instances/{uuidlib.uuid4().hex}"):
        status, body = await get(http, agent, path)
        assert status == 503 and "libvirt" in body["error"]["description"], (path, body)
    status, body = await submit(http, agent, "POST", "/v1/vm-instances",
                                {"params": {"name": "x", "cpuNum": 1, "memorySize": 64 << 20}})
    assert status == 503
    status, body = await get(http, agent, "/v1/host/ping")
    assert status == 200

    # A socket appears (a stale one: nobody listens): now the agent loads the
    # binding and tries, and says what libvirt answered.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()
    vm = await wait_libvirt_reason(http, agent, "cannot connect")
    assert vm["capabilities"]["libvirt"]["available"] is False
    assert loaded_libvirt(agent.proc.pid)


# ------------------------------------------------------------------ libvirt's test driver

def make_test_node(path, n: int, running: int) -> dict[str, str]:
    """A test:/// node with n domains, the first `running` of them running."""
    uuids = {}
    root = ET.Element("node")
    cpu = ET.SubElement(root, "cpu")
    for tag, text in (("mhz", "2400"), ("model", "x86_64"), ("nodes", "1"), ("sockets", "1"),
                      ("cores", "2"), ("threads", "1")):
        ET.SubElement(cpu, tag).text = text
    ET.SubElement(root, "memory").text = "8388608"
    ns = "http://libvirt.org/schemas/domain/test/1.0"
    ET.register_namespace("test", ns)
    for i in range(n):
        u = uuidlib.uuid4().hex
        uuids[f"vm{i:04d}"] = u
        dom = ET.SubElement(root, "domain", type="test")
        ET.SubElement(dom, "name").text = f"vm{i:04d}"
        ET.SubElement(dom, "uuid").text = u
        ET.SubElement(dom, "memory", unit="MiB").text = "128"
        ET.SubElement(dom, "vcpu").text = "2"
        os_ = ET.SubElement(dom, "os")
        ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
        if i >= running:
            ET.SubElement(dom, f"{{{ns}}}runstate").text = "5"
    ET.ElementTree(root).write(path)
    return uuids


async def test_test_driver_1000_domains_and_events(agent_factory, http, tmp_path, receiver):
    node = tmp_path / "node.xml"
    uuids = make_test_node(node, 1000, 700)
    agent = agent_factory({"libvirt": {"uri": f"test://{node}"},
                           "vm": {"stats_interval_seconds": 1}}).start()
    await wait_libvirt(http, agent)
    await connect_host(http, agent, receiver)

    t0 = time.monotonic()
    status, body = await get(http, agent, "/v1/vm-instances", limit="5000")
    listed = time.monotonic() - t0
    assert status == 200 and len(body["inventories"]) == 1000
    assert {i["uuid"] for i in body["inventories"]} == set(uuids.values())
    t0 = time.monotonic()
    status, body = await get(http, agent, "/v1/vm-instances", q="state=Running", count="true")
    counted = time.monotonic() - t0
    assert body == {"total": 700}
    status, body = await get(http, agent, "/v1/vm-instances", q=["state=Stopped", "name~=vm09%"],
                             sort="-name", limit="3", fields="name")
    assert body == {"inventories": [{"name": "vm0999"}, {"name": "vm0998"}, {"name": "vm0997"}]}
    assert listed < 2 and counted < 2, (listed, counted)
    status, body = await get(http, agent, "/v1/vm-instances/stats", q="state=Running", count="true")
    assert body == {"total": 700}

    # Lifecycle events through libvirtaio.
    u = uuids["vm0001"]
    status, body = await act(http, agent, u, "pauseVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Paused"
    assert (await wait_event(receiver, u, "Paused"))["previousState"] == "Running"
    status, body = await act(http, agent, u, "stopVmInstance", {"type": "cold"})
    assert status == 200 and body["inventory"]["state"] == "Stopped"
    ev = await wait_event(receiver, u, "Stopped")
    assert ev == {"vmInstanceUuid": u, "name": "vm0001", "state": "Stopped",
                  "previousState": "Paused", "reason": "destroyed"}
    # Define from a spec on the test driver too (its domain type is "test").
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 1024)
    inv = await define(http, agent, {"name": "fresh", "cpuNum": 2, "memorySize": 128 << 20,
                                     "disks": [{"path": str(disk), "format": "raw"}]})
    assert inv["domainType"] == "test" and inv["state"] == "Stopped"
    status, body = await get(http, agent, "/v1/vm-instances", count="true")
    assert body == {"total": 1001}


# ------------------------------------------------------------------ pure functions

def test_domain_type_choice_and_escaping():
    from plugins.vm import domxml
    from plugins.vm.models import VmSpec
    caps = """<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
      <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/></arch></guest>
      <guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest>
    </capabilities>"""
    assert domxml.choose_domain_type(caps, kvm_ok=True) == ("kvm", "x86_64")
    assert domxml.choose_domain_type(caps, kvm_ok=False) == ("qemu", "x86_64")
    no_kvm = caps.replace("<domain type='kvm'/>", "")
    assert domxml.choose_domain_type(no_kvm, kvm_ok=True) == ("qemu", "x86_64")
    with pytest.raises(ValueError):
        domxml.choose_domain_type(no_kvm, kvm_ok=True, wanted="kvm")
    s = VmSpec.model_validate({"name": "x'\"><evil>&amp;", "cpuNum": 1, "memorySize": 64 << 20,
                               "description": "</description><devices/>"})
    root = ET.fromstring(domxml.render(s, "0" * 31 + "1", "kvm", "x86_64"))
    assert root.findtext("name") == "x'\"><evil>&amp;" and root.find("evil") is None
    assert root.findtext("description") == "</description><devices/>"


def test_which_uris_wait_for_a_socket():
    from agent.libvirt_conn import local_sockets
    assert local_sockets("qemu:///system") == ["/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock"]
    assert local_sockets("qemu+unix:///system?socket=/tmp/x/sock") == ["/tmp/x/sock"]
    for uri in ("qemu:///session", "test:///default", "qemu+ssh://root@peer/system",
                "qemu+tcp://10.0.0.2/system"):
        assert local_sockets(uri) is None, uri
