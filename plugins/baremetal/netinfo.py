"""The node's interfaces (from ``ip -j addr``) and the checks of a DHCP range against them.

Pure functions over the parsed JSON, so the checks are testable without a
network; ``read_addresses`` is the one call that runs ``ip``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from agent import errors


@dataclass(frozen=True)
class Iface:
    name: str
    up: bool
    ipv4: tuple[ipaddress.IPv4Interface, ...]   # address with its prefix
    ipv6_global: bool                           # has a non-link-local IPv6 address


def parse_ip_addr(text: str) -> dict[str, Iface]:
    """``ip -j addr show`` output -> name -> Iface."""
    out: dict[str, Iface] = {}
    for link in json.loads(text or "[]"):
        name = link.get("ifname")
        if not name:
            continue
        v4, v6 = [], False
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and a.get("local"):
                v4.append(ipaddress.IPv4Interface(f"{a['local']}/{a.get('prefixlen', 32)}"))
            elif a.get("family") == "inet6" and a.get("scope") == "global":
                v6 = True
        flags = link.get("flags", [])
        out[name] = Iface(name, "UP" in flags or link.get("operstate") == "UP", tuple(v4), v6)
    return out


async def read_addresses(runner, ip_binary: str = "ip") -> dict[str, Iface]:
    try:
        res = await runner.run([ip_binary, "-j", "addr", "show"], timeout=10)
    except FileNotFoundError:
        raise errors.Unavailable(f"'{ip_binary}' (iproute2) is not installed; it is needed to "
                                 "check the DHCP interface", code="PXE.1008") from None
    if res.returncode != 0:
        raise errors.OperationFailed(
            f"'ip -j addr show' failed: {res.stderr.decode(errors='replace').strip()[:300]}",
            code="PXE.1008")
    return parse_ip_addr(res.stdout.decode(errors="replace"))


def parse_netmask(text: str) -> ipaddress.IPv4Address:
    """'255.255.255.0', '/24' or '24' -> the dotted netmask; anything else is a 400."""
    t = text.strip().lstrip("/")
    try:
        if t.isdigit():
            return ipaddress.IPv4Network(f"0.0.0.0/{int(t)}").netmask
        # IPv4Network validates that the mask is contiguous.
        return ipaddress.IPv4Network(f"0.0.0.0/{t}").netmask
    except (ValueError, ipaddress.NetmaskValueError):
        raise ValueError(f"'{text}' is not a netmask (e.g. 255.255.255.0 or 24)") from None


@dataclass(frozen=True)
class CheckedRange:
    interface: str
    server_ip: str                 # the interface's address in the range's network
    network: ipaddress.IPv4Network
    begin: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    netmask: ipaddress.IPv4Address
    ipv6_global: bool


def check_range(ifaces: dict[str, Iface], interface: str, begin: str, end: str,
                netmask: str | None) -> CheckedRange:
    """The interface exists and carries an IPv4 subnet that holds begin..end; 400s name the problem."""
    iface = ifaces.get(interface)
    if iface is None:
        known = ", ".join(sorted(n for n in ifaces if n != "lo")) or "none"
        raise errors.BadRequest(
            f"dhcpInterface '{interface}' does not exist on this node (interfaces: {known})",
            code="PXE.1001")
    if not iface.ipv4:
        raise errors.BadRequest(
            f"dhcpInterface '{interface}' has no IPv4 address; give it an address in the "
            "DHCP range's subnet first", code="PXE.1001")
    b, e = ipaddress.IPv4Address(begin), ipaddress.IPv4Address(end)
    if b > e:
        raise errors.BadRequest(f"dhcpRangeBegin {b} is after dhcpRangeEnd {e}", code="PXE.1003")
    owner = next((a for a in iface.ipv4 if b in a.network and e in a.network), None)
    if owner is None:
        subnets = ", ".join(str(a) for a in iface.ipv4)
        raise errors.BadRequest(
            f"the DHCP range {b}-{e} is not inside the subnet of {interface} ({subnets})",
            code="PXE.1002")
    mask = parse_netmask(netmask) if netmask else owner.network.netmask
    if mask != owner.network.netmask:
        raise errors.BadRequest(
            f"dhcpRangeNetmask {mask} does not match the subnet of {interface} "
            f"({owner}, netmask {owner.network.netmask})", code="PXE.1002")
    net = owner.network
    if net.prefixlen < 31 and (b == net.network_address or e == net.broadcast_address):
        raise errors.BadRequest(
            f"the DHCP range {b}-{e} includes the network or broadcast address of {net}",
            code="PXE.1002")
    if b <= owner.ip <= e:
        raise errors.BadRequest(
            f"the DHCP range {b}-{e} includes {interface}'s own address {owner.ip}",
            code="PXE.1002")
    return CheckedRange(interface, str(owner.ip), net, b, e, mask, iface.ipv6_global)


def overlaps(a_begin: str, a_end: str, b_begin: str, b_end: str) -> bool:
    ab, ae = ipaddress.IPv4Address(a_begin), ipaddress.IPv4Address(a_end)
    bb, be = ipaddress.IPv4Address(b_begin), ipaddress.IPv4Address(b_end)
    return ab <= be and bb <= ae
