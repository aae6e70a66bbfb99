"""The devices plugin: PCI and USB inventory, passthrough to VMs, USB redirection.

Inventory comes from sysfs under ``[devices] sysfs_root`` (``pci.py``,
``usb.py``), is cached, and is rescanned on udev events (``hotplug.py``,
only when the root is ``/``) and every ``refresh_seconds``; each device that
appears or goes is pushed as a DeviceAdded / DeviceRemoved event.  Which VM
holds which device comes from the libvirt domains' XML (``hostdev.py``); the
status and candidate rules are in ``candidates.py``.

Attach and detach are jobs that need libvirt; the inventory does not.  A
device is reserved when a request for it is checked (a refusal gives it back)
until its job ends, so a second request for the same device is a 409 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from agent import errors
from agent.libvirt_conn import libvirt
from agent.models import WireModel
from agent.plugin import Plugin, action, get, query
from agent.query import FrozenItems
from agent.validation import full_match

from . import candidates, hostdev, pci, usb
from .candidates import ATTACHED, NOT_ASSIGNABLE, Assessment
from .hotplug import HotplugMonitor

log = logging.getLogger("node_agent.devices")

SCAN_TIMEOUT = 30.0
ATTACHMENTS_TTL = 5.0          # seconds a libvirt domain scan is trusted
ATTACHMENTS_TIMEOUT = 10.0     # a read never waits longer for libvirt
RESERVATION_SECONDS = 60.0     # a reservation whose job never started is dropped
HOTPLUG_DEBOUNCE = 0.2
UUID_PATTERN = (r"^[0-9a-fA-F]{32}$|"
                r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class DevicesSettings(WireModel):
    """The [devices] config section."""
    sysfs_root: str = Field("/", description="the directory holding sys/ (and proc/)")
    hotplug: bool | None = Field(None, description="listen to udev; default: when sysfs_root is /")
    refresh_seconds: float = Field(30.0, gt=0, le=86400,
                                   description="rescan sysfs at least this often")
    pci_ids: str = Field("/usr/share/misc/pci.ids", description="pciutils' names; '' for none")
    usb_redirect_channels: int = Field(2, ge=1, le=16,
                                       description="SPICE USB redirection channels per VM")

    @field_validator("sysfs_root")
    @classmethod
    def _is_dir(cls, v: str) -> str:
        if not os.path.isdir(v):
            raise ValueError(f"{v} is not a directory")
        return v


# -- the wire ------------------------------------------------------------------

class PciDeviceInventory(WireModel):
    pci_device_address: str = Field(description="domain:bus:slot.function")
    host_uuid: str | None = None
    name: str
    description: str | None = None
    vendor_id: str
    device_id: str
    subvendor_id: str | None = None
    subdevice_id: str | None = None
    class_code: str = Field(description="6 hex digits: class, subclass, programming interface")
    type: str = Field(description="GPU, Audio, NIC, Storage, Bridge or Other")
    header_type: int = Field(description="0 endpoint, 1 PCI-PCI bridge, 2 CardBus bridge")
    revision: str | None = None
    status: str = Field(description="Free, Attached or NotAssignable")
    status_reason: str | None = Field(None, description="why NotAssignable")
    vm_instance_uuid: str | None = Field(None, description="the VM holding it (hex)")
    driver: str | None = None
    iommu_group: int | None = None
    iommu_group_members: list[str] = []
    numa_node: int | None = None
    sriov_physical_function: str | None = Field(None, description="the PF of a VF")
    sriov_virtual_functions: list[str] = Field([], description="the VFs of a PF")
    sriov_total_vfs: int | None = None
    sriov_num_vfs: int | None = None
    parent_bridge: str | None = None
    boot_vga: bool = False
    meta_data: dict[str, str] = Field({}, description="names and facts to match offerings on")


class UsbDeviceInventory(WireModel):
    id: str = Field(description="the sysfs name: bus-port.port (1-1.2), usbN for a root hub")
    host_uuid: str | None = None
    name: str
    type: str = Field(description="Hub or Device")
    bus_num: str
    dev_num: str
    id_vendor: str
    id_product: str
    i_manufacturer: str | None = None
    i_product: str | None = None
    i_serial: str | None = None
    usb_version: str | None = None
    speed: str | None = Field(None, description="Mbit/s")
    device_class: str | None = None
    port_path: str | None = None
    parent_hub: str | None = None
    controller: str | None = Field(None, description="PCI address of the host controller")
    driver: str | None = None
    status: str
    status_reason: str | None = None
    vm_instance_uuid: str | None = None


class PciDeviceReply(WireModel):
    inventory: PciDeviceInventory


class UsbDeviceReply(WireModel):
    inventory: UsbDeviceInventory


class PciNotCandidate(WireModel):
    pci_device_address: str
    reason: str


class UsbNotCandidate(WireModel):
    id: str
    reason: str


class PciCandidates(WireModel):
    inventories: list[PciDeviceInventory]
    not_candidates: list[PciNotCandidate]


class UsbCandidates(WireModel):
    inventories: list[UsbDeviceInventory]
    not_candidates: list[UsbNotCandidate]


class ListParams(WireModel):
    refresh: bool = Field(False, description="rescan sysfs (and the VMs) before answering")


class CandidateParams(WireModel):
    vm_instance_uuid: str | None = Field(None, pattern=UUID_PATTERN,
                                         description="the VM to attach to; any VM when absent")


class AttachToVm(WireModel):
    vm_instance_uuid: str = Field(pattern=UUID_PATTERN)


class DetachFromVm(WireModel):
    vm_instance_uuid: str | None = Field(None, pattern=UUID_PATTERN,
                                         description="if given, the VM must be the one holding it")


class UsbRedirect(WireModel):
    enable: bool


# -- state -----------------------------------------------------------------------

@dataclass(slots=True)
class Snapshot:
    """One scan of sysfs (immutable once made)."""
    pci: dict[str, pci.PciDevice]
    usb: dict[str, usb.UsbDevice]
    iommu: bool
    critical: dict[str, str]
    ids: pci.PciIds | None
    taken: float


def take_snapshot(root: str, ids_path: str | None) -> Snapshot:
    """Blocking: read everything under root."""
    p = pci.scan(root)
    u = usb.scan(root)
    ids = pci.pci_ids(ids_path)
    if ids is not None:
        # Names missing from its memo are read from pci.ids now, in this thread:
        # the views are built on the loop and must find them there.
        for dev in p.values():
            ids.names(dev.vendor_id, dev.device_id, dev.subvendor_id, dev.subdevice_id)
    return Snapshot(p, u, pci.iommu_active(root), candidates.host_critical(root, p, u),
                    ids, time.time())


@dataclass(slots=True)
class View:
    """A snapshot joined with the attachments: statuses and inventories."""
    snap: Snapshot
    pci_status: dict[str, Assessment]
    usb_status: dict[str, Assessment]
    members: dict[int, list[str]]
    pci: dict[str, dict[str, Any]] = field(default_factory=dict)
    usb: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the list routes return: the dicts are JSON-ready and never change
    # (any change makes a new View), so the core skips dump() and keeps each
    # reply body it renders on these objects: 1000 PCI items take ~5 ms to
    # render, a kept body nothing.
    pci_list: FrozenItems = field(default_factory=FrozenItems)
    usb_list: FrozenItems = field(default_factory=FrozenItems)


def _described(dev: pci.PciDevice, ids: pci.PciIds | None,
               cache: dict[tuple, tuple]) -> tuple[str, str | None, str, dict[str, str]]:
    """(name, description, type, metaData but the driver) of a function, once per
    combination of ids and class: the thousand VFs of a host share a handful."""
    key = (dev.vendor_id, dev.device_id, dev.subvendor_id, dev.subdevice_id, dev.class_code)
    found = cache.get(key)
    if found is None:
        vendor = device = cls = subsys = None
        if ids is not None:
            vendor, device, subsys = ids.names(dev.vendor_id, dev.device_id,
                                               dev.subvendor_id, dev.subdevice_id)
            cls = ids.class_name(dev.class_code)
        meta = {"vendorName": vendor, "deviceName": device, "className": cls,
                "subsystemName": subsys}
        found = cache[key] = (
            device or f"{dev.vendor_id}:{dev.device_id}",
            " ".join(x for x in (vendor, device) if x) or cls,
            pci.device_type(dev.class_code),
            {k: v for k, v in meta.items() if v is not None})
    return found


def _check_assignable(st: Assessment, vm: str, area: str, what: str) -> None:
    """409 when the device's status keeps it from VM vm: attached, or not assignable."""
    if st.status == ATTACHED:
        if st.vm == vm:
            raise errors.Conflict(f"{what} is already attached to this VM", code=f"{area}.1013")
        raise errors.Conflict(f"{what} is attached to VM {st.vm}; detach it first",
                              code=f"{area}.1010")
    if st.status == NOT_ASSIGNABLE:
        raise errors.Conflict(f"{what} cannot be given to a VM: {st.reason}", code=f"{area}.1011")


