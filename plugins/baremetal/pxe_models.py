"""Wire models of the PXE half: PXE servers and host configs (manual §4.3.2, §4.3.3).

Every value that ends up in dnsmasq's files, an iPXE script, a kickstart or a
preseed is validated here to a narrow character set (MACs, IPv4 addresses,
host names, bond names and modes), so the templates never need to quote
anything a caller sent.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from agent.models import CreateParams, WireModel
from agent.validation import control_chars, full_match

from .netinfo import parse_netmask

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-]?)[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{32}$|^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
BOND_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,14}$")
# The Linux bonding modes, by number and by name (kickstart and ifupdown take the names).
BOND_MODES = {"0": "balance-rr", "1": "active-backup", "2": "balance-xor", "3": "broadcast",
              "4": "802.3ad", "5": "balance-tlb", "6": "balance-alb"}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def normalize_mac(v: str) -> str:
    if not isinstance(v, str) or not full_match(MAC_RE, v.strip()):
        raise ValueError("must be a MAC address such as 52:54:00:12:34:56")
    hexdigits = re.sub(r"[:-]", "", v.strip().lower())
    mac = ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))
    if mac in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
        raise ValueError("must be a MAC address of a nic (not all zeros or broadcast)")
    return mac


def normalize_uuid(v: str) -> str:
    if not isinstance(v, str) or not full_match(UUID_RE, v):
        raise ValueError("must be a uuid (32 hex digits)")
    return v.replace("-", "").lower()


def _ipv4(v: str, what: str = "an IPv4 address") -> str:
    try:
        a = ipaddress.IPv4Address(v.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"must be {what} such as 10.0.0.1") from None
    return str(a)


def _nullish(v: Any) -> Any:
    """The manual's examples send "null" and "" for absent values."""
    if isinstance(v, str) and v.strip().lower() in ("", "null", "none"):
        return None
    return v


def _boolish(v: Any) -> Any:
    """The manual's examples send "TRUE" for booleans."""
    if isinstance(v, str):
        if v.strip().lower() in _TRUE:
            return True
        if v.strip().lower() in _FALSE:
            return False
    return v


def _dns_list(v: Any) -> list[str]:
    v = _nullish(v)
    if v is None:
        return []
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list):
        raise ValueError("must be an IPv4 address or a list (or comma-separated string) of them")
    out = [_ipv4(x, "a DNS server's IPv4 address") for x in items if str(x).strip()]
    if len(out) > 3:
        raise ValueError("at most 3 DNS servers")
    return out


# ------------------------------------------------------------------ PXE servers

class PxeServerFields(WireModel):
    @field_validator("dhcp_range_begin", "dhcp_range_end", check_fields=False)
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        return None if v is None else _ipv4(v)

    @field_validator("dhcp_range_netmask", check_fields=False)
    @classmethod
    def _mask(cls, v: str | None) -> str | None:
        return None if v is None else str(parse_netmask(v))

    @field_validator("dhcp_interface", check_fields=False)
    @classmethod
    def _iface(cls, v: str | None) -> str | None:
        if v is not None and not full_match(r"[A-Za-z0-9_.:@-]{1,15}", v):
            raise ValueError("must be a network interface name (1-15 characters)")
        return v

    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not full_match(NAME_RE, v):
            raise ValueError("must be 1-255 characters without control characters")
        return v

    @field_validator("router", check_fields=False, mode="before")
    @classmethod
    def _router(cls, v: Any) -> str | None:
        # "" (or "null"): no router; an update takes it as "remove the router".
        if v is None:
            return None
        if isinstance(v, str) and _nullish(v) is None:
            return ""
        return _ipv4(v, "the router's IPv4 address") if isinstance(v, str) else v

    @field_validator("dns_servers", check_fields=False, mode="before")
    @classmethod
    def _dns(cls, v: Any) -> list[str] | None:
        return None if v is None else _dns_list(v)


_ROUTER_DOC = ("the router (DHCP option 3) offered to installing machines, inside the range's "
               "subnet; by default none is offered")
_DNS_DOC = ("DNS servers (DHCP option 6, at most 3; a list or a comma-separated string) "
            "offered to installing machines; by default none")


class CreatePxeServer(CreateParams, PxeServerFields):
    name: str
    dhcp_interface: str
    dhcp_range_begin: str
    dhcp_range_end: str
    dhcp_range_netmask: str | None = Field(None, description="default: the interface's netmask")
    description: str | None = Field(None, max_length=2048)
    router: str | None = Field(None, description=_ROUTER_DOC)
    dns_servers: list[str] | None = Field(None, description=_DNS_DOC)


