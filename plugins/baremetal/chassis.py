"""Baremetal chassis: IPMI registration, power, provisioning, hardware info, SOL console.

A chassis is a BMC the agent talks IPMI over LAN to (pyghmi, see ipmi.py).
Registration proves the credentials against the BMC before anything is
stored; the password is kept encrypted (crypto.py) and never returned,
logged or put in argv.  One session per BMC is reused; see ipmi.BmcSession
for the serialization, timeouts and retries.

The PXE half (pxe.py) relies on two methods of this class:
``chassis_exists(uuid)`` and ``mark_provisioned(uuid)`` (the installed
host's callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import socket
import sqlite3
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Literal

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent import errors
from agent.jobs import iso
from agent.models import CreateParams, Empty, WireModel
from agent.plugin import action, create, delete, get, query, raw
from agent.validation import full_match

from . import ipmi
from .console import ConsoleGrants, SolBridge
from .crypto import SecretBox

log = logging.getLogger("node_agent.baremetal")

UNPROVISIONED, PROVISIONING, PROVISIONED = "Unprovisioned", "Provisioning", "Provisioned"
HW_BMC, HW_INSPECTION = "bmc", "inspection"
CHASSIS = "/v1/baremetal/chassis/{uuid}"
CHASSIS_ACTIONS = "/v1/baremetal/chassis/{uuid}/actions"
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_UUID_RE = re.compile(r"^[0-9a-f]{32}$")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS bm_chassis (
        uuid TEXT PRIMARY KEY,
        name TEXT,
        ipmi_address TEXT NOT NULL,
        ipmi_port INTEGER NOT NULL,
        ipmi_username TEXT NOT NULL,
        ipmi_password TEXT NOT NULL,          -- Fernet token, see crypto.py
        status TEXT NOT NULL,
        inspection_token TEXT NOT NULL,       -- Fernet token of the in-band inspection token
        inspection_token_hash TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (ipmi_address, ipmi_port))""",
    """CREATE TABLE IF NOT EXISTS bm_hwinfo (
        uuid TEXT PRIMARY KEY,
        chassis_uuid TEXT NOT NULL,
        type TEXT NOT NULL,
        content TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (chassis_uuid, type))""",
]


# ---------------------------------------------------------------- settings

