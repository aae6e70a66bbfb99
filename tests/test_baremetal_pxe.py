"""Baremetal PXE: dnsmasq for real in network namespaces, host configs and install files.

The lab (made here, torn down even on failure): two network namespaces with
10.200.x addresses that exist only inside them.

    server ns: br0 10.200.0.1/24 + fd00:200::1/64 <- veth-s, tap-vm (QEMU)
               veth-s2 10.200.1.1/24
               the agent (listening on 0.0.0.0), its dnsmasq, a fake BMC
    client ns: veth-c (52:54:00:aa:00:02), veth-c2: dhclient, tftp, curl

The test process reaches the agent's API through tests/services/netns_forward.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import aiohttp
import pytest

from agentproc import AgentProcess
from conftest import run_job, submit

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "dnsmasq", "dhclient", "tftp", "curl")),
    reason="needs root, iproute2, dnsmasq, dhclient, tftp and curl")

CLIENT_MAC = "52:54:00:aa:00:02"
VM_MAC = "52:54:00:aa:00:10"
PASSWORD = "Pl41nText-R00t-Passw0rd!"
SERVICES = Path(__file__).parent / "services"
IPXE = Path("/usr/lib/ipxe")


def sh(*argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, timeout=timeout, capture_output=True, text=True, **kw)


class Lab:
    def __init__(self, base: Path) -> None:
        tag = os.getpid() % 100000
        self.srv, self.cli = f"napxe-s{tag}", f"napxe-c{tag}"
        self.base = base
        self.procs: list[subprocess.Popen] = []

    def in_srv(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.srv, *argv, **kw)

    def in_cli(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.cli, *argv, **kw)

    def up(self) -> "Lab":
        s, c = self.srv, self.cli
        for ns in (s, c):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "veth-s", "netns", s, "type", "veth", "peer", "name", "veth-c", "netns", c)
        sh("ip", "link", "add", "veth-s2", "netns", s, "type", "veth", "peer", "name", "veth-c2", "netns", c)
        sh("ip", "-n", s, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", s, "link", "set", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        sh("ip", "-n", s, "link", "set", "veth-s", "master", "br0")
        sh("ip", "-n", s, "tuntap", "add", "dev", "tap-vm", "mode", "tap")
        sh("ip", "-n", s, "link", "set", "tap-vm", "master", "br0")
        sh("ip", "-n", s, "addr", "add", "10.200.0.1/24", "dev", "br0")
        sh("ip", "-n", s, "addr", "add", "fd00:200::1/64", "dev", "br0", "nodad")
        sh("ip", "-n", s, "addr", "add", "10.200.1.1/24", "dev", "veth-s2")
        for link in ("br0", "veth-s", "tap-vm", "veth-s2"):
            sh("ip", "-n", s, "link", "set", link, "up")
        sh("ip", "-n", c, "link", "set", "veth-c", "address", CLIENT_MAC, "up")
        sh("ip", "-n", c, "link", "set", "veth-c2", "up")
        return self

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for ns in (self.srv, self.cli):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)

    def pids_in_srv(self, name: str) -> list[int]:
        """The processes called name in the server namespace, without their same-named
        children (dnsmasq forks a helper that runs the lease script)."""
        found = {}
        for pid in sh("ip", "netns", "pids", self.srv, check=False).stdout.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if comm == name and fields[0] != "Z":       # zombies are gone, just not reaped yet
                found[int(pid)] = int(fields[1])
        return sorted(p for p, ppid in found.items() if ppid not in found)

    def dhclient(self, iface: str = "veth-c", release: bool = True) -> dict[str, str]:
        """One DHCP exchange from the client namespace; the variables dhclient got."""
        d = self.base / f"dhclient-{iface}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        script = d / "dump.sh"
        script.write_text(f"#!/bin/sh\nenv | grep -E '^(reason|new_)' | sort > {d}/env.$reason\n")
        script.chmod(0o755)
        args = ["-sf", str(script), "-lf", str(d / "leases"), "-pf", str(d / "pid"), iface]
        self.in_cli("ip", "addr", "flush", "dev", iface)
        self.in_cli("timeout", "20", "dhclient", "-1", *args, timeout=30)
        env = dict(line.split("=", 1) for line in (d / "env.BOUND").read_text().splitlines() if "=" in line)
        # our script configures nothing: add the address, so that the unicast release goes out
        self.in_cli("ip", "addr", "add", f"{env['new_ip_address']}/24", "dev", iface)
        if release:
            self.in_cli("dhclient", "-r", *args, check=False)
        return env


class NetnsAgent(AgentProcess):
    """The agent inside the server namespace (`ip netns exec` execs it); its API through a forwarder."""

    def __init__(self, workdir: Path, lab: Lab, config: dict) -> None:
        super().__init__(workdir, config, wrapper=["ip", "netns", "exec", lab.srv])
        self.lab = lab
        self.config["server"]["host"] = "0.0.0.0"
        self.forwarder: subprocess.Popen | None = None
        self.fwd_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fwd_port}"

    def start(self, timeout: float = 20.0, wait: bool = True) -> "NetnsAgent":
        if self.forwarder is None:
            self.forwarder = subprocess.Popen(
                [sys.executable, str(SERVICES / "netns_forward.py"), self.lab.srv, str(self.port)],
                stdout=subprocess.PIPE, text=True)
            self.lab.procs.append(self.forwarder)
            self.fwd_port = int(self.forwarder.stdout.readline())
        super().start(timeout, wait)
        return self


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("pxe-lab"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def boot_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pxe-boot")
    for family in ("rhel", "debian"):
        (d / family).mkdir()
        (d / family / "vmlinuz").write_bytes(b"not a kernel\n" * 100)
        (d / family / "initrd.img").write_bytes(b"not an initrd\n" * 100)
    return d


@pytest.fixture(scope="module")
def pxe_agent(lab, boot_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pxe-agent")
    a = NetnsAgent(workdir, lab, {"pxe": {"boot_dir": str(boot_dir), "ipv6_ra": True}})
    try:
        yield a.start()
    finally:
        a.stop()


@pytest.fixture(scope="module")
def fake_bmc(lab):
    """Start a fake BMC (tests/services/fake_bmc.py) in the server namespace; returns its port."""
    ports = iter(range(6230, 6260))

    def start() -> int:
        port = next(ports)
        p = subprocess.Popen(["ip", "netns", "exec", lab.srv, sys.executable, str(SERVICES / "fake_bmc.py"),
                              "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
        lab.procs.append(p)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            if '"start"' in line:
                return port
        raise RuntimeError("the fake BMC did not start")
    return start


async def get_json(http, agent, path, **params):
    async with http.get(agent.url + path, headers=agent.headers, params=params) as r:
        return r.status, await r.json()


async def servers(http, agent) -> list[dict]:
    status, body = await get_json(http, agent, "/v1/baremetal/pxeserver")
    assert status == 200, body
    return body["inventories"]


async def ensure_br0_server(http, agent) -> dict:
    for s in await servers(http, agent):
        if s["dhcpInterface"] == "br0":
            return s
    status, body = await run_job(http, agent, "POST", "/v1/baremetal/pxeserver", {"params": {
        "name": "lab", "dhcpInterface": "br0", "dhcpRangeBegin": "10.200.0.100",
        "dhcpRangeEnd": "10.200.0.150", "dhcpRangeNetmask": "255.255.255.0"}})
    assert status == 200, body
    return body["inventory"]


async def new_chassis(http, agent, fake_bmc) -> str:
    """A chassis of its own fake BMC (one chassis per BMC)."""
    status, body = await run_job(http, agent, "POST", "/v1/baremetal/chassis", {"params": {
        "ipmiAddress": "127.0.0.1", "ipmiPort": fake_bmc(), "ipmiUsername": "admin",
        "ipmiPassword": "password"}}, timeout=60)
    assert status == 200, body
    return body["inventory"]["uuid"]


async def wait_event(http, agent, type_: str, pred, timeout: float = 15) -> dict:
    """Read GET /v1/events (SSE, replayed from the start) until a matching event arrives."""
    seen = []
    async with asyncio.timeout(timeout):
        async with http.get(agent.url + "/v1/events", params={"since": "0"}, headers=agent.headers,
                            timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
            assert r.status == 200
            async for raw_line in r.content:
                line = raw_line.decode().strip()
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                seen.append(ev["type"])
                if ev["type"] == type_ and pred(ev["data"]):
                    return ev
    raise AssertionError(f"no matching {type_} event; saw {seen}")


def ksvalidator(path: Path, version: str) -> subprocess.CompletedProcess:
    return sh(str(Path(sys.executable).parent / "ksvalidator"), "-v", version, str(path), check=False)


# ------------------------------------------------------------------ tests

async def test_bad_pxe_server_input_is_4xx_and_starts_nothing(lab, pxe_agent, http):
    good = {"name": "x", "dhcpInterface": "br0", "dhcpRangeBegin": "10.200.0.100",
            "dhcpRangeEnd": "10.200.0.150", "dhcpRangeNetmask": "255.255.255.0"}
    cases = [
        ({"dhcpInterface": "nope0"}, 400, "PXE.1001", "nope0"),
        ({"dhcpRangeBegin": "10.201.0.10", "dhcpRangeEnd": "10.201.0.20"}, 400, "PXE.1002", "not inside"),
        ({"dhcpRangeBegin": "10.200.0.150", "dhcpRangeEnd": "10.200.0.100"}, 400, "PXE.1003", "after"),
        ({"dhcpRangeNetmask": "255.255.0.0"}, 400, "PXE.1002", "does not match"),
        ({"dhcpRangeBegin": "10.200.0.1"}, 400, "PXE.1002", "own address"),
        ({"dhcpRangeNetmask": "255.0.255.0"}, 400, "SYS.1002", "netmask"),
        ({"dhcpRangeBegin": "10.200.0.300"}, 400, "SYS.1002", "dhcpRangeBegin"),
        ({"dhcpInterface": "br0; rm -rf /"}, 400, "SYS.1002", "dhcpInterface"),
    ]
    for change, code, err, words in cases:
        status, body = await submit(http, pxe_agent, "POST", "/v1/baremetal/pxeserver",
                                    {"params": dict(good, **change)})
        assert status == code, (change, body)
        assert body["error"]["code"] == err and words in body["error"]["description"], (change, body)
    assert await servers(http, pxe_agent) == []
    assert lab.pids_in_srv("dnsmasq") == []
    assert not (pxe_agent.state_dir / "pxe" / "servers").exists() or \
        list((pxe_agent.state_dir / "pxe" / "servers").iterdir()) == []
    # unknown server: 404 for each verb
    ghost = uuidlib.uuid4().hex
    status, body = await submit(http, pxe_agent, "PUT", f"/v1/baremetal/pxeserver/{ghost}/actions",
                                {"startBaremetalPxeServer": {}})
    assert status == 404 and body["error"]["code"] == "PXE.1404"
    status, body = await submit(http, pxe_agent, "DELETE", f"/v1/baremetal/pxeserver/{ghost}")
    assert status == 404


async def test_dhcp_lease_tftp_and_lease_events(lab, pxe_agent, http):
    server = await ensure_br0_server(http, pxe_agent)
    assert server["status"] == "Running" and server["pid"] in lab.pids_in_srv("dnsmasq")
    assert server["dhcpServerIp"] == "10.200.0.1"
    assert server["bootUrl"] == f"http://10.200.0.1:{pxe_agent.port}"
    t0 = time.monotonic()
    env = lab.dhclient()
    assert time.monotonic() - t0 < 10
    ip = env["new_ip_address"]
    assert ip.startswith("10.200.0.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150
    assert env["new_next_server"] == "10.200.0.1" and env["new_filename"] == "undionly.kpxe"
    assert env["new_subnet_mask"] == "255.255.255.0"

    ev = await wait_event(http, pxe_agent, "PxeDhcpLease",
                          lambda d: d["mac"] == CLIENT_MAC and d["action"] == "add")
    d = ev["data"]
    assert d["ip"] == ip and d["pxeServerUuid"] == server["uuid"] and d["ipxe"] is False
    assert d["expires"].endswith("Z") and d["hostCfgUuid"] is None
    await wait_event(http, pxe_agent, "PxeDhcpLease",
                     lambda d: d["mac"] == CLIENT_MAC and d["action"] == "del")

    # TFTP: the firmware's iPXE, and boot.ipxe that chains the agent's HTTP
    got = lab.base / "got.kpxe"
    lab.in_cli("tftp", "-m", "binary", "10.200.0.1", "-c", "get", "undionly.kpxe", str(got))
    assert got.read_bytes() == (IPXE / "undionly.kpxe").read_bytes()
    script = lab.in_cli("curl", "-sS", "tftp://10.200.0.1/boot.ipxe").stdout
    assert script.startswith("#!ipxe")
    assert f"chain http://10.200.0.1:{pxe_agent.port}/v1/baremetal/ipxe/mac/${{netX/mac:hexhyp}}" in script
    missing = lab.in_cli("curl", "-sS", "tftp://10.200.0.1/dnsmasq.conf", check=False)
    assert missing.returncode != 0        # only the TFTP root is served

    # a second server on another interface coexists; an overlapping range does not
    status, body = await run_job(http, pxe_agent, "POST", "/v1/baremetal/pxeserver", {"params": {
        "name": "second", "dhcpInterface": "veth-s2", "dhcpRangeBegin": "10.200.1.100",
        "dhcpRangeEnd": "10.200.1.110"}})
    assert status == 200 and body["inventory"]["status"] == "Running", body
    assert body["inventory"]["dhcpRangeNetmask"] == "255.255.255.0"
    second = body["inventory"]["uuid"]
    env2 = lab.dhclient("veth-c2")
    assert env2["new_ip_address"].startswith("10.200.1.") and env2["new_next_server"] == "10.200.1.1"
    status, body = await submit(http, pxe_agent, "POST", "/v1/baremetal/pxeserver", {"params": {
        "name": "overlap", "dhcpInterface": "br0", "dhcpRangeBegin": "10.200.0.140",
        "dhcpRangeEnd": "10.200.0.160"}})
    assert status == 409 and body["error"]["code"] == "PXE.1004" and server["uuid"] in body["error"]["description"]
    status, body = await submit(http, pxe_agent, "PUT", f"/v1/baremetal/pxeserver/{second}/actions",
                                {"updateBaremetalPxeServer": {"dhcpRangeBegin": "10.200.0.110", "dhcpRangeEnd": "10.200.0.120"}})
    assert status == 400 and body["error"]["code"] == "PXE.1002"
    status, body = await run_job(http, pxe_agent, "PUT", f"/v1/baremetal/pxeserver/{second}/actions",
                                 {"updateBaremetalPxeServer": {"name": "renamed", "dhcpRangeEnd": "10.200.1.120"}})
    assert status == 200 and body["inventory"]["dhcpRangeEnd"] == "10.200.1.120", body
    assert body["inventory"]["name"] == "renamed" and body["inventory"]["status"] == "Running"
    status, _ = await run_job(http, pxe_agent, "DELETE", f"/v1/baremetal/pxeserver/{second}")
    assert status == 200
    assert [s["uuid"] for s in await servers(http, pxe_agent)] == [server["uuid"]]
    assert len(lab.pids_in_srv("dnsmasq")) == 1
    status, body = await get_json(http, pxe_agent, "/v1/baremetal/pxeserver", q="status=Running")
    assert body["inventories"][0]["uuid"] == server["uuid"]


async def test_dhcp_offers_no_router_unless_configured(lab, pxe_agent, http):
    """Issue 13.13: dnsmasq offers its own address as router unless told otherwise."""
    server = await ensure_br0_server(http, pxe_agent)
    assert server["router"] is None and server["dnsServers"] == []
    env = lab.dhclient()
    assert env["new_ip_address"].startswith("10.200.0.")
    assert "new_routers" not in env, env                  # no option 3
    assert "new_domain_name_servers" not in env, env      # no option 6
    actions = f"/v1/baremetal/pxeserver/{server['uuid']}/actions"
    try:
        # a router outside the subnet, or inside the DHCP range, is refused
        for bad in ("10.200.1.1", "10.200.0.120", "10.200.0.255"):
            status, body = await submit(http, pxe_agent, "PUT", actions,
                                        {"updateBaremetalPxeServer": {"router": bad}})
            assert status == 400 and body["error"]["code"] == "PXE.1010", body
        status, body = await submit(http, pxe_agent, "PUT", actions,
                                    {"updateBaremetalPxeServer": {"dnsServers": "1.2.3"}})
        assert status == 400 and "dnsServers" in body["error"]["description"], body
        status, body = await run_job(http, pxe_agent, "PUT", actions, {"updateBaremetalPxeServer": {
            "router": "10.200.0.254", "dnsServers": "10.200.0.53, 10.200.0.54"}})
        assert status == 200, body
        inv = body["inventory"]
        assert inv["router"] == "10.200.0.254" and inv["dnsServers"] == ["10.200.0.53", "10.200.0.54"]
        env = lab.dhclient()
        assert env["new_routers"] == "10.200.0.254", env
        assert env["new_domain_name_servers"] == "10.200.0.53 10.200.0.54", env
        # the same after an agent restart (stored)
        pxe_agent.restart()
        env = lab.dhclient()
        assert env["new_routers"] == "10.200.0.254", env
    finally:
        status, body = await run_job(http, pxe_agent, "PUT", actions, {"updateBaremetalPxeServer": {
            "router": "", "dnsServers": []}})
        assert status == 200 and body["inventory"]["router"] is None, body
        assert body["inventory"]["dnsServers"] == []
    env = lab.dhclient()
    assert "new_routers" not in env and "new_domain_name_servers" not in env, env


async def test_host_config_reservation_install_files_and_callback(lab, pxe_agent, fake_bmc, http):
    server = await ensure_br0_server(http, pxe_agent)
    chassis = await new_chassis(http, pxe_agent, fake_bmc)

    # bad input: 400 naming the field, nothing stored
    base = {"chassisUuid": chassis, "password": PASSWORD, "hostname": "web1.lab.example",
            "osFamily": "rhel", "nicCfgs": [{"mac": CLIENT_MAC, "ip": "10.200.0.120",
                                             "netmask": "255.255.255.0", "gateway": "10.200.0.1",
                                             "dns": "10.200.0.1", "pxe": True}]}
    bad = [
        ({"nicCfgs": [{"mac": "52:54:00:zz:00:02", "pxe": True}]}, "nicCfgs.0.mac"),
        ({"nicCfgs": [{"mac": CLIENT_MAC, "ip": "10.200.0.999", "netmask": "24"}]}, "nicCfgs.0.ip"),
        ({"nicCfgs": [{"mac": CLIENT_MAC, "ip": "10.200.0.120", "netmask": "24",
                       "gateway": "10.9.9.9"}]}, "not in"),
        ({"hostname": "bad host;rm"}, "hostname"),
        ({"password": "two\nlines"}, "password"),
        ({"osFamily": "windows"}, "osFamily"),
        ({"chassisUuid": uuidlib.uuid4().hex}, "names no chassis"),
        ({"bondings": [{"name": "bond0", "slaves": [CLIENT_MAC], "mode": "9"}]}, "mode"),
    ]
    for change, words in bad:
        status, body = await submit(http, pxe_agent, "POST", "/v1/baremetal/hostcfg",
                                    {"params": dict(base, **change)})
        assert status == 400 and words in body["error"]["description"], (change, body)
        assert PASSWORD not in json.dumps(body)
    assert (await get_json(http, pxe_agent, "/v1/baremetal/hostcfg"))[1]["inventories"] == []

    # the manual's form (cfgItems, "TRUE", "null") is accepted too
    body = {"params": {**{k: v for k, v in base.items() if k != "nicCfgs"},
                       "cfgItems": {"nicCfgs": [dict(base["nicCfgs"][0], pxe="TRUE")],
                                    "bondings": [{"name": "bond0", "slaves": "52:54:00:bb:00:01,52:54:00:bb:00:02",
                                                  "mode": "4", "ip": "192.168.50.10", "netmask": "255.255.255.0",
                                                  "gateway": "null", "dns": "null"}]},
                       "unattended": True, "vnc": True}}
    status, reply = await run_job(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", body)
    assert status == 200, reply
    inv = reply["inventory"]
    assert PASSWORD not in json.dumps(reply) and "password" not in inv and inv["passwordSet"] is True
    assert inv["installState"] == "Armed" and inv["bondings"][0]["slaves"] == ["52:54:00:bb:00:01", "52:54:00:bb:00:02"]
    assert inv["nicCfgs"][0]["pxe"] is True and inv["nicCfgs"][0]["dns"] == "10.200.0.1"
    install_url, ipxe_url = inv["installUrl"], inv["ipxeUrl"]
    assert install_url.startswith(f"http://10.200.0.1:{pxe_agent.port}/v1/baremetal/install/")
    token = install_url.rsplit("/", 1)[1]
    assert len(token) >= 40
    status, body = await submit(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", body)
    assert status == 409 and body["error"]["code"] == "BM.2002"

    # the reserved MAC gets its reserved IP and host name (dnsmasq re-read its hosts file)
    env = lab.dhclient(release=False)
    assert env["new_ip_address"] == "10.200.0.120" and env["new_host_name"] == "web1"
    ev = await wait_event(http, pxe_agent, "PxeDhcpLease",
                          lambda d: d["ip"] == "10.200.0.120" and d["action"] == "add")
    assert ev["data"]["reserved"] is True and ev["data"]["chassisUuid"] == chassis
    assert ev["data"]["hostCfgUuid"] == inv["uuid"]

    # the kickstart, from the installing machine's side (no API token), validated by pykickstart
    lab.in_cli("ip", "addr", "add", "10.200.0.77/24", "dev", "veth-c")
    ks = lab.in_cli("curl", "-sSf", install_url).stdout
    ks_file = lab.base / "ks.cfg"
    ks_file.write_text(ks)
    for version in ("RHEL8", "RHEL9", "RHEL10"):
        res = ksvalidator(ks_file, version)
        assert res.returncode == 0, (version, res.stdout, res.stderr, ks)
    m = re.search(r"^rootpw --iscrypted (\$6\$[^$]+\$\S+)$", ks, re.M)
    assert m, ks
    salt = m.group(1).split("$")[2]
    again = sh("openssl", "passwd", "-6", "-salt", salt, "-stdin", input=PASSWORD + "\n").stdout.strip()
    assert again == m.group(1)
    assert f"network --device={CLIENT_MAC} --onboot=yes --bootproto=static --ip=10.200.0.120" in ks
    assert "--bondslaves=$slaves --bondopts=mode=802.3ad" in ks and "%include /tmp/node-agent-bonds.ks" in ks
    assert f"curl -fsS --retry 5 --retry-delay 3 -X POST {install_url}/done" in ks
    assert "network --hostname=web1.lab.example" in ks and "reboot" in ks

    # the iPXE script: per MAC, only to the IP that MAC holds; by token from anywhere
    mac_url = f"http://10.200.0.1:{pxe_agent.port}/v1/baremetal/ipxe/mac/52-54-00-aa-00-02"
    script = lab.in_cli("curl", "-sSf", "--interface", "10.200.0.120", mac_url).stdout
    assert script.startswith("#!ipxe") and f"inst.ks={install_url} " in script
    assert f"kernel http://10.200.0.1:{pxe_agent.port}/v1/baremetal/boot/rhel/vmlinuz initrd=initrd.img" in script
    assert "inst.vnc" in script and "BOOTIF=01-${netX/mac:hexhyp}" in script
    other = lab.in_cli("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "10.200.0.77",
                       mac_url).stdout
    assert other == "404"
    async with http.get(ipxe_url.replace(f"http://10.200.0.1:{pxe_agent.port}", pxe_agent.url)) as r:
        assert r.status == 200 and "inst.ks=" in await r.text()
    kernel = lab.in_cli("curl", "-sSf", f"http://10.200.0.1:{pxe_agent.port}/v1/baremetal/boot/rhel/vmlinuz").stdout
    assert kernel.startswith("not a kernel")

    # the callback: a wrong token is refused; the right one marks the chassis Provisioned once
    done = install_url + "/done"
    wrong = lab.in_cli("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                       done.replace(token, token[:-4] + "AAAA")).stdout
    assert wrong == "404"
    assert (await get_json(http, pxe_agent, f"/v1/baremetal/chassis/{chassis}"))[1]["inventory"]["status"] != "Provisioned"
    res = json.loads(lab.in_cli("curl", "-sSf", "-X", "POST", done).stdout)
    assert res == {"chassisUuid": chassis, "status": "Provisioned"}
    status, body = await get_json(http, pxe_agent, f"/v1/baremetal/chassis/{chassis}")
    assert body["inventory"]["status"] == "Provisioned"
    assert lab.in_cli("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", done).stdout == "404"
    assert lab.in_cli("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", install_url).stdout == "404"
    # the token changed; the host's next PXE boot goes to its disk
    status, body = await get_json(http, pxe_agent, f"/v1/baremetal/hostcfg/{inv['uuid']}")
    assert body["inventory"]["installState"] == "Done" and body["inventory"]["installUrl"] != install_url
    script = lab.in_cli("curl", "-sSf", "--interface", "10.200.0.120", mac_url).stdout
    assert "exit 1" in script and "kernel" not in script
    lab.in_cli("ip", "addr", "flush", "dev", "veth-c")

    # a Debian host: a preseed with the expected directives
    chassis2 = await new_chassis(http, pxe_agent, fake_bmc)
    status, reply = await run_job(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", {"params": {
        "chassisUuid": chassis2, "password": PASSWORD, "hostname": "db1", "osFamily": "debian",
        "unattended": True, "nicCfgs": [{"mac": "52:54:00:aa:00:33", "ip": "10.200.0.133",
                                         "netmask": "24", "gateway": "10.200.0.1", "pxe": True}]}})
    assert status == 200, reply
    status, body = await submit(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", {"params": {
        "chassisUuid": chassis, "nicCfgs": [{"mac": "52:54:00:aa:00:33"}]}})
    assert status == 409 and body["error"]["code"] in ("BM.2002", "BM.2003")
    pre_url = reply["inventory"]["installUrl"].replace(f"http://10.200.0.1:{pxe_agent.port}", pxe_agent.url)
    async with http.get(pre_url) as r:
        assert r.status == 200
        preseed = await r.text()
    for directive in ("d-i passwd/root-password-crypted password $6$", "d-i netcfg/get_hostname string db1",
                      "d-i partman-auto/method string regular", "d-i mirror/http/hostname string deb.debian.org",
                      "d-i finish-install/reboot_in_progress note", "d-i preseed/late_command string"):
        assert directive in preseed, directive
    assert PASSWORD not in preseed and "/done" in preseed

    # the password never in plaintext: not in the log, the state files, any command line
    await asyncio.sleep(0.5)
    needle = PASSWORD.encode()
    assert needle not in pxe_agent.log_path.read_bytes()
    for f in pxe_agent.state_dir.rglob("*"):
        if f.is_file():
            assert needle not in f.read_bytes(), f
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                assert needle not in (p / "cmdline").read_bytes()
            except OSError:
                pass
    assert token not in pxe_agent.log()     # tokens are redacted in the access log

    # deleting host configs takes their reservations with them
    for hc in (await get_json(http, pxe_agent, "/v1/baremetal/hostcfg"))[1]["inventories"]:
        status, _ = await run_job(http, pxe_agent, "DELETE", f"/v1/baremetal/hostcfg/{hc['uuid']}")
        assert status == 200
    hosts = (pxe_agent.state_dir / "pxe" / "dhcp-hosts").read_text()
    assert CLIENT_MAC not in hosts
    assert server["uuid"]


async def test_provision_rearms_and_chassis_delete_drops_the_host_config(lab, pxe_agent,
                                                                          fake_bmc, http):
    """Issue 13.14: the chassis half calls pxe_arm_install and pxe_chassis_deleted."""
    await ensure_br0_server(http, pxe_agent)
    chassis = await new_chassis(http, pxe_agent, fake_bmc)
    status, reply = await run_job(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", {"params": {
        "chassisUuid": chassis, "hostname": "re1", "osFamily": "rhel",
        "nicCfgs": [{"mac": "52:54:00:aa:00:44", "ip": "10.200.0.144", "netmask": "24", "pxe": True}]}})
    assert status == 200, reply
    hc = reply["inventory"]["uuid"]
    local = lambda url: url.replace(f"http://10.200.0.1:{pxe_agent.port}", pxe_agent.url)  # noqa: E731
    async with http.post(local(reply["inventory"]["installUrl"] + "/done")) as r:
        assert r.status == 200, await r.text()
    status, body = await get_json(http, pxe_agent, f"/v1/baremetal/hostcfg/{hc}")
    assert body["inventory"]["installState"] == "Done"
    # provisioning the chassis arms its install again
    status, body = await run_job(http, pxe_agent, "PUT", f"/v1/baremetal/chassis/{chassis}/actions",
                                 {"updateBaremetalChassis": {"status": "Unprovisioned"}})
    assert status == 200, body
    status, body = await run_job(http, pxe_agent, "PUT", f"/v1/baremetal/chassis/{chassis}/actions",
                                 {"provisionBaremetalHost": {}}, timeout=60)
    assert status == 200, body
    status, body = await get_json(http, pxe_agent, f"/v1/baremetal/hostcfg/{hc}")
    assert body["inventory"]["installState"] == "Armed", body
    install_url = body["inventory"]["installUrl"]
    async with http.get(local(install_url)) as r:
        assert r.status == 200
    # deleting the chassis drops its host config, reservation and install URL
    status, body = await run_job(http, pxe_agent, "DELETE", f"/v1/baremetal/chassis/{chassis}")
    assert status == 200, body
    status, body = await get_json(http, pxe_agent, f"/v1/baremetal/hostcfg/{hc}")
    assert status == 404, body
    async with http.get(local(install_url)) as r:
        assert r.status == 404
    hosts = (pxe_agent.state_dir / "pxe" / "dhcp-hosts").read_text()
    assert "52:54:00:aa:00:44" not in hosts and "10.200.0.144" not in hosts


async def test_a_dnsmasq_that_cannot_start_is_a_503_and_leaves_nothing(lab, pxe_agent, http):
    """Something else holds TFTP on veth-s2: dnsmasq's own words come back, nothing is kept."""
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", lab.srv, sys.executable, "-c",
         "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.bind(('10.200.1.1', 69))\nprint('bound', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    lab.procs.append(squatter)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        before = lab.pids_in_srv("dnsmasq")
        status, body = await run_job(http, pxe_agent, "POST", "/v1/baremetal/pxeserver", {"params": {
            "name": "blocked", "dhcpInterface": "veth-s2", "dhcpRangeBegin": "10.200.1.100",
            "dhcpRangeEnd": "10.200.1.110"}})
        assert status == 503 and body["error"]["code"] == "PXE.1007", body
        assert "address already in use" in body["error"]["description"].lower(), body
        assert all(s["dhcpInterface"] != "veth-s2" for s in await servers(http, pxe_agent))
        assert lab.pids_in_srv("dnsmasq") == before
        assert len(list((pxe_agent.state_dir / "pxe" / "servers").iterdir())) == len(before)
    finally:
        squatter.kill()
        squatter.wait(5)