class UpdatePxeServer(PxeServerFields):
    name: str | None = None
    dhcp_interface: str | None = None
    dhcp_range_begin: str | None = None
    dhcp_range_end: str | None = None
    dhcp_range_netmask: str | None = None
    description: str | None = Field(None, max_length=2048)
    router: str | None = Field(None, description=_ROUTER_DOC + '; "" removes it')
    dns_servers: list[str] | None = Field(None, description=_DNS_DOC + "; [] removes them")


class PxeServerInventory(WireModel):
    uuid: str
    name: str
    description: str | None = None
    dhcp_interface: str
    dhcp_range_begin: str
    dhcp_range_end: str
    dhcp_range_netmask: str
    router: str | None = Field(None, description="the router offered (DHCP option 3); null: none")
    dns_servers: list[str] = Field(default_factory=list,
                                   description="the DNS servers offered (DHCP option 6)")
    dhcp_server_ip: str | None = Field(None, description="the interface's address: next-server and TFTP")
    boot_url: str | None = Field(None, description="the agent's base URL that iPXE chain-loads from")
    status: Literal["Running", "Stopped", "Error"]
    status_reason: str | None = None
    pid: int | None = None
    restarts: int = 0
    create_date: str
    last_op_date: str


class PxeServerReply(WireModel):
    inventory: PxeServerInventory


# ------------------------------------------------------------------ host configs

class L3Settings(WireModel):
    """The ip, netmask and gateway of a nic or a bonding (declared by each, in its
    own order): checked one by one, then together (check_l3)."""

    @field_validator("ip", "gateway", check_fields=False)
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else _ipv4(v)

    @field_validator("netmask", check_fields=False)
    @classmethod
    def _mask(cls, v: str | None) -> str | None:
        return None if v is None else str(parse_netmask(v))

    @model_validator(mode="after")
    def _consistent(self) -> "L3Settings":
        check_l3(self.ip, self.netmask, self.gateway, self._l3_owner())
        return self

    def _l3_owner(self) -> str:
        raise NotImplementedError


class NicCfg(L3Settings):
    mac: str
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    dns: list[str] = Field(default_factory=list, description="a list, or a comma-separated string")
    pxe: bool = False

    @model_validator(mode="before")
    @classmethod
    def _manual_quirks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: _nullish(v) for k, v in data.items()}
            if "pxe" in data:
                data["pxe"] = _boolish(data["pxe"])
            if data.get("pxe") is None:
                data.pop("pxe", None)
            if "dns" in data:
                data["dns"] = _dns_list(data["dns"])
            if data.get("dns") is None:
                data.pop("dns", None)
        return data

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return normalize_mac(v)

    def _l3_owner(self) -> str:
        return f"nic {self.mac}"


def check_l3(ip: str | None, netmask: str | None, gateway: str | None, what: str) -> None:
    if ip is None:
        if netmask is not None or gateway is not None:
            raise ValueError(f"{what}: netmask and gateway need an ip")
        return
    if netmask is None:
        raise ValueError(f"{what}: an ip needs a netmask")
    net = ipaddress.IPv4Network(f"{ip}/{netmask}", strict=False)
    addr = ipaddress.IPv4Address(ip)
    if net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
        raise ValueError(f"{what}: {ip} is the network or broadcast address of {net}")
    if gateway is not None:
        gw = ipaddress.IPv4Address(gateway)
        if gw not in net:
            raise ValueError(f"{what}: gateway {gateway} is not in {net}")
        if gw == addr:
            raise ValueError(f"{what}: gateway {gateway} is the nic's own address")


class Bonding(L3Settings):
    name: str
    mode: str = "4"
    slaves: list[str] = Field(min_length=1, description="MACs; a list or a comma-separated string")
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    dns: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _manual_quirks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: _nullish(v) for k, v in data.items()}
            if isinstance(data.get("slaves"), str):
                data["slaves"] = [s.strip() for s in data["slaves"].split(",") if s.strip()]
            if "dns" in data:
                data["dns"] = _dns_list(data["dns"])
            for k in ("dns", "mode"):
                if data.get(k) is None:
                    data.pop(k, None)
            if isinstance(data.get("mode"), int) and not isinstance(data.get("mode"), bool):
                data["mode"] = str(data["mode"])
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not full_match(BOND_NAME_RE, v):
            raise ValueError("must be an interface name such as bond0 (a letter, then up to "
                             "14 letters, digits or _)")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        v = v.strip().lower()
        if v in BOND_MODES:
            return v
        for num, name in BOND_MODES.items():
            if v == name:
                return num
        raise ValueError("must be a bonding mode: 0-6 or " + ", ".join(BOND_MODES.values()))

    @field_validator("slaves")
    @classmethod
    def _slaves(cls, v: list[str]) -> list[str]:
        macs = [normalize_mac(m) for m in v]
        if len(set(macs)) != len(macs):
            raise ValueError("a MAC is listed twice")
        return macs

    def _l3_owner(self) -> str:
        return f"bonding {self.name}"


