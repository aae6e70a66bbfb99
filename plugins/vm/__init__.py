"""The VM plugin: define, list, drive, migrate and measure this node's libvirt domains.

Each URL's code is the method under its decorator.  Every libvirt call runs
through the shared connection (``agent.libvirt()``) on this plugin's own
thread pool with a timeout (``ops.py`` holds the blocking functions).  The
spec becomes domain XML in ``domxml.py``; lifecycle events become
``VmStateChanged`` in ``events.py``; statistics are sampled in bulk in
``stats.py``.  The plugin stays available while libvirt is down: its
``libvirt`` capability goes down with the reason and the VM routes answer
503 until the connection is back.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any, Callable, Literal

from pydantic import Field

from agent import errors, paths
from agent.lazy import lazy_import
from agent.libvirt_conn import IMPORT_ERROR as BINDING_ERROR
from agent.libvirt_conn import libvirt
from agent.models import Empty, WireModel
from agent.plugin import Plugin, action, create, delete, get, query
from agent.validation import full_match

from . import lverrors
from . import states as S
from .events import LifecycleTracker
from .models import (DeleteVm, MigrateVm, RebootVm, StopVm, UUID_RE, VmInventory, VmMigrateReply,
                     VmReply, VmSpec, VmStats, VmStopReply, normalize_uuid)
from .stats import StatsSampler, VmCollector

log = logging.getLogger("node_agent.vm")

# libvirt is loaded once libvirtd is there to talk to (agent.libvirt_conn), and
# so are the calls and the XML that need it; without the binding the plugin
# still loads and its libvirt capability says why.
ops = lazy_import("plugins.vm.ops")
domxml = lazy_import("plugins.vm.domxml")

# A uuid-shaped segment only, so that /v1/vm-instances/stats is never a VM.
VM = "/v1/vm-instances/{uuid:[0-9a-fA-F-]{32,36}}"
ACTIONS = VM + "/actions"
LIFECYCLE_EVENT = 0               # VIR_DOMAIN_EVENT_ID_LIFECYCLE
POLL = 0.5                        # seconds between state and migration-progress polls


class VmSettings(WireModel):
    """The [vm] config section."""
    stats_interval_seconds: float = Field(10.0, ge=0.2, le=3600)
    domain_type: Literal["auto", "kvm", "qemu"] = Field(
        "auto", description="auto: kvm when /dev/kvm is usable and libvirt offers it, else qemu (TCG)")
    stopped_event_hold_seconds: float = Field(2.0, ge=0, le=60)


def _path_uuid(uuid: str) -> str:
    if not full_match(UUID_RE, uuid):
        raise errors.BadRequest(f"'{uuid}' is not a VM uuid: use 32 hex digits", code="VM.1001")
    return normalize_uuid(uuid)


class VmPlugin(Plugin):
    name = "vm"
    config_sections = {"vm": VmSettings}
    max_threads = 8               # a call stuck on one VM holds one thread, not the others

    def __init__(self, agent, settings) -> None:
        super().__init__(agent, settings)
        self.conf: VmSettings = settings.get("vm") or VmSettings()
        self.conn = None
        self._domain_type: tuple[str, str] | None = None
        self._define_lock = asyncio.Lock()
        self.busy: dict[str, str] = {}            # uuid -> the long operation running on it
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._generation = 0
        self.tracker: LifecycleTracker | None = None
        self.sampler = StatsSampler(self._call, self.runner.call, self.conf.stats_interval_seconds,
                                    agent.config.libvirt.call_timeout_seconds)
        self.collector = VmCollector(self.sampler)
        self.set_capability("libvirt", False, BINDING_ERROR or "not connected yet")

    # ------------------------------------------------------------ lifecycle
    async def lifecycle(self):
        if BINDING_ERROR:
            yield
            return
        self.conn = self.agent.libvirt()
        self.tracker = LifecycleTracker(self.agent.events.publish,
                                        hold_seconds=self.conf.stopped_event_hold_seconds,
                                        on_change=self.sampler.wake)
        self.tracker.start()
        self.agent.metrics.registry.register(self.collector)
        self.conn.subscribe(LIFECYCLE_EVENT, self._on_lifecycle)
        self.conn.add_listener(self._on_connection)
        await self.conn.acquire()
        background = [asyncio.create_task(self.sampler.run(lambda: self.conn.connected),
                                          name="vm-stats")]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.tracker.stop()
            try:
                self.agent.metrics.registry.unregister(self.collector)
            except KeyError:
                pass
            await self.conn.release()

    def _on_connection(self, connected: bool, reason: str | None) -> None:
        self._generation += 1
        if not connected:
            self.set_capability("libvirt", False,
                                f"libvirt at {self.conn.uri} is unreachable: {reason}")
            return
        # The routes open once the VMs' states are known, so that the first
        # events are told apart from the states found at connection.
        self._domain_type = None               # the hypervisor may have changed under us
        task = asyncio.get_running_loop().create_task(self._resync(self._generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.sampler.wake()

    async def _resync(self, generation: int) -> None:
        try:
            # ops and domxml are first needed now: imported in a thread, not on the loop
            await self.runner.call(importlib.import_module, "plugins.vm.ops", timeout=30)
            current = await self._call(ops.all_states, timeout=30)
        except Exception as e:
            log.warning("could not read the VMs' states after connecting: %s", e)
        else:
            self.tracker.reconcile(current)
        if generation == self._generation and self.conn.connected:
            self.set_capability("libvirt", True)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """On the loop (libvirtaio); UUIDString and name are local, no RPC."""
        try:
            uuid = dom.UUIDString().replace("-", "")
            self.tracker.on_event(uuid, dom.name(), event, detail)
            for ev in self._waiters.get(uuid, ()):
                ev.set()
        except Exception:
            log.exception("lifecycle event %s/%s not handled", event, detail)

    # ------------------------------------------------------------ helpers
    async def _call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
                    what: str | None = None, uuid: str | None = None) -> Any:
        """fn(virConnect, *args) on this plugin's threads; libvirt errors as VM.* codes."""
        try:
            return await self.conn.call(fn, *args, runner=self.runner, timeout=timeout)
        except errors.ApiError as e:
            if isinstance(e, errors.Timeout) and what:
                raise lverrors.to_api(e, what, uuid) from None
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise lverrors.to_api(e, what or f"run {getattr(fn, '__name__', 'a call')}", uuid) from None

    async def _status(self, uuid: str) -> tuple[str, str | None, bool]:
        return await self._call(ops.status, uuid, what="read the VM's state", uuid=uuid)

    async def _inventory(self, uuid: str) -> dict[str, Any]:
        inv = await self._call(ops.inventory, uuid, what="read the VM", uuid=uuid)
        return self._overlay(inv)

    def _overlay(self, inv: dict[str, Any]) -> dict[str, Any]:
        if self.busy.get(inv["uuid"]) == "migrate" and inv["state"] in S.ACTIVE:
            inv["state"] = S.MIGRATING
        return inv

    async def _require(self, uuid: str, allowed: Callable[[str, bool], bool], doing: str,
                       hint: str) -> None:
        """The @check of an action: the VM exists, is not busy, and is in a state for it."""
        uuid = _path_uuid(uuid)
        state, _, active = await self._status(uuid)
        if uuid in self.busy:
            raise errors.Conflict(f"VM {uuid} is busy ({self.busy[uuid]} in progress); "
                                  "wait for that job or cancel it", code="VM.1011")
        if not allowed(state, active):
            raise errors.Conflict(f"cannot {doing} VM {uuid}: it is {state}; {hint}", code="VM.1009")

    async def _wait_inactive(self, uuid: str, timeout: float) -> bool:
        """Until the VM is off (woken by its lifecycle events, polled as a fallback)."""
        ev = asyncio.Event()
        self._waiters.setdefault(uuid, set()).add(ev)
        deadline = time.monotonic() + timeout
        try:
            while True:
                _, _, active = await self._status(uuid)
                if not active:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                ev.clear()
                try:
                    await asyncio.wait_for(ev.wait(), min(POLL, left))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiters[uuid].discard(ev)
            if not self._waiters[uuid]:
                del self._waiters[uuid]

    async def _stop(self, job, uuid: str, how: str, timeout: float) -> bool:
        """Stop the VM; True when a grace stop had to fall back to destroy."""
        if how == "cold":
            job.progress(10, "destroying")
            await self._call(ops.destroy, uuid, what="destroy the VM", uuid=uuid)
            return False
        job.progress(10, f"asked the guest to shut down; waiting up to {timeout} s")
        await self._call(ops.shutdown, uuid, what="shut the VM down", uuid=uuid)
        if await self._wait_inactive(uuid, timeout):
            return False
        job.progress(80, f"no shutdown within {timeout} s: destroying")
        log.info("VM %s did not shut down within %s s; destroying it", uuid, timeout)
        await self._call(ops.destroy, uuid, what="destroy the VM", uuid=uuid)
        return True

    async def _domain_type_for_define(self) -> tuple[str, str]:
        if self._domain_type is None:
            self._domain_type = await self._call(ops.domain_type, self.conf.domain_type,
                                                 what="read the hypervisor's capabilities")
        return self._domain_type

    # ------------------------------------------------------------ reads
    @query("/v1/vm-instances", model=VmInventory, requires="libvirt")
    async def list_vms(self) -> list[dict[str, Any]]:
        """Every VM defined (or running) on this node."""
        invs = await self._call(ops.list_inventories, what="list the VMs")
        return [self._overlay(i) for i in invs]

    @query("/v1/vm-instances/stats", model=VmStats, requires="libvirt")
    async def vm_stats(self) -> list[dict[str, Any]]:
        """Every VM's figures from the last bulk sample (see ageSeconds)."""
        if self.sampler.taken is None:
            await self.sampler.sample()       # the first call after start: sample now
        return await self.sampler.served()

    @get(VM, result=VmReply, requires="libvirt")
    async def get_vm(self, uuid: str) -> dict[str, Any]:
        """One VM's inventory."""
        return {"inventory": await self._inventory(_path_uuid(uuid))}

    # ------------------------------------------------------------ define / delete
    @create("/v1/vm-instances", params=VmSpec, result=VmReply, requires="libvirt")
    async def define_vm(self, job, params: VmSpec) -> dict[str, Any]:
        """Define a VM from a spec (persistent, not started)."""
        uuid = params.resource_uuid
        async with self._define_lock:
            problems, block = await self._disk_paths(params)
            if problems:
                raise errors.BadRequest("; ".join(problems), code="VM.1001")
            dtype, arch = await self._domain_type_for_define()
            job.progress(30, f"defining a {dtype} domain")
            xml = domxml.render(params, uuid, dtype, arch, block)
            inv = await self._call(ops.define, uuid, params.name, xml, what="define the VM",
                                   uuid=uuid)
        return {"inventory": inv}

    @define_vm.check
    async def _define_check(self, params: VmSpec) -> None:
        problems, _ = await self._disk_paths(params)
        if problems:
            raise errors.BadRequest("cannot define the VM: " + "; ".join(problems), code="VM.1001")
        found = await self._call(ops.exists, None, params.name, what="look the VM's name up")
        if found:
            raise errors.Conflict(found, code="VM.1010")

    @define_vm.exists
    async def _vm_uuid_used(self, uuid: str) -> bool:
        return await self._call(ops.exists, uuid, None, what="look the VM's uuid up") is not None

    async def _disk_paths(self, params: VmSpec) -> tuple[list[str], frozenset[str]]:
        # Every disk and ISO inside [storage] allowed_roots (or an RBD device), else 400
        # SYS.1007; QEMU then gets the resolved path, never a symlink the check did not see.
        named = [d for d in params.disks if d.path]
        try:
            real = await self.runner.call(_confine_disks, [d.path for d in named],
                                          self.agent.config.roots, timeout=10)
        except errors.Timeout:
            raise errors.Timeout("resolving the disk paths took more than 10 s; is their "
                                 "storage hung?", code="VM.1408") from None
        for d, path in zip(named, real):
            d.path = path
        must = [d.path for d in params.disks if d.device == "disk" and d.path]
        blockable = [d.path for d in params.disks if d.device == "cdrom" and d.path]
        try:
            problems, block = await self.runner.call(ops.check_disk_paths, must, timeout=10)
            # A cdrom's image may come later: only learn whether it is a block device.
            _, cd_block = await self.runner.call(ops.check_disk_paths, blockable, timeout=10)
        except errors.Timeout:
            raise errors.Timeout("checking the disk paths took more than 10 s; is their "
                                 "storage hung?", code="VM.1408") from None
        return [f"disk {p}" for p in problems], block | cd_block

    @delete(VM, params=DeleteVm, requires="libvirt")
    async def delete_vm(self, job, params: DeleteVm, uuid: str) -> dict[str, Any]:
        """Undefine a VM (its disks are left alone); force=true destroys a running one first."""
        uuid = _path_uuid(uuid)
        await self._call(ops.undefine, uuid, params.force, what="delete the VM", uuid=uuid)
        return {}

    @delete_vm.check
    async def _delete_check(self, params: DeleteVm, uuid: str) -> None:
        await self._require(uuid, lambda s, active: params.force or not active, "delete",
                            "stop it first, or delete with ?force=true")

    # ------------------------------------------------------------ actions
    @action(ACTIONS, "startVmInstance", params=Empty, result=VmReply, requires="libvirt")
    async def start_vm(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Start a stopped VM."""
        uuid = _path_uuid(uuid)
        await self._call(ops.start, uuid, what="start the VM", uuid=uuid)
        return {"inventory": await self._inventory(uuid)}

    @start_vm.check
    async def _start_check(self, params: Empty, uuid: str) -> None:
        await self._require(uuid, lambda s, active: not active, "start",
                            "a paused VM is resumed with resumeVmInstance")

    @action(ACTIONS, "stopVmInstance", params=StopVm, result=VmStopReply, requires="libvirt")
    async def stop_vm(self, job, params: StopVm, uuid: str) -> dict[str, Any]:
        """Stop a VM: grace (ACPI, then destroy after the timeout) or cold (destroy)."""
        uuid = _path_uuid(uuid)
        forced = await self._stop(job, uuid, params.type, params.timeout)
        return {"inventory": await self._inventory(uuid), "forced": forced}

    @stop_vm.check
    async def _stop_check(self, params: StopVm, uuid: str) -> None:
        await self._require(uuid, lambda s, active: active, "stop", "it is not running")

    @action(ACTIONS, "rebootVmInstance", params=RebootVm, result=VmStopReply, requires="libvirt")
    async def reboot_vm(self, job, params: RebootVm, uuid: str) -> dict[str, Any]:
        """Reboot: stop (grace or cold) then start; reported as no stop."""
        uuid = _path_uuid(uuid)
        forced = await self._stop(job, uuid, params.type, params.timeout)
        job.progress(90, "starting")
        await self._call(ops.start, uuid, what="start the VM again", uuid=uuid)
        return {"inventory": await self._inventory(uuid), "forced": forced}

    @reboot_vm.check
    async def _reboot_check(self, params: RebootVm, uuid: str) -> None:
        await self._require(uuid, lambda s, active: active, "reboot", "start it instead")

    @action(ACTIONS, "pauseVmInstance", params=Empty, result=VmReply, requires="libvirt")
    async def pause_vm(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Pause a running VM (its vCPUs stop; memory stays)."""
        uuid = _path_uuid(uuid)
        await self._call(ops.suspend, uuid, what="pause the VM", uuid=uuid)
        return {"inventory": await self._inventory(uuid)}

    @pause_vm.check
    async def _pause_check(self, params: Empty, uuid: str) -> None:
        await self._require(uuid, lambda s, active: s == S.RUNNING, "pause",
                            "only a Running VM can be paused")

    @action(ACTIONS, "resumeVmInstance", params=Empty, result=VmReply, requires="libvirt")
    async def resume_vm(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Resume a paused VM."""
        uuid = _path_uuid(uuid)
        await self._call(ops.resume, uuid, what="resume the VM", uuid=uuid)
        return {"inventory": await self._inventory(uuid)}

    @resume_vm.check
    async def _resume_check(self, params: Empty, uuid: str) -> None:
        await self._require(uuid, lambda s, active: s == S.PAUSED, "resume",
                            "only a Paused VM can be resumed")

    @action(ACTIONS, "destroyVmInstance", params=Empty, result=VmReply, requires="libvirt")
    async def destroy_vm(self, job, params: Empty, uuid: str) -> dict[str, Any]:
        """Power a VM off at once (its definition stays)."""
        uuid = _path_uuid(uuid)
        await self._call(ops.destroy, uuid, what="destroy the VM", uuid=uuid)
        return {"inventory": await self._inventory(uuid)}

    @destroy_vm.check
    async def _destroy_check(self, params: Empty, uuid: str) -> None:
        await self._require(uuid, lambda s, active: active, "destroy", "it is not running")

    @action(ACTIONS, "migrateVm", params=MigrateVm, result=VmMigrateReply, requires="libvirt")
    async def migrate_vm(self, job, params: MigrateVm, uuid: str) -> dict[str, Any]:
        """Live-migrate to another node's libvirt (persistent there, undefined here)."""
        uuid = _path_uuid(uuid)
        if uuid in self.busy:
            raise errors.Conflict(f"VM {uuid} is busy ({self.busy[uuid]} in progress)", code="VM.1011")
        self.busy[uuid] = "migrate"
        started = time.monotonic()
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        if params.copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        if params.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if params.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        mparams: dict[str, Any] = {}
        if params.migrate_uri:
            mparams[libvirt.VIR_MIGRATE_PARAM_URI] = params.migrate_uri
        if params.bandwidth:
            mparams[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = params.bandwidth
        job.progress(0, f"migrating to {params.destination}")
        task = asyncio.ensure_future(self._call(
            ops.migrate, uuid, params.destination, mparams, flags, timeout=params.timeout + 60,
            what=f"migrate the VM to {params.destination}", uuid=uuid))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL)
                if done:
                    break
                if time.monotonic() - started > params.timeout:
                    await self._abort_migration(uuid, task)
                    raise errors.Timeout(f"the migration of VM {uuid} did not finish within "
                                         f"{params.timeout} s and was aborted; the VM still "
                                         "runs here", code="VM.1408")
                await self._migration_progress(job, uuid)
            try:
                task.result()
            except errors.ApiError as e:
                if e.code in ("VM.1500", "VM.1002", "VM.1601"):
                    raise errors.OperationFailed(
                        f"the migration of VM {uuid} to {params.destination} failed: "
                        f"{e.description}", code="VM.1601") from None
                raise
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_migration(uuid, task))
            raise
        finally:
            self.busy.pop(uuid, None)
        return {"vmInstanceUuid": uuid, "destination": params.destination,
                "seconds": round(time.monotonic() - started, 3)}

    @migrate_vm.check
    async def _migrate_check(self, params: MigrateVm, uuid: str) -> None:
        await self._require(uuid, lambda s, active: s in (S.RUNNING, S.PAUSED), "migrate",
                            "only a Running or Paused VM can be live-migrated")

    async def _migration_progress(self, job, uuid: str) -> None:
        try:
            st = await self._call(ops.job_stats, uuid, timeout=5)
        except Exception:
            return            # progress is best effort; the migration's own result matters
        total = st.get("data_total") or st.get("memory_total") or 0
        remaining = st.get("data_remaining", st.get("memory_remaining"))
        processed = st.get("data_processed") or st.get("memory_processed") or 0
        # Zero pages are skipped, not sent: what is left says more than what was sent.
        percent = min(99.0, 100.0 * (total - remaining) / total) if total and remaining is not None else None
        job.progress(percent, "migrating", dataTotal=total, dataProcessed=processed,
                     dataRemaining=remaining, timeElapsedMs=st.get("time_elapsed"))

    async def _abort_migration(self, uuid: str, task: asyncio.Future) -> None:
        try:
            await self._call(ops.abort_job, uuid, timeout=10)
        except Exception as e:
            log.warning("could not abort the migration of VM %s: %s", uuid, e)
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except Exception:
            pass


def _confine_disks(disk_paths: list[str], roots: paths.Roots) -> list[str]:
    """Blocking (lstat/readlink): run in the plugin's pool."""
    return [str(paths.confine_disk(p, roots)) for p in disk_paths]
