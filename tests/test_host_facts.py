"""Host facts against generated /proc and /sys trees, and on this machine."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from plugins.host import facts
from plugins.host.facts import (
    collect, cpu_info, kvm_status, memory_info, numa_nodes, os_info,
    parse_cpulist, parse_ip_addr_json, parse_version,
)

GIB = 1024 ** 3


@pytest.fixture(autouse=True)
def _fresh_cache():
    facts.clear_cache()
    yield
    facts.clear_cache()


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cpuinfo(vendor: str, model: str, flag: str, topology: list[tuple[int, int]],
            mhz: str = "1200.000") -> str:
    """A proc/cpuinfo with one block per (physical id, core id) pair."""
    blocks = []
    for n, (socket_id, core_id) in enumerate(topology):
        blocks.append(
            f"processor\t: {n}\nvendor_id\t: {vendor}\n"
            f"model name\t: {model}\ncpu MHz\t\t: {mhz}\n"
            f"physical id\t: {socket_id}\ncore id\t\t: {core_id}\n"
            f"flags\t\t: fpu vme de pse tsc msr {flag} lm\n")
    return "\n".join(blocks) + "\n"


def meminfo(total_kb: int, free_kb: int, node: int | None = None) -> str:
    prefix = f"Node {node} " if node is not None else ""
    lines = [f"{prefix}MemTotal:       {total_kb} kB",
             f"{prefix}MemFree:        {free_kb} kB"]
    if node is None:
        lines.append(f"MemAvailable:   {free_kb + 1024} kB")
    lines.append(f"{prefix}HugePages_Total:     0")
    return "\n".join(lines) + "\n"


OS_RELEASE = '''PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
ID=debian
# a comment
'''


@pytest.fixture
def intel_host(tmp_path: Path) -> Path:
    """2 sockets x 2 cores x 2 threads, one NUMA node per socket."""
    # Linux numbers the first thread of every core first: cpus 0-3, then the
    # SMT siblings 4-7.  Socket 0 holds cpus 0,1,4,5.
    topology = [(0, 0), (0, 1), (1, 0), (1, 1)] * 2
    write(tmp_path, "proc/cpuinfo",
          cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz",
                  "vmx", topology))
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
          "3900000\n")
    write(tmp_path, "sys/devices/system/cpu/online", "0-7\n")
    write(tmp_path, "proc/meminfo", meminfo(64 * 1024 ** 2, 40 * 1024 ** 2))
    for node, cpus, distance in ((0, "0-1,4-5", "10 21"),
                                 (1, "2-3,6-7", "21 10")):
        base = f"sys/devices/system/node/node{node}"
        write(tmp_path, f"{base}/cpulist", cpus + "\n")
        write(tmp_path, f"{base}/distance", distance + "\n")
        write(tmp_path, f"{base}/meminfo",
              meminfo(32 * 1024 ** 2, (20 + node) * 1024 ** 2, node=node))
    write(tmp_path, "sys/devices/system/node/online", "0-1\n")
    for size_kb, total, free in ((2048, 1024, 1000), (1048576, 8, 6)):
        base = f"sys/kernel/mm/hugepages/hugepages-{size_kb}kB"
        write(tmp_path, f"{base}/nr_hugepages", f"{total}\n")
        write(tmp_path, f"{base}/free_hugepages", f"{free}\n")
    write(tmp_path, "etc/os-release", OS_RELEASE)
    write(tmp_path, "proc/sys/kernel/osrelease", "6.1.0-18-amd64\n")
    write(tmp_path, "proc/sys/kernel/hostname", "kvm-07\n")
    write(tmp_path, "proc/stat", "cpu  1 2 3 4\nbtime 1700000000\nprocesses 9\n")
    write(tmp_path, "dev/kvm", "")  # a generated tree cannot hold a char device
    return tmp_path


@pytest.fixture
def amd_host(tmp_path: Path) -> Path:
    """1 socket x 4 cores x 2 threads, no NUMA directory, no cpufreq."""
    write(tmp_path, "proc/cpuinfo",
          cpuinfo("AuthenticAMD", "AMD EPYC 7302P 16-Core Processor", "svm",
                  [(0, c) for c in range(4)] * 2, mhz="2994.372"))
    write(tmp_path, "proc/meminfo", meminfo(16 * 1024 ** 2, 8 * 1024 ** 2))
    # Only the vendor copy: exercises the usr/lib/os-release fallback.
    write(tmp_path, "usr/lib/os-release",
          "NAME='Rocky Linux'\nID=\"rocky\"\nVERSION_ID=\"9.3\"\n")
    write(tmp_path, "dev/kvm", "")
    return tmp_path


# --- parsers ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]),
    ("5", [5]),
    ("0,2,4-5", [0, 2, 4, 5]),
    ("\n", []),          # a memory-only node
    (None, []),
    ("0-x", []),         # malformed: nothing rather than something wrong
])
def test_parse_cpulist(text, expected):
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n", "7.2.22"),
    ("libvirtd (libvirt) 9.0.0\n", "9.0.0"),
    ("no version here", None),
    (None, None),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_ip_addr_json_skips_loopback_and_link_layer():
    links = [
        {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "addr_info": [
            {"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
        {"ifname": "br0", "flags": ["BROADCAST", "UP"], "addr_info": [
            {"family": "inet", "local": "10.0.0.5", "prefixlen": 24},
            {"family": "inet6", "local": "fd00::5", "prefixlen": 64}]},
        {"ifname": "can0", "flags": ["UP"], "addr_info": [
            {"family": "can", "local": "x", "prefixlen": 0}]},
    ]
    got = parse_ip_addr_json(json.dumps(links))
    assert [a.model_dump(by_alias=True) for a in got] == [
        {"interface": "br0", "family": "ipv4", "address": "10.0.0.5",
         "prefixLength": 24},
        {"interface": "br0", "family": "ipv6", "address": "fd00::5",
         "prefixLength": 64},
    ]
    assert parse_ip_addr_json("not json") == []
    assert parse_ip_addr_json('{"an": "object"}') == []


# --- a 2-socket, 2-node Intel host -----------------------------------------

def test_intel_cpu(intel_host):
    cpu = cpu_info(intel_host)
    assert cpu.vendor == "GenuineIntel"
    assert cpu.model_name.startswith("Intel(R) Xeon(R) Gold 6230")
    assert (cpu.sockets, cpu.cores, cpu.threads, cpu.threads_per_core) == \
        (2, 4, 8, 2)
    assert cpu.mhz == 3900.0          # cpufreq maximum beats the current clock
    assert cpu.virtualization == "vmx"
    assert cpu.architecture == "x86_64"
    assert cpu_info(intel_host, architecture="aarch64").architecture == "aarch64"


def test_intel_memory_and_hugepages(intel_host):
    mem = memory_info(intel_host)
    assert mem.total == 64 * GIB
    assert mem.free == 40 * GIB
    assert mem.available == 40 * GIB + 1024 * 1024
    assert [h.model_dump(by_alias=True) for h in mem.hugepages] == [
        {"sizeBytes": 2 * 1024 ** 2, "total": 1024, "free": 1000},
        {"sizeBytes": GIB, "total": 8, "free": 6},
    ]


def test_intel_numa_nodes(intel_host):
    nodes = numa_nodes(intel_host)
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[0].cpus == [0, 1, 4, 5]
    assert nodes[1].cpus == [2, 3, 6, 7]
    assert [n.mem_total for n in nodes] == [32 * GIB, 32 * GIB]
    assert [n.mem_free for n in nodes] == [20 * GIB, 21 * GIB]
    assert [n.distances for n in nodes] == [[10, 21], [21, 10]]


def test_intel_os(intel_host):
    assert os_info(intel_host).model_dump(by_alias=True) == {
        "name": "Debian GNU/Linux", "version": "12 (bookworm)", "id": "debian",
        "versionId": "12", "prettyName": "Debian GNU/Linux 12 (bookworm)",
        "kernel": "6.1.0-18-amd64"}


def test_intel_collect_serializes_camel_case(intel_host):
    body = collect(intel_host).model_dump(by_alias=True)
    assert set(body) == {"hostname", "addresses", "cpu", "memory", "numaNodes",
                         "os", "hypervisorType", "kvm", "versions", "bootTime"}
    assert body["hostname"] == "kvm-07"
    assert body["hypervisorType"] == "KVM"
    assert body["bootTime"] == "2023-11-14T22:13:20Z"
    assert body["cpu"]["threadsPerCore"] == 2
    assert body["kvm"] == {"present": True, "usable": True, "reason": None}
    # A generated tree runs no commands: no addresses, no versions.
    assert body["addresses"] == []
    assert body["versions"] == {"libvirtVersion": None, "qemuVersion": None}
    # Populating by field name and by alias both work.
    assert facts.HostFacts.model_validate(body) == collect(intel_host)


def test_collect_caches_static_gotbut_not_free_memory(intel_host):
    first = collect(intel_host)
    write(intel_host, "proc/cpuinfo", "processor\t: 0\nmodel name\t: other\n")
    write(intel_host, "proc/meminfo", meminfo(64 * 1024 ** 2, 1024 ** 2))
    write(intel_host, "sys/devices/system/node/node1/meminfo",
          meminfo(32 * 1024 ** 2, 1024 ** 2, node=1))
    second = collect(intel_host)
    assert second.cpu == first.cpu                 # cached
    assert second.memory.free == GIB               # fresh
    assert second.numa_nodes[1].mem_free == GIB    # fresh
    second.cpu.model_name = "mutated"              # a copy, not the cache
    assert collect(intel_host).cpu == first.cpu
    facts.clear_cache()
    assert collect(intel_host).cpu.model_name == "other"


# --- an AMD host without a NUMA directory ----------------------------------

def test_amd_cpu(amd_host):
    cpu = cpu_info(amd_host)
    assert cpu.vendor == "AuthenticAMD"
    assert (cpu.sockets, cpu.cores, cpu.threads, cpu.threads_per_core) == \
        (1, 4, 8, 2)
    assert cpu.mhz == pytest.approx(2994.372)   # no cpufreq: cpuinfo clock
    assert cpu.virtualization == "svm"


def test_amd_single_implicit_numa_node(amd_host):
    assert [n.model_dump(by_alias=True) for n in numa_nodes(amd_host)] == [
        {"id": 0, "cpus": list(range(8)), "memTotal": 16 * GIB,
         "memFree": 8 * GIB, "distances": [10]}]


def test_amd_os_release_fallback(amd_host):
    info = os_info(amd_host)
    assert (info.name, info.id, info.version_id) == ("Rocky Linux", "rocky", "9.3")
    assert info.version is None and info.pretty_name is None
    assert info.kernel is None                    # no proc/sys in the tree


def test_guest_cpuinfo_without_topology_ids(tmp_path):
    write(tmp_path, "proc/cpuinfo",
          "processor\t: 0\nvendor_id\t: GenuineIntel\n\n"
          "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    cpu = cpu_info(tmp_path)
    assert (cpu.sockets, cpu.cores, cpu.threads, cpu.threads_per_core) == \
        (1, 2, 2, 1)
    assert cpu.virtualization is None and cpu.mhz is None


# --- KVM device ------------------------------------------------------------

def test_kvm_missing(intel_host):
    (intel_host / "dev/kvm").unlink()
    kvm = kvm_status(intel_host)
    assert (kvm.present, kvm.usable) == (False, False)
    assert "dev/kvm not found" in kvm.reason


# --- missing and malformed files -------------------------------------------

def test_empty_tree_degrades_to_none(tmp_path):
    body = collect(tmp_path).model_dump(by_alias=True)
    assert body["cpu"] == {
        "modelName": None, "vendor": None, "sockets": None, "cores": None,
        "threads": None, "threadsPerCore": None, "mhz": None,
        "virtualization": None, "architecture": "x86_64"}
    assert body["memory"] == {"total": None, "available": None, "free": None,
                              "hugepages": []}
    assert body["numaNodes"] == [{"id": 0, "cpus": [], "memTotal": None,
                                  "memFree": None, "distances": [10]}]
    assert set(body["os"].values()) == {None}
    assert body["kvm"]["present"] is False
    assert body["hostname"] is None and body["bootTime"] is None


def test_malformed_files_degrade_gracefully(tmp_path):
    write(tmp_path, "proc/cpuinfo", "\x00garbage without colons\n\n: :\n")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "?")
    write(tmp_path, "proc/meminfo", "MemTotal: lots kB\nMemFree:\nFoo\n")
    write(tmp_path, "proc/stat", "btime soon\n")
    write(tmp_path, "etc/os-release", 'NAME="Unterminated\nID=ok\n=\n')
    write(tmp_path, "sys/devices/system/node/node0/cpulist", "0-x\n")
    write(tmp_path, "sys/devices/system/node/node0/distance", "ten\n")
    write(tmp_path, "sys/devices/system/node/node0/meminfo", "Node 0 MemTotal:\n")
    (tmp_path / "sys/devices/system/node/nodeX").mkdir()   # not a node
    hp = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    hp.mkdir(parents=True)
    (hp / "nr_hugepages").write_bytes(b"\xff\xfe")         # not UTF-8
    (tmp_path / "sys/kernel/mm/hugepages/hugepages-bogus").mkdir()

    got = collect(tmp_path)
    assert got.cpu.threads is None and got.cpu.mhz is None
    assert (got.memory.total, got.memory.free) == (None, None)
    assert [h.model_dump() for h in got.memory.hugepages] == [
        {"size_bytes": 2 * 1024 ** 2, "total": None, "free": None}]
    assert [n.model_dump() for n in got.numa_nodes] == [
        {"id": 0, "cpus": [], "mem_total": None, "mem_free": None,
         "distances": []}]
    # An unbalanced quote keeps the raw value; later lines still parse.
    assert got.os.name == '"Unterminated' and got.os.id == "ok"
    assert got.boot_time is None


# --- this machine ----------------------------------------------------------

def test_collect_on_this_machine():
    host = collect("/")
    assert host.hostname
    assert host.cpu.threads == os.cpu_count()
    assert host.cpu.cores and host.cpu.sockets
    assert host.cpu.cores * host.cpu.threads_per_core == host.cpu.threads
    assert host.cpu.architecture == os.uname().machine
    assert host.memory.total > 0
    assert 0 < host.memory.free <= host.memory.total
    node_cpus = [c for n in host.numa_nodes for c in n.cpus]
    assert len(set(node_cpus)) == len(node_cpus) == host.cpu.threads
    assert host.os.id == "debian"
    assert host.os.kernel == os.uname().release
    assert host.kvm.present == os.path.exists("/dev/kvm")
    assert host.kvm.usable == (host.kvm.present
                               and os.access("/dev/kvm", os.R_OK | os.W_OK))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", host.boot_time)
    assert all(a.interface != "lo" for a in host.addresses)
    for version in (host.versions.libvirt_version, host.versions.qemu_version):
        assert version is None or re.fullmatch(r"\d+\.\d+(\.\d+)?", version)