def _refuse_pci(view: View, addr: str, vm: str) -> None:
    """409 unless the function may go to VM vm: the candidates endpoint's own rule."""
    refusal = candidates.pci_refusal(view.snap.pci[addr], view.pci_status[addr], view.snap.pci,
                                     view.pci_status, view.members, vm)
    if refusal is not None:
        raise errors.Conflict(f"PCI device {addr} cannot be attached to VM {vm}: "
                              f"{refusal.reason}", code=f"PCI.{refusal.number}")


def pci_inventory(dev: pci.PciDevice, st: Assessment, members: dict[int, list[str]],
                  ids: pci.PciIds | None, host_uuid: str | None,
                  names: dict[tuple, tuple] | None = None) -> dict[str, Any]:
    name, description, type_, meta = _described(dev, ids, {} if names is None else names)
    return {
        "pciDeviceAddress": dev.address,
        "hostUuid": host_uuid,
        "name": name,
        "description": description,
        "vendorId": dev.vendor_id, "deviceId": dev.device_id,
        "subvendorId": dev.subvendor_id, "subdeviceId": dev.subdevice_id,
        "classCode": dev.class_code, "type": type_,
        "headerType": dev.header_type, "revision": dev.revision,
        "status": st.status, "statusReason": st.reason, "vmInstanceUuid": st.vm,
        "driver": dev.driver, "iommuGroup": dev.iommu_group,
        "iommuGroupMembers": list(members.get(dev.iommu_group, ())) if dev.iommu_group is not None else [],
        "numaNode": dev.numa_node,
        "sriovPhysicalFunction": dev.physfn, "sriovVirtualFunctions": list(dev.virtfns),
        "sriovTotalVfs": dev.sriov_total_vfs, "sriovNumVfs": dev.sriov_num_vfs,
        "parentBridge": dev.parent, "bootVga": dev.boot_vga,
        "metaData": (meta | {"driver": dev.driver}) if dev.driver is not None else dict(meta),
    }