async def test_supervisor_restarts_a_killed_dnsmasq(lab, pxe_agent, http):
    server = await ensure_br0_server(http, pxe_agent)
    old = server["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        s = (await get_json(http, pxe_agent, f"/v1/baremetal/pxeserver/{server['uuid']}"))[1]["inventory"]
        if s["status"] == "Running" and s["pid"] not in (None, old):
            break
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.1)
    assert s["restarts"] >= 1 and lab.pids_in_srv("dnsmasq") == [s["pid"]]
    assert lab.dhclient()["new_next_server"] == "10.200.0.1"
    assert "restarting it" in pxe_agent.log()


async def test_state_survives_an_agent_restart_then_stop_start_delete(lab, pxe_agent, http):
    server = await ensure_br0_server(http, pxe_agent)
    pxe_agent.restart()
    after = (await get_json(http, pxe_agent, f"/v1/baremetal/pxeserver/{server['uuid']}"))[1]["inventory"]
    assert after["status"] == "Running" and after["pid"] != server["pid"]
    assert lab.pids_in_srv("dnsmasq") == [after["pid"]]
    # an agent killed outright leaves its dnsmasq; the next agent replaces it
    pxe_agent.kill9()
    orphan = lab.pids_in_srv("dnsmasq")
    assert len(orphan) == 1
    pxe_agent.start()
    now = (await get_json(http, pxe_agent, f"/v1/baremetal/pxeserver/{server['uuid']}"))[1]["inventory"]
    assert now["status"] == "Running" and lab.pids_in_srv("dnsmasq") == [now["pid"]] != orphan
    assert lab.dhclient()["new_next_server"] == "10.200.0.1"

    status, body = await run_job(http, pxe_agent, "PUT", f"/v1/baremetal/pxeserver/{server['uuid']}/actions",
                                 {"stopBaremetalPxeServer": {}})
    assert status == 200 and body["inventory"]["status"] == "Stopped" and lab.pids_in_srv("dnsmasq") == []
    pxe_agent.restart()
    assert (await servers(http, pxe_agent))[0]["status"] == "Stopped" and lab.pids_in_srv("dnsmasq") == []
    status, body = await run_job(http, pxe_agent, "PUT", f"/v1/baremetal/pxeserver/{server['uuid']}/actions",
                                 {"startBaremetalPxeServer": {}})
    assert status == 200 and body["inventory"]["status"] == "Running"
    status, _ = await run_job(http, pxe_agent, "DELETE", f"/v1/baremetal/pxeserver/{server['uuid']}")
    assert status == 200
    assert await servers(http, pxe_agent) == [] and lab.pids_in_srv("dnsmasq") == []
    assert not (pxe_agent.state_dir / "pxe" / "servers" / server["uuid"]).exists()


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
async def test_qemu_guest_pxe_boots_through_ipxe_to_the_agents_http(lab, pxe_agent, fake_bmc, http):
    """A real (TCG) guest: firmware iPXE -> DHCP -> TFTP boot.ipxe -> per-MAC script -> kernel, initrd."""
    await ensure_br0_server(http, pxe_agent)
    chassis = await new_chassis(http, pxe_agent, fake_bmc)
    status, reply = await run_job(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", {"params": {
        "chassisUuid": chassis, "hostname": "vm1", "nicCfgs": [{"mac": VM_MAC, "ip": "10.200.0.130",
                                                               "netmask": "24", "pxe": True}]}})
    assert status == 200, reply
    serial = lab.base / "vm-serial.log"
    t0 = time.monotonic()
    vm = subprocess.Popen(
        ["ip", "netns", "exec", lab.srv, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "128",
         "-nographic", "-no-reboot", "-boot", "n", "-serial", f"file:{serial}", "-monitor", "none",
         "-netdev", "tap,id=n0,ifname=tap-vm,script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,mac={VM_MAC}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(vm)
    try:
        while "GET /v1/baremetal/boot/rhel/initrd.img 200" not in pxe_agent.log():
            assert vm.poll() is None, serial.read_text(errors="replace")
            assert time.monotonic() - t0 < 30, serial.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.25)
    finally:
        vm.kill()
        vm.wait(10)
    log = pxe_agent.log()
    assert "GET /v1/baremetal/ipxe/mac/52-54-00-aa-00-10 200" in log
    assert "GET /v1/baremetal/boot/rhel/vmlinuz 200" in log
    ev = await wait_event(http, pxe_agent, "PxeDhcpLease", lambda d: d["mac"] == VM_MAC and d["ipxe"])
    assert ev["data"]["ip"] == "10.200.0.130" and ev["data"]["chassisUuid"] == chassis


# Debian's debian-installer-12-netboot-amd64 package (scripts/install.sh installs it).
DEBIAN_INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
INSTALLER_SECONDS = 240        # TCG on a busy 2-core machine; 30-60 s on a quiet one


@pytest.mark.installer
@pytest.mark.timeout(INSTALLER_SECONDS * 2 + 60)
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64")
                    or not (DEBIAN_INSTALLER / "linux").is_file(),
                    reason="needs qemu-system-x86_64 and debian-installer-12-netboot-amd64")
