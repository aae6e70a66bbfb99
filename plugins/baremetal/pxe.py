"""Baremetal PXE: PXE servers (supervised dnsmasq), host configs and install files.

The PXE half of BaremetalPlugin (a mixin: Plugin provides agent, settings and
runner; ChassisRoutes provides ``chassis_exists`` and ``mark_provisioned``).

The boot of a machine being provisioned, end to end::

    firmware PXE --DHCP--> dnsmasq: undionly.kpxe (BIOS) / snponly.efi (UEFI), TFTP
    iPXE         --DHCP--> dnsmasq: boot.ipxe (TFTP), which chains
                 --HTTP--> GET /v1/baremetal/ipxe/mac/<mac>   (only from the MAC's own IP)
                           the host's script: kernel + initrd from /v1/baremetal/boot/...
    installer    --HTTP--> GET /v1/baremetal/install/<token>  kickstart or preseed
    installed    --HTTP--> POST /v1/baremetal/install/<token>/done: chassis Provisioned;
                           the token changes and the host's next PXE boot goes to disk

The host-facing URLs take no API token (installers cannot send one): the
install file and the callback carry an unguessable per-host token, and the
per-MAC script answers only the IP that MAC holds (its reservation or lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent import errors
from agent.jobs import iso
from agent.models import Empty
from agent.plugin import action, create, delete, get, query, raw
from agent.validation import full_match

from . import hostcfg as render
from . import netinfo
from .dnsmasq import FS_TIMEOUT, Dnsmasq
from .leases import LeaseWatcher, read_lease_file, write_hook
from .pxe_models import (CreateHostCfg, CreatePxeServer, HostCfgInventory, HostCfgReply,
                         PxeServerInventory, PxeServerReply, UpdatePxeServer, normalize_mac,
                         normalize_uuid)

log = logging.getLogger("node_agent.baremetal.pxe")

PXE = "/v1/baremetal/pxeserver"
PXE_ONE = PXE + "/{uuid}"
PXE_ACTIONS = PXE_ONE + "/actions"
HOSTCFG = "/v1/baremetal/hostcfg"
HOSTCFG_ONE = HOSTCFG + "/{uuid}"
RUNNING, STOPPED, ERROR = "Running", "Stopped", "Error"
ARMED, DONE = "Armed", "Done"
_URL_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/%+@=,-]*)?$")
_TOKEN_PATH_RE = re.compile(r"(/v1/baremetal/(?:install|ipxe)/)(?!mac/)[A-Za-z0-9_-]{16,}")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS bm_pxe_servers (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT,
        dhcp_interface TEXT NOT NULL,
        range_begin TEXT NOT NULL,
        range_end TEXT NOT NULL,
        netmask TEXT NOT NULL,
        server_ip TEXT,
        desired TEXT NOT NULL,              -- Running | Stopped: restored at agent start
        created REAL NOT NULL,
        updated REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS bm_hostcfg (
        uuid TEXT PRIMARY KEY,
        chassis_uuid TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,                 -- the validated config, JSON, without the password
        password_hash TEXT,                 -- SHA-512 crypt; the password itself is never stored
        token TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        armed INTEGER NOT NULL,
        install_done REAL,
        created REAL NOT NULL,
        updated REAL NOT NULL)""",
]


# Columns added after the first release: ALTER TABLE on a state dir that lacks them.
SERVER_COLUMNS = {"router": "TEXT", "dns_servers": "TEXT NOT NULL DEFAULT ''"}


def _add_server_columns(conn: sqlite3.Connection) -> None:
    have = {r[1] for r in conn.execute("PRAGMA table_info(bm_pxe_servers)")}
    for name, decl in SERVER_COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE bm_pxe_servers ADD COLUMN {name} {decl}")


def _dns_of(row: sqlite3.Row) -> list[str]:
    return [d for d in (row["dns_servers"] or "").split(",") if d]


# ------------------------------------------------------------------ settings

class PxeSettings(BaseModel):
    """The [pxe] config section."""
    model_config = ConfigDict(extra="forbid")

    dnsmasq: str = "dnsmasq"                    # the binary (PATH or absolute)
    ip: str = "ip"
    openssl: str = "openssl"
    ipxe_dir: Path = Path("/usr/lib/ipxe")      # Debian's ipxe: undionly.kpxe, snponly.efi, ipxe.efi
    boot_dir: Path | None = None                # default <state>/pxe/boot: <osFamily>/vmlinuz, initrd.img
    http_base_url: str | None = None            # default http://<dhcp interface address>:<port>
    lease_seconds: int = Field(3600, ge=120, le=30 * 86400)
    ipv6_ra: bool = False                       # router adverts: iPXE stops waiting for IPv6 at once
    serial_console: str | None = "ttyS0,115200n8"   # the installer's console (SOL); "" for none
    rhel_repo_url: str = "http://dl.rockylinux.org/pub/rocky/9/BaseOS/x86_64/os/"
    debian_mirror: str = "http://deb.debian.org/debian"
    debian_suite: str = Field("bookworm", pattern=r"^[a-z0-9-]{1,32}$")
    timezone: str = Field("Etc/UTC", pattern=r"^[A-Za-z0-9_+/-]{1,64}$")

    @field_validator("http_base_url", "rhel_repo_url", "debian_mirror")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        # Rendered into kernel command lines, kickstarts and preseeds: no quotes, spaces, ? or &.
        if v is not None and not full_match(_URL_RE, v):
            raise ValueError("must be an http:// or https:// URL of letters, digits and . - _ ~ / % + @ = ,")
        return v

    @field_validator("http_base_url")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    @field_validator("serial_console")
    @classmethod
    def _console(cls, v: str | None) -> str | None:
        if v and not full_match(r"tty[A-Za-z0-9]{1,8}(,[0-9a-z]{1,16})?", v):
            raise ValueError("must be like ttyS0,115200n8")
        return v or None