def usb_inventory(dev: usb.UsbDevice, st: Assessment, host_uuid: str | None) -> dict[str, Any]:
    return {
        "id": dev.id, "hostUuid": host_uuid,
        "name": " ".join(x for x in (dev.manufacturer, dev.product) if x)
                or f"{dev.id_vendor}:{dev.id_product}",
        "type": "Hub" if dev.is_hub else "Device",
        "busNum": f"{dev.bus_num:03d}", "devNum": f"{dev.dev_num:03d}",
        "idVendor": dev.id_vendor, "idProduct": dev.id_product,
        "iManufacturer": dev.manufacturer, "iProduct": dev.product, "iSerial": dev.serial,
        "usbVersion": dev.usb_version, "speed": dev.speed, "deviceClass": dev.device_class,
        "portPath": dev.port_path, "parentHub": dev.parent, "controller": dev.controller,
        "driver": dev.driver,
        "status": st.status, "statusReason": st.reason, "vmInstanceUuid": st.vm,
    }


def build_view(snap: Snapshot, pci_attached: dict[str, str],
               usb_refs: list[tuple[hostdev.UsbRef, str]], host_uuid: str | None) -> View:
    members = candidates.group_members(snap.pci)
    pst = candidates.assess_pci(snap.pci, snap.iommu, snap.critical, pci_attached, members)
    ust = candidates.assess_usb(snap.usb, snap.critical, hostdev.usb_attached(snap.usb, usb_refs))
    view = View(snap, pst, ust, members)
    names: dict[tuple, tuple] = {}
    view.pci = {a: pci_inventory(d, pst[a], view.members, snap.ids, host_uuid, names)
                for a, d in snap.pci.items()}
    view.usb = {k: usb_inventory(d, ust[k], host_uuid) for k, d in snap.usb.items()}
    view.pci_list, view.usb_list = FrozenItems(view.pci.values()), FrozenItems(view.usb.values())
    return view


def hex_uuid(text: str) -> str:
    return text.replace("-", "").lower()