async def test_real_debian_installer_fetches_its_preseed_without_a_question(
        lab, pxe_agent, boot_dir, fake_bmc, http):
    """Issue 13.12: the real Debian 12 netboot installer, PXE-booted (TCG) from the agent,
    asks nothing and fetches its preseed: on a network without a DNS server (the
    kernel command line answers the name-server question), then with one (DHCP option 6)."""
    server = await ensure_br0_server(http, pxe_agent)
    actions = f"/v1/baremetal/pxeserver/{server['uuid']}/actions"
    chassis = await new_chassis(http, pxe_agent, fake_bmc)
    mac = "52:54:00:aa:00:11"
    status, reply = await run_job(http, pxe_agent, "POST", "/v1/baremetal/hostcfg", {"params": {
        "chassisUuid": chassis, "hostname": "deb1.lab.example", "osFamily": "debian",
        "unattended": True, "password": PASSWORD,
        "nicCfgs": [{"mac": mac, "ip": "10.200.0.131", "netmask": "24", "pxe": True}]}})
    assert status == 200, reply
    hostcfg = reply["inventory"]["uuid"]
    saved = {n: (boot_dir / "debian" / n).read_bytes() for n in ("vmlinuz", "initrd.img")}
    shutil.copyfile(DEBIAN_INSTALLER / "linux", boot_dir / "debian" / "vmlinuz")
    shutil.copyfile(DEBIAN_INSTALLER / "initrd.gz", boot_dir / "debian" / "initrd.img")
    try:
        for dns in ([], ["10.200.0.53"]):
            status, body = await run_job(http, pxe_agent, "PUT", actions,
                                         {"updateBaremetalPxeServer": {"dnsServers": dns}})
            assert status == 200, body
            await boot_until_preseed(lab, pxe_agent, mac, f"dns-{len(dns)}")
    finally:
        for n, data in saved.items():
            (boot_dir / "debian" / n).write_bytes(data)
        await run_job(http, pxe_agent, "PUT", actions, {"updateBaremetalPxeServer": {"dnsServers": []}})
        await run_job(http, pxe_agent, "DELETE", f"/v1/baremetal/hostcfg/{hostcfg}")


