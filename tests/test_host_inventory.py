"""GET /v1/host carries the manual's HostInventory fields next to the facts, computed
on the node: a real agent, the isolated libvirtd and a running QEMU guest."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import libvirt

from conftest import run_job
from libvirt_fixture import libvirtd  # noqa: F401  (the session fixture)
from test_vm import act, define, make_disk, spec, vm_config, wait_libvirt

libvirt.registerErrorHandler(lambda *_: None, None)

MIB = 1 << 20
FIELDS = ("uuid", "name", "managementIp", "hypervisorType", "state", "status", "totalCpuCapacity",
          "availableCpuCapacity", "cpuSockets", "cpuNum", "totalMemoryCapacity",
          "availableMemoryCapacity", "architecture")


async def host(http, agent) -> dict:
    async with http.get(agent.url + "/v1/host", headers=agent.headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def given_to_active_vms(uri: str) -> tuple[int, int]:
    """vCPUs and memory (bytes) of the active domains, asked of libvirtd directly."""
    conn = libvirt.open(uri)
    try:
        infos = [d.info() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    finally:
        conn.close()
    return sum(i[3] for i in infos), sum(i[2] for i in infos) * 1024


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


async def test_inventory_fields_and_capacities_with_a_running_vm(agent_factory, http, libvirtd,  # noqa: F811
                                                                 tmp_path, receiver):
    agent = agent_factory(vm_config(libvirtd.uri)).start()
    await wait_libvirt(http, agent)

    before = await host(http, agent)
    for field in FIELDS:
        assert field in before, field
    # The facts are still there, and the fields agree with them.
    assert before["cpu"]["threads"] and before["memory"]["total"]
    assert before["name"] == before["hostname"]
    assert before["hypervisorType"] == "KVM" and before["state"] == "Enabled"
    assert before["uuid"] is None and before["status"] == "Disconnected"
    assert before["cpuNum"] == before["totalCpuCapacity"] == before["cpu"]["threads"]
    assert before["cpuSockets"] == before["cpu"]["sockets"]
    assert before["architecture"] == before["cpu"]["architecture"]
    assert before["totalMemoryCapacity"] == mem_total()
    vcpus, memory = given_to_active_vms(libvirtd.uri)
    assert before["availableCpuCapacity"] == before["totalCpuCapacity"] - vcpus
    assert before["availableMemoryCapacity"] == before["totalMemoryCapacity"] - memory
    # The agent listens on 127.0.0.1: before connectHost that is its management address.
    assert before["managementIp"] == "127.0.0.1"

    # connectHost gives the uuid (dashed here: the inventory has it normalised).
    host_uuid = uuidlib.uuid4()
    status, body = await run_job(http, agent, "PUT", "/v1/host/actions", {"connectHost": {
        "hostUuid": str(host_uuid).upper(), "managementServerUrl": receiver.url("/events")}})
    assert status == 200, body

    # A running guest with 2 vCPUs and 96 MiB is taken off the available capacities.
    inv = await define(http, agent, spec(f"t-vm-{uuidlib.uuid4().hex[:8]}", make_disk(tmp_path),
                                         cpuNum=2, memorySize=96 * MIB))
    status, body = await act(http, agent, inv["uuid"], "startVmInstance")
    assert status == 200 and body["inventory"]["state"] == "Running", body
    try:
        after = await host(http, agent)
        assert after["uuid"] == host_uuid.hex and after["status"] == "Connected"
        assert after["managementIp"] == "127.0.0.1"     # the route to the controller's host
        assert after["runningVmCount"] == before["runningVmCount"] + 1
        assert after["availableCpuCapacity"] == before["availableCpuCapacity"] - 2
        assert after["availableMemoryCapacity"] == before["availableMemoryCapacity"] - 96 * MIB
        assert after["totalCpuCapacity"] == before["totalCpuCapacity"]
    finally:
        status, body = await run_job(http, agent, "DELETE", f"/v1/vm-instances/{inv['uuid']}?force=true",
                                     timeout=60)
    # Stopped and gone: the capacities are back.
    again = await host(http, agent)
    assert again["availableCpuCapacity"] == before["availableCpuCapacity"]
    assert again["availableMemoryCapacity"] == before["availableMemoryCapacity"]


async def test_inventory_without_libvirt_and_the_documented_fields(agent_factory, http, tmp_path):
    """No libvirtd: the capacities that need it are null (never a guess), the rest is there;
    the OpenAPI document says how each is computed."""
    agent = agent_factory({"libvirt": {"uri": f"qemu:///system?socket={tmp_path}/none.sock"}}).start()
    body = await host(http, agent)
    assert body["availableCpuCapacity"] is None and body["availableMemoryCapacity"] is None
    assert body["runningVmCount"] is None
    assert body["totalCpuCapacity"] == body["cpu"]["threads"]
    assert body["totalMemoryCapacity"] == mem_total()
    async with http.get(agent.url + "/v1/openapi.json", headers=agent.headers) as r:
        doc = await r.json()
    ref = doc["paths"]["/v1/host"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    props = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"]
    for field in FIELDS:
        assert field in props, field
    assert "minus" in props["availableCpuCapacity"]["description"]
    assert "active" in props["availableMemoryCapacity"]["description"]
    assert "connectHost" in props["uuid"]["description"]