class BaremetalSettings(BaseModel):
    """The [baremetal] config section (chassis half)."""
    model_config = ConfigDict(extra="forbid")

    key_file: Path | None = None                 # default: <state dir>/baremetal.key
    # One whole BMC call: its wait for the BMC's turn, logins, attempts and retry pauses.
    call_timeout_seconds: float = Field(8.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    retry_backoff_seconds: float = Field(0.5, ge=0, le=60)
    min_interval_seconds: float = Field(0.1, ge=0, le=10)
    session_idle_seconds: float = Field(300.0, ge=0)   # 0: keep sessions for ever
    ipmi_threads: int = Field(64, ge=1, le=1024)
    max_waiting_calls: int = Field(32, ge=1, le=10000)   # per BMC; more are refused at once
    probe_interval_seconds: float = Field(5.0, gt=0, le=3600)   # a BMC found down is tried
    allow_sha1: bool = True                      # fall back to RAKP-HMAC-SHA1
    console_token_seconds: float = Field(60.0, gt=0, le=3600)
    inspection_max_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    advertise_url: str | None = None             # how hosts and clients reach this agent

    @field_validator("advertise_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not full_match(r"https?://[^/\s]+", v.rstrip("/")):
            raise ValueError("must be http(s)://host[:port] without a path")
        return v.rstrip("/") if v else v


# ---------------------------------------------------------------- wire models

def _normalize_address(v: str) -> str:
    v = v.strip()
    try:
        return str(ipaddress.ip_address(v.strip("[]")))
    except ValueError:
        pass
    if not full_match(_HOSTNAME_RE, v) or v.replace(".", "").isdigit():
        raise ValueError("must be an IPv4 or IPv6 address or a host name")
    return v.lower().rstrip(".")


def _normalize_port(v: int | str) -> int:
    if isinstance(v, str):
        if not v.strip().isdigit():
            raise ValueError("must be a port number (1-65535)")
        v = int(v.strip())
    if isinstance(v, bool) or not 1 <= v <= 65535:
        raise ValueError("must be a port number (1-65535)")
    return v


class _Creds(WireModel):
    @field_validator("ipmi_address", check_fields=False)
    @classmethod
    def _addr(cls, v):
        return None if v is None else _normalize_address(v)

    @field_validator("ipmi_port", check_fields=False)
    @classmethod
    def _port(cls, v):
        return None if v is None else _normalize_port(v)


class CreateChassis(CreateParams, _Creds):
    ipmi_address: str = Field(max_length=255, description="the BMC's IP address or host name")
    ipmi_port: int | str = Field(623, description="the BMC's UDP port (a number or a numeric string)")
    ipmi_username: str = Field(min_length=1, max_length=16)
    ipmi_password: str = Field(min_length=1, max_length=20, repr=False,
                               description="never returned or logged; stored encrypted")
    name: str | None = Field(None, max_length=255)


class UpdateChassis(_Creds):
    name: str | None = Field(None, max_length=255)
    ipmi_address: str | None = Field(None, max_length=255)
    ipmi_port: int | str | None = None
    ipmi_username: str | None = Field(None, min_length=1, max_length=16)
    ipmi_password: str | None = Field(None, min_length=1, max_length=20, repr=False)
    status: Literal["Unprovisioned", "Provisioning", "Provisioned"] | None = None


class PowerOff(WireModel):
    method: Literal["soft", "hard"] = Field("hard", description="soft: ACPI shutdown request; "
                                                                "hard: cut the power")
    wait_seconds: int = Field(0, ge=0, le=3600, description="soft only: wait up to this long "
                                                            "for the host to be off")


class ChassisInventory(WireModel):
    uuid: str
    name: str | None = None
    ipmi_address: str
    ipmi_port: str
    ipmi_username: str
    status: str = Field(description="Unprovisioned, Provisioning or Provisioned")
    inspection_url: str | None = Field(description="where an installer or ramdisk POSTs in-band "
                                            "hardware data (no Authorization: the URL is the "
                                            "secret; each use replaces it with a new one); "
                                            "null when the key file was lost (see "
                                            "updateBaremetalChassis)")
    create_date: str
    last_op_date: str


class ChassisReply(WireModel):
    inventory: ChassisInventory


class PowerStatus(WireModel):
    status: Literal["on", "off"]


class HardwareInfoInventory(WireModel):
    uuid: str
    chassis_uuid: str
    type: str = Field(description="bmc (FRU inventory and sensors read over IPMI) or "
                                  "inspection (posted in-band by the host)")
    content: str = Field(description="the data, as JSON text")
    create_date: str
    last_op_date: str


class HardwareInfoReply(WireModel):
    inventory: HardwareInfoInventory


class ConsoleRequest(WireModel):
    chassis_uuid: str = Field(pattern=r"^[0-9a-fA-F]{32}$")


class ConsoleInventory(WireModel):
    uuid: str
    chassis_uuid: str
    token: str = Field(description="one use; expires at expireDate")
    url: str = Field(description="the websocket to open (GET, no Authorization header)")
    expire_date: str


class ConsoleReply(WireModel):
    inventory: ConsoleInventory


def _chassis_uuid(uuid: str) -> str:
    u = uuid.replace("-", "").lower()
    if not full_match(_UUID_RE, u):
        raise errors.NotFound(f"no such chassis: {uuid}", code="BM.1104")
    return u


# ---------------------------------------------------------------- the routes

class ChassisRoutes:
    """The chassis half of BaremetalPlugin (a mixin: Plugin provides agent, settings, runner)."""

    config_sections = {"baremetal": BaremetalSettings}

    # ---- lifecycle ---------------------------------------------------------
    @property
    def bm_conf(self) -> BaremetalSettings:
        return self.settings["baremetal"]

    @contextlib.asynccontextmanager
    async def chassis_resources(self):
        conf = self.bm_conf
        await self.agent.db.migrate(SCHEMA)
        self._box = SecretBox(conf.key_file or self.agent.state_dir / "baremetal.key")
        ipmi.allow_sha1_fallback(conf.allow_sha1)
        self._ipmi_runner = self.agent.runner("baremetal-ipmi", max_threads=conf.ipmi_threads)
        self._policy = ipmi.CallPolicy(timeout=conf.call_timeout_seconds, retries=conf.retries,
                                       backoff=conf.retry_backoff_seconds,
                                       min_interval=conf.min_interval_seconds,
                                       max_waiting=conf.max_waiting_calls,
                                       probe_interval=conf.probe_interval_seconds)
        self._sessions: dict[str, ipmi.BmcSession] = {}
        self._session_lock = asyncio.Lock()
        self._provision_claims: dict[str, float] = {}
        self._consoles = ConsoleGrants()
        self._bg: set[asyncio.Task] = set()
        self._pump_stop = threading.Event()
        self._pump: threading.Thread | None = None
        reaper = asyncio.create_task(self._reap_idle_sessions(), name="baremetal-reaper")
        try:
            yield
        finally:
            reaper.cancel()
            for t in list(self._bg):
                t.cancel()
            await asyncio.gather(reaper, *self._bg, return_exceptions=True)
            for g in list(self._consoles.by_chassis.values()):
                if g.closer is not None:
                    g.closer()
            sessions, self._sessions = list(self._sessions.values()), {}
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
            self._pump_stop.set()
            if self._pump is not None:
                await self.runner.call(self._pump.join, 2, timeout=5)

    def _ensure_pump(self) -> None:
        """pyghmi (~10 MB of RSS with cryptography) is loaded and its event loop driven
        from the first BMC session or console on, not at start: an agent without chassis
        never needs it."""
        if self._pump is None:
            ipmi._patch_pyghmi()
            self._pump = threading.Thread(target=_pump, args=(self._pump_stop,),
                                          name="baremetal-ipmi-pump", daemon=True)
            self._pump.start()

    async def chassis_stopping(self) -> None:
        """The agent is stopping: close open consoles now rather than wait them out."""
        for g in list(self._consoles.by_chassis.values()):
            if g.closer is not None:
                g.closer()

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _reap_idle_sessions(self) -> None:
        idle = self.bm_conf.session_idle_seconds
        if idle <= 0:
            return
        while True:
            await asyncio.sleep(min(30.0, idle))
            for uuid, s in list(self._sessions.items()):
                if await s.logout_if_idle(idle):
                    log.debug("logged out of the idle BMC session of chassis %s", uuid)

    # ---- contract with the PXE half ------------------------------------------
    async def chassis_exists(self, chassis_uuid: str) -> bool:
        u = chassis_uuid.replace("-", "").lower()
        row = await self.agent.db.fetchone("SELECT 1 FROM bm_chassis WHERE uuid=?", (u,))
        return row is not None

    async def mark_provisioned(self, chassis_uuid: str) -> None:
        """The installed host called back: status Provisioned, and an event."""
        row = await self._row(chassis_uuid)
        await self._set_status(row, PROVISIONED)

    def chassis_inspection_url(self, row: sqlite3.Row) -> str | None:
        """The chassis' current in-band inspection URL (None if the key file was lost)."""
        try:
            token = self._box.decrypt(row["inspection_token"], "the inspection token").decode()
        except errors.ApiError:
            return None
        return f"{self._base_url()}/v1/baremetal/inspection/{token}"

    # ---- helpers ---------------------------------------------------------------
    def _base_url(self, scheme: str | None = None) -> str:
        base = self.bm_conf.advertise_url
        if base is None:
            server = self.agent.config.server
            host = server.host
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostname()      # no DNS lookup on the event loop
            if ":" in host:
                host = f"[{host}]"
            base = f"{'https' if server.tls_cert else 'http'}://{host}:{server.port}"
        if scheme == "ws":
            base = "ws" + base[4:]      # http -> ws, https -> wss
        return base

    async def _row(self, chassis_uuid: str) -> sqlite3.Row:
        u = _chassis_uuid(chassis_uuid)
        row = await self.agent.db.fetchone("SELECT * FROM bm_chassis WHERE uuid=?", (u,))
        if row is None:
            raise errors.NotFound(f"no such chassis: {chassis_uuid}", code="BM.1104")
        return row

    def _inventory(self, row: sqlite3.Row) -> dict[str, Any]:
        return ChassisInventory(
            uuid=row["uuid"], name=row["name"], ipmi_address=row["ipmi_address"],
            ipmi_port=str(row["ipmi_port"]), ipmi_username=row["ipmi_username"],
            status=row["status"], inspection_url=self.chassis_inspection_url(row),
            create_date=iso(row["created"]), last_op_date=iso(row["updated"])
        ).model_dump(by_alias=True)

    def _creds(self, row: sqlite3.Row) -> ipmi.Credentials:
        password = self._box.decrypt(row["ipmi_password"],
                                     f"the IPMI password of chassis {row['uuid']}")
        return ipmi.Credentials(row["ipmi_address"], row["ipmi_port"],
                                row["ipmi_username"].encode(), password)

    async def _session(self, row: sqlite3.Row) -> ipmi.BmcSession:
        async with self._session_lock:
            s = self._sessions.get(row["uuid"])
            creds = self._creds(row)
            if s is None or s.closed or s.creds != creds:
                if s is not None:
                    self._spawn(s.close())
                self._ensure_pump()
                s = ipmi.BmcSession(creds, self._ipmi_runner, self._policy)
                self._sessions[row["uuid"]] = s
            return s

    async def _drop_session(self, chassis_uuid: str) -> None:
        async with self._session_lock:
            s = self._sessions.pop(chassis_uuid, None)
        if s is not None:
            await s.close()

    async def _bmc(self, row: sqlite3.Row, op, what: str, **kw) -> Any:
        s = await self._session(row)
        try:
            return await s.call(op, what=what, **kw)
        except ipmi.BmcError as e:
            raise self._api_error(e, s.creds, what) from None

    @staticmethod
    def _api_error(e: ipmi.BmcError, creds: ipmi.Credentials, what: str) -> errors.ApiError:
        err = ipmi.to_api_error(e, creds.where)
        err.description = f"{what}: {err.description}"
        return err

    async def _set_status(self, row: sqlite3.Row, status: str) -> None:
        previous = row["status"]
        await self.agent.db.execute("UPDATE bm_chassis SET status=?, updated=? WHERE uuid=?",
                                    (status, time.time(), row["uuid"]))
        log.info("chassis %s: %s -> %s", row["uuid"], previous, status)
        await self.agent.events.publish("BaremetalChassisStatusChanged", {
            "chassisUuid": row["uuid"], "status": status, "previousStatus": previous})

    async def _check_unique(self, address: str, port: int, exclude: str | None = None) -> None:
        row = await self.agent.db.fetchone(
            "SELECT uuid FROM bm_chassis WHERE ipmi_address=? AND ipmi_port=? AND uuid != ?",
            (address, port, exclude or ""))
        if row is not None:
            raise errors.Conflict(f"the BMC {address}:{port} is already registered as chassis "
                                  f"{row['uuid']}", code="BM.1109")

    async def _verify(self, creds: ipmi.Credentials) -> str:
        """Log in with creds and read the power state; a fresh session, closed after."""
        self._ensure_pump()
        s = ipmi.BmcSession(creds, self._ipmi_runner, self._policy, watch=False)
        try:
            return await s.call(ipmi.op_power_status, what="log in")
        except ipmi.BmcError as e:
            raise self._api_error(e, creds, "the credentials could not be checked") from None
        finally:
            self._spawn(s.close())

    # ---- chassis CRUD ------------------------------------------------------------
    @query("/v1/baremetal/chassis", model=ChassisInventory)
    async def list_chassis(self) -> list[dict[str, Any]]:
        """Every registered chassis (QueryBaremetalChassis); passwords are never returned."""
        rows = await self.agent.db.fetchall("SELECT * FROM bm_chassis ORDER BY created")
        return [self._inventory(r) for r in rows]

    @get(CHASSIS, result=ChassisReply)
    async def get_chassis(self, uuid: str) -> dict[str, Any]:
        """One chassis."""
        return {"inventory": self._inventory(await self._row(uuid))}

    @create("/v1/baremetal/chassis", params=CreateChassis, result=ChassisReply)
    async def create_chassis(self, job, params: CreateChassis) -> dict[str, Any]:
        """Register a BMC (CreateBaremetalChassis): the credentials are checked first."""
        creds = ipmi.Credentials(params.ipmi_address, params.ipmi_port,
                                 params.ipmi_username.encode(), params.ipmi_password.encode())
        job.progress(10, f"logging in to the BMC at {creds.where}")
        await self._verify(creds)
        uuid = params.resource_uuid
        token = secrets.token_urlsafe(32)
        now = time.time()
        try:
            await self.agent.db.execute(
                "INSERT INTO bm_chassis(uuid, name, ipmi_address, ipmi_port, ipmi_username, "
                "ipmi_password, status, inspection_token, inspection_token_hash, created, updated) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (uuid, params.name, creds.address, creds.port, params.ipmi_username,
                 self._box.encrypt(params.ipmi_password), UNPROVISIONED,
                 self._box.encrypt(token), hashlib.sha256(token.encode()).hexdigest(), now, now))
        except sqlite3.IntegrityError:
            await self._check_unique(creds.address, creds.port)
            raise errors.Conflict(f"a chassis with uuid {uuid} already exists",
                                  code="BM.1109") from None
        row = await self._row(uuid)
        log.info("registered chassis %s (BMC %s, user %s)", uuid, creds.where,
                 params.ipmi_username)
        self._spawn(self._collect_quietly(uuid))
        return {"inventory": self._inventory(row)}

    @create_chassis.check
    async def _create_check(self, params: CreateChassis) -> None:
        await self._check_unique(params.ipmi_address, params.ipmi_port)

    @create_chassis.exists
    async def _chassis_uuid_used(self, uuid: str) -> bool:
        return await self.chassis_exists(uuid)

    @action(CHASSIS_ACTIONS, "updateBaremetalChassis", params=UpdateChassis, result=ChassisReply)
    async def update_chassis(self, job, params: UpdateChassis, uuid: str) -> dict[str, Any]:
        """Change the name, credentials (checked against the BMC first) or status."""
        row = await self._row(uuid)
        fields: dict[str, Any] = {}
        if params.name is not None:
            fields["name"] = params.name
        new_creds = any(v is not None for v in (params.ipmi_address, params.ipmi_port,
                                                params.ipmi_username, params.ipmi_password))
        if new_creds:
            password = (params.ipmi_password.encode() if params.ipmi_password is not None
                        else self._creds(row).password)
            creds = ipmi.Credentials(
                params.ipmi_address or row["ipmi_address"], params.ipmi_port or row["ipmi_port"],
                (params.ipmi_username or row["ipmi_username"]).encode(), password)
            if (creds.address, creds.port) != (row["ipmi_address"], row["ipmi_port"]):
                await self._check_unique(creds.address, creds.port, exclude=row["uuid"])
            job.progress(20, f"logging in to the BMC at {creds.where}")
            await self._verify(creds)
            fields.update(ipmi_address=creds.address, ipmi_port=creds.port,
                          ipmi_username=creds.username.decode(),
                          ipmi_password=self._box.encrypt(creds.password.decode()))
            if self.chassis_inspection_url(row) is None:   # the key file was replaced
                token = secrets.token_urlsafe(32)
                fields.update(inspection_token=self._box.encrypt(token),
                              inspection_token_hash=hashlib.sha256(token.encode()).hexdigest())
        if fields:
            fields["updated"] = time.time()
            sets = ", ".join(f"{k}=?" for k in fields)
            try:
                await self.agent.db.execute(f"UPDATE bm_chassis SET {sets} WHERE uuid=?",
                                            (*fields.values(), row["uuid"]))
            except sqlite3.IntegrityError:
                raise errors.Conflict(f"the BMC {fields.get('ipmi_address')}:"
                                      f"{fields.get('ipmi_port')} is already registered",
                                      code="BM.1109") from None
        if new_creds:
            await self._drop_session(row["uuid"])
        if params.status is not None and params.status != row["status"]:
            await self._set_status(await self._row(uuid), params.status)
        return {"inventory": self._inventory(await self._row(uuid))}

    @update_chassis.check
    async def _update_check(self, params: UpdateChassis, uuid: str) -> None:
        row = await self._row(uuid)
        if params.ipmi_address is not None or params.ipmi_port is not None:
            await self._check_unique(params.ipmi_address or row["ipmi_address"],
                                     params.ipmi_port or row["ipmi_port"], exclude=row["uuid"])

    @delete(CHASSIS)
    async def delete_chassis(self, job, params: None, uuid: str) -> dict[str, Any]:
        """Forget a chassis: its session, console, hardware info and stored password."""
        row = await self._row(uuid)
        g = self._consoles.for_chassis(row["uuid"])
        if g is not None:
            if g.closer is not None:
                g.closer()
            self._consoles.release(g)
        await self._drop_session(row["uuid"])

        def _del(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM bm_hwinfo WHERE chassis_uuid=?", (row["uuid"],))
            conn.execute("DELETE FROM bm_chassis WHERE uuid=?", (row["uuid"],))
        await self.agent.db.transaction(_del)
        await self.pxe_chassis_deleted(row["uuid"])     # its host config and reservations
        log.info("deleted chassis %s (BMC %s:%s)", row["uuid"], row["ipmi_address"],
                 row["ipmi_port"])
        return {}

    @delete_chassis.check
    async def _delete_check(self, params: None, uuid: str) -> None:
        row = await self._row(uuid)
        if self._provision_running(row["uuid"]):
            raise errors.Conflict(f"chassis {row['uuid']} is being provisioned right now; "
                                  "delete it when the provisioning job has ended",
                                  code="BM.1110")

    # ---- power -----------------------------------------------------------------
    @get(CHASSIS + "/power", result=PowerStatus)
    async def power_status(self, uuid: str) -> dict[str, Any]:
        """The chassis' power state, read from its BMC now."""
        row = await self._row(uuid)
        return {"status": await self._bmc(row, ipmi.op_power_status, "read the power state")}

    @action(CHASSIS_ACTIONS, "powerStatusBaremetalHost", params=Empty, result=PowerStatus)
    async def power_status_action(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """The power state, as a job (PowerStatusBaremetalHost)."""
        return await self.power_status(uuid)

    @action(CHASSIS_ACTIONS, "powerOnBaremetalHost", params=Empty)
    async def power_on(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Power the host on (nothing to do if it is on)."""
        row = await self._row(uuid)
        await self._bmc(row, ipmi.op_set_power("on"), "power on")
        return {}

    @action(CHASSIS_ACTIONS, "powerOffBaremetalHost", params=PowerOff)
    async def power_off(self, job, params: PowerOff, uuid: str) -> dict[str, Any]:
        """Power the host off: soft (ACPI shutdown request) or hard (default)."""
        row = await self._row(uuid)
        state = "shutdown" if params.method == "soft" else "off"
        await self._bmc(row, ipmi.op_set_power(state), f"power off ({params.method})")
        if params.method == "soft" and params.wait_seconds:
            deadline = time.monotonic() + params.wait_seconds
            while True:
                job.progress(None, "waiting for the host to shut down")
                if await self._bmc(row, ipmi.op_power_status, "read the power state") == "off":
                    break
                if time.monotonic() > deadline:
                    raise errors.OperationFailed(
                        f"the host is still on {params.wait_seconds} s after the soft power "
                        "off request (its OS ignored or is still handling it); wait longer or "
                        "use method=hard", code="BM.1107")
                await asyncio.sleep(1.0)
        return {}

    @action(CHASSIS_ACTIONS, "powerResetBaremetalHost", params=Empty)
    async def power_reset(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Reset a running host (a host that is off is refused: power it on instead)."""
        row = await self._row(uuid)

        def op(cmd) -> str:
            if ipmi.op_power_status(cmd) != "on":
                raise ipmi.BmcError(ipmi.REFUSED, "the host is powered off and a reset needs "
                                                  "it on; use powerOnBaremetalHost")
            return ipmi.op_set_power("reset")(cmd)
        await self._bmc(row, op, "reset")
        return {}

    async def _require_chassis(self, params: Any, uuid: str) -> None:
        await self._row(uuid)

    for _route in (power_status_action, power_on, power_off, power_reset):
        _route.check(_require_chassis)

    # ---- provisioning ------------------------------------------------------------
    def _provision_running(self, chassis_uuid: str) -> bool:
        claimed = self._provision_claims.get(chassis_uuid)
        # A claim made in a request whose job never started expires after a minute.
        return claimed is not None and (claimed == float("inf") or time.monotonic() - claimed < 60)

    @action(CHASSIS_ACTIONS, "provisionBaremetalHost", params=Empty, result=ChassisReply)
    async def provision(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Next boot from PXE (once), then power on, or reset when already on."""
        u = _chassis_uuid(uuid)
        self._provision_claims[u] = float("inf")
        try:
            row = await self._row(u)
            # Its host config (if any) installs again on this PXE boot (the PXE half).
            armed = await self.pxe_arm_install(u)
            job.progress(20, "setting the next boot to PXE (once)"
                         + ("" if armed else "; no host config: the PXE server's default boot applies"))
            boot = await self._bmc(row, ipmi.op_set_bootdev("network", persist=False),
                                   "set the next boot device to PXE")
            if boot.get("bootdev") != "network":
                raise errors.OperationFailed(
                    f"the BMC at {row['ipmi_address']}:{row['ipmi_port']} accepted the PXE boot "
                    f"device but reports {boot.get('bootdev')!r}", code="BM.1103")
            job.progress(50, "powering the host on (reset if it is on)")

            def boot_now(cmd) -> str:
                state = ipmi.op_power_status(cmd)
                return ipmi.op_set_power("reset" if state == "on" else "on")(cmd)
            done = await self._bmc(row, boot_now, "boot the host")
            await self._set_status(row, PROVISIONING)
            log.info("chassis %s: provisioning started (next boot PXE, %s)", u,
                     "reset" if done == "reset" else "powered on")
            return {"inventory": self._inventory(await self._row(u))}
        finally:
            self._provision_claims.pop(u, None)

    @provision.check
    async def _provision_check(self, params: Empty, uuid: str) -> None:
        row = await self._row(uuid)
        if self._provision_running(row["uuid"]) or row["status"] == PROVISIONING:
            raise errors.Conflict(
                f"chassis {row['uuid']} is already being provisioned (status {row['status']}); "
                "wait for the installed host's callback, or set the status back with "
                "updateBaremetalChassis {\"status\": \"Unprovisioned\"} to start over",
                code="BM.1110")
        self._provision_claims[row["uuid"]] = time.monotonic()

    # ---- hardware info -------------------------------------------------------------
    def _hw_inventory(self, row: sqlite3.Row) -> dict[str, Any]:
        return HardwareInfoInventory(
            uuid=row["uuid"], chassis_uuid=row["chassis_uuid"], type=row["type"],
            content=row["content"], create_date=iso(row["created"]),
            last_op_date=iso(row["updated"])).model_dump(by_alias=True)

    async def _store_hwinfo(self, chassis_uuid: str, type_: str, content: Any) -> dict[str, Any]:
        text = json.dumps(content, sort_keys=True)
        now = time.time()
        new_uuid = uuidlib.uuid4().hex

        def _upsert(conn: sqlite3.Connection) -> sqlite3.Row:
            if conn.execute("SELECT 1 FROM bm_chassis WHERE uuid=?", (chassis_uuid,)).fetchone() is None:
                raise errors.NotFound(f"no such chassis: {chassis_uuid}", code="BM.1104")
            conn.execute("INSERT INTO bm_hwinfo(uuid, chassis_uuid, type, content, created, updated) "
                         "VALUES(?,?,?,?,?,?) ON CONFLICT(chassis_uuid, type) DO UPDATE SET "
                         "content=excluded.content, updated=excluded.updated",
                         (new_uuid, chassis_uuid, type_, text, now, now))
            return conn.execute("SELECT * FROM bm_hwinfo WHERE chassis_uuid=? AND type=?",
                                (chassis_uuid, type_)).fetchone()
        row = await self.agent.db.transaction(_upsert)
        inv = self._hw_inventory(row)
        await self.agent.events.publish("BaremetalHardwareInfo", {
            "chassisUuid": chassis_uuid, "hardwareInfoUuid": inv["uuid"], "type": type_,
            "content": text})
        return inv

    async def _collect(self, chassis_uuid: str) -> dict[str, Any]:
        row = await self._row(chassis_uuid)
        data = await self._bmc(row, ipmi.op_hardware_info, "read the hardware inventory",
                               timeout=max(self.bm_conf.call_timeout_seconds, 120.0))
        return await self._store_hwinfo(row["uuid"], HW_BMC, data)

    async def _collect_quietly(self, chassis_uuid: str) -> None:
        try:
            await self._collect(chassis_uuid)
        except errors.ApiError as e:
            log.warning("chassis %s: no hardware info from the BMC: %s", chassis_uuid,
                        e.description)

    @query("/v1/baremetal/hardwareinfo", model=HardwareInfoInventory)
    async def list_hardware_info(self) -> list[dict[str, Any]]:
        """Hardware info of every chassis (QueryBaremetalHardwareInfo)."""
        rows = await self.agent.db.fetchall("SELECT * FROM bm_hwinfo ORDER BY created")
        return [self._hw_inventory(r) for r in rows]

    @get("/v1/baremetal/hardwareinfo/{uuid}", result=HardwareInfoReply)
    async def get_hardware_info(self, uuid: str) -> dict[str, Any]:
        row = await self.agent.db.fetchone("SELECT * FROM bm_hwinfo WHERE uuid=?",
                                           (uuid.replace("-", "").lower(),))
        if row is None:
            raise errors.NotFound(f"no such hardware info: {uuid}", code="BM.1114")
        return {"inventory": self._hw_inventory(row)}

    @action(CHASSIS_ACTIONS, "refreshBaremetalHardwareInfo", params=Empty, result=HardwareInfoReply)
    async def refresh_hardware_info(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Read the FRU inventory and sensors from the BMC now."""
        return {"inventory": await self._collect(uuid)}

    refresh_hardware_info.check(_require_chassis)
    del _route

    @raw("POST", "/v1/baremetal/inspection/{token}", auth=False)
    async def inspection(self, request: web.Request) -> web.Response:
        """In-band inspection data from the host; the URL is the secret, used once.

        Any request that names the current token spends it (a new one replaces
        it, see the chassis' inspectionUrl), so a token that shows up in an
        access log or a proxy's log is already useless.
        """
        token = request.match_info["token"]
        spent = hashlib.sha256(token.encode()).hexdigest()
        row = await self.agent.db.fetchone(
            "SELECT uuid FROM bm_chassis WHERE inspection_token_hash=?", (spent,))
        if row is None or not await self._rotate_inspection_token(row["uuid"], spent):
            raise errors.NotFound("no such inspection URL (unknown, or already used: the "
                                  "chassis' inspectionUrl names the current one)", code="BM.1115")
        limit = self.bm_conf.inspection_max_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.PayloadTooLarge(f"inspection data is limited to {limit} bytes "
                                         "([baremetal] inspection_max_bytes)", code="BM.1116")
        body = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            body += chunk
            if len(body) > limit:
                raise errors.PayloadTooLarge(f"inspection data is limited to {limit} bytes "
                                             "([baremetal] inspection_max_bytes)", code="BM.1116")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise errors.BadRequest("inspection data must be a JSON object", code="BM.1117")
        inv = await self._store_hwinfo(row["uuid"], HW_INSPECTION, data)
        log.info("chassis %s: in-band inspection data received (%d bytes) from %s",
                 row["uuid"], len(body), request.remote)
        return web.json_response({"inventory": inv})

    async def _rotate_inspection_token(self, chassis_uuid: str, spent_hash: str) -> bool:
        """Replace the token whose hash is spent_hash; False if another request got it first."""
        token = secrets.token_urlsafe(32)
        n = await self.agent.db.execute(
            "UPDATE bm_chassis SET inspection_token=?, inspection_token_hash=? "
            "WHERE uuid=? AND inspection_token_hash=?",
            (self._box.encrypt(token), hashlib.sha256(token.encode()).hexdigest(),
             chassis_uuid, spent_hash))
        return n == 1

    # ---- serial console ----------------------------------------------------------------
    @create("/v1/baremetal/consoles", params=ConsoleRequest, result=ConsoleReply)
    async def request_console(self, job, params: ConsoleRequest) -> dict[str, Any]:
        """A one-time token and the websocket URL of the chassis' serial-over-LAN console."""
        u = _chassis_uuid(params.chassis_uuid)
        ttl = self.bm_conf.console_token_seconds
        g, token = self._consoles.issue(u, ttl)
        expires = time.time() + ttl
        return {"inventory": ConsoleInventory(
            uuid=g.uuid, chassis_uuid=u, token=token,
            url=f"{self._base_url('ws')}/v1/baremetal/consoles/{token}",
            expire_date=iso(expires)).model_dump(by_alias=True)}

    @request_console.check
    async def _console_check(self, params: ConsoleRequest) -> None:
        row = await self._row(params.chassis_uuid)
        self._consoles.reserve(row["uuid"], uuidlib.uuid4().hex, self.bm_conf.console_token_seconds)

    @raw("GET", "/v1/baremetal/consoles/{token}", auth=False)
    async def console_socket(self, request: web.Request) -> web.StreamResponse:
        """The websocket of a console token: serial output out, keystrokes in."""
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 16)
        if not ws.can_prepare(request).ok:
            raise errors.BadRequest("this URL is a websocket: connect with a websocket client",
                                    code="BM.1118")
        g = self._consoles.claim(request.match_info["token"])
        try:
            row = await self._row(g.chassis_uuid)
            creds = self._creds(row)
        except errors.ApiError:
            self._consoles.release(g)
            raise
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        self._ensure_pump()
        bridge = SolBridge(creds, self._ipmi_runner, loop)
        g.closer = lambda: loop.create_task(ws.close(code=1001, message=b"chassis gone"))
        log.info("console of chassis %s opened from %s", g.chassis_uuid, request.remote)
        released = False
        try:
            try:
                await bridge.open()
            except errors.ApiError as e:
                # Free the slot before telling the client, who may ask again at once.
                await bridge.close()
                self._consoles.release(g)
                released = True
                await ws.send_str(json.dumps({"event": "error", "message": e.description}))
                await ws.close(code=1011, message=b"SOL failed")
                return ws
            await ws.send_str(json.dumps({"event": "connected", "chassisUuid": g.chassis_uuid}))
            out = asyncio.create_task(self._console_out(bridge, ws))
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.BINARY:
                        await bridge.send(msg.data)
                    elif msg.type == WSMsgType.TEXT:
                        await bridge.send(msg.data.encode())
                    elif msg.type == WSMsgType.ERROR:
                        break
                    if out.done():
                        break
            except errors.ApiError as e:
                log.info("console of chassis %s: %s", g.chassis_uuid, e.description)
            finally:
                out.cancel()
                await asyncio.gather(out, return_exceptions=True)
        finally:
            if not released:
                await bridge.close()        # SOL deactivated before the slot is free
                self._consoles.release(g)
            if not ws.closed:
                await ws.close()
            log.info("console of chassis %s closed", g.chassis_uuid)
        return ws

    async def _console_out(self, bridge: SolBridge, ws: web.WebSocketResponse) -> None:
        while True:
            item = await bridge.queue.get()
            if isinstance(item, (bytes, bytearray)):
                await ws.send_bytes(bytes(item))
            elif isinstance(item, str):
                await ws.send_bytes(item.encode())
            elif isinstance(item, dict):
                if "error" in item:
                    await ws.send_str(json.dumps({"event": "error", "message": str(item["error"])}))
                    await ws.close(code=1011, message=b"SOL ended")
                    return
                await ws.send_str(json.dumps({"event": "info",
                                              "message": str(item.get("info", item))}))


def _pump(stop: threading.Event) -> None:
    """Drive pyghmi's event loop: SOL data, keepalives and asynchronous logins."""
    from pyghmi.ipmi.private import session
    while not stop.is_set():
        try:
            session.Session.wait_for_rsp(timeout=0.5)
        except Exception:
            log.exception("pyghmi event loop")
            stop.wait(0.5)
