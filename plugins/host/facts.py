"""Host facts of a KVM hypervisor: CPU, memory, NUMA, OS, KVM, versions.

In the manner of VDSM's hostdev.py, every fact comes from a small function
that reads files under a configurable ``root`` (``<root>/proc/cpuinfo``,
``<root>/sys/devices/system/node``, ``<root>/etc/os-release``, ...), so tests
can point it at a generated tree.  Every function is synchronous and may
block; the plugin calls them off the event loop.  The few facts that need a
command (addresses, versions) are parsed here from output the plugin gets
through its runner (ADDRESSES_COMMAND, VERSION_COMMANDS).

A missing or malformed file never raises: the fact it feeds becomes None (or
an empty list) and the rest of the report is still produced.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

SUBPROCESS_TIMEOUT = 5  # seconds; every external command runs under it

# Daemons usually have /usr/sbin on PATH, interactive users on Debian do not.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/libexec")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

class _Model(BaseModel):
    # defer_build: validators built on the first /v1/host, as the wire models' are
    # (memory at idle); the OpenAPI document is the same.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, defer_build=True)


class CpuInfo(_Model):
    model_name: str | None = None
    vendor: str | None = None          # GenuineIntel, AuthenticAMD, ...
    sockets: int | None = None
    cores: int | None = None           # physical cores, all sockets
    threads: int | None = None         # logical CPUs
    threads_per_core: int | None = None
    mhz: float | None = None
    virtualization: str | None = None  # "vmx", "svm" or None
    architecture: str = "x86_64"


class HugePages(_Model):
    size_bytes: int
    total: int | None = None
    free: int | None = None


class MemoryInfo(_Model):
    total: int | None = None           # bytes
    available: int | None = None
    free: int | None = None
    hugepages: list[HugePages] = []


class NumaNode(_Model):
    id: int
    cpus: list[int] = []
    mem_total: int | None = None       # bytes
    mem_free: int | None = None
    distances: list[int] = []


class OsInfo(_Model):
    name: str | None = None
    version: str | None = None
    id: str | None = None
    version_id: str | None = None
    pretty_name: str | None = None
    kernel: str | None = None


class Address(_Model):
    interface: str
    family: str                        # "ipv4" or "ipv6"
    address: str
    prefix_length: int


class KvmStatus(_Model):
    present: bool
    usable: bool
    reason: str | None = None          # why it is not usable


class Versions(_Model):
    libvirt_version: str | None = None
    qemu_version: str | None = None


class HostFacts(_Model):
    hostname: str | None = None
    addresses: list[Address] = []
    cpu: CpuInfo
    memory: MemoryInfo
    numa_nodes: list[NumaNode] = []
    os: OsInfo
    hypervisor_type: str = "KVM"
    kvm: KvmStatus
    versions: Versions
    boot_time: str | None = None       # ISO 8601, UTC


# --------------------------------------------------------------------------
# Small readers: all return None instead of raising
# --------------------------------------------------------------------------

def _path(root: str | os.PathLike, rel: str) -> Path:
    return Path(root, rel)


def _is_live(root: str | os.PathLike) -> bool:
    """True when root is this machine's own "/", not a generated tree."""
    return os.path.realpath(root) == "/"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _kb_fields(text: str | None) -> dict[str, int]:
    """Parse "Key: 123 kB" lines (proc/meminfo, node*/meminfo) into bytes.

    Node meminfo lines carry a "Node N " prefix, so the key is the word just
    before the colon.  Counters without a unit (HugePages_Total) stay counts.
    """
    fields: dict[str, int] = {}
    for line in (text or "").splitlines():
        head, sep, tail = line.partition(":")
        words = tail.split()
        if not sep or not head.split() or not words:
            continue
        try:
            value = int(words[0])
        except ValueError:
            continue
        if len(words) > 1 and words[1].lower() == "kb":
            value *= 1024
        fields[head.split()[-1]] = value
    return fields


def parse_cpulist(text: str | None) -> list[int]:
    """Expand a kernel cpulist such as "0-3,8-11" to [0, 1, 2, 3, 8, ...].

    A malformed list gives [] rather than a partial, misleading one.
    """
    cpus: list[int] = []
    try:
        for chunk in (text or "").strip().split(","):
            if not chunk:
                continue
            first, _, last = chunk.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        return []
    return cpus


def find_binary(name: str) -> str | None:
    """The path of a command (PATH plus the sbin directories a service may lack)."""
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    return shutil.which(name, path=path)


# --------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------

