"""The host plugin over HTTP, on this real machine (Debian 12, libvirt 9.0.0, QEMU 7.2)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest

from conftest import process_gone, run_job, submit, wait_job


@pytest.fixture
def shell_agent(agent_factory):
    return agent_factory({"host": {"allow_run_shell": True, "run_shell_max_output": 1024}}).start()


async def get_json(http, agent, path, params=None):
    async with http.get(agent.url + path, params=params, headers=agent.headers) as r:
        return r.status, await r.json()


async def _wait_file(path, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        await asyncio.sleep(0.02)
    raise AssertionError(f"the script did not write {path}")


def _meminfo_bytes(key: str) -> int:
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# --------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------

async def test_host_facts_of_this_machine(agent, http):
    status, f = await get_json(http, agent, "/v1/host")
    assert status == 200, f

    assert f["hostname"] == socket.gethostname()
    assert f["addresses"], "no address reported"
    for a in f["addresses"]:
        assert set(a) == {"interface", "family", "address", "prefixLength"}
        assert a["family"] in ("ipv4", "ipv6") and a["interface"] != "lo"
        assert a["address"] not in ("127.0.0.1", "::1")

    cpu = f["cpu"]
    assert isinstance(cpu["modelName"], str) and cpu["modelName"]
    assert isinstance(cpu["vendor"], str) and cpu["vendor"]
    assert cpu["threads"] == os.cpu_count()
    assert 1 <= cpu["sockets"] <= cpu["cores"] <= cpu["threads"]
    assert isinstance(cpu["mhz"], (int, float)) and cpu["mhz"] > 0
    assert "virtualization" in cpu and cpu["virtualization"] in (None, "vmx", "svm")

    mem = f["memory"]
    assert mem["total"] == _meminfo_bytes("MemTotal")
    assert 0 < mem["available"] <= mem["total"]
    assert isinstance(mem["hugepages"], list)
    sizes = {h["sizeBytes"] for h in mem["hugepages"]}
    on_disk = {int(d.split("-")[1].rstrip("kB")) * 1024
               for d in os.listdir("/sys/kernel/mm/hugepages")} if os.path.isdir("/sys/kernel/mm/hugepages") else set()
    assert sizes == on_disk
    for h in mem["hugepages"]:
        assert h["total"] >= 0 and 0 <= h["free"] <= h["total"]

    nodes = f["numaNodes"]
    assert nodes
    cpus = [c for n in nodes for c in n["cpus"]]
    assert sorted(cpus) == sorted(set(cpus)) and len(cpus) == os.cpu_count()
    for n in nodes:
        assert n["cpus"] and n["memTotal"] > 0 and 0 <= n["memFree"] <= n["memTotal"]

    osinfo = f["os"]
    assert osinfo["name"] == "Debian GNU/Linux" and osinfo["version"].startswith("12")
    assert osinfo["kernel"] == os.uname().release

    versions = f["versions"]
    assert isinstance(versions["libvirtVersion"], str) and versions["libvirtVersion"].startswith("9."), versions
    assert isinstance(versions["qemuVersion"], str) and versions["qemuVersion"].startswith("7."), versions

    assert f["hypervisorType"] == "KVM"
    kvm = f["kvm"]
    assert isinstance(kvm["present"], bool) and isinstance(kvm["usable"], bool)
    assert kvm["present"] == os.path.exists("/dev/kvm")
    assert kvm["usable"] <= kvm["present"]


async def test_hypervisor_types(agent, http):
    assert await get_json(http, agent, "/v1/hypervisor-types") == (200, {"hypervisorTypes": ["KVM"]})


# --------------------------------------------------------------------------
# kvmRunShell
# --------------------------------------------------------------------------

async def test_run_shell_output_is_capped_and_the_job_finishes_promptly(shell_agent, http):
    t0 = time.monotonic()
    status, result = await run_job(http, shell_agent, "PUT", "/v1/host/actions",
                                   {"kvmRunShell": {"script": "head -c 100000 /dev/zero | tr '\\0' x; "
                                                              "echo done >&2", "timeout": 20}})
    assert time.monotonic() - t0 < 5
    assert status == 200, result
    assert result["returnCode"] == 0
    assert result["stdout"] == "x" * 1024 and result["stdoutTruncated"] is True
    assert result["stderr"] == "done\n" and result["stderrTruncated"] is False


async def test_run_shell_timeout_kills_the_script_tree(shell_agent, http, tmp_path):
    pidfile = tmp_path / "child"
    t0 = time.monotonic()
    status, reply = await submit(http, shell_agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": f"sleep 300 & echo $! > {pidfile}; wait",
                                                  "timeout": 1}})
    assert status == 202
    child = int(await _wait_file(pidfile))
    assert not process_gone(child)
    status, body = await wait_job(http, shell_agent, reply["location"])
    assert status == 503 and body["error"]["code"] == "HOST.1408"
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 2
    while not process_gone(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert process_gone(child), f"the script's child {child} survived the timeout"


async def test_run_shell_script_goes_on_stdin_not_argv(shell_agent, http, tmp_path):
    marker = f"marker-{uuid.uuid4().hex}"
    pidfile = tmp_path / "shell"
    script = f"MARK={marker}\necho $$ > {pidfile}\nsleep 2\necho $MARK\n"
    status, reply = await submit(http, shell_agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": script}})
    assert status == 202
    shell = int(await _wait_file(pidfile))
    with open(f"/proc/{shell}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:-1] == [b"/bin/bash", b"-s"]
    seen = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    seen.append(int(entry))
        except OSError:
            continue
    assert seen == [], f"the script is visible in the argv of {seen}"
    status, result = await wait_job(http, shell_agent, reply["location"])
    assert status == 200 and result["stdout"] == marker + "\n"


# --------------------------------------------------------------------------
# updateHostOS (apt on this Debian machine)
# --------------------------------------------------------------------------

async def test_update_host_os_dry_run_with_apt(agent, http):
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"updateHostOS": {"dryRun": True, "excludePackages": ["bash"]}})
    assert status == 202, reply
    status, result = await wait_job(http, agent, reply["location"], timeout=40)
    assert status == 200, result
    assert result["packageManager"] == "apt-get" and result["dryRun"] is True
    assert result["excluded"] == ["bash"]
    names = [p["name"] for p in result["upgraded"]]
    assert "bash" not in names
    for p in result["upgraded"]:
        assert p["name"] and p["version"]

    job = reply["location"].rsplit("/", 1)[1]
    status, body = await get_json(http, agent, "/v1/api-jobs", {"q": f"uuid={job}"})
    [inv] = body["inventories"]
    assert (inv["state"], inv["action"], inv["success"]) == ("Succeeded", "updateHostOS", True)
    if inv["progress"] is not None:
        assert inv["progress"]["percent"] == 100, inv["progress"]


async def test_update_host_os_enable_repos_on_apt_is_400(agent, http):
    status, body = await submit(http, agent, "PUT", "/v1/host/actions",
                                {"updateHostOS": {"enableRepos": ["epel"], "dryRun": True}})
    assert status == 400 and body["error"]["code"] == "HOST.1102"
    assert "apt" in body["error"]["description"]
    status, body = await get_json(http, agent, "/v1/api-jobs", {"count": "true"})
    assert body == {"total": 0}