# ------------------------------------------------------------------ runtime

class _Server:
    """A started PXE server: its dnsmasq and its lease watcher."""

    def __init__(self, uuid: str, dnsmasq: Dnsmasq, watcher: LeaseWatcher) -> None:
        self.uuid = uuid
        self.dnsmasq = dnsmasq
        self.watcher = watcher


class _RedactInstallTokens(logging.Filter):
    """Keep install and iPXE tokens out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_PATH_RE.sub(r"\1<token>", a) if isinstance(a, str) else a
                                for a in record.args)
        http = getattr(record, "http", None)
        if isinstance(http, dict) and isinstance(http.get("path"), str):
            record.http = dict(http, path=_TOKEN_PATH_RE.sub(r"\1<token>", http["path"]))
        return True


def _now() -> float:
    return time.time()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def _server_uuid(uuid: str) -> str:
    try:
        return normalize_uuid(uuid)
    except ValueError:
        raise errors.NotFound(f"no such PXE server: {uuid}", code="PXE.1404") from None


# ------------------------------------------------------------------ the routes

class PxeRoutes:
    """The PXE half of BaremetalPlugin."""

    config_sections = {"pxe": PxeSettings}

    # ---- lifecycle -------------------------------------------------------------
    @property
    def pxe_conf(self) -> PxeSettings:
        return self.settings["pxe"]

    @contextlib.asynccontextmanager
    async def pxe_resources(self):
        conf = self.pxe_conf
        self._pxe_dir = self.agent.state_dir / "pxe"
        self._pxe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pxe_boot_dir = conf.boot_dir or self._pxe_dir / "boot"
        self._pxe_hostsfile = self._pxe_dir / "dhcp-hosts"
        self._pxe_lock = asyncio.Lock()
        self._pxe_servers: dict[str, _Server] = {}
        self._pxe_macs: dict[str, tuple[str, str]] = {}   # mac -> (hostcfg uuid, chassis uuid)
        await self.agent.db.migrate(SCHEMA)
        await self.agent.db.transaction(_add_server_columns)
        binary = shutil.which(conf.dnsmasq)
        self.set_capability("dnsmasq", binary is not None,
                            f"dnsmasq ('{conf.dnsmasq}') is not installed: install Debian's "
                            "dnsmasq package or set [pxe] dnsmasq")
        self._pxe_dnsmasq = binary or conf.dnsmasq
        redact = _RedactInstallTokens()
        access = logging.getLogger("node_agent.access")
        access.addFilter(redact)
        await self._pxe_write_hosts()
        if binary is not None:
            for row in await self.agent.db.fetchall(
                    "SELECT * FROM bm_pxe_servers WHERE desired=?", (RUNNING,)):
                await self._pxe_resume(row)
        try:
            yield
        finally:
            servers, self._pxe_servers = list(self._pxe_servers.values()), {}
            await asyncio.gather(*(self._pxe_halt(s) for s in servers), return_exceptions=True)
            access.removeFilter(redact)

    async def _pxe_resume(self, row: sqlite3.Row) -> None:
        """A server that was running when the agent stopped: start it, or keep trying."""
        server = self._pxe_runtime(row["uuid"])
        try:
            row = await self._pxe_refresh_ip(row)
            await self._pxe_prepare(row)
            await server.dnsmasq.start()
        except errors.ApiError as e:
            log.warning("PXE server %s could not be started: %s; retrying in the background",
                        row["uuid"], e.description)
            server.dnsmasq.adopt_failure(e.description)
        server.watcher.start()

    async def _pxe_refresh_ip(self, row: sqlite3.Row) -> sqlite3.Row:
        ifaces = await netinfo.read_addresses(self.runner, self.pxe_conf.ip)
        checked = netinfo.check_range(ifaces, row["dhcp_interface"], row["range_begin"],
                                      row["range_end"], row["netmask"])
        if checked.server_ip != row["server_ip"]:
            await self.agent.db.execute("UPDATE bm_pxe_servers SET server_ip=? WHERE uuid=?",
                                        (checked.server_ip, row["uuid"]))
            row = await self._pxe_row(row["uuid"])
        return row

    def _pxe_runtime(self, uuid: str) -> _Server:
        server = self._pxe_servers.get(uuid)
        if server is None:
            workdir = self._pxe_server_dir(uuid)
            server = _Server(uuid, Dnsmasq(uuid, self._pxe_dnsmasq, workdir, self.runner),
                             LeaseWatcher(uuid, workdir / "spool",
                                          lambda ev, u=uuid: self._pxe_lease_event(u, ev),
                                          self.runner))
            self._pxe_servers[uuid] = server
        return server

    async def _pxe_halt(self, server: _Server) -> None:
        await server.dnsmasq.stop()
        await server.watcher.stop()

    def _pxe_server_dir(self, uuid: str) -> Path:
        return self._pxe_dir / "servers" / uuid

    # ---- contract with the chassis half ------------------------------------------------
    async def pxe_arm_install(self, chassis_uuid: str) -> bool:
        """The chassis is being provisioned: its next PXE boot installs again.

        Called by ChassisRoutes.provision; False when the chassis has no host config.
        """
        n = await self.agent.db.execute(
            "UPDATE bm_hostcfg SET armed=1, updated=? WHERE chassis_uuid=?",
            (_now(), chassis_uuid.replace("-", "").lower()))
        return n > 0

    async def pxe_chassis_deleted(self, chassis_uuid: str) -> None:
        """The chassis is gone: so are its host config, reservations and install URLs.

        Meant to be called by ChassisRoutes.delete_chassis.
        """
        async with self._pxe_lock:
            n = await self.agent.db.execute("DELETE FROM bm_hostcfg WHERE chassis_uuid=?",
                                            (chassis_uuid.replace("-", "").lower(),))
            if n:
                await self._pxe_write_hosts()

    # ---- PXE server rows and files -----------------------------------------------------
    async def _pxe_row(self, uuid: str) -> sqlite3.Row:
        row = await self.agent.db.fetchone("SELECT * FROM bm_pxe_servers WHERE uuid=?",
                                           (_server_uuid(uuid),))
        if row is None:
            raise errors.NotFound(f"no such PXE server: {uuid}", code="PXE.1404")
        return row

    def _pxe_base_url(self, server_ip: str | None) -> str | None:
        if self.pxe_conf.http_base_url:
            return self.pxe_conf.http_base_url.rstrip("/")
        if not server_ip:
            return None
        s = self.agent.config.server
        return f"{'https' if s.tls_cert else 'http'}://{server_ip}:{s.port}"

    def _pxe_inventory(self, row: sqlite3.Row) -> PxeServerInventory:
        server = self._pxe_servers.get(row["uuid"])
        status, reason, pid, restarts = STOPPED, None, None, 0
        if row["desired"] == RUNNING:
            if server is not None and server.dnsmasq.running:
                status, pid = RUNNING, server.dnsmasq.pid
            else:
                status = ERROR
                reason = (server.dnsmasq.reason if server is not None else None) or "dnsmasq is not running"
        if server is not None:
            restarts = server.dnsmasq.restarts
        return PxeServerInventory(
            uuid=row["uuid"], name=row["name"], description=row["description"],
            dhcp_interface=row["dhcp_interface"], dhcp_range_begin=row["range_begin"],
            dhcp_range_end=row["range_end"], dhcp_range_netmask=row["netmask"],
            router=row["router"] or None, dns_servers=_dns_of(row),
            dhcp_server_ip=row["server_ip"], boot_url=self._pxe_base_url(row["server_ip"]),
            status=status, status_reason=reason, pid=pid, restarts=restarts,
            create_date=iso(row["created"]), last_op_date=iso(row["updated"]))

    def _pxe_boot_files(self) -> tuple[Path, Path]:
        d = self.pxe_conf.ipxe_dir
        bios = d / "undionly.kpxe"
        efi = next((p for p in (d / "snponly.efi", d / "ipxe.efi") if p.is_file()), None)
        if not bios.is_file() or efi is None:
            raise errors.Unavailable(
                f"the iPXE boot files are missing from {d} (undionly.kpxe and snponly.efi or "
                "ipxe.efi): install Debian's ipxe package or set [pxe] ipxe_dir", code="PXE.1008")
        return bios, efi

    async def _pxe_prepare(self, row: sqlite3.Row) -> None:
        """Write the server's dnsmasq.conf, TFTP root and lease hook."""
        bios, efi = self._pxe_boot_files()
        conf = self.pxe_conf
        base = self._pxe_base_url(row["server_ip"])
        workdir = self._pxe_server_dir(row["uuid"])
        ipv6_ra = False
        if conf.ipv6_ra:
            ifaces = await netinfo.read_addresses(self.runner, conf.ip)
            iface = ifaces.get(row["dhcp_interface"])
            ipv6_ra = bool(iface and iface.ipv6_global)
            if not ipv6_ra:
                log.info("PXE server %s: [pxe] ipv6_ra is on but %s has no global IPv6 address; "
                         "no router adverts", row["uuid"], row["dhcp_interface"])
        text = render.render(
            "dnsmasq.conf.j2", uuid=row["uuid"], interface=row["dhcp_interface"],
            begin=row["range_begin"], end=row["range_end"], netmask=row["netmask"],
            lease_seconds=conf.lease_seconds, dir=str(workdir), hostsfile=str(self._pxe_hostsfile),
            server_ip=row["server_ip"], bios_file=bios.name, efi_file=efi.name, ipv6_ra=ipv6_ra,
            router=row["router"] or None, dns_servers=_dns_of(row))
        boot = render.render("boot.ipxe.j2", uuid=row["uuid"], base=base)

        def _write() -> None:
            tftp = workdir / "tftp"
            tftp.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(workdir, 0o700)
            for src in (bios, efi):
                shutil.copyfile(src, tftp / (src.name + ".tmp"))
                os.chmod(tftp / (src.name + ".tmp"), 0o644)   # dnsmasq as root serves world-readable files only
                os.replace(tftp / (src.name + ".tmp"), tftp / src.name)
            _atomic_write(tftp / "boot.ipxe", boot, 0o644)
            _atomic_write(workdir / "dnsmasq.conf", text, 0o600)
            write_hook(workdir / "lease-hook", workdir / "spool", row["uuid"])
        await self.runner.call(_write, timeout=FS_TIMEOUT)

    async def _pxe_check(self, *, name: str, interface: str, begin: str, end: str,
                         netmask: str | None, router: str | None = None,
                         exclude: str | None = None, **_: Any) -> netinfo.CheckedRange:
        """Every 4xx a PXE server's fields can earn; nothing is changed."""
        ifaces = await netinfo.read_addresses(self.runner, self.pxe_conf.ip)
        checked = netinfo.check_range(ifaces, interface, begin, end, netmask)
        if router:
            r = ipaddress.IPv4Address(router)
            if (r not in checked.network or r in (checked.network.network_address,
                                                  checked.network.broadcast_address)
                    or checked.begin <= r <= checked.end):
                raise errors.BadRequest(
                    f"router {router} must be a host of the range's subnet {checked.network}, "
                    f"outside the DHCP range", code="PXE.1010")
        for other in await self.agent.db.fetchall("SELECT * FROM bm_pxe_servers"):
            if other["uuid"] == exclude:
                continue
            if netinfo.overlaps(begin, end, other["range_begin"], other["range_end"]):
                raise errors.Conflict(
                    f"the DHCP range {begin}-{end} overlaps {other['range_begin']}-"
                    f"{other['range_end']} of PXE server {other['uuid']} ({other['name']})",
                    code="PXE.1004")
            if other["dhcp_interface"] == interface:
                raise errors.Conflict(
                    f"{interface} already serves PXE server {other['uuid']} ({other['name']}): "
                    "one PXE server per interface", code="PXE.1005")
        s = self.agent.config.server
        if not self.pxe_conf.http_base_url and s.host not in ("0.0.0.0", "::", "", checked.server_ip):
            raise errors.BadRequest(
                f"machines on {interface} could not reach the agent: it listens on {s.host} only. "
                f"Set [server] host = \"0.0.0.0\" (or \"{checked.server_ip}\"), or [pxe] "
                "http_base_url to the URL they can reach it at", code="PXE.1006")
        self._pxe_boot_files()
        return checked

    async def _pxe_start(self, row: sqlite3.Row) -> None:
        server = self._pxe_runtime(row["uuid"])
        await self._pxe_prepare(row)
        await server.dnsmasq.start()
        server.watcher.start()

    async def _pxe_stop(self, uuid: str) -> None:
        server = self._pxe_servers.pop(uuid, None)
        if server is not None:
            await self._pxe_halt(server)

    # ---- PXE server routes ---------------------------------------------------------------
    @query(PXE, model=PxeServerInventory)
    async def pxe_list_servers(self) -> list[PxeServerInventory]:
        """The PXE servers (QueryBaremetalPxeServer)."""
        rows = await self.agent.db.fetchall("SELECT * FROM bm_pxe_servers ORDER BY created")
        return [self._pxe_inventory(r) for r in rows]

    @get(PXE_ONE, result=PxeServerReply)
    async def pxe_get_server(self, uuid: str) -> PxeServerReply:
        return PxeServerReply(inventory=self._pxe_inventory(await self._pxe_row(uuid)))

    @create(PXE, params=CreatePxeServer, result=PxeServerReply, requires="dnsmasq")
    async def pxe_create_server(self, job, params: CreatePxeServer) -> PxeServerReply:
        """Create a PXE server and start it (CreateBaremetalPxeServer); a failed start keeps nothing."""
        async with self._pxe_lock:
            checked = await self._pxe_check(name=params.name, interface=params.dhcp_interface,
                                            begin=params.dhcp_range_begin, end=params.dhcp_range_end,
                                            netmask=params.dhcp_range_netmask, router=params.router)
            uuid = params.resource_uuid
            now = _now()
            await self.agent.db.execute(
                "INSERT INTO bm_pxe_servers(uuid, name, description, dhcp_interface, range_begin, "
                "range_end, netmask, server_ip, desired, created, updated, router, dns_servers) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (uuid, params.name, params.description, params.dhcp_interface, str(checked.begin),
                 str(checked.end), str(checked.netmask), checked.server_ip, RUNNING, now, now,
                 params.router or None, ",".join(params.dns_servers or [])))
            job.progress(50, "starting dnsmasq")
            try:
                await self._pxe_start(await self._pxe_row(uuid))
            except BaseException:
                await self._pxe_stop(uuid)
                await self.agent.db.execute("DELETE FROM bm_pxe_servers WHERE uuid=?", (uuid,))
                await self.runner.call(shutil.rmtree, self._pxe_server_dir(uuid), True, timeout=FS_TIMEOUT)
                raise
            return PxeServerReply(inventory=self._pxe_inventory(await self._pxe_row(uuid)))

    @pxe_create_server.exists
    async def _pxe_uuid_used(self, uuid: str) -> bool:
        return await self.agent.db.fetchone("SELECT 1 FROM bm_pxe_servers WHERE uuid=?",
                                            (uuid,)) is not None

    @pxe_create_server.check
    async def _pxe_create_check(self, params: CreatePxeServer) -> None:
        await self._pxe_check(name=params.name, interface=params.dhcp_interface,
                              begin=params.dhcp_range_begin, end=params.dhcp_range_end,
                              netmask=params.dhcp_range_netmask, router=params.router)

    @action(PXE_ACTIONS, "startBaremetalPxeServer", params=Empty, result=PxeServerReply,
            requires="dnsmasq")
    async def pxe_start_server(self, job, params: Empty, uuid: str) -> PxeServerReply:
        """Start the server's dnsmasq; it is started again at every agent start until stopped."""
        async with self._pxe_lock:
            row = await self._pxe_row(uuid)
            server = self._pxe_servers.get(row["uuid"])
            if not (server is not None and server.dnsmasq.running):
                if server is not None:       # in Error, retrying: start over cleanly
                    await self._pxe_stop(row["uuid"])
                row = await self._pxe_refresh_ip(row)
                try:
                    await self._pxe_start(row)
                except BaseException:
                    await self._pxe_stop(row["uuid"])
                    raise
            await self.agent.db.execute("UPDATE bm_pxe_servers SET desired=?, updated=? WHERE uuid=?",
                                        (RUNNING, _now(), row["uuid"]))
            return PxeServerReply(inventory=self._pxe_inventory(await self._pxe_row(uuid)))

    @pxe_start_server.check
    async def _pxe_start_check(self, params: Empty, uuid: str) -> None:
        row = await self._pxe_row(uuid)
        await self._pxe_check(name=row["name"], interface=row["dhcp_interface"],
                              begin=row["range_begin"], end=row["range_end"],
                              netmask=row["netmask"], router=row["router"], exclude=row["uuid"])

    @action(PXE_ACTIONS, "stopBaremetalPxeServer", params=Empty, result=PxeServerReply)
    async def pxe_stop_server(self, job, params: Empty, uuid: str) -> PxeServerReply:
        """Stop the server's dnsmasq (leases are kept for its next start)."""
        async with self._pxe_lock:
            row = await self._pxe_row(uuid)
            await self.agent.db.execute("UPDATE bm_pxe_servers SET desired=?, updated=? WHERE uuid=?",
                                        (STOPPED, _now(), row["uuid"]))
            await self._pxe_stop(row["uuid"])
            return PxeServerReply(inventory=self._pxe_inventory(await self._pxe_row(uuid)))

    @pxe_stop_server.check
    async def _pxe_stop_check(self, params: Empty, uuid: str) -> None:
        await self._pxe_row(uuid)

    @action(PXE_ACTIONS, "updateBaremetalPxeServer", params=UpdatePxeServer, result=PxeServerReply)
    async def pxe_update_server(self, job, params: UpdatePxeServer, uuid: str) -> PxeServerReply:
        """Change name, interface or range; a running server restarts with them (or keeps the old ones)."""
        async with self._pxe_lock:
            old = await self._pxe_row(uuid)
            new = self._pxe_merge(old, params)
            checked = await self._pxe_check(**new, exclude=old["uuid"])
            await self.agent.db.execute(
                "UPDATE bm_pxe_servers SET name=?, description=?, dhcp_interface=?, range_begin=?, "
                "range_end=?, netmask=?, server_ip=?, router=?, dns_servers=?, updated=? WHERE uuid=?",
                (new["name"], params.description if params.description is not None else old["description"],
                 new["interface"], str(checked.begin), str(checked.end), str(checked.netmask),
                 checked.server_ip, new["router"], new["dns_servers"], _now(), old["uuid"]))
            if old["desired"] == RUNNING:
                job.progress(50, "restarting dnsmasq with the new settings")
                await self._pxe_stop(old["uuid"])
                try:
                    await self._pxe_start(await self._pxe_row(uuid))
                except errors.ApiError as e:
                    await self._pxe_stop(old["uuid"])
                    await self.agent.db.execute(
                        "UPDATE bm_pxe_servers SET name=?, description=?, dhcp_interface=?, "
                        "range_begin=?, range_end=?, netmask=?, server_ip=?, router=?, dns_servers=?, "
                        "updated=? WHERE uuid=?",
                        (old["name"], old["description"], old["dhcp_interface"], old["range_begin"],
                         old["range_end"], old["netmask"], old["server_ip"], old["router"],
                         old["dns_servers"], old["updated"], old["uuid"]))
                    with contextlib.suppress(errors.ApiError):
                        await self._pxe_start(await self._pxe_row(uuid))
                    raise errors.OperationFailed(
                        f"the new settings were not applied, the old ones are back: {e.description}",
                        code=e.code) from None
            return PxeServerReply(inventory=self._pxe_inventory(await self._pxe_row(uuid)))

    @staticmethod
    def _pxe_merge(old: sqlite3.Row, params: UpdatePxeServer) -> dict[str, Any]:
        iface_changed = params.dhcp_interface not in (None, old["dhcp_interface"])
        return {"name": params.name if params.name is not None else old["name"],
                "interface": params.dhcp_interface or old["dhcp_interface"],
                "begin": params.dhcp_range_begin or old["range_begin"],
                "end": params.dhcp_range_end or old["range_end"],
                # a new interface brings its own netmask unless one is given
                "netmask": params.dhcp_range_netmask or (None if iface_changed else old["netmask"]),
                # None: unchanged; "" / []: removed
                "router": (old["router"] if params.router is None else params.router) or None,
                "dns_servers": (old["dns_servers"] if params.dns_servers is None
                                else ",".join(params.dns_servers))}

    @pxe_update_server.check
    async def _pxe_update_check(self, params: UpdatePxeServer, uuid: str) -> None:
        old = await self._pxe_row(uuid)
        await self._pxe_check(**self._pxe_merge(old, params), exclude=old["uuid"])

    @delete(PXE_ONE)
    async def pxe_delete_server(self, job, params: None, uuid: str) -> dict[str, Any]:
        """Stop and delete a PXE server with its files (DeleteBaremetalPxeServer)."""
        async with self._pxe_lock:
            row = await self._pxe_row(uuid)
            await self._pxe_stop(row["uuid"])
            await self.agent.db.execute("DELETE FROM bm_pxe_servers WHERE uuid=?", (row["uuid"],))
            await self.runner.call(shutil.rmtree, self._pxe_server_dir(row["uuid"]), True,
                                  timeout=FS_TIMEOUT)
            return {}

    @pxe_delete_server.check
    async def _pxe_delete_check(self, params: None, uuid: str) -> None:
        await self._pxe_row(uuid)

    # ---- leases ------------------------------------------------------------------------------
    async def _pxe_lease_event(self, server_uuid: str, ev: dict[str, Any]) -> None:
        hc = self._pxe_macs.get(ev["mac"])
        data = {"pxeServerUuid": server_uuid, **ev,
                "hostCfgUuid": hc[0] if hc else None, "chassisUuid": hc[1] if hc else None}
        await self.agent.events.publish("PxeDhcpLease", data)

    # ---- host configs: rows, reservations -------------------------------------------------------
    async def _pxe_write_hosts(self) -> None:
        """dnsmasq's dhcp-hostsfile from every host config, then SIGHUP the running servers."""
        rows = await self.agent.db.fetchall("SELECT uuid, chassis_uuid, spec FROM bm_hostcfg ORDER BY created")
        lines, macs = ["# node-agent: MAC reservations of the host configs; generated, do not edit"], {}
        for r in rows:
            spec = json.loads(r["spec"])
            short = spec["hostname"].split(".")[0]
            pxe = {n["mac"] for n in _pxe_nics(spec)}
            for n in spec["nicCfgs"]:
                macs[n["mac"]] = (r["uuid"], r["chassis_uuid"])
                fields = [n["mac"]] + ([n["ip"]] if n.get("ip") else []) + ([short] if n["mac"] in pxe else [])
                if len(fields) > 1:
                    lines.append(",".join(fields))
            for b in spec["bondings"]:
                for m in b["slaves"]:
                    macs.setdefault(m, (r["uuid"], r["chassis_uuid"]))
        await self.runner.call(_atomic_write, self._pxe_hostsfile, "\n".join(lines) + "\n", 0o600,
                               timeout=FS_TIMEOUT)
        self._pxe_macs = macs
        for server in self._pxe_servers.values():
            server.dnsmasq.reload()

    async def _pxe_hostcfg_row(self, uuid: str) -> sqlite3.Row:
        try:
            u = normalize_uuid(uuid)
        except ValueError:
            u = None
        row = u and await self.agent.db.fetchone("SELECT * FROM bm_hostcfg WHERE uuid=?", (u,))
        if not row:
            raise errors.NotFound(f"no such host config: {uuid}", code="BM.2404")
        return row

    def _hostcfg_base(self, spec: dict[str, Any], servers: list[sqlite3.Row]) -> str | None:
        """The URL the host reaches the agent at: through the PXE server of its subnet."""
        if self.pxe_conf.http_base_url:
            return self.pxe_conf.http_base_url.rstrip("/")
        for nic in _pxe_nics(spec):
            for s in servers:
                if nic.get("ip") and s["server_ip"] and ipaddress.IPv4Address(nic["ip"]) in \
                        ipaddress.IPv4Network(f"{s['server_ip']}/{s['netmask']}", strict=False):
                    return self._pxe_base_url(s["server_ip"])
        return self._pxe_base_url(servers[0]["server_ip"]) if len(servers) == 1 else None

    def _hostcfg_inventory(self, row: sqlite3.Row, servers: list[sqlite3.Row]) -> HostCfgInventory:
        spec = json.loads(row["spec"])
        base = self._hostcfg_base(spec, servers)
        u = row["uuid"]
        created, updated = iso(row["created"]), iso(row["updated"])

        def dns(x: dict[str, Any]) -> str | None:
            return ",".join(x.get("dns") or []) or None
        return HostCfgInventory(
            uuid=u, chassis_uuid=row["chassis_uuid"], hostname=spec["hostname"],
            os_family=spec["osFamily"], unattended=spec["unattended"], vnc=spec["vnc"],
            password_set=row["password_hash"] is not None,
            install_state=ARMED if row["armed"] else DONE,
            install_url=f"{base}/v1/baremetal/install/{row['token']}" if base else None,
            ipxe_url=f"{base}/v1/baremetal/ipxe/{row['token']}" if base else None,
            install_done_date=iso(row["install_done"]),
            nic_cfgs=[dict(n, hostCfgUuid=u, dns=dns(n), createDate=created, lastOpDate=updated)
                      for n in spec["nicCfgs"]],
            bondings=[dict(b, hostCfgUuid=u, dns=dns(b), createDate=created, lastOpDate=updated)
                      for b in spec["bondings"]],
            create_date=created, last_op_date=updated)

    async def _hostcfg_conflicts(self, params: CreateHostCfg) -> None:
        """409s: one host config per chassis, a MAC or an IP in one host config only."""
        mine_macs = {n.mac for n in params.nic_cfgs} | {m for b in params.bondings for m in b.slaves}
        mine_ips = {x.ip for x in [*params.nic_cfgs, *params.bondings] if x.ip}
        for r in await self.agent.db.fetchall("SELECT uuid, chassis_uuid, spec FROM bm_hostcfg"):
            if r["uuid"] == params.resource_uuid:
                raise errors.Conflict(f"host config {r['uuid']} exists already", code="BM.2002")
            if r["chassis_uuid"] == params.chassis_uuid:
                raise errors.Conflict(
                    f"chassis {params.chassis_uuid} already has host config {r['uuid']}: delete it "
                    "first to replace it", code="BM.2002")
            spec = json.loads(r["spec"])
            theirs = {n["mac"] for n in spec["nicCfgs"]} | {m for b in spec["bondings"] for m in b["slaves"]}
            if mine_macs & theirs:
                raise errors.Conflict(f"MAC {sorted(mine_macs & theirs)[0]} belongs to host config "
                                      f"{r['uuid']} already", code="BM.2003")
            ips = {x["ip"] for x in [*spec["nicCfgs"], *spec["bondings"]] if x.get("ip")}
            if mine_ips & ips:
                raise errors.Conflict(f"IP {sorted(mine_ips & ips)[0]} is reserved by host config "
                                      f"{r['uuid']} already", code="BM.2004")

    # ---- host config routes ------------------------------------------------------------------------
    @query(HOSTCFG, model=HostCfgInventory)
    async def hostcfg_list(self) -> list[HostCfgInventory]:
        """The host configs (QueryBaremetalHostCfg); passwords are never returned."""
        rows = await self.agent.db.fetchall("SELECT * FROM bm_hostcfg ORDER BY created")
        servers = await self.agent.db.fetchall("SELECT * FROM bm_pxe_servers ORDER BY created")
        return [self._hostcfg_inventory(r, servers) for r in rows]

    @get(HOSTCFG_ONE, result=HostCfgReply)
    async def hostcfg_get(self, uuid: str) -> HostCfgReply:
        servers = await self.agent.db.fetchall("SELECT * FROM bm_pxe_servers ORDER BY created")
        return HostCfgReply(inventory=self._hostcfg_inventory(await self._pxe_hostcfg_row(uuid), servers))

    @create(HOSTCFG, params=CreateHostCfg, result=HostCfgReply)
    async def hostcfg_create(self, job, params: CreateHostCfg) -> HostCfgReply:
        """Create a host config (CreateBaremetalHostCfg): reservations, install file, iPXE script."""
        password_hash = None
        if params.password is not None:
            job.progress(20, "hashing the root password")
            password_hash = await render.hash_password(self.runner, params.password, self.pxe_conf.openssl)
        spec = params.model_dump(mode="json", by_alias=True,
                                 exclude={"password", "clone_iso", "resource_uuid", "cfg_items"})
        spec["hostname"] = params.hostname or f"node-{params.chassis_uuid[:8]}"
        for n in spec["nicCfgs"]:
            n["uuid"] = uuidlib.uuid4().hex
        for b in spec["bondings"]:
            b["uuid"] = uuidlib.uuid4().hex
        uuid = params.resource_uuid
        token = secrets.token_urlsafe(32)
        async with self._pxe_lock:
            await self._hostcfg_conflicts(params)
            now = _now()
            await self.agent.db.execute(
                "INSERT INTO bm_hostcfg(uuid, chassis_uuid, spec, password_hash, token, token_sha256, "
                "armed, install_done, created, updated) VALUES (?,?,?,?,?,?,1,NULL,?,?)",
                (uuid, params.chassis_uuid, json.dumps(spec), password_hash, token, _sha(token), now, now))
            await self._pxe_write_hosts()
        log.info("host config %s for chassis %s created (%s, %d nics, %d bonds)", uuid,
                 params.chassis_uuid, spec["osFamily"], len(spec["nicCfgs"]), len(spec["bondings"]))
        return await self.hostcfg_get(uuid)

    @hostcfg_create.exists
    async def _hostcfg_uuid_used(self, uuid: str) -> bool:
        return await self.agent.db.fetchone("SELECT 1 FROM bm_hostcfg WHERE uuid=?",
                                            (uuid,)) is not None

    @hostcfg_create.check
    async def _hostcfg_create_check(self, params: CreateHostCfg) -> None:
        if not await self.chassis_exists(params.chassis_uuid):
            raise errors.BadRequest(
                f"chassisUuid {params.chassis_uuid} names no chassis on this node: create it first "
                "(POST /v1/baremetal/chassis)", code="BM.2001")
        await self._hostcfg_conflicts(params)

    @delete(HOSTCFG_ONE)
    async def hostcfg_delete(self, job, params: None, uuid: str) -> dict[str, Any]:
        """Delete a host config (DeleteBaremetalHostCfg): its reservations and URLs go with it."""
        async with self._pxe_lock:
            row = await self._pxe_hostcfg_row(uuid)
            await self.agent.db.execute("DELETE FROM bm_hostcfg WHERE uuid=?", (row["uuid"],))
            await self._pxe_write_hosts()
            return {}

    @hostcfg_delete.check
    async def _hostcfg_delete_check(self, params: None, uuid: str) -> None:
        await self._pxe_hostcfg_row(uuid)

    # ---- what installing machines fetch (no API token) ----------------------------------------------
    async def _pxe_by_token(self, token: str) -> sqlite3.Row | None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", token):
            return None
        row = await self.agent.db.fetchone("SELECT * FROM bm_hostcfg WHERE token_sha256=?", (_sha(token),))
        if row is None or not hmac.compare_digest(row["token"].encode(), token.encode()):
            return None
        return row

    def _pxe_request_base(self, request: web.Request) -> str:
        if self.pxe_conf.http_base_url:
            return self.pxe_conf.http_base_url.rstrip("/")
        return str(request.url.origin())

    def _pxe_values(self, row: sqlite3.Row, base: str) -> dict[str, Any]:
        return render.template_values(json.loads(row["spec"]), uuid=row["uuid"],
                                      password_hash=row["password_hash"], base=base,
                                      token=row["token"], conf=self.pxe_conf)

    def _pxe_host_script(self, row: sqlite3.Row, base: str) -> str:
        if not row["armed"]:
            return render.render_exit_ipxe(
                f"the install of {json.loads(row['spec'])['hostname']} is done "
                "(provision the chassis again to reinstall)")
        return render.render_host_ipxe(self._pxe_values(row, base), self.pxe_conf.serial_console)

    @raw("GET", "/v1/baremetal/install/{token}", auth=False)
    async def pxe_install_file(self, request: web.Request) -> web.Response:
        """The host's kickstart (RHEL family) or preseed (Debian family); the token is the secret."""
        row = await self._pxe_by_token(request.match_info["token"])
        if row is None:
            raise errors.NotFound("no such install file (a wrong or spent token)", code="BM.2010")
        return _text(render.render_install_file(self._pxe_values(row, self._pxe_request_base(request))))

    @raw("POST", "/v1/baremetal/install/{token}/done", auth=False)
    async def pxe_install_done(self, request: web.Request) -> web.Response:
        """The installed host's callback: the chassis is Provisioned; the token is spent."""
        row = await self._pxe_by_token(request.match_info["token"])
        if row is None:
            raise errors.NotFound("no such install (a wrong or spent token)", code="BM.2010")
        try:
            await self.mark_provisioned(row["chassis_uuid"])
        except errors.ApiError as e:
            log.warning("install of host config %s finished, but chassis %s could not be marked "
                        "Provisioned: %s", row["uuid"], row["chassis_uuid"], e.description)
            return web.json_response(e.body(), status=e.status)
        new = secrets.token_urlsafe(32)
        now = _now()
        await self.agent.db.execute(
            "UPDATE bm_hostcfg SET token=?, token_sha256=?, armed=0, install_done=?, updated=? "
            "WHERE uuid=?", (new, _sha(new), now, now, row["uuid"]))
        log.info("host config %s: the installed host called back; chassis %s is Provisioned",
                 row["uuid"], row["chassis_uuid"])
        return web.json_response({"chassisUuid": row["chassis_uuid"], "status": "Provisioned"})

    @raw("GET", "/v1/baremetal/ipxe/{token}", auth=False)
    async def pxe_ipxe_by_token(self, request: web.Request) -> web.Response:
        """The host's iPXE script by its token."""
        row = await self._pxe_by_token(request.match_info["token"])
        if row is None:
            raise errors.NotFound("no such boot script (a wrong or spent token)", code="BM.2010")
        return _text(self._pxe_host_script(row, self._pxe_request_base(request)))

    @raw("GET", "/v1/baremetal/ipxe/mac/{mac}", auth=False)
    async def pxe_ipxe_by_mac(self, request: web.Request) -> web.Response:
        """What boot.ipxe chains to: the host's script, answered only to the IP its MAC holds."""
        not_found = errors.NotFound("no boot script for this machine", code="BM.2011")
        try:
            mac = normalize_mac(request.match_info["mac"])
        except ValueError:
            raise not_found from None
        hc = self._pxe_macs.get(mac)
        row = hc and await self.agent.db.fetchone("SELECT * FROM bm_hostcfg WHERE uuid=?", (hc[0],))
        if not row:
            raise not_found
        if request.remote not in await self._pxe_ips_of(mac, json.loads(row["spec"])):
            log.warning("iPXE script of %s asked for from %s, which is not that MAC's address: refused",
                        mac, request.remote)
            raise not_found
        return _text(self._pxe_host_script(row, self._pxe_request_base(request)))

    async def _pxe_ips_of(self, mac: str, spec: dict[str, Any]) -> set[str]:
        ips = {n["ip"] for n in spec["nicCfgs"] if n["mac"] == mac and n.get("ip")}
        files = [s.dnsmasq.dir / "dnsmasq.leases" for s in self._pxe_servers.values()]

        def _read() -> set[str]:
            return {ip for f in files if (ip := read_lease_file(f).get(mac))}
        return ips | await self.runner.call(_read, timeout=FS_TIMEOUT)

    @raw("GET", "/v1/baremetal/boot/{family}/{name}", auth=False)
    async def pxe_boot_file(self, request: web.Request) -> web.StreamResponse:
        """The installer's kernel and initrd: <boot_dir>/<osFamily>/vmlinuz and initrd.img."""
        family, name = request.match_info["family"], request.match_info["name"]
        if family not in ("rhel", "debian") or name not in ("vmlinuz", "initrd.img"):
            raise errors.NotFound(f"no such boot file: {family}/{name} (rhel or debian, "
                                  "vmlinuz or initrd.img)", code="BM.2012")
        path = self._pxe_boot_dir / family / name
        if not await self.runner.call(path.is_file, timeout=FS_TIMEOUT):
            log.warning("the installer's %s for %s is missing: put it at %s", name, family, path)
            # Public route: the body names no server path (the log does, for the operator).
            raise errors.NotFound(f"the agent has no {family} {name} (the operator puts it in "
                                  "the [pxe] boot directory; the agent's log names the path)",
                                  code="BM.2012")
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})


def _pxe_nics(spec: dict[str, Any]) -> list[dict[str, Any]]:
    flagged = [n for n in spec["nicCfgs"] if n.get("pxe")]
    return flagged or spec["nicCfgs"][:1]


def _atomic_write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


__all__ = ["PxeRoutes", "PxeSettings"]