def _cpuinfo_processors(root: str | os.PathLike) -> list[dict[str, str]]:
    """One dict per "processor" block of proc/cpuinfo."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    text = _read(_path(root, "proc/cpuinfo")) or ""
    for line in [*text.splitlines(), ""]:
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
        elif not line.strip() and current:
            # ARM adds a trailing global block without "processor"; skip it.
            if "processor" in current:
                blocks.append(current)
            current = {}
    return blocks


def _cpu_mhz(root: str | os.PathLike, first: dict[str, str]) -> float | None:
    # The cpufreq maximum is stable; "cpu MHz" is the current, scaled clock
    # (800 MHz on an idle intel_pstate host), so it is only the fallback.
    max_khz = _read_int(_path(
        root, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"))
    if max_khz:
        return max_khz / 1000
    try:
        return float(first["cpu MHz"])
    except (KeyError, ValueError):
        return None


def cpu_info(root: str | os.PathLike = "/",
             architecture: str | None = None) -> CpuInfo:
    procs = _cpuinfo_processors(root)
    first = procs[0] if procs else {}
    threads = len(procs) or len(parse_cpulist(
        _read(_path(root, "sys/devices/system/cpu/online")))) or None

    # Topology: distinct sockets and distinct (socket, core) pairs.  Guests
    # and some arches omit the ids; count each CPU as its own core then.
    if procs and all("physical id" in p and "core id" in p for p in procs):
        sockets = len({p["physical id"] for p in procs})
        cores = len({(p["physical id"], p["core id"]) for p in procs})
    else:
        sockets, cores = (1, threads) if threads else (None, None)

    flags = set(first.get("flags", "").split())
    virtualization = ("vmx" if "vmx" in flags
                      else "svm" if "svm" in flags else None)
    if architecture is None:
        architecture = os.uname().machine if _is_live(root) else "x86_64"

    return CpuInfo(
        model_name=first.get("model name"),
        vendor=first.get("vendor_id"),
        sockets=sockets,
        cores=cores,
        threads=threads,
        threads_per_core=threads // cores if threads and cores else None,
        mhz=_cpu_mhz(root, first),
        virtualization=virtualization,
        architecture=architecture,
    )


# --------------------------------------------------------------------------
# Memory and NUMA
# --------------------------------------------------------------------------

def _hugepages(root: str | os.PathLike) -> list[HugePages]:
    pools: list[HugePages] = []
    base = _path(root, "sys/kernel/mm/hugepages")
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = re.fullmatch(r"hugepages-(\d+)kB", entry.name)
        if match:
            pools.append(HugePages(
                size_bytes=int(match.group(1)) * 1024,
                total=_read_int(entry / "nr_hugepages"),
                free=_read_int(entry / "free_hugepages"),
            ))
    return sorted(pools, key=lambda p: p.size_bytes)


def memory_info(root: str | os.PathLike = "/") -> MemoryInfo:
    fields = _kb_fields(_read(_path(root, "proc/meminfo")))
    return MemoryInfo(
        total=fields.get("MemTotal"),
        available=fields.get("MemAvailable"),
        free=fields.get("MemFree"),
        hugepages=_hugepages(root),
    )


def _node_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    base = _path(root, "sys/devices/system/node")
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    nodes = [(int(e.name[4:]), e) for e in entries
             if re.fullmatch(r"node\d+", e.name)]
    return sorted(nodes)


def _read_node(node_id: int, path: Path) -> NumaNode:
    mem = _kb_fields(_read(path / "meminfo"))
    try:
        distances = [int(d) for d in (_read(path / "distance") or "").split()]
    except ValueError:
        distances = []
    return NumaNode(
        id=node_id,
        cpus=parse_cpulist(_read(path / "cpulist")),  # [] for memory-only nodes
        mem_total=mem.get("MemTotal"),
        mem_free=mem.get("MemFree"),
        distances=distances,
    )


def numa_nodes(root: str | os.PathLike = "/") -> list[NumaNode]:
    nodes = _node_dirs(root)
    if nodes:
        return [_read_node(node_id, path) for node_id, path in nodes]

    # A kernel without CONFIG_NUMA has no node directory: the host is one
    # node holding every CPU and all memory, at the local distance 10.
    cpus = parse_cpulist(_read(_path(root, "sys/devices/system/cpu/online")))
    if not cpus:
        cpus = [int(p["processor"]) for p in _cpuinfo_processors(root)
                if p["processor"].isdigit()]
    mem = memory_info(root)
    return [NumaNode(id=0, cpus=cpus, mem_total=mem.total, mem_free=mem.free,
                     distances=[10])]


# --------------------------------------------------------------------------
# OS, KVM, hostname, boot time
# --------------------------------------------------------------------------

def _parse_os_release(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        try:
            # Values are shell-quoted ('x', "x", with backslash escapes).
            words = shlex.split(value)
        except ValueError:
            words = [value]
        fields[key] = " ".join(words)
    return fields


def os_info(root: str | os.PathLike = "/") -> OsInfo:
    # etc/os-release wins; usr/lib/os-release is the vendor's fallback copy.
    text = (_read(_path(root, "etc/os-release"))
            or _read(_path(root, "usr/lib/os-release")) or "")
    fields = _parse_os_release(text)
    if _is_live(root):
        kernel: str | None = os.uname().release
    else:
        kernel = (_read(_path(root, "proc/sys/kernel/osrelease")) or "").strip()
    return OsInfo(
        name=fields.get("NAME"),
        version=fields.get("VERSION"),
        id=fields.get("ID"),
        version_id=fields.get("VERSION_ID"),
        pretty_name=fields.get("PRETTY_NAME"),
        kernel=kernel or None,
    )


def kvm_status(root: str | os.PathLike = "/") -> KvmStatus:
    dev = _path(root, "dev/kvm")
    try:
        mode = dev.stat().st_mode
    except FileNotFoundError:
        return KvmStatus(present=False, usable=False,
                         reason=f"{dev} not found: kvm module not loaded or "
                                "virtualization disabled in firmware")
    except OSError as exc:
        return KvmStatus(present=False, usable=False,
                         reason=f"cannot stat {dev}: {exc.strerror}")
    # A generated tree cannot hold device nodes, so only check the real one.
    if _is_live(root) and not stat.S_ISCHR(mode):
        return KvmStatus(present=True, usable=False,
                         reason=f"{dev} is not a character device")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(present=True, usable=False,
                         reason=f"{dev} is not readable and writable "
                                f"by uid {os.geteuid()}")
    return KvmStatus(present=True, usable=True)


def hostname(root: str | os.PathLike = "/") -> str | None:
    if _is_live(root):
        return socket.gethostname()
    text = (_read(_path(root, "proc/sys/kernel/hostname"))
            or _read(_path(root, "etc/hostname")) or "")
    return text.strip() or None


def boot_time(root: str | os.PathLike = "/") -> str | None:
    for line in (_read(_path(root, "proc/stat")) or "").splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "btime" and words[1].isdigit():
            when = datetime.fromtimestamp(int(words[1]), tz=timezone.utc)
            return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


# --------------------------------------------------------------------------
# Network and hypervisor versions (live host only: they run commands)
# --------------------------------------------------------------------------

_FAMILIES = {"inet": "ipv4", "inet6": "ipv6"}


def parse_ip_addr_json(text: str) -> list[Address]:
    """Addresses from `ip -j addr` output, loopback interfaces left out."""
    try:
        links = json.loads(text)
    except (TypeError, ValueError):
        return []
    addresses: list[Address] = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict) or "LOOPBACK" in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            family = _FAMILIES.get(info.get("family"))
            if family and info.get("local") and "prefixlen" in info:
                addresses.append(Address(
                    interface=link.get("ifname", ""), family=family,
                    address=info["local"], prefix_length=info["prefixlen"]))
    return addresses


def parse_version(text: str | None) -> str | None:
    """The first dotted version in a `--version` banner.

    "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)" gives "7.2.22";
    "libvirtd (libvirt) 9.0.0" gives "9.0.0".
    """
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", text or "")
    return match.group(1) if match else None


# The commands behind the addresses and the versions.  The host plugin runs
# them through its runner (argv lists, a timeout, the process tree killed on
# timeout or cancel) and hands their output to collect(); the first command of
# a list that answers gives the version.
ADDRESSES_COMMAND = ["ip", "-j", "addr"]
VERSION_COMMANDS: dict[str, list[list[str]]] = {
    # The daemon's banner, not the Python binding: the daemon is what runs the
    # VMs, and loading the binding would cost ~12 MB of RSS for one number.
    "libvirt_version": [["libvirtd", "--version"], ["virtqemud", "--version"]],
    # Debian ships qemu-system-<arch> plus the /usr/bin/kvm wrapper; RHEL
    # ships /usr/libexec/qemu-kvm.
    "qemu_version": [[b, "--version"] for b in dict.fromkeys([
        f"qemu-system-{os.uname().machine}", "qemu-system-x86_64", "/usr/bin/kvm",
        "/usr/libexec/qemu-kvm"])],
}


# --------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------

# CPU, OS and versions do not change while the agent runs (a package upgrade
# restarts it), so they are read once per root; memory and NUMA free counts
# change all the time and are read on every call.

@functools.lru_cache(maxsize=8)
def _cached_cpu(root: str) -> CpuInfo:
    return cpu_info(root)


@functools.lru_cache(maxsize=8)
def _cached_os(root: str) -> OsInfo:
    return os_info(root)


def clear_cache() -> None:
    """Forget the cached static facts (tests, or after an in-place upgrade)."""
    for cached in (_cached_cpu, _cached_os):
        cached.cache_clear()


def collect(root: str | os.PathLike = "/", ip_addr_json: str | None = None,
            versions: Versions | None = None) -> HostFacts:
    """The facts read under root, with the output of ADDRESSES_COMMAND and the
    versions from VERSION_COMMANDS when the caller ran them (on this machine)."""
    root = os.fspath(root)
    # Copies, so a caller changing its HostFacts cannot alter the cache.
    return HostFacts(
        hostname=hostname(root),
        addresses=parse_ip_addr_json(ip_addr_json or ""),
        cpu=_cached_cpu(root).model_copy(deep=True),
        memory=memory_info(root),
        numa_nodes=numa_nodes(root),
        os=_cached_os(root).model_copy(deep=True),
        hypervisor_type="KVM",
        kvm=kvm_status(root),
        versions=versions.model_copy() if versions else Versions(),
        boot_time=boot_time(root),
    )
