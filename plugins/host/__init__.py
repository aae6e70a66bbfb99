"""The host plugin: facts, ping, the controller's registration, shell, OS update.

The code of each URL is the method under its decorator; facts are parsed in
``facts.py`` and the package update in ``osupdate.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from pydantic import Field, HttpUrl

from agent import errors
from agent.models import Empty, WireModel, utcnow_iso
from agent.plugin import Plugin, action, get
from agent.validation import Multiline

from . import facts, inventory, osupdate

audit = logging.getLogger("node_agent.audit")
log = logging.getLogger("node_agent.host")

FACTS_TIMEOUT = 20.0
INVENTORY_TIMEOUT = 5.0      # the management address lookup, the active VMs' listing
KV_CONNECTION = "host.connection"


class HostSettings(WireModel):
    """The [host] config section."""
    allow_run_shell: bool = False
    run_shell_max_output: int = Field(1 << 20, ge=1024, le=64 << 20)
    run_shell_max_timeout: int = Field(3600, ge=1, le=86400)


class Ping(WireModel):
    host_uuid: str
    version: str
    uptime: float = Field(description="seconds since the agent started")


class HypervisorTypes(WireModel):
    hypervisor_types: list[str]


class ConnectHost(WireModel):
    host_uuid: str = Field(pattern=r"^[0-9a-fA-F]{32}$|^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
                           description="the controller's uuid of this host")
    management_server_url: HttpUrl = Field(description="where events are POSTed")


class HostConnection(WireModel):
    host_uuid: str
    management_server_url: str
    connected_date: str
    version: str


class HostConnectionReply(WireModel):
    inventory: HostConnection


class RunShell(WireModel):
    script: Multiline = Field(min_length=1, max_length=1 << 20, description="lines of bash; no NUL")
    timeout: int = Field(60, ge=1, description="seconds; the script's process tree is killed after it")


class RunShellResult(WireModel):
    return_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool


class HostPlugin(Plugin):
    name = "host"
    config_sections = {"host": HostSettings}
    max_processes = 16
    _versions: facts.Versions | None = None     # libvirt's and QEMU's, read once
    _libvirt = None                              # the shared connection, from lifecycle()

    @property
    def conf(self) -> HostSettings:
        return self.settings["host"]

    async def lifecycle(self):
        # The shared connection, for what the node's VMs are given (the inventory's
        # available capacities); libvirt is loaded only once its socket is there.
        self._libvirt = self.agent.libvirt()
        await self._libvirt.acquire()
        try:
            yield
        finally:
            await self._libvirt.release()

    @get("/v1/host", result=inventory.HostInventory)
    async def host_facts(self) -> inventory.HostInventory:
        """This node's facts (CPU, memory, NUMA, hugepages, OS, KVM, versions) and the
        manual's HostInventory fields computed from them and from the node's active VMs."""
        async with asyncio.timeout(FACTS_TIMEOUT):
            ip_json = await self._output(facts.ADDRESSES_COMMAND)
            if self._versions is None:      # read once: an upgrade restarts the agent
                found = {}
                for field, commands in facts.VERSION_COMMANDS.items():
                    for argv in commands:
                        found[field] = facts.parse_version(await self._output(argv))
                        if found[field]:
                            break
                self._versions = facts.Versions(**found)
            collected = await self.runner.call(facts.collect, "/", ip_json, self._versions,
                                               timeout=FACTS_TIMEOUT)
            target = self.agent.events.target
            try:
                manage_ip = await self.runner.call(
                    inventory.management_ip, target["url"] if target else None,
                    self.agent.config.server.host, timeout=INVENTORY_TIMEOUT)
            except errors.ApiError as e:      # a name that does not resolve in time
                log.warning("management address: %s", e.description)
                manage_ip = None
            return inventory.build(collected, target=target, manage_ip=manage_ip,
                                   usage=await self._vm_usage())

    async def _vm_usage(self) -> inventory.VmUsage | None:
        """What the active VMs are given, or None while libvirt cannot tell."""
        conn = self._libvirt
        if conn is None or not conn.connected:
            return None
        try:
            return await conn.call(inventory.active_vm_usage, timeout=INVENTORY_TIMEOUT)
        except Exception as e:          # unreachable, or a libvirt error: capacities unknown
            log.warning("active VMs not counted: %s", getattr(e, "description", e))
            return None

    async def _output(self, argv: list[str]) -> str | None:
        """A command's stdout through the runner, or None when it is missing or fails."""
        exe = await self.runner.call(facts.find_binary, argv[0], timeout=5)
        if exe is None:
            return None
        try:
            done = await self.runner.run([exe, *argv[1:]], timeout=facts.SUBPROCESS_TIMEOUT)
        except errors.ApiError as e:        # a timeout: the tree was killed
            log.warning("%s: %s", argv[0], e.description)
            return None
        return done.stdout.decode(errors="replace") if done.returncode == 0 else None

    @get("/v1/host/ping", result=Ping)
    async def ping(self) -> Ping:
        """Cheap liveness with identity: answered on the loop, touches nothing."""
        target = self.agent.events.target
        return Ping(host_uuid=target["hostUuid"] if target else self.agent.node_uuid,
                    version=self.agent.version, uptime=round(time.time() - self.agent.started, 3))

    @get("/v1/hypervisor-types", result=HypervisorTypes)
    async def hypervisor_types(self) -> HypervisorTypes:
        return HypervisorTypes(hypervisor_types=["KVM"])

    @action("/v1/host/actions", "connectHost", params=ConnectHost, result=HostConnectionReply)
    async def connect_host(self, job, params: ConnectHost) -> HostConnectionReply:
        """The controller registers itself; events are pushed to it from now on."""
        conn = HostConnection(host_uuid=params.host_uuid.replace("-", "").lower(),
                              management_server_url=str(params.management_server_url),
                              connected_date=utcnow_iso(), version=self.agent.version)
        await self.agent.db.kv_set(KV_CONNECTION, conn.model_dump(by_alias=True))
        await self.agent.events.set_target(conn.management_server_url, conn.host_uuid)
        await self.agent.events.publish("HostConnected", {"version": self.agent.version})
        return HostConnectionReply(inventory=conn)

    @action("/v1/host/actions", "reconnectHost", params=Empty, result=HostConnectionReply)
    async def reconnect_host(self, job, params: Empty) -> HostConnectionReply:
        """Re-establish the registration: events resume to the same controller."""
        saved = await self.agent.db.kv_get(KV_CONNECTION)
        conn = HostConnection.model_validate(saved)
        conn.connected_date, conn.version = utcnow_iso(), self.agent.version
        await self.agent.db.kv_set(KV_CONNECTION, conn.model_dump(by_alias=True))
        await self.agent.events.set_target(conn.management_server_url, conn.host_uuid)
        # The controller is back: what is pending goes out now, not at its backoff.
        await self.agent.outbox.retry_now(conn.management_server_url)
        await self.agent.events.publish("HostReconnected", {"version": self.agent.version})
        return HostConnectionReply(inventory=conn)

    @reconnect_host.check
    async def _reconnect_check(self, params: Empty) -> None:
        if await self.agent.db.kv_get(KV_CONNECTION) is None:
            raise errors.Conflict("this host was never connected: call connectHost first",
                                  code="HOST.1009")

    @action("/v1/host/actions", "kvmRunShell", params=RunShell, result=RunShellResult)
    async def run_shell(self, job, params: RunShell) -> RunShellResult:
        """Run a shell script (only when [host] allow_run_shell is true); audited."""
        digest = hashlib.sha256(params.script.encode()).hexdigest()
        rc: int | str = "error"
        try:
            # The script goes in on stdin, never in argv, where `ps` would show it.
            result = await job.runner.run(["/bin/bash", "-s"], input=params.script.encode(),
                                          timeout=params.timeout,
                                          max_output=self.conf.run_shell_max_output)
            rc = result.returncode
        except errors.Timeout:
            rc = "timeout"
            raise errors.OperationFailed(
                f"the script did not finish within {params.timeout} s; its processes were killed",
                code="HOST.1408") from None
        except BaseException:
            rc = "cancelled"
            raise
        finally:
            audit.info("kvmRunShell job=%s caller=%s sha256=%s bytes=%d rc=%s", job.uuid, job.caller,
                       digest, len(params.script), rc,
                       extra={"audit": {"action": "kvmRunShell", "job": job.uuid, "caller": job.caller,
                                        "sha256": digest, "bytes": len(params.script), "rc": rc}})
        return RunShellResult(return_code=result.returncode,
                              stdout=result.stdout.decode(errors="replace"),
                              stderr=result.stderr.decode(errors="replace"),
                              stdout_truncated=result.stdout_truncated,
                              stderr_truncated=result.stderr_truncated)

    @run_shell.check
    async def _run_shell_check(self, params: RunShell) -> None:
        if not self.conf.allow_run_shell:
            raise errors.Unavailable("kvmRunShell is disabled on this node: set "
                                     "allow_run_shell = true in the [host] config section",
                                     code="HOST.1003")
        if params.timeout > self.conf.run_shell_max_timeout:
            raise errors.BadRequest(f"timeout must be at most {self.conf.run_shell_max_timeout} s",
                                    code="HOST.1002")

    @action("/v1/host/actions", "updateHostOS", params=osupdate.UpdateHostOS,
            result=osupdate.UpdateHostOSResult)
    async def update_host_os(self, job, params: osupdate.UpdateHostOS) -> osupdate.UpdateHostOSResult:
        """Upgrade the node's packages with its package manager, reporting progress."""
        return await osupdate.update(job, params)

    @update_host_os.check
    async def _update_check(self, params: osupdate.UpdateHostOS) -> None:
        osupdate.check(params)
