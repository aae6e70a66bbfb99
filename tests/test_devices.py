"""The devices plugin: the scanner over generated sysfs trees, then real agent
processes over HTTP, with a real isolated libvirtd for attach and detach.

This machine has no IOMMU and no USB bus, so libvirt's *live* attach fails
(the error path is tested); config-only attach to a stopped VM works.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import pytest
import yarl

import sysfs_fixtures as fx
from conftest import run_job, submit, wait_job
from libvirt_fixture import libvirtd  # noqa: F401  (the session fixture)
from agent.errors import BadRequest
from agent.models import dump
from agent.query import QuerySpec, run_query
from plugins.devices import (PciDeviceInventory, UsbDeviceInventory, build_view, candidates,
                             hostdev, pci, take_snapshot, usb)

PCI_IDS = "/usr/share/misc/pci.ids"
UNREACHABLE_LIBVIRT = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


# --- trees ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_tree(tmp_path_factory) -> fx.SysfsTree:
    return fx.gpu_server(tmp_path_factory.mktemp("gpu") / "root")


@pytest.fixture(scope="module")
def no_iommu_tree(tmp_path_factory) -> fx.SysfsTree:
    return fx.no_iommu_host(tmp_path_factory.mktemp("noiommu") / "root")


def view_of(tree: fx.SysfsTree, pci_attached=None, usb_refs=None):
    snap = take_snapshot(str(tree.root), PCI_IDS)
    return build_view(snap, pci_attached or {}, usb_refs or [], "host-1")


def candidate_reasons(view, vm=None) -> tuple[list[str], dict[str, str]]:
    ok, refused = [], {}
    for addr, dev in view.snap.pci.items():
        r = candidates.pci_candidate_reason(dev, view.pci_status[addr], view.snap.pci,
                                            view.pci_status, view.members, vm)
        if r is None:
            ok.append(addr)
        else:
            refused[addr] = r
    return ok, refused


# --- 1. the PCI scanner ------------------------------------------------------------------

def test_gpu_every_field(gpu_tree):
    inv = view_of(gpu_tree).pci[fx.GPU0]
    assert inv == {
        "pciDeviceAddress": fx.GPU0, "hostUuid": "host-1",
        "name": "GA102GL [RTX A6000]", "description": "NVIDIA Corporation GA102GL [RTX A6000]",
        "vendorId": "10de", "deviceId": "2230", "subvendorId": "10de", "subdeviceId": "1459",
        "classCode": "030000", "type": "GPU", "headerType": 0, "revision": "a1",
        "status": "Free", "statusReason": None, "vmInstanceUuid": None,
        "driver": "vfio-pci", "iommuGroup": 21, "iommuGroupMembers": [fx.GPU0, fx.GPU0_AUDIO],
        "numaNode": 0, "sriovPhysicalFunction": None, "sriovVirtualFunctions": [],
        "sriovTotalVfs": None, "sriovNumVfs": None, "parentBridge": "0000:3a:00.0",
        "bootVga": False,
        "metaData": {"vendorName": "NVIDIA Corporation", "deviceName": "GA102GL [RTX A6000]",
                     "className": "VGA compatible controller", "driver": "vfio-pci"},
    }
    # The dicts are what the model describes (so the query API knows every field).
    for item in view_of(gpu_tree).pci_list:
        assert PciDeviceInventory.model_validate(item).model_dump(by_alias=True) == item


def test_types_from_class_codes(gpu_tree):
    types = {a: i["type"] for a, i in view_of(gpu_tree).pci.items()}
    assert types[fx.GPU0] == types[fx.GPU1] == types[fx.BMC_VGA] == "GPU"
    assert types[fx.GPU0_AUDIO] == types[fx.GPU1_AUDIO] == "Audio"
    assert types[fx.NIC_PF] == types[fx.ONBOARD_NIC] == "NIC"
    assert all(types[vf] == "NIC" for vf in fx.NIC_VFS)
    assert types[fx.NVME] == types[fx.SATA] == "Storage"
    assert all(types[p] == "Bridge" for p in fx.ROOT_PORTS + [fx.HOST_BRIDGE, fx.BMC_BRIDGE, fx.PCH_LPC])
    assert types[fx.XHCI] == types[fx.PCH_SMBUS] == "Other"
    assert [pci.device_type(c) for c in ("030200", "040100", "040000", "120000", "0b4000")] == \
        ["GPU", "Audio", "Other", "Other", "Other"]


def test_bridges_numa_drivers_and_parents(gpu_tree):
    devs = pci.scan(str(gpu_tree.root))
    assert len(devs) == 26 and list(devs) == sorted(devs)
    assert devs["0000:3a:00.0"].header_type == 1 and devs[fx.BMC_BRIDGE].header_type == 1
    assert devs[fx.HOST_BRIDGE].header_type == 0 and devs[fx.HOST_BRIDGE].is_bridge
    assert devs[fx.BMC_VGA].parent == fx.BMC_BRIDGE and devs[fx.BMC_BRIDGE].parent == "0000:00:1c.0"
    assert devs[fx.HOST_BRIDGE].parent is None
    assert devs[fx.BMC_VGA].boot_vga and not devs[fx.GPU1].boot_vga
    assert (devs[fx.GPU1].numa_node, devs[fx.GPU1].driver) == (1, "nvidia")
    assert devs[fx.PCH_LPC].driver is None and devs[fx.PCH_SMBUS].driver == "i801_smbus"


def test_pci_names_are_read_in_the_scan_not_when_the_view_is_built(gpu_tree, tmp_path):
    """The views are built on the event loop: every name they show must have been read
    from pci.ids by the scan (in a runner thread), so none is read while building one."""
    ids_copy = tmp_path / "pci.ids"
    shutil.copy(PCI_IDS, ids_copy)
    snap = take_snapshot(str(gpu_tree.root), str(ids_copy))
    ids_copy.unlink()                       # a read now would find no file, so no names
    gpu = build_view(snap, {}, [], "host-1").pci[fx.GPU0]
    assert gpu["metaData"]["vendorName"] == "NVIDIA Corporation"
    assert gpu["metaData"]["deviceName"] == "GA102GL [RTX A6000]"
    assert pci.PciIds.load(str(ids_copy)) is None


def test_sriov_parent_and_children(gpu_tree):
    devs = pci.scan(str(gpu_tree.root))
    pf = devs[fx.NIC_PF]
    assert pf.virtfns == fx.NIC_VFS
    assert (pf.sriov_total_vfs, pf.sriov_num_vfs, pf.physfn) == (64, 4, None)
    for i, vf in enumerate(fx.NIC_VFS):
        d = devs[vf]
        assert (d.physfn, d.vendor_id, d.device_id, d.driver) == (fx.NIC_PF, "8086", "154c", "iavf")
        assert d.iommu_group == 52 + i and d.virtfns == [] and d.sriov_total_vfs is None
    # scan() takes a VF's PF from the PF's virtfn links; alone, a VF reads its physfn link.
    assert pci.read_device(str(gpu_tree.root), fx.NIC_VFS[1]) == devs[fx.NIC_VFS[1]]
    assert pci.read_device(str(gpu_tree.root), fx.NIC_PF) == pf
    inv = view_of(gpu_tree).pci
    assert inv[fx.NIC_VFS[0]]["sriovPhysicalFunction"] == fx.NIC_PF
    assert inv[fx.NIC_PF]["sriovVirtualFunctions"] == fx.NIC_VFS
    assert inv[fx.NIC_PF]["metaData"]["subsystemName"] == "Ethernet Converged Network Adapter X710-2"


def test_iommu_groups(gpu_tree, no_iommu_tree):
    devs = pci.scan(str(gpu_tree.root))
    members = candidates.group_members(devs)
    assert members[21] == [fx.GPU0, fx.GPU0_AUDIO] and members[41] == [fx.GPU1, fx.GPU1_AUDIO]
    assert members[9] == [fx.BMC_BRIDGE, fx.BMC_VGA]
    assert members[12] == [fx.PCH_LPC, fx.PCH_PMC, fx.PCH_SMBUS, fx.PCH_SPI]
    assert pci.iommu_active(str(gpu_tree.root)) is True
    assert pci.iommu_active(str(no_iommu_tree.root)) is False
    assert all(d.iommu_group is None for d in pci.scan(str(no_iommu_tree.root)).values())


def test_host_critical_devices(gpu_tree):
    snap = take_snapshot(str(gpu_tree.root), PCI_IDS)
    assert snap.critical == {
        fx.SATA: "holds the host's mounted filesystem /",
        "0000:00:1c.5": "carries the host's default route (br0 -> eno1)",
        fx.ONBOARD_NIC: "carries the host's default route (br0 -> eno1)",
        fx.BMC_VGA: "is the host console's VGA device (boot_vga=1)",
    }


def test_statuses(gpu_tree):
    view = view_of(gpu_tree)
    st = {a: (s.status, s.reason) for a, s in view.pci_status.items()}
    for bridge in fx.ROOT_PORTS + [fx.BMC_BRIDGE]:
        assert st[bridge] == ("NotAssignable", "it is a PCI bridge (class 0x060400)")
    assert st[fx.HOST_BRIDGE] == ("NotAssignable", "it is a PCI bridge (class 0x060000)")
    assert st[fx.SATA] == ("NotAssignable",
                           "the host needs it: it holds the host's mounted filesystem /")
    assert st[fx.ONBOARD_NIC] == ("NotAssignable", "the host needs it: it carries the host's "
                                  "default route (br0 -> eno1)")
    assert st[fx.BMC_VGA] == ("NotAssignable", "the host needs it: it is the host console's VGA "
                              "device (boot_vga=1)")
    for fn in (fx.PCH_PMC, fx.PCH_SMBUS, fx.PCH_SPI):
        assert st[fn] == ("NotAssignable", f"its IOMMU group 12 also holds the bridge {fx.PCH_LPC}")
    for free in [fx.GPU0, fx.GPU0_AUDIO, fx.GPU1, fx.GPU1_AUDIO, fx.NVME, fx.XHCI, fx.NIC_PF,
                 *fx.NIC_VFS]:
        assert st[free] == ("Free", None), free


def test_candidates_and_reasons(gpu_tree):
    ok, refused = candidate_reasons(view_of(gpu_tree))
    assert ok == sorted([fx.XHCI, fx.GPU0, fx.GPU0_AUDIO, fx.NVME, *fx.NIC_VFS])
    assert refused[fx.GPU1] == (f"its IOMMU group 41 member {fx.GPU1_AUDIO} is bound to the host "
                                "driver snd_hda_intel; bind it to vfio-pci first")
    assert refused[fx.GPU1_AUDIO] == (f"its IOMMU group 41 member {fx.GPU1} is bound to the host "
                                      "driver nvidia; bind it to vfio-pci first")
    assert refused[fx.NIC_PF].startswith("it is an SR-IOV physical function with 4 VFs enabled")
    assert refused[fx.SATA].startswith("the host needs it")
    assert refused[fx.PCH_SMBUS] == f"its IOMMU group 12 also holds the bridge {fx.PCH_LPC}"
    assert set(ok) | set(refused) == set(view_of(gpu_tree).pci)


def test_candidates_with_attachments(gpu_tree):
    vm_a, vm_b = "a" * 32, "b" * 32
    view = view_of(gpu_tree, pci_attached={fx.GPU0: vm_a, fx.NIC_VFS[0]: vm_b})
    inv = view.pci[fx.GPU0]
    assert (inv["status"], inv["vmInstanceUuid"]) == ("Attached", vm_a)
    ok_a, refused_a = candidate_reasons(view, vm_a)
    assert refused_a[fx.GPU0] == "it is already attached to this VM"
    assert fx.GPU0_AUDIO in ok_a                           # its group peer is with this VM
    assert refused_a[fx.NIC_VFS[0]] == f"it is attached to VM {vm_b}"
    _, refused_b = candidate_reasons(view, vm_b)
    assert refused_b[fx.GPU0_AUDIO] == f"its IOMMU group 21 member {fx.GPU0} is attached to VM {vm_a}"
    _, refused_any = candidate_reasons(view, None)
    assert refused_any[fx.GPU0] == f"it is attached to VM {vm_a}"


def test_no_iommu_host_has_no_candidates(no_iommu_tree):
    view = view_of(no_iommu_tree)
    ok, refused = candidate_reasons(view)
    assert ok == []
    assert len(refused) == 26
    # The first thing to fix comes first, even for bridges and host-critical devices.
    assert all(r == "IOMMU is not active" for r in refused.values())
    assert all(i["status"] == "NotAssignable" and i["iommuGroup"] is None for i in view.pci_list)


def test_address_forms():
    assert pci.normalize_address("0000:3B:00.0") == "0000:3b:00.0"
    assert pci.normalize_address("3b:00.1") == "0000:3b:00.1"
    assert pci.normalize_address("1:3b:1f.7") == "0001:3b:1f.7"
    for bad in ("3b:00", "0000:3b:20.0", "0000:3b:00.8", "zz:00.0", "", "0000:3b:00.0/../x"):
        assert pci.normalize_address(bad) is None, bad


def test_attribute_files_when_uevent_is_missing(tmp_path):
    t = fx.gpu_server(tmp_path / "root")
    (t.paths[fx.GPU1] / "uevent").unlink()
    dev = pci.scan(str(t.root))[fx.GPU1]
    assert (dev.vendor_id, dev.device_id, dev.subvendor_id, dev.subdevice_id, dev.class_code,
            dev.driver) == ("10de", "2230", "10de", "1459", "030000", "nvidia")


def test_the_real_host_scans():
    """This machine: a handful of virtio functions, no IOMMU, no USB."""
    snap = take_snapshot("/", PCI_IDS)
    assert snap.pci and all(pci.ADDRESS_RE.match(a) for a in snap.pci)
    view = build_view(snap, {}, [], None)
    for item in view.pci_list:
        PciDeviceInventory.model_validate(item)
    if not snap.iommu:
        assert {i["statusReason"] for i in view.pci_list} == {"IOMMU is not active"}


def test_list_bodies_are_kept_per_view(gpu_tree):
    """The list routes return FrozenItems: each body is rendered once per view and query
    string, the same JSON value as the generic path (dump, run_query, json.dumps) gives."""
    spec = QuerySpec.from_model(PciDeviceInventory)
    view = view_of(gpu_tree)
    for qs, params in (("", {}), ("q=type%3DGPU&limit=2", {"q": ["type=GPU"], "limit": ["2"]}),
                       ("fields=pciDeviceAddress,status&sort=-iommuGroup",
                        {"fields": ["pciDeviceAddress,status"], "sort": ["-iommuGroup"]}),
                       ("count=true", {"count": ["true"]})):
        body = view.pci_list.reply(qs, params, spec)
        assert json.loads(body) == run_query(dump(list(view.pci_list)), params, spec)
        assert view.pci_list.reply(qs, params, spec) is body
    with pytest.raises(BadRequest):                      # refused, and nothing kept
        view.pci_list.reply("q=bogus%3D1", {"q": ["bogus=1"]}, spec)
    # Another view (a rescan, an attach...) starts with none: its statuses are its own.
    attached = view_of(gpu_tree, pci_attached={fx.GPU0: "a" * 32})
    body = json.loads(attached.pci_list.reply("", {}, spec))
    assert body["inventories"][list(attached.pci).index(fx.GPU0)]["status"] == "Attached"


# --- 2. the USB scanner -------------------------------------------------------------------

def test_usb_every_field(gpu_tree):
    view = view_of(gpu_tree)
    assert list(view.usb) == ["usb1", "usb2", "1-1", "1-1.2", "1-1.3", "1-4"]
    assert view.usb[fx.USB_STICK] == {
        "id": "1-1.2", "hostUuid": "host-1", "name": "SanDisk Ultra Fit", "type": "Device",
        "busNum": "001", "devNum": "004", "idVendor": "0781", "idProduct": "5583",
        "iManufacturer": "SanDisk", "iProduct": "Ultra Fit", "iSerial": "4C530001230101108113",
        "usbVersion": "2.1", "speed": "480", "deviceClass": "00", "portPath": "1.2",
        "parentHub": "1-1", "controller": fx.XHCI, "driver": "usb",
        "status": "Free", "statusReason": None, "vmInstanceUuid": None,
    }
    root2 = view.usb["usb2"]
    assert (root2["usbVersion"], root2["speed"], root2["type"], root2["portPath"]) == \
        ("3.0", "5000", "Hub", None)
    assert view.usb[fx.USB_KEY]["parentHub"] == "usb1" and view.usb[fx.USB_RECEIVER]["iSerial"] is None
    for item in view.usb_list:
        assert UsbDeviceInventory.model_validate(item).model_dump(by_alias=True) == item


def test_usb_hubs_are_never_candidates(gpu_tree):
    view = view_of(gpu_tree)
    reasons = {k: s.refusal(None) for k, s in view.usb_status.items()}
    assert reasons == {"usb1": "it is a root hub", "usb2": "it is a root hub",
                       "1-1": "it is a USB hub", "1-1.2": None, "1-1.3": None, "1-4": None}


def test_usb_attachment_matching(gpu_tree):
    devs = usb.scan(str(gpu_tree.root))
    by_addr = hostdev.UsbRef("0781", "5583", 1, 4)
    by_ids = hostdev.UsbRef("046d", "c52b", None, None)
    wrong_dev = hostdev.UsbRef("0781", "5583", 1, 9)
    got = hostdev.usb_attached(devs, [(by_addr, "a" * 32), (by_ids, "b" * 32), (wrong_dev, "c" * 32)])
    assert got == {fx.USB_STICK: "a" * 32, fx.USB_RECEIVER: "b" * 32}
    assert usb.parse_id("1-1.2") == "1-1.2" and usb.parse_id("usb2") == "usb2"
    assert usb.parse_id("001-004") == (1, 4)
    assert usb.parse_id("../1-1") is None and usb.parse_id("1-1:1.0") is None


# --- 3. libvirt XML --------------------------------------------------------------------------

def test_hostdev_xml_round_trip(gpu_tree):
    devs = usb.scan(str(gpu_tree.root))
    domain = (f"<domain type='kvm'><name>x</name><devices>{hostdev.pci_hostdev_xml(fx.GPU0)}"
              f"{hostdev.usb_hostdev_xml(devs[fx.USB_STICK])}"
              "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000'"
              " bus='0xaf' slot='0x02' function='0x1'/></source></interface>"
              f"{hostdev.REDIRDEV_XML}<graphics type='spice'/></devices></domain>")
    parsed = hostdev.parse_devices(domain)
    assert set(parsed.pci) == {fx.GPU0, fx.NIC_VFS[1]}
    assert [ref for ref, _ in parsed.usb] == [hostdev.UsbRef("0781", "5583", 1, 4)]
    assert len(parsed.redirdevs) == 1 and parsed.spice
    el = ET.fromstring(hostdev.pci_hostdev_xml(fx.GPU0))
    assert (el.get("type"), el.get("managed")) == ("pci", "yes")
    assert el.find("source/address").attrib == {"domain": "0x0000", "bus": "0x3b",
                                                "slot": "0x00", "function": "0x0"}


# --- 4. agents over HTTP, without libvirt ------------------------------------------------------

def devices_agent(agent_factory, tree: fx.SysfsTree, libvirt_uri: str = UNREACHABLE_LIBVIRT,
                  name: str = "agent", env: dict | None = None, **devices):
    config = {"devices": {"sysfs_root": str(tree.root), **devices},
              "libvirt": {"uri": libvirt_uri}}
    return agent_factory(config, name=name, env=env)


async def get(http, agent, path, **params):
    async with http.get(agent.url + path, params=params, headers=agent.headers) as r:
        return r.status, await r.json()


async def test_inventory_over_http_without_libvirt(agent_factory, http, gpu_tree):
    agent = devices_agent(agent_factory, gpu_tree).start()
    status, health = await get(http, agent, "/v1/health")
    plugin = next(p for p in health["plugins"] if p["name"] == "devices")
    assert plugin["available"] is True
    assert plugin["capabilities"]["libvirt"]["available"] is False
    assert "off (sysfs_root is" in plugin["capabilities"]["hotplug"]["reason"]

    status, body = await get(http, agent, "/v1/pci-devices", replyWithCount="true")
    assert status == 200 and body["total"] == 26
    async with http.get(agent.url + "/v1/pci-devices", headers=agent.headers) as r:
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    # Bodies are kept by the query string as sent: an escaped '&' is another query.
    for raw, want in (("q=type%3DGPU&count=true", {"total": 3}),
                      ("q=type%3DGPU%26count%3Dtrue", {"inventories": []}),
                      ("q=type%3DGPU&count=true", {"total": 3})):
        url = yarl.URL(f"{agent.url}/v1/pci-devices?{raw}", encoded=True)
        async with http.get(url, headers=agent.headers) as r:
            assert (r.status, await r.json()) == (200, want), raw
    assert body["inventories"][0]["pciDeviceAddress"] == fx.HOST_BRIDGE
    status, body = await get(http, agent, "/v1/pci-devices", q="type=GPU",
                             fields="pciDeviceAddress,status", sort="-pciDeviceAddress")
    assert body["inventories"] == [{"pciDeviceAddress": fx.GPU1, "status": "Free"},
                                   {"pciDeviceAddress": fx.GPU0, "status": "Free"},
                                   {"pciDeviceAddress": fx.BMC_VGA, "status": "NotAssignable"}]
    status, body = await get(http, agent, "/v1/pci-devices", q="metaData.driver=vfio-pci",
                             fields="pciDeviceAddress")
    assert [i["pciDeviceAddress"] for i in body["inventories"]] == [fx.GPU0, fx.GPU0_AUDIO]
    status, body = await get(http, agent, "/v1/pci-devices", q="sriovPhysicalFunction=" + fx.NIC_PF,
                             count="true")
    assert body == {"total": 4}
    status, body = await get(http, agent, "/v1/pci-devices", q="bogus=1")
    assert status == 400 and body["error"]["code"] == "SYS.1100"

    status, body = await get(http, agent, "/v1/pci-devices/3B:00.0")
    assert status == 200 and body["inventory"]["pciDeviceAddress"] == fx.GPU0
    status, body = await get(http, agent, "/v1/pci-devices/0000:99:00.0")
    assert status == 404 and body["error"]["code"] == "PCI.1004"
    status, body = await get(http, agent, "/v1/pci-devices/not-an-address")
    assert status == 400 and body["error"]["code"] == "PCI.1001"

    status, body = await get(http, agent, "/v1/pci-devices/candidates")
    assert status == 200
    assert [i["pciDeviceAddress"] for i in body["inventories"]] == \
        sorted([fx.XHCI, fx.GPU0, fx.GPU0_AUDIO, fx.NVME, *fx.NIC_VFS])
    refused = {n["pciDeviceAddress"]: n["reason"] for n in body["notCandidates"]}
    assert len(refused) == 26 - 8 and "snd_hda_intel" in refused[fx.GPU1]
    # Checking a VM needs libvirt.
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid="a" * 32)
    assert status == 503 and body["error"]["code"] == "SYS.1504"
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid="nope")
    assert status == 400

    status, body = await get(http, agent, "/v1/usb-devices", q="type=Device", fields="id,name")
    assert body["inventories"] == [{"id": "1-1.2", "name": "SanDisk Ultra Fit"},
                                   {"id": "1-1.3", "name": "Logitech USB Receiver"},
                                   {"id": "1-4", "name": "Yubico YubiKey OTP+FIDO+CCID"}]
    status, body = await get(http, agent, "/v1/usb-devices/001-004")
    assert status == 200 and body["inventory"]["id"] == fx.USB_STICK
    status, body = await get(http, agent, "/v1/usb-devices/9-9")
    assert status == 404 and body["error"]["code"] == "USB.1004"
    status, body = await get(http, agent, "/v1/usb-devices/a;b")
    assert status == 400 and body["error"]["code"] == "USB.1001"
    status, body = await get(http, agent, "/v1/usb-devices/candidates")
    assert [i["id"] for i in body["inventories"]] == ["1-1.2", "1-1.3", "1-4"]
    assert {n["id"] for n in body["notCandidates"]} == {"usb1", "usb2", "1-1"}

    # Attaching needs libvirt: refused at once, nothing stored.
    status, body = await submit(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0}/actions",
                                {"attachPciDeviceToVm": {"vmInstanceUuid": "a" * 32}})
    assert status == 503 and body["error"]["code"] == "SYS.1504"
    assert "libvirt" in body["error"]["description"]
    status, body = await get(http, agent, "/v1/vm-instances/" + "a" * 32 + "/usb-redirect")
    assert status == 503


class EventStream:
    """GET /v1/events, read as server-sent events."""

    def __init__(self, http, agent) -> None:
        self.http, self.agent, self.resp = http, agent, None

    async def __aenter__(self) -> "EventStream":
        self.resp = await self.http.get(
            self.agent.url + "/v1/events", headers=self.agent.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        assert self.resp.status == 200
        line = await asyncio.wait_for(self.resp.content.readline(), 5)
        assert line.startswith(b": connected"), line
        return self

    async def __aexit__(self, *exc) -> None:
        self.resp.close()

    async def events(self, n: int, timeout: float) -> list[dict]:
        found: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(found) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(found)} of {n} events in {timeout} s: {found}")
            line = (await asyncio.wait_for(self.resp.content.readline(), left)).decode()
            if line.startswith("data: "):
                found.append(json.loads(line[6:]))
        return found


async def test_ttl_refresh_publishes_device_events(agent_factory, http, tmp_path):
    tree = fx.gpu_server(tmp_path / "root")
    agent = devices_agent(agent_factory, tree, refresh_seconds=0.3).start()
    async with EventStream(http, agent) as stream:
        # Hot-add a fifth VF and a USB device; hot-remove the NVMe.
        tree.sriov(fx.NIC_PF, ["0000:af:02.4"], "8086", "154c", driver="iavf", groups=[56])
        tree.usb("1-1.4", 1, 6, "0bda", "8153", controller=fx.XHCI, manufacturer="Realtek",
                 product="USB 10/100/1000 LAN", serial="000001", version="3.00", speed="5000",
                 interfaces=["ff"])
        tree.remove_pci(fx.NVME)
        t0 = time.monotonic()
        got = await stream.events(3, timeout=10)
    assert time.monotonic() - t0 < 3
    by = {(e["type"], e["data"]["deviceType"], e["data"]["id"]): e for e in got}
    assert set(by) == {("DeviceAdded", "PCI", "0000:af:02.4"), ("DeviceAdded", "USB", "1-1.4"),
                       ("DeviceRemoved", "PCI", fx.NVME)}
    assert all(e["hostUuid"] is None and e["time"].endswith("Z") for e in got)  # not connected yet
    added = by[("DeviceAdded", "PCI", "0000:af:02.4")]["data"]["inventory"]
    assert (added["vendorId"], added["deviceId"], added["type"]) == ("8086", "154c", "NIC")
    assert by[("DeviceAdded", "USB", "1-1.4")]["data"]["inventory"]["name"] == \
        "Realtek USB 10/100/1000 LAN"
    assert by[("DeviceRemoved", "PCI", fx.NVME)]["data"]["inventory"]["type"] == "Storage"
    status, body = await get(http, agent, "/v1/pci-devices/0000:af:02.4")
    assert (body["inventory"]["sriovPhysicalFunction"], body["inventory"]["status"],
            body["inventory"]["iommuGroup"]) == (fx.NIC_PF, "Free", 56)
    status, body = await get(http, agent, f"/v1/pci-devices/{fx.NVME}")
    assert status == 404
    status, body = await get(http, agent, f"/v1/pci-devices/{fx.NIC_PF}")
    assert body["inventory"]["sriovNumVfs"] == 5


async def test_refresh_parameter_rescans_now(agent_factory, http, tmp_path):
    tree = fx.gpu_server(tmp_path / "root")
    agent = devices_agent(agent_factory, tree, refresh_seconds=3600).start()
    tree.bind(fx.GPU1, "vfio-pci")
    tree.bind(fx.GPU1_AUDIO, "vfio-pci")
    status, body = await get(http, agent, "/v1/pci-devices", q="driver=vfio-pci", count="true")
    assert body == {"total": 2}                          # the cache, an hour old at most
    status, body = await get(http, agent, "/v1/pci-devices", q="driver=vfio-pci", count="true",
                             refresh="true")
    assert body == {"total": 4}
    # The body kept for this query string went with the old view.
    status, body = await get(http, agent, "/v1/pci-devices", q="driver=vfio-pci", count="true")
    assert body == {"total": 4}
    status, body = await get(http, agent, "/v1/pci-devices/candidates")
    assert {fx.GPU1, fx.GPU1_AUDIO} <= {i["pciDeviceAddress"] for i in body["inventories"]}
    status, body = await get(http, agent, "/v1/pci-devices", refresh="maybe")
    assert status == 400


def test_bad_devices_config_is_refused_at_start(agent_factory, tmp_path):
    agent = agent_factory({"devices": {"sysfs_root": str(tmp_path / "missing")}})
    with pytest.raises(RuntimeError) as e:
        agent.start()
    assert agent.proc.returncode == 2
    assert "devices.sysfs_root" in str(e.value) and "not a directory" in str(e.value)
    agent = agent_factory({"devices": {"refresh_seconds": 0}}, name="zero")
    with pytest.raises(RuntimeError) as e:
        agent.start()
    assert "devices.refresh_seconds" in str(e.value)


# --- 5. hotplug through pyudev, under umockdev ----------------------------------------------

UMOCKDEV_PRELOAD = "libumockdev-preload.so.0"


def umockdev_available() -> bool:
    return shutil.which("umockdev-wrapper") is not None and any(
        Path(d, UMOCKDEV_PRELOAD).exists()
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/lib/aarch64-linux-gnu"))


@pytest.mark.skipif(not umockdev_available(), reason="umockdev is not installed")
async def test_udev_hotplug_under_umockdev(agent_factory, http, tmp_path):
    """The agent runs with libumockdev-preload: /sys is the generated tree and its
    udev monitor socket is a Unix socket in the tree, where we play udevd."""
    tree = fx.gpu_server(tmp_path / "testbed")
    agent = agent_factory({"devices": {"sysfs_root": "/", "refresh_seconds": 3600},
                           "libvirt": {"uri": UNREACHABLE_LIBVIRT}},
                          env={"LD_PRELOAD": UMOCKDEV_PRELOAD, "UMOCKDEV_DIR": str(tree.root)})
    agent.start()
    status, health = await get(http, agent, "/v1/health")
    plugin = next(p for p in health["plugins"] if p["name"] == "devices")
    assert plugin["capabilities"]["hotplug"] == {"available": True, "reason": None}
    status, body = await get(http, agent, "/v1/pci-devices", count="true")
    assert body == {"total": 26}                    # the testbed, not this machine's 6
    assert list(tree.root.glob("event[0-9]*")), "the agent's udev monitor socket is missing"

    async with EventStream(http, agent) as stream:
        tree.pci("0000:d8:00.0", "15b3", "101d", "020000", parent="0000:ae:00.0",
                 driver="mlx5_core", group=60, numa=1, subvendor="15b3", subdevice="0016")
        assert fx.send_uevent(tree.root, tree.devpath("0000:d8:00.0"), "pci", "add") >= 1
        t0 = time.monotonic()
        [ev] = await stream.events(1, timeout=5)
        latency = time.monotonic() - t0
        assert ev["type"] == "DeviceAdded" and ev["data"]["id"] == "0000:d8:00.0"
        assert ev["data"]["inventory"]["name"].startswith("MT2892")   # ConnectX-6 Dx
        assert latency < 2, latency                 # udev, not the hour-long refresh

        devpath = tree.devpath(fx.USB_KEY)
        tree.remove_usb(fx.USB_KEY)
        fx.send_uevent(tree.root, devpath, "usb", "remove", "usb_device")
        [ev] = await stream.events(1, timeout=5)
        assert (ev["type"], ev["data"]["deviceType"], ev["data"]["id"]) == \
            ("DeviceRemoved", "USB", fx.USB_KEY)
    status, body = await get(http, agent, "/v1/usb-devices/" + fx.USB_KEY)
    assert status == 404


# --- 6. attach and detach against a real libvirtd -------------------------------------------

def lv_open(uri: str):
    import libvirt
    return libvirt.open(uri)


def define_domain(conn, workdir: Path, name: str, *, spice: bool = True):
    """A small TCG domain on a fresh qcow2, with an xHCI controller."""
    disk = workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    graphics = ("<graphics type='spice' autoport='yes' listen='127.0.0.1'/>"
                "<video><model type='qxl'/></video>") if spice else \
        "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
    uuid = str(uuidlib.uuid4())
    xml = f"""<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>
      <memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
        <controller type='usb' model='qemu-xhci' ports='8'/>
        {graphics}
      </devices></domain>"""
    return conn.defineXML(xml)


def config_xml(dom) -> str:
    import libvirt
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


@pytest.fixture
def lv(libvirtd, tmp_path):  # noqa: F811  (the imported session fixture)
    conn = lv_open(libvirtd.uri)
    made = []

    def make(name: str, **kw):
        dom = define_domain(conn, tmp_path, f"{name}-{uuidlib.uuid4().hex[:6]}", **kw)
        made.append(dom)
        return dom
    yield conn, make
    for dom in made:
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except Exception:
            pass
    conn.close()


async def libvirt_agent(agent_factory, libvirtd, tree, http):  # noqa: F811
    agent = devices_agent(agent_factory, tree, libvirtd.uri).start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, health = await get(http, agent, "/v1/health")
        plugin = next(p for p in health["plugins"] if p["name"] == "devices")
        if plugin["capabilities"]["libvirt"]["available"]:
            return agent
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agent did not connect to libvirt: {plugin}")


def hex_of(dom) -> str:
    return dom.UUIDString().replace("-", "")


async def test_pci_attach_detach_config_only(agent_factory, http, gpu_tree, libvirtd, lv):  # noqa: F811
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm, other = make("pci"), make("other")
    path = f"/v1/pci-devices/{fx.GPU0}/actions"

    status, body = await run_job(http, agent, "PUT", path,
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": vm.UUIDString()}})
    assert status == 200, body
    assert (body["inventory"]["status"], body["inventory"]["vmInstanceUuid"]) == ("Attached", hex_of(vm))
    src = ET.fromstring(config_xml(vm)).find("devices/hostdev[@type='pci']")
    assert src.get("managed") == "yes"
    assert src.find("source/address").attrib == {"domain": "0x0000", "bus": "0x3b", "slot": "0x00",
                                                 "function": "0x0"}
    status, body = await get(http, agent, f"/v1/pci-devices/{fx.GPU0}")
    assert (body["inventory"]["status"], body["inventory"]["vmInstanceUuid"]) == ("Attached", hex_of(vm))

    # Candidates per VM: the group peer goes with this VM only.
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid=hex_of(vm))
    refused = {n["pciDeviceAddress"]: n["reason"] for n in body["notCandidates"]}
    assert refused[fx.GPU0] == "it is already attached to this VM"
    assert fx.GPU0_AUDIO in [i["pciDeviceAddress"] for i in body["inventories"]]
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid=hex_of(other))
    refused = {n["pciDeviceAddress"]: n["reason"] for n in body["notCandidates"]}
    assert refused[fx.GPU0_AUDIO] == f"its IOMMU group 21 member {fx.GPU0} is attached to VM {hex_of(vm)}"
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid="f" * 32)
    assert status == 404 and body["error"]["code"] == "VM.1004"

    # Never twice: same VM, another VM.
    for target, code in ((vm, "PCI.1013"), (other, "PCI.1010")):
        status, body = await submit(http, agent, "PUT", path,
                                    {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(target)}})
        assert (status, body["error"]["code"]) == (409, code), body
    assert config_xml(vm).count("<hostdev") == 1 and "<hostdev" not in config_xml(other)

    # Detach: naming the wrong VM is refused; then it goes.
    status, body = await submit(http, agent, "PUT", path,
                                {"detachPciDeviceFromVm": {"vmInstanceUuid": hex_of(other)}})
    assert (status, body["error"]["code"]) == (409, "PCI.1010")
    status, body = await run_job(http, agent, "PUT", path, {"detachPciDeviceFromVm": {}})
    assert status == 200, body
    assert (body["inventory"]["status"], body["inventory"]["vmInstanceUuid"]) == ("Free", None)
    assert "<hostdev" not in config_xml(vm)
    status, body = await submit(http, agent, "PUT", path, {"detachPciDeviceFromVm": {}})
    assert (status, body["error"]["code"]) == (409, "PCI.1012")


async def test_iommu_group_never_split_across_vms(agent_factory, http, gpu_tree, libvirtd,
                                                  lv):  # noqa: F811
    """Issue 11.4: attach applies the candidates rule (one code path decides both)."""
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm, other = make("grp-a"), make("grp-b")
    status, body = await run_job(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0}/actions",
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 200, body
    status, body = await get(http, agent, "/v1/pci-devices/candidates", vmInstanceUuid=hex_of(other))
    reason = {n["pciDeviceAddress"]: n["reason"] for n in body["notCandidates"]}[fx.GPU0_AUDIO]
    assert reason == f"its IOMMU group 21 member {fx.GPU0} is attached to VM {hex_of(vm)}"

    status, body = await submit(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0_AUDIO}/actions",
                                {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(other)}})
    assert (status, body["error"]["code"]) == (409, "PCI.1011"), body
    assert body["error"]["description"].endswith(reason)
    assert "<hostdev" not in config_xml(other)
    # The group's peer still goes to the VM that holds the group.
    status, body = await run_job(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0_AUDIO}/actions",
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 200, body
    assert config_xml(vm).count("<hostdev") == 2


async def test_concurrent_attaches_of_one_group_to_two_vms(agent_factory, http, gpu_tree,
                                                           libvirtd, lv):  # noqa: F811
    # Both pass the check (nothing attached yet); the jobs, one at a time, see the other.
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm, other = make("race-a"), make("race-b")
    replies = await asyncio.gather(
        submit(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0}/actions",
               {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}}),
        submit(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0_AUDIO}/actions",
               {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(other)}}))
    ends = []
    for status, reply in replies:
        if status == 202:
            ends.append(await wait_job(http, agent, reply["location"]))
        else:
            ends.append((status, reply))
    # Refused at submission (409) or, past the check, the job fails (polled as 503).
    assert sorted(s for s, _ in ends) in ([200, 409], [200, 503]), ends
    [refused] = [b for s, b in ends if s != 200]
    assert refused["error"]["code"] == "PCI.1011" and "IOMMU group 21" in refused["error"]["description"]
    assert config_xml(vm).count("<hostdev") + config_xml(other).count("<hostdev") == 1


async def test_kept_list_bodies_follow_attach_and_detach(agent_factory, http, gpu_tree,
                                                         libvirtd, lv):  # noqa: F811
    """List bodies are kept per view: every status change must show in them at once."""
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm = make("kept")
    path = f"/v1/pci-devices/{fx.GPU0}/actions"

    async def listed() -> tuple:
        _, full = await get(http, agent, "/v1/pci-devices")
        _, held = await get(http, agent, "/v1/pci-devices", q="status=Attached",
                            fields="pciDeviceAddress,vmInstanceUuid")
        mine = next(i for i in full["inventories"] if i["pciDeviceAddress"] == fx.GPU0)
        return (mine["status"], mine["vmInstanceUuid"]), held["inventories"]

    async def settled(want: tuple, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := await listed()) != want and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert got == want
        assert await listed() == want           # and again, from the kept bodies

    free = (("Free", None), [])
    held = (("Attached", hex_of(vm)), [{"pciDeviceAddress": fx.GPU0, "vmInstanceUuid": hex_of(vm)}])
    await settled(free)
    status, body = await run_job(http, agent, "PUT", path,
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 200, body
    await settled(held)
    status, body = await run_job(http, agent, "PUT", path, {"detachPciDeviceFromVm": {}})
    assert status == 200, body
    await settled(free)
    # Behind the agent's back: libvirt's event (or the 5 s age limit) makes a new view.
    status, body = await run_job(http, agent, "PUT", path,
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 200, body
    await settled(held)
    el = ET.fromstring(config_xml(vm)).find("devices/hostdev[@type='pci']")
    vm.detachDeviceFlags(ET.tostring(el, encoding="unicode"), 2)   # VIR_DOMAIN_AFFECT_CONFIG
    await settled(free, timeout=10)


async def test_usb_attach_detach_config_only(agent_factory, http, gpu_tree, libvirtd, lv):  # noqa: F811
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm = make("usb")
    status, body = await run_job(http, agent, "PUT", f"/v1/usb-devices/{fx.USB_STICK}/actions",
                                 {"attachUsbDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 200, body
    assert (body["inventory"]["status"], body["inventory"]["vmInstanceUuid"]) == ("Attached", hex_of(vm))
    src = ET.fromstring(config_xml(vm)).find("devices/hostdev[@type='usb']/source")
    assert src.find("vendor").get("id") == "0x0781" and src.find("product").get("id") == "0x5583"
    assert src.find("address").attrib == {"bus": "1", "device": "4"}
    status, body = await get(http, agent, "/v1/usb-devices/candidates", vmInstanceUuid=hex_of(vm))
    assert {n["id"]: n["reason"] for n in body["notCandidates"]}[fx.USB_STICK] == \
        "it is already attached to this VM"

    status, body = await submit(http, agent, "PUT", "/v1/usb-devices/1-1/actions",
                                {"attachUsbDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert (status, body["error"]["code"]) == (409, "USB.1011")
    assert "hub" in body["error"]["description"]

    status, body = await run_job(http, agent, "PUT", "/v1/usb-devices/001-004/actions",
                                 {"detachUsbDeviceFromVm": {}})
    assert status == 200, body
    assert body["inventory"]["status"] == "Free" and "<hostdev" not in config_xml(vm)


async def test_live_attach_fails_cleanly_and_changes_nothing(agent_factory, http, gpu_tree,
                                                             libvirtd, lv):  # noqa: F811
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm = make("live")
    vm.create()
    before_config, before_live = config_xml(vm), vm.XMLDesc(0)

    status, body = await run_job(http, agent, "PUT", f"/v1/pci-devices/{fx.NIC_VFS[0]}/actions",
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 503
    err = body["error"]
    assert err["code"] == "PCI.1503", err
    assert "host doesn't support passthrough of host PCI devices" in err["description"]

    status, body = await run_job(http, agent, "PUT", f"/v1/usb-devices/{fx.USB_RECEIVER}/actions",
                                 {"attachUsbDeviceToVm": {"vmInstanceUuid": hex_of(vm)}})
    assert status == 503
    assert body["error"]["code"] == "USB.1503", body
    assert "/sys/bus/usb/devices" in body["error"]["description"]

    assert config_xml(vm) == before_config and vm.XMLDesc(0) == before_live
    status, body = await get(http, agent, f"/v1/pci-devices/{fx.NIC_VFS[0]}")
    assert body["inventory"]["status"] == "Free"


def libvirtd_pid(libvirtd) -> int:  # noqa: F811
    return int((libvirtd.base / "run" / "libvirtd.pid").read_text().strip())


async def test_second_concurrent_attach_is_409(agent_factory, http, gpu_tree, libvirtd, lv):  # noqa: F811
    """libvirtd is frozen while the first attach is in its checks, so it is surely
    still running when the second request for the same device comes."""
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm, other = make("race"), make("race2")
    path = f"/v1/pci-devices/{fx.NVME}/actions"
    pid = libvirtd_pid(libvirtd)
    os.kill(pid, signal.SIGSTOP)
    try:
        first = asyncio.ensure_future(submit(
            http, agent, "PUT", path, {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(vm)}}))
        await asyncio.sleep(0.5)
        assert not first.done()
        t0 = time.monotonic()
        for target in (vm, other):
            status, body = await submit(http, agent, "PUT", path,
                                        {"attachPciDeviceToVm": {"vmInstanceUuid": hex_of(target)}})
            assert (status, body["error"]["code"]) == (409, "PCI.1009"), body
        status, body = await submit(http, agent, "PUT", path, {"detachPciDeviceFromVm": {}})
        assert (status, body["error"]["code"]) == (409, "PCI.1009")
        assert time.monotonic() - t0 < 1           # refused at once, not queued
    finally:
        os.kill(pid, signal.SIGCONT)
    status, body = await first
    assert status == 202, body
    status, body = await wait_job(http, agent, body["location"])
    assert status == 200, body
    assert config_xml(vm).count("<hostdev") == 1 and "<hostdev" not in config_xml(other)
    # The reservation ended with the job.
    status, body = await run_job(http, agent, "PUT", path, {"detachPciDeviceFromVm": {}})
    assert status == 200


async def test_usb_redirect(agent_factory, http, gpu_tree, libvirtd, lv):  # noqa: F811
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm, vnc = make("spice"), make("vnc", spice=False)
    base = f"/v1/vm-instances/{vm.UUIDString()}/usb-redirect"
    actions = f"/v1/vm-instances/{vm.UUIDString()}/actions"   # shared with the VM plugin's actions
    assert await get(http, agent, base) == (200, {"enable": False})
    status, body = await run_job(http, agent, "PUT", actions,
                                 {"setVmUsbRedirect": {"enable": True}})
    assert (status, body) == (200, {"enable": True})
    assert await get(http, agent, base) == (200, {"enable": True})
    redirs = ET.fromstring(config_xml(vm)).findall("devices/redirdev")
    assert [(r.get("bus"), r.get("type")) for r in redirs] == [("usb", "spicevmc")] * 2
    # Enabling again changes nothing.
    status, body = await run_job(http, agent, "PUT", actions,
                                 {"setVmUsbRedirect": {"enable": True}})
    assert status == 200 and len(ET.fromstring(config_xml(vm)).findall("devices/redirdev")) == 2
    status, body = await run_job(http, agent, "PUT", actions,
                                 {"setVmUsbRedirect": {"enable": False}})
    assert (status, body) == (200, {"enable": False})
    assert "<redirdev" not in config_xml(vm)
    assert await get(http, agent, base) == (200, {"enable": False})

    status, body = await submit(http, agent, "PUT", f"/v1/vm-instances/{hex_of(vnc)}/actions",
                                {"setVmUsbRedirect": {"enable": True}})
    assert (status, body["error"]["code"]) == (409, "USB.1014")
    assert "SPICE" in body["error"]["description"] and "<redirdev" not in config_xml(vnc)
    status, body = await get(http, agent, f"/v1/vm-instances/{'e' * 32}/usb-redirect")
    assert (status, body["error"]["code"]) == (404, "VM.1004")
    status, body = await get(http, agent, "/v1/vm-instances/xyz/usb-redirect")
    assert (status, body["error"]["code"]) == (400, "VM.1001")


async def test_bad_input_is_a_clear_4xx(agent_factory, http, gpu_tree, libvirtd, lv):  # noqa: F811
    conn, make = lv
    agent = await libvirt_agent(agent_factory, libvirtd, gpu_tree, http)
    vm = hex_of(make("bad"))
    cases = [
        (f"/v1/pci-devices/{fx.GPU0}/actions", {"attachPciDeviceToVm": {"vmInstanceUuid": "123"}},
         400, "SYS.1002"),
        (f"/v1/pci-devices/{fx.GPU0}/actions", {"attachPciDeviceToVm": {}}, 400, "SYS.1002"),
        (f"/v1/pci-devices/{fx.GPU0}/actions",
         {"attachPciDeviceToVm": {"vmInstanceUuid": vm, "extra": 1}}, 400, "SYS.1002"),
        (f"/v1/pci-devices/{fx.GPU0}/actions", {"attachPciDeviceToVm": {"vmInstanceUuid": "d" * 32}},
         404, "VM.1004"),
        ("/v1/pci-devices/0000:77:00.0/actions", {"attachPciDeviceToVm": {"vmInstanceUuid": vm}},
         404, "PCI.1004"),
        ("/v1/pci-devices/77-00/actions", {"attachPciDeviceToVm": {"vmInstanceUuid": vm}},
         400, "PCI.1001"),
        (f"/v1/pci-devices/{fx.SATA}/actions", {"attachPciDeviceToVm": {"vmInstanceUuid": vm}},
         409, "PCI.1011"),
        (f"/v1/pci-devices/{fx.GPU0}/actions", {"explodePciDevice": {}}, 400, "SYS.1006"),
        ("/v1/usb-devices/7-7/actions", {"attachUsbDeviceToVm": {"vmInstanceUuid": vm}},
         404, "USB.1004"),
        (f"/v1/usb-devices/{fx.USB_KEY}/actions", {"detachUsbDeviceFromVm": {}}, 409, "USB.1012"),
        (f"/v1/usb-devices/{fx.USB_KEY}/actions", {"attachUsbDeviceToVm": {"vmInstanceUuid": "e" * 32}},
         404, "VM.1004"),
    ]
    for path, body, want_status, want_code in cases:
        status, reply = await submit(http, agent, "PUT", path, body)
        assert (status, reply["error"]["code"]) == (want_status, want_code), (path, body, reply)
        assert reply["error"]["description"]
    # A refused request reserved nothing: a good one goes through at once.
    status, body = await run_job(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0}/actions",
                                 {"attachPciDeviceToVm": {"vmInstanceUuid": vm}})
    assert status == 200
    status, body = await run_job(http, agent, "PUT", f"/v1/pci-devices/{fx.GPU0}/actions",
                                 {"detachPciDeviceFromVm": {}})
    assert status == 200
    async with http.get(agent.url + "/v1/api-jobs", params={"q": "plugin=devices", "count": "true"},
                        headers=agent.headers) as r:
        assert (await r.json()) == {"total": 2}      # only the two good ones became jobs