class DevicesPlugin(Plugin):
    name = "devices"
    config_sections = {"devices": DevicesSettings}
    max_threads = 4

    def __init__(self, agent, settings) -> None:
        super().__init__(agent, settings)
        self._snap: Snapshot | None = None
        self._snap_gen = 0
        self._pci_attached: dict[str, str] = {}
        self._usb_refs: list[tuple[hostdev.UsbRef, str]] = []
        self._attach_gen = 0
        self._attach_time = 0.0          # monotonic time of the last domain scan
        self._attach_stale = True
        self._view_key: tuple | None = None
        self._view: View | None = None
        self._scan_lock = asyncio.Lock()
        self._attach_lock = asyncio.Lock()
        self._pci_attach_lock = asyncio.Lock()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._expiry: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pending_refresh: asyncio.TimerHandle | None = None
        self._hotplug: HotplugMonitor | None = None
        self.set_capability("libvirt", False, "not connected yet")

    @property
    def conf(self) -> DevicesSettings:
        return self.settings["devices"]

    @property
    def root(self) -> str:
        return self.conf.sysfs_root

    # -- lifecycle -----------------------------------------------------------
    async def lifecycle(self):
        # The first scan runs in the background: start-up does not wait for it,
        # a read that comes before it does.
        self._spawn(self._first_scan(), "devices-first-scan")
        conn = self.agent.libvirt()
        await conn.acquire()
        conn.add_listener(self._libvirt_changed)
        if libvirt is not None:
            # VIR_DOMAIN_EVENT_ID_LIFECYCLE, _DEVICE_REMOVED (libvirt 1.1.1) and
            # _DEVICE_ADDED (1.2.15) by number: the binding loads only once
            # libvirtd is there (agent.libvirt_conn).
            for event in (0, 15, 19):
                conn.subscribe(event, self._domain_event)
        self._start_hotplug()
        self._spawn(self._periodic(), "devices-refresh")
        try:
            yield
        finally:
            if self._hotplug is not None:
                self._hotplug.stop()
            if self._pending_refresh is not None:
                self._pending_refresh.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await conn.release()

    def _start_hotplug(self) -> None:
        on = self.conf.hotplug
        if on is None:
            on = os.path.realpath(self.root) == "/"
        if not on:
            self.set_capability("hotplug", False, f"off (sysfs_root is {self.root}): devices are "
                                f"rescanned every {self.conf.refresh_seconds:g} s")
            return
        mon = HotplugMonitor(self._udev_event)
        try:
            mon.start()
        except Exception as e:
            self.set_capability("hotplug", False, f"cannot listen to udev ({e}): devices are "
                                f"rescanned every {self.conf.refresh_seconds:g} s")
            return
        self._hotplug = mon
        self.set_capability("hotplug", True)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.conf.refresh_seconds)
            try:
                await self.refresh()
            except Exception:
                log.exception("device rescan failed")

    def _udev_event(self, action_: str, subsystem: str, sys_name: str) -> None:
        log.debug("udev %s %s %s", action_, subsystem, sys_name)
        if self._pending_refresh is None:
            loop = asyncio.get_running_loop()
            self._pending_refresh = loop.call_later(HOTPLUG_DEBOUNCE, self._refresh_soon)

    def _refresh_soon(self) -> None:
        self._pending_refresh = None
        self._spawn(self._refresh_logged(), "devices-hotplug-refresh")

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("device rescan after a udev event failed")

    def _libvirt_changed(self, connected: bool, reason: str | None) -> None:
        self.set_capability("libvirt", connected, reason)
        self._attach_stale = True

    def _domain_event(self, *_args: Any) -> None:
        self._attach_stale = True

    # -- the cache -------------------------------------------------------------
    def host_uuid(self) -> str | None:
        target = self.agent.events.target
        return target["hostUuid"] if target else (self.agent.node_uuid or None)

    def view(self) -> View:
        """The inventories of the current snapshot and attachments (cached)."""
        assert self._snap is not None
        key = (self._snap_gen, self._attach_gen, self.host_uuid())
        if key != self._view_key or self._view is None:
            self._view = build_view(self._snap, self._pci_attached, self._usb_refs, key[2])
            self._view_key = key
        return self._view

    async def _first_scan(self) -> None:
        try:
            await self.ensure_snapshot()
        except Exception:
            log.exception("the first device scan failed; reads will retry it")

    async def ensure_snapshot(self) -> None:
        """Scan once if there is no snapshot yet (no events for a first scan)."""
        if self._snap is not None:
            return
        async with self._scan_lock:
            if self._snap is None:
                snap = await self.runner.call(take_snapshot, self.root,
                                              self.conf.pci_ids or None, timeout=SCAN_TIMEOUT)
                self._snap, self._snap_gen = snap, self._snap_gen + 1

    async def refresh(self) -> None:
        """Rescan sysfs; publish DeviceAdded / DeviceRemoved for what changed."""
        await self.ensure_snapshot()
        async with self._scan_lock:
            snap = await self.runner.call(take_snapshot, self.root, self.conf.pci_ids or None,
                                          timeout=SCAN_TIMEOUT)
            old = self.view()
            self._snap, self._snap_gen = snap, self._snap_gen + 1
            new = self.view()
            for kind, before, after, same in (
                    ("PCI", old.pci, new.pci, _same_pci), ("USB", old.usb, new.usb, _same_usb)):
                for key, inv in before.items():
                    if key not in after or not same(inv, after[key]):
                        await self.agent.events.publish(
                            "DeviceRemoved", {"deviceType": kind, "id": key, "inventory": inv})
                for key, inv in after.items():
                    if key not in before or not same(before[key], inv):
                        await self.agent.events.publish(
                            "DeviceAdded", {"deviceType": kind, "id": key, "inventory": inv})

    async def refresh_attachments(self, force: bool = False, strict: bool = False) -> None:
        """Re-read the domains when libvirt is up and the last read is old or stale.

        force: whatever the age of the last read.  strict: a failure is raised
        (for the checks of attach and detach) instead of leaving the last read.
        """
        conn = self.agent.libvirt()
        if not conn.connected:
            return
        async with self._attach_lock:
            fresh = time.monotonic() - self._attach_time < ATTACHMENTS_TTL
            if fresh and not self._attach_stale and not force:
                return
            self._attach_stale = False
            started = time.monotonic()
            try:
                domains = await conn.call(hostdev.list_domains, runner=self.runner,
                                          timeout=ATTACHMENTS_TIMEOUT)
            except Exception as e:
                self._attach_stale = True
                if strict:
                    raise e if isinstance(e, errors.ApiError) else \
                        hostdev.map_error(e, "VM", "reading the VMs' devices") from None
                log.warning("cannot read the VMs' devices from libvirt: %s", e)
                return
            pci_att, usb_refs = hostdev.attachments(domains)
            if pci_att != self._pci_attached or usb_refs != self._usb_refs:
                self._pci_attached, self._usb_refs = pci_att, usb_refs
                self._attach_gen += 1
            self._attach_time = started

    async def checked_view(self) -> View:
        """For the checks of attach and detach: the domains read now, or a 503."""
        await self.ensure_snapshot()
        await self.refresh_attachments(force=True, strict=True)
        return self.view()

    async def current(self, rescan: bool = False) -> View:
        """The view to answer from; rescan forces a sysfs scan and a domain read."""
        await self.ensure_snapshot()
        if rescan:
            await self.refresh()
        await self.refresh_attachments(force=rescan)
        return self.view()

    # -- reservations: one attach/detach per device at a time ---------------------
    async def _reserve(self, key: tuple[str, str], area: str, what: str) -> None:
        """Take the device's lock in the request, or refuse with a 409 at once.

        Nobody ever waits on these locks, so acquire() of a free one returns
        without suspending: no other request can slip in between.
        """
        lock = self._locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            raise errors.Conflict(f"another attach or detach of {what} is running; "
                                  "try again when it has finished", code=f"{area}.1009")
        await lock.acquire()
        self._expiry[key] = asyncio.get_running_loop().call_later(
            RESERVATION_SECONDS, self._release, key)

    def _claim(self, key: tuple[str, str]) -> None:
        """The job started: its reservation lasts until it ends."""
        handle = self._expiry.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _release(self, key: tuple[str, str]) -> None:
        handle = self._expiry.pop(key, None)
        if handle is not None:
            handle.cancel()
        lock = self._locks.pop(key, None)
        if lock is not None and lock.locked():
            lock.release()

    # -- helpers -----------------------------------------------------------------
    def _pci_address(self, address: str) -> str:
        addr = pci.normalize_address(address)
        if addr is None:
            raise errors.BadRequest(f"'{address}' is not a PCI address: write "
                                    "domain:bus:slot.function, e.g. 0000:3b:00.0", code="PCI.1001")
        return addr

    def _usb_key(self, view: View, text: str) -> str | None:
        parsed = usb.parse_id(text)
        if parsed is None:
            raise errors.BadRequest(f"'{text}' is not a USB device id: use the sysfs name "
                                    "(e.g. 1-1.2) or bus-device (e.g. 001-004)", code="USB.1001")
        if isinstance(parsed, tuple):
            return next((k for k, d in view.snap.usb.items()
                         if (d.bus_num, d.dev_num) == parsed), None)
        return parsed if parsed in view.snap.usb else None

    async def _call(self, fn, *args, what: str, area: str):
        try:
            return await self.agent.libvirt().call(fn, *args, runner=self.runner)
        except errors.ApiError:
            raise
        except Exception as e:
            raise hostdev.map_error(e, area, what) from None

    async def _domain(self, uuid: str, area: str) -> hostdev.DomainInfo:
        info = await self._call(hostdev.domain_info, uuid, what=f"looking up VM {uuid}",
                                area=area)
        if info is None:
            raise errors.NotFound(f"there is no VM {uuid} on this host", code="VM.1004")
        return info

    @contextlib.contextmanager
    def _release_on_error(self, key: tuple[str, str]):
        """A check that refuses gives the reservation back."""
        try:
            yield
        except BaseException:
            self._release(key)
            raise

    # -- PCI -----------------------------------------------------------------------
    @query("/v1/pci-devices", model=PciDeviceInventory, params=ListParams)
    async def list_pci(self, params: ListParams) -> FrozenItems:
        """This host's PCI functions (QueryPciDevice)."""
        return (await self.current(params.refresh)).pci_list

    @get("/v1/pci-devices/candidates", params=CandidateParams, result=PciCandidates)
    async def pci_candidates(self, params: CandidateParams) -> dict[str, Any]:
        """The functions that may be attached to a VM, and why each other one may not."""
        vm = await self._candidate_vm(params, "PCI")
        view = await self.current()
        found, refused = [], []
        for addr, dev in view.snap.pci.items():
            refusal = candidates.pci_refusal(dev, view.pci_status[addr], view.snap.pci,
                                             view.pci_status, view.members, vm)
            if refusal is None:
                found.append(view.pci[addr])
            else:
                refused.append({"pciDeviceAddress": addr, "reason": refusal.reason})
        return {"inventories": found, "notCandidates": refused}

    async def _candidate_vm(self, params: CandidateParams, area: str) -> str | None:
        if params.vm_instance_uuid is None:
            return None
        if self.capabilities.get("libvirt") is not None:
            raise errors.Unavailable(f"libvirt is not available ({self.capabilities['libvirt']}): "
                                     "cannot check the VM", code="SYS.1504")
        vm = hex_uuid(params.vm_instance_uuid)
        await self._domain(vm, area)
        return vm

    @get("/v1/pci-devices/{address}", result=PciDeviceReply)
    async def get_pci(self, address: str) -> dict[str, Any]:
        """One PCI function."""
        addr = self._pci_address(address)
        view = await self.current()
        if addr not in view.pci:
            raise errors.NotFound(f"there is no PCI device {addr} on this host", code="PCI.1004")
        return {"inventory": view.pci[addr]}

    @action("/v1/pci-devices/{address}/actions", "attachPciDeviceToVm", params=AttachToVm,
            result=PciDeviceReply, requires="libvirt")
    async def attach_pci(self, job, params: AttachToVm, address: str) -> dict[str, Any]:
        """Give the function to a VM: a managed hostdev, live if it runs, always in its config."""
        addr, vm = self._pci_address(address), hex_uuid(params.vm_instance_uuid)
        key = ("pci", addr)
        self._claim(key)
        try:
            # Attaches of one group's functions run concurrently (each reserves only its
            # own device): one at a time, each checked against the domains read now.
            async with self._pci_attach_lock:
                domains = await self._call(hostdev.list_domains, what="reading the VMs",
                                           area="PCI")
                snap = self._snap
                if addr not in snap.pci:
                    raise errors.NotFound(f"PCI device {addr} is gone from this host",
                                          code="PCI.1004")
                attached = hostdev.attachments(domains)[0]
                members = candidates.group_members(snap.pci)
                statuses = candidates.assess_pci(snap.pci, snap.iommu, snap.critical, attached,
                                                 members)
                _refuse_pci(View(snap, statuses, {}, members), addr, vm)
                job.progress(50, f"attaching {addr}")
                await self._call(hostdev.attach, vm, hostdev.pci_hostdev_xml(addr),
                                 what=f"attaching PCI device {addr} to VM {vm}", area="PCI")
            await self.refresh_attachments(force=True)
            return {"inventory": self.view().pci.get(addr)}
        finally:
            self._release(key)

    @attach_pci.check
    async def _attach_pci_check(self, params: AttachToVm, address: str) -> None:
        addr, vm = self._pci_address(address), hex_uuid(params.vm_instance_uuid)
        key = ("pci", addr)
        await self._reserve(key, "PCI", f"PCI device {addr}")
        with self._release_on_error(key):
            view = await self.checked_view()
            if addr not in view.pci:
                raise errors.NotFound(f"there is no PCI device {addr} on this host",
                                      code="PCI.1004")
            await self._domain(vm, "PCI")
            _refuse_pci(view, addr, vm)

    @action("/v1/pci-devices/{address}/actions", "detachPciDeviceFromVm", params=DetachFromVm,
            result=PciDeviceReply, requires="libvirt")
    async def detach_pci(self, job, params: DetachFromVm, address: str) -> dict[str, Any]:
        """Take the function back from the VM holding it (live and config, where it is)."""
        addr = self._pci_address(address)
        key = ("pci", addr)
        self._claim(key)
        try:
            domains = await self._call(hostdev.list_domains, what="reading the VMs", area="PCI")
            for d in domains:
                live = d.live.pci.get(addr) if d.live else None
                config = d.config.pci.get(addr) if d.config else None
                if live is None and config is None:
                    continue
                job.progress(50, f"detaching {addr} from VM {d.uuid}")
                await self._detach(d, addr, live, config, "PCI")
                break
            else:
                raise errors.Conflict(f"PCI device {addr} is not attached to any VM",
                                      code="PCI.1012")
            await self.refresh_attachments(force=True)
            inv = self.view().pci.get(addr)
            return {"inventory": inv}
        finally:
            self._release(key)

    async def _detach(self, d: hostdev.DomainInfo, key: str, live, config, area: str) -> None:
        """Detach from wherever the domain has it: live, config or both."""
        xml = hostdev.to_xml(config if config is not None else live)
        await self._call(_detach_both, d.uuid, xml, live is not None, config is not None,
                         what=f"detaching {area} device {key} from VM {d.uuid}", area=area)

    @detach_pci.check
    async def _detach_pci_check(self, params: DetachFromVm, address: str) -> None:
        addr = self._pci_address(address)
        key = ("pci", addr)
        await self._reserve(key, "PCI", f"PCI device {addr}")
        with self._release_on_error(key):
            view = await self.checked_view()
            holder = self._pci_attached.get(addr)
            if holder is None:
                if addr not in view.pci:
                    raise errors.NotFound(f"there is no PCI device {addr} on this host",
                                          code="PCI.1004")
                raise errors.Conflict(f"PCI device {addr} is not attached to any VM",
                                      code="PCI.1012")
            if params.vm_instance_uuid and hex_uuid(params.vm_instance_uuid) != holder:
                raise errors.Conflict(f"PCI device {addr} is attached to VM {holder}, not to "
                                      f"{hex_uuid(params.vm_instance_uuid)}", code="PCI.1010")

    # -- USB -----------------------------------------------------------------------
    @query("/v1/usb-devices", model=UsbDeviceInventory, params=ListParams)
    async def list_usb(self, params: ListParams) -> FrozenItems:
        """This host's USB devices (QueryUsbDevice)."""
        return (await self.current(params.refresh)).usb_list

    @get("/v1/usb-devices/candidates", params=CandidateParams, result=UsbCandidates)
    async def usb_candidates(self, params: CandidateParams) -> dict[str, Any]:
        """The USB devices that may be attached to a VM (never hubs), and why not the others."""
        vm = await self._candidate_vm(params, "USB")
        view = await self.current()
        found, refused = [], []
        for key in view.snap.usb:
            reason = view.usb_status[key].refusal(vm)
            if reason is None:
                found.append(view.usb[key])
            else:
                refused.append({"id": key, "reason": reason})
        return {"inventories": found, "notCandidates": refused}

    @get("/v1/usb-devices/{id}", result=UsbDeviceReply)
    async def get_usb(self, id: str) -> dict[str, Any]:  # noqa: A002 (the URL's name)
        """One USB device, by sysfs id (1-1.2) or bus-device (001-004)."""
        view = await self.current()
        key = self._usb_key(view, id)
        if key is None:
            raise errors.NotFound(f"there is no USB device {id} on this host", code="USB.1004")
        return {"inventory": view.usb[key]}

    async def _usb_target(self, id: str, checked: bool = False) -> tuple[View, str]:  # noqa: A002
        view = await (self.checked_view() if checked else self.current())
        key = self._usb_key(view, id)
        if key is None:
            raise errors.NotFound(f"there is no USB device {id} on this host", code="USB.1004")
        return view, key

    @action("/v1/usb-devices/{id}/actions", "attachUsbDeviceToVm", params=AttachToVm,
            result=UsbDeviceReply, requires="libvirt")
    async def attach_usb(self, job, params: AttachToVm, id: str) -> dict[str, Any]:  # noqa: A002
        """Give the USB device to a VM: a hostdev by vendor/product and bus/device."""
        view, key = await self._usb_target(id)
        vm = hex_uuid(params.vm_instance_uuid)
        lock = ("usb", key)
        self._claim(lock)
        try:
            dev = view.snap.usb[key]
            domains = await self._call(hostdev.list_domains, what="reading the VMs", area="USB")
            holder = hostdev.usb_attached({key: dev}, hostdev.attachments(domains)[1]).get(key)
            if holder is not None:
                raise errors.Conflict(f"USB device {key} is already attached to VM {holder}",
                                      code="USB.1010" if holder != vm else "USB.1013")
            job.progress(50, f"attaching {key}")
            await self._call(hostdev.attach, vm, hostdev.usb_hostdev_xml(dev),
                             what=f"attaching USB device {key} to VM {vm}", area="USB")
            await self.refresh_attachments(force=True)
            return {"inventory": self.view().usb.get(key)}
        finally:
            self._release(lock)

    @attach_usb.check
    async def _attach_usb_check(self, params: AttachToVm, id: str) -> None:  # noqa: A002
        view, key = await self._usb_target(id, checked=True)
        vm = hex_uuid(params.vm_instance_uuid)
        lock = ("usb", key)
        await self._reserve(lock, "USB", f"USB device {key}")
        with self._release_on_error(lock):
            await self._domain(vm, "USB")
            _check_assignable(view.usb_status[key], vm, "USB", f"USB device {key}")

    @action("/v1/usb-devices/{id}/actions", "detachUsbDeviceFromVm", params=DetachFromVm,
            result=UsbDeviceReply, requires="libvirt")
    async def detach_usb(self, job, params: DetachFromVm, id: str) -> dict[str, Any]:  # noqa: A002
        """Take the USB device back from the VM holding it."""
        view, key = await self._usb_target(id)
        lock = ("usb", key)
        self._claim(lock)
        try:
            dev = view.snap.usb[key]
            domains = await self._call(hostdev.list_domains, what="reading the VMs", area="USB")
            for d in domains:
                live = next((el for ref, el in d.live.usb if ref.matches(dev)), None) \
                    if d.live else None
                config = next((el for ref, el in d.config.usb if ref.matches(dev)), None) \
                    if d.config else None
                if live is None and config is None:
                    continue
                job.progress(50, f"detaching {key} from VM {d.uuid}")
                await self._detach(d, key, live, config, "USB")
                break
            else:
                raise errors.Conflict(f"USB device {key} is not attached to any VM",
                                      code="USB.1012")
            await self.refresh_attachments(force=True)
            return {"inventory": self.view().usb.get(key)}
        finally:
            self._release(lock)

    @detach_usb.check
    async def _detach_usb_check(self, params: DetachFromVm, id: str) -> None:  # noqa: A002
        view, key = await self._usb_target(id, checked=True)
        lock = ("usb", key)
        await self._reserve(lock, "USB", f"USB device {key}")
        with self._release_on_error(lock):
            st = view.usb_status[key]
            if st.status != ATTACHED:
                raise errors.Conflict(f"USB device {key} is not attached to any VM",
                                      code="USB.1012")
            if params.vm_instance_uuid and hex_uuid(params.vm_instance_uuid) != st.vm:
                raise errors.Conflict(f"USB device {key} is attached to VM {st.vm}, not to "
                                      f"{hex_uuid(params.vm_instance_uuid)}", code="USB.1010")

    # -- SPICE USB redirection --------------------------------------------------
    @get("/v1/vm-instances/{uuid}/usb-redirect", result=UsbRedirect, requires="libvirt")
    async def get_usb_redirect(self, uuid: str) -> UsbRedirect:
        """Whether the VM has SPICE USB redirection channels (GetVmUsbRedirect)."""
        info = await self._domain(self._vm_uuid(uuid), "USB")
        devs = info.config or info.live
        return UsbRedirect(enable=bool(devs and devs.redirdevs))

    def _vm_uuid(self, uuid: str) -> str:
        if not full_match(UUID_PATTERN, uuid):
            raise errors.BadRequest(f"'{uuid}' is not a VM uuid: 32 hex digits, with or without "
                                    "dashes", code="VM.1001")
        return hex_uuid(uuid)

    # On the VM's own actions path, as API.md says: the core routes each action of a
    # path to the plugin that declares it, so the VM plugin's actions live beside it.
    # The pattern must be the VM plugin's, letter for letter, to be the same route.
    @action("/v1/vm-instances/{uuid:[0-9a-fA-F-]{32,36}}/actions", "setVmUsbRedirect",
            params=UsbRedirect, result=UsbRedirect, requires="libvirt")
    async def set_usb_redirect(self, job, params: UsbRedirect, uuid: str) -> UsbRedirect:
        """Add or remove the VM's SPICE USB redirection channels (persistent config)."""
        vm = self._vm_uuid(uuid)
        key = ("vm", vm)
        self._claim(key)
        try:
            info = await self._domain(vm, "USB")
            what = f"{'enabling' if params.enable else 'disabling'} USB redirection of VM {vm}"
            await self._call(_set_redirect, vm, params.enable, self.conf.usb_redirect_channels,
                             info.running, what=what, area="USB")
            return UsbRedirect(enable=params.enable)
        finally:
            self._release(key)

    @set_usb_redirect.check
    async def _set_usb_redirect_check(self, params: UsbRedirect, uuid: str) -> None:
        vm = self._vm_uuid(uuid)
        key = ("vm", vm)
        await self._reserve(key, "USB", f"VM {vm}'s USB redirection")
        with self._release_on_error(key):
            info = await self._domain(vm, "USB")
            if params.enable and not any(d.spice for d in info.all()):
                raise errors.Conflict(f"VM {vm} has no SPICE graphics: USB redirection goes "
                                      "through a SPICE client; add <graphics type='spice'> first",
                                      code="USB.1014")