class CreateHostCfg(CreateParams):
    chassis_uuid: str
    hostname: str | None = Field(None, description="default: node-<first 8 digits of the chassis uuid>")
    password: str | None = Field(None, min_length=1, max_length=256,
                                 description="the root password; only its SHA-512 crypt hash is kept")
    unattended: bool = True
    vnc: bool = False
    os_family: Literal["rhel", "debian"] = "rhel"
    nic_cfgs: list[NicCfg] = Field(default_factory=list, max_length=64)
    bondings: list[Bonding] = Field(default_factory=list, max_length=16)
    clone_iso: bool | None = Field(None, description="accepted and ignored (manual 2.2)")
    cfg_items: dict[str, Any] | None = Field(None, description="the manual's form: {nicCfgs, bondings}")

    @model_validator(mode="before")
    @classmethod
    def _manual_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for k in ("unattended", "vnc", "cloneIso", "clone_iso"):
            if k in data:
                data[k] = _boolish(_nullish(data[k]))
        items = data.pop("cfgItems", None)
        if items is None:
            items = data.pop("cfg_items", None)
        if items is not None:
            if not isinstance(items, dict):
                raise ValueError("cfgItems must be an object with nicCfgs and bondings")
            extra = set(items) - {"nicCfgs", "bondings"}
            if extra:
                raise ValueError(f"cfgItems: unknown key(s) {sorted(extra)}")
            for k in ("nicCfgs", "bondings"):
                if k in items:
                    if k in data:
                        raise ValueError(f"{k} given both in cfgItems and at the top level")
                    data[k] = items[k]
        if data.get("osFamily") is not None and isinstance(data["osFamily"], str):
            data["osFamily"] = data["osFamily"].strip().lower()
        return data

    @field_validator("chassis_uuid")
    @classmethod
    def _chassis(cls, v: str) -> str:
        return normalize_uuid(v)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and (not full_match(HOSTNAME_RE, v) or v.replace(".", "").isdigit()):
            raise ValueError("must be a host name: letters, digits and hyphens, dot-separated labels")
        return None if v is None else v.lower()

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        # No control characters: the password goes to `openssl passwd -stdin`, one line.
        if v is not None and control_chars(v):
            raise ValueError("must not contain control characters or line breaks")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "CreateHostCfg":
        if not self.nic_cfgs:
            raise ValueError("nicCfgs must list at least the nic the host boots from (pxe: true)")
        macs = [n.mac for n in self.nic_cfgs]
        dup = {m for m in macs if macs.count(m) > 1}
        if dup:
            raise ValueError(f"nicCfgs: MAC {sorted(dup)[0]} is listed twice")
        slaves = [m for b in self.bondings for m in b.slaves]
        dup = {m for m in slaves if slaves.count(m) > 1}
        if dup:
            raise ValueError(f"bondings: MAC {sorted(dup)[0]} is a slave of two bonds")
        names = [b.name for b in self.bondings]
        if len(set(names)) != len(names):
            raise ValueError("bondings: a bond name is used twice")
        for n in self.nic_cfgs:
            if n.mac in slaves and n.ip is not None:
                raise ValueError(f"nic {n.mac} is a bond slave and cannot have its own ip")
        ips = [x.ip for x in [*self.nic_cfgs, *self.bondings] if x.ip]
        dup = {i for i in ips if ips.count(i) > 1}
        if dup:
            raise ValueError(f"ip {sorted(dup)[0]} is given to two interfaces")
        if self.vnc and self.os_family != "rhel":
            raise ValueError("vnc is only available for osFamily rhel (Anaconda); "
                             "debian-installer has no VNC")
        return self


class NicCfgInventory(WireModel):
    uuid: str
    host_cfg_uuid: str
    mac: str
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    dns: str | None = None
    pxe: bool
    create_date: str | None = None
    last_op_date: str | None = None


class BondingInventory(WireModel):
    uuid: str
    host_cfg_uuid: str
    name: str
    mode: str
    slaves: list[str]
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    dns: str | None = None
    create_date: str | None = None
    last_op_date: str | None = None


class HostCfgInventory(WireModel):
    uuid: str
    chassis_uuid: str
    hostname: str
    os_family: str
    unattended: bool
    vnc: bool
    password_set: bool = Field(description="a root password (kept only as a SHA-512 crypt hash) is set")
    install_state: Literal["Armed", "Done"] = Field(
        description="Armed: the host's next PXE boot installs; Done: it called back, PXE boots go to disk")
    install_url: str | None = Field(None, description="the kickstart/preseed URL (secret: it embeds a token)")
    ipxe_url: str | None = Field(None, description="the host's iPXE script (secret: it embeds a token)")
    install_done_date: str | None = None
    nic_cfgs: list[NicCfgInventory]
    bondings: list[BondingInventory]
    create_date: str
    last_op_date: str


class HostCfgReply(WireModel):
    inventory: HostCfgInventory
