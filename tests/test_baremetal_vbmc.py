"""Baremetal chassis against virtualbmc in front of a real libvirt domain.

virtualbmc (PyPI: `vbmcd` and `vbmc`, subprocesses with their own config
dir through VIRTUALBMC_CONFIG) serves IPMI on a loopback UDP port for a tiny
TCG domain (no OS) in the isolated libvirtd of libvirt_fixture.  A real agent
process drives it over HTTP; libvirt-python checks what really happened to
the domain, and ipmitool -I lanplus is a second IPMI client.  virtualbmc is
pyghmi-based: it answers RAKP with SHA-1, so registration goes through the
agent's SHA-1 fallback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from agentproc import free_port
from bmcproc import free_udp_port
from conftest import run_job
from libvirt_fixture import libvirtd  # noqa: F401

libvirt.registerErrorHandler(lambda *_: None, None)

CHASSIS = "/v1/baremetal/chassis"
BIN = Path(sys.executable).parent
USER, PASSWORD = "admin", "vbmc-pw-7q"


def domain_xml(name: str, disk: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


class Vbmc:
    """vbmcd in the foreground (its own session) and the vbmc client, one config dir."""

    def __init__(self, workdir: Path, libvirt_uri: str) -> None:
        self.workdir = workdir
        self.libvirt_uri = libvirt_uri
        self.port = free_udp_port()
        self.conf = workdir / "virtualbmc.conf"
        self.log_file = workdir / "vbmcd.log"
        (workdir / "bmcs").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "[default]\n"
            f"config_dir = {workdir / 'bmcs'}\n"
            f"pid_file = {workdir / 'vbmcd.pid'}\n"
            f"server_port = {free_port()}\n"
            "server_response_timeout = 10000\n"
            "[log]\n"
            f"logfile = {self.log_file}\n"
            "debug = true\n")
        self.env = dict(os.environ, VIRTUALBMC_CONFIG=str(self.conf), HOME=str(workdir))
        self.proc: subprocess.Popen | None = None

    def start_daemon(self) -> None:
        self.proc = subprocess.Popen([str(BIN / "vbmcd"), "--foreground"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def vbmc(self, *args: str, timeout: float = 30) -> str:
        """The vbmc client; retried while vbmcd is still binding its control socket."""
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run([str(BIN / "vbmc"), "--no-daemon", *args], env=self.env,
                                 capture_output=True, text=True, timeout=timeout)
            if out.returncode == 0:
                return out.stdout
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vbmcd exited with {self.proc.returncode}:\n{self.log()}")
            if "server" not in out.stderr.lower() or time.monotonic() > deadline:
                raise RuntimeError(f"vbmc {args[0]} failed: {out.stderr.strip()}\n{self.log()}")
            time.sleep(0.2)

    def ipmitool(self, *args: str, timeout: float = 20) -> str:
        """ipmitool -I lanplus as a second client (password through -E, not argv)."""
        out = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(self.port),
                              "-U", USER, "-E", *args],
                             env=dict(os.environ, IPMI_PASSWORD=PASSWORD),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ipmitool {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def wait_ipmi(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ipmitool("power", "status", timeout=5)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"virtualbmc not answering on UDP {self.port}:\n"
                                       + self.log()) from None
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()          # vbmcd terminates its per-domain BMC processes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in vbmcd's session (a BMC child that outlived it).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)

    def params(self) -> dict:
        return {"ipmiAddress": "127.0.0.1", "ipmiPort": str(self.port), "ipmiUsername": USER,
                "ipmiPassword": PASSWORD, "name": "vbmc-host"}


@pytest.fixture
def domain(libvirtd, tmp_path):  # noqa: F811
    """A tiny TCG domain (qcow2 disk, no OS), defined and shut off; removed at the end."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    conn = libvirt.open(libvirtd.uri)
    dom = conn.defineXML(domain_xml(f"t-vbmc-{uuidlib.uuid4().hex[:8]}", str(disk)))
    try:
        yield dom
    finally:
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        finally:
            conn.close()