def _detach_both(conn: Any, uuid: str, xml: str, live: bool, config: bool) -> None:
    hostdev.detach(conn, uuid, xml, live=live, config=config)


def _set_redirect(conn: Any, uuid: str, enable: bool, channels: int, running: bool) -> None:
    """Blocking: add `channels` spicevmc redirdevs, or remove them all (rolled back on error)."""
    info = hostdev.domain_info(conn, uuid)
    if info is None:
        raise libvirt.libvirtError(f"Domain not found: no domain with matching uuid '{uuid}'")
    base = info.config or info.live
    if enable:
        if base is not None and base.redirdevs:
            return
        added = 0
        try:
            for _ in range(channels):
                hostdev.attach_config_or_live(conn, uuid, hostdev.REDIRDEV_XML, running)
                added += 1
        except Exception:
            # Remove what this call added: the last `added` redirdevs of the config.
            now = hostdev.domain_info(conn, uuid)
            for el in (now.config.redirdevs[-added:] if now and now.config and added else []):
                try:
                    hostdev.detach(conn, uuid, hostdev.to_xml(el), live=False, config=True)
                except Exception:
                    pass
            raise
        return
    if info.config is not None:
        for el in info.config.redirdevs:
            hostdev.detach(conn, uuid, hostdev.to_xml(el), live=False, config=True)
    if info.live is not None:
        for el in info.live.redirdevs:
            try:
                hostdev.detach(conn, uuid, hostdev.to_xml(el), live=True, config=False)
            except Exception as e:     # the config is what counts; live goes at next boot
                log.warning("VM %s: live removal of a USB redirection channel failed: %s", uuid, e)


def _same_pci(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["vendorId"], a["deviceId"]) == (b["vendorId"], b["deviceId"])


def _same_usb(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["busNum"], a["devNum"], a["idVendor"], a["idProduct"]) == \
        (b["busNum"], b["devNum"], b["idVendor"], b["idProduct"])