async def boot_until_preseed(lab, agent, mac: str, name: str) -> None:
    serial = lab.base / f"installer-{name}.log"
    def fetched() -> int:      # the access log writes the token as "<token>" or "{token}"
        return len(re.findall(r"GET /v1/baremetal/install/\S+ 200", agent.log()))
    before = fetched()
    t0 = time.monotonic()
    vm = subprocess.Popen(
        ["ip", "netns", "exec", lab.srv, "qemu-system-x86_64", "-machine", "q35,accel=tcg",
         "-m", "1024", "-nographic", "-no-reboot", "-boot", "n", "-serial", f"file:{serial}",
         "-monitor", "none", "-netdev", "tap,id=n0,ifname=tap-vm,script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,mac={mac}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(vm)
    try:
        while fetched() == before:
            tail = serial.read_text(errors="replace")[-3000:] if serial.exists() else ""
            assert vm.poll() is None, tail
            assert time.monotonic() - t0 < INSTALLER_SECONDS, (
                f"the installer did not fetch its preseed within {INSTALLER_SECONDS} s; "
                f"its console ends with:\n{tail}")
            await asyncio.sleep(1)
    finally:
        vm.kill()
        vm.wait(10)
    print(f"installer ({name}) fetched its preseed after {time.monotonic() - t0:.0f} s")


# ------------------------------------------------------------------ rendering, without the lab

def _render(tmp_path: Path, **params) -> str:
    from plugins.baremetal import hostcfg as render
    from plugins.baremetal.pxe import PxeSettings
    from plugins.baremetal.pxe_models import CreateHostCfg
    body = {"chassisUuid": uuidlib.uuid4().hex, "nicCfgs": [{"mac": CLIENT_MAC, "pxe": True}], **params}
    p = CreateHostCfg.model_validate_json(json.dumps(body), strict=True)
    spec = p.model_dump(mode="json", by_alias=True, exclude={"password", "clone_iso", "resource_uuid", "cfg_items"})
    spec["hostname"] = p.hostname or "node-x"
    values = render.template_values(spec, uuid="u1", password_hash=None, base="http://10.0.0.1:7070",
                                    token="T" * 43, conf=PxeSettings())
    return render.render_install_file(values)


@pytest.mark.parametrize("params", [
    {"unattended": False},
    {"unattended": True, "vnc": True, "hostname": "a.b.example"},
    {"nicCfgs": [{"mac": "52:54:00:00:00:01", "ip": "10.1.0.5", "netmask": "16", "gateway": "10.1.0.1",
                  "dns": ["10.1.0.2", "10.1.0.3"], "pxe": True}, {"mac": "52:54:00:00:00:02"}],
     "bondings": [{"name": "bond1", "mode": "active-backup", "slaves": ["52:54:00:00:00:03", "52:54:00:00:00:04"]}]},
])
def test_kickstart_variants_pass_ksvalidator(tmp_path, params):
    ks = _render(tmp_path, osFamily="rhel", **params)
    f = tmp_path / "ks.cfg"
    f.write_text(ks)
    for version in ("RHEL8", "RHEL9", "RHEL10"):
        res = ksvalidator(f, version)
        assert res.returncode == 0, (version, res.stdout, ks)
    assert "rootpw --lock" in ks                          # no password: root locked
    assert ("autopart" in ks) == params.get("unattended", True)
    if params.get("bondings"):
        assert "--bondopts=mode=active-backup,miimon=100" in ks


def test_preseed_interactive_leaves_partitioning_to_the_user(tmp_path):
    pre = _render(tmp_path, osFamily="debian", unattended=False)
    assert "partman" not in pre and "d-i passwd/root-password-crypted password !" in pre
    assert "d-i preseed/late_command string" in pre