@pytest.fixture
def vbmc(libvirtd, domain, tmp_path):  # noqa: F811
    v = Vbmc(tmp_path / "vbmc", libvirtd.uri)
    try:
        v.start_daemon()
        v.vbmc("add", "--username", USER, "--password", PASSWORD, "--address", "127.0.0.1",
               "--port", str(v.port), "--libvirt-uri", libvirtd.uri, domain.name())
        v.vbmc("start", domain.name())
        v.wait_ipmi()
        yield v
    finally:
        v.stop()


def boot_dev(dom) -> str | None:
    boot = ET.fromstring(dom.XMLDesc()).find("./os/boot")
    return None if boot is None else boot.get("dev")


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.1)


async def act(http, agent, chassis: str, name: str, params: dict | None = None):
    return await run_job(http, agent, "PUT", f"{CHASSIS}/{chassis}/actions",
                         {name: params or {}}, timeout=60)


async def test_chassis_power_and_provision_through_virtualbmc(agent_factory, http, domain, vbmc):
    agent = agent_factory({"baremetal": {"retry_backoff_seconds": 0.1}}).start()
    assert not domain.isActive() and boot_dev(domain) == "hd"

    # Registration logs in to virtualbmc: SHA-256 proposed, SHA-1 answered, fallback.
    status, body = await run_job(http, agent, "POST", CHASSIS, {"params": vbmc.params()},
                                 timeout=60)
    assert status == 200, (body, agent.log()[-2000:], vbmc.log())
    inv = body["inventory"]
    c = inv["uuid"]
    assert inv["ipmiPort"] == str(vbmc.port) and inv["status"] == "Unprovisioned"
    assert "ipmiPassword" not in inv

    status, body = await act(http, agent, c, "powerStatusBaremetalHost")
    assert status == 200 and body == {"status": "off"}, body
    assert "Chassis Power is off" in vbmc.ipmitool("power", "status")

    status, body = await act(http, agent, c, "powerOnBaremetalHost")
    assert status == 200, body
    await wait_for(domain.isActive, what="the domain running")
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    async with http.get(f"{agent.url}{CHASSIS}/{c}/power", headers=agent.headers) as r:
        assert r.status == 200 and await r.json() == {"status": "on"}
    assert "Chassis Power is on" in vbmc.ipmitool("power", "status")

    status, body = await act(http, agent, c, "powerOffBaremetalHost", {"method": "hard"})
    assert status == 200, body
    await wait_for(lambda: not domain.isActive(), what="the domain shut off")
    assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    status, body = await act(http, agent, c, "powerStatusBaremetalHost")
    assert status == 200 and body == {"status": "off"}, body
    assert "Chassis Power is off" in vbmc.ipmitool("power", "status")

    # Provision: next boot from the network, then power on.
    status, body = await act(http, agent, c, "provisionBaremetalHost")
    assert status == 200, (body, vbmc.log())
    assert body["inventory"]["status"] == "Provisioning"
    await wait_for(domain.isActive, what="the provisioned domain running")
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert boot_dev(domain) == "network"           # the running domain's own XML
    assert "Force PXE" in vbmc.ipmitool("chassis", "bootparam", "get", "5")
    assert "Chassis Power is on" in vbmc.ipmitool("power", "status")
    status, body = await act(http, agent, c, "powerStatusBaremetalHost")
    assert status == 200 and body == {"status": "on"}, body

    # The agent's log (flushed at stop): the fallback happened, and no password.
    agent.stop()
    assert f"BMC 127.0.0.1:{vbmc.port} answered RAKP with SHA-1: falling back" in agent.log()
    assert PASSWORD not in agent.log()

    # Without the fallback the same BMC cannot be registered, and nothing is stored.
    strict = agent_factory({"baremetal": {"allow_sha1": False, "retries": 0}},
                           name="strict").start()
    status, body = await run_job(http, strict, "POST", CHASSIS, {"params": vbmc.params()},
                                 timeout=60)
    assert status == 503, body
    assert f"127.0.0.1:{vbmc.port}" in body["error"]["description"] and "SHA-1" in body["error"]["description"], body
    async with http.get(strict.url + CHASSIS, headers=strict.headers) as r:
        assert (await r.json())["inventories"] == []
