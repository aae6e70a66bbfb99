"""The manual's HostInventory fields, computed on this node, next to the facts.

A controller schedules from the capacities: total is what the node has (its
logical CPUs, its MemTotal), available is total minus what the node's active
VMs (running or paused) are given, read through the shared libvirt connection
(agent.libvirt_conn), so it counts every domain of this node's libvirtd,
whoever defined it.  The functions here are synchronous; the plugin runs them
off the loop.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from agent import libvirt_conn

from . import facts

# No packet is sent to it: connecting a UDP socket only picks the route.
DEFAULT_ROUTE_PROBE = "192.0.2.1"     # TEST-NET-1: only the default route leads there


class HostInventory(facts.HostFacts):
    """The facts, and the manual's HostInventory fields computed on the node."""
    uuid: str | None = Field(None, description="the hostUuid the controller gave in connectHost "
                                               "(32 hex digits); null before connectHost")
    name: str | None = Field(None, description="the node's host name")
    management_ip: str | None = Field(
        None, description="this node's address towards the controller (the source address of "
                          "the route to the connectHost URL's host); before connectHost the "
                          "[server] host when it is one address, else the default route's source")
    state: Literal["Enabled"] = Field("Enabled", description="always Enabled: maintenance is "
                                                             "the controller's state, not the node's")
    status: Literal["Connected", "Disconnected"] = Field(
        description="Connected once a controller registered with connectHost, else Disconnected")
    total_cpu_capacity: int | None = Field(None, description="logical CPUs of the node (cpu.threads)")
    available_cpu_capacity: int | None = Field(
        None, description="totalCpuCapacity minus the vCPUs of the node's active (running or "
                          "paused) VMs, as libvirt reports them; negative when they are given more "
                          "than the node has; null while libvirt is not reachable")
    cpu_sockets: int | None = Field(None, description="CPU sockets (cpu.sockets)")
    cpu_num: int | None = Field(None, description="logical CPUs (cpu.threads)")
    total_memory_capacity: int | None = Field(None, description="bytes: MemTotal of the node")
    available_memory_capacity: int | None = Field(
        None, description="bytes: totalMemoryCapacity minus the current memory of the node's "
                          "active VMs, as libvirt reports them; null while libvirt is not reachable")
    architecture: str = Field(description="the CPU architecture, e.g. x86_64 (cpu.architecture)")
    running_vm_count: int | None = Field(None, description="active VMs counted in the available "
                                                           "capacities; null while libvirt is not reachable")


class VmUsage:
    def __init__(self, count: int, vcpus: int, memory: int) -> None:
        self.count, self.vcpus, self.memory = count, vcpus, memory


def active_vm_usage(conn: Any) -> VmUsage:
    """What the active domains are given: vCPUs and current memory (bytes).
    Called with the shared connection, in a runner thread."""
    lv = libvirt_conn.libvirt
    domains = conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    count = vcpus = memory = 0
    for dom in domains:
        try:
            _state, _max_kib, memory_kib, nr_vcpus, _cpu_time = dom.info()
        except lv.libvirtError:          # stopped or undefined since the listing
            continue
        count += 1
        vcpus += nr_vcpus
        memory += memory_kib * 1024
    return VmUsage(count, vcpus, memory)


def source_address(host: str) -> str | None:
    """The local address the kernel would use to reach host (a name is resolved)."""
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _type, _proto, _name, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def management_ip(controller_url: str | None, listen_host: str) -> str | None:
    if controller_url:
        host = urlsplit(controller_url).hostname
        if host:
            found = source_address(host)
            if found:
                return found
    try:
        listen = ipaddress.ip_address(listen_host)
        if not listen.is_unspecified:
            return str(listen)
    except ValueError:
        pass
    return source_address(DEFAULT_ROUTE_PROBE)


def build(found: facts.HostFacts, *, target: dict[str, str] | None, manage_ip: str | None,
          usage: VmUsage | None) -> HostInventory:
    threads, total_memory = found.cpu.threads, found.memory.total
    return HostInventory(
        **dict(found),
        uuid=target["hostUuid"] if target else None,
        name=found.hostname,
        management_ip=manage_ip,
        status="Connected" if target else "Disconnected",
        total_cpu_capacity=threads,
        available_cpu_capacity=(threads - usage.vcpus) if usage and threads is not None else None,
        cpu_sockets=found.cpu.sockets,
        cpu_num=threads,
        total_memory_capacity=total_memory,
        available_memory_capacity=(total_memory - usage.memory)
        if usage and total_memory is not None else None,
        architecture=found.cpu.architecture,
        running_vm_count=usage.count if usage else None,
    )
