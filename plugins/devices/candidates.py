"""Which devices may be given to a VM, and why the others may not.

Two levels:

* the **status** of a device: ``Attached`` (a libvirt domain names it),
  ``NotAssignable`` (it can never go to a guest as the host stands: no IOMMU,
  a bridge, something the host itself needs, or such a device in its IOMMU
  group) or ``Free``;
* whether it is a **candidate** for one VM: free, and its whole IOMMU group
  with it: no member attached to another VM, every other member unbound or
  bound to vfio-pci / pci-stub (libvirt's managed='yes' rebinds only the
  device it is given), not an SR-IOV PF with VFs enabled.

The host-critical devices come from the host's own state under the root:
the controllers behind mounted filesystems and swap, the NICs that carry a
default route (through bridges, bonds and VLANs), and the console VGA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .pci import ADDRESS_RE, PASSTHROUGH_DRIVERS, PciDevice, read_attr, read_text
from .usb import ID_RE as USB_ID_RE
from .usb import UsbDevice

FREE, ATTACHED, NOT_ASSIGNABLE = "Free", "Attached", "NotAssignable"
IOMMU_INACTIVE = "IOMMU is not active"


@dataclass(slots=True)
class Assessment:
    status: str
    reason: str | None = None          # why NotAssignable
    vm: str | None = None              # the domain uuid (hex) when Attached

    def refusal(self, vm: str | None) -> str | None:
        """Why this status alone keeps the device from vm (any VM when None), or None."""
        if self.status == ATTACHED:
            if vm is not None and self.vm == vm:
                return "it is already attached to this VM"
            return f"it is attached to VM {self.vm}"
        if self.status == NOT_ASSIGNABLE:
            return self.reason
        return None


# -- what the host itself needs ---------------------------------------------

def _ancestors(path: str) -> tuple[list[str], list[str]]:
    """The PCI addresses and USB device ids along a sysfs device path."""
    parts = path.split("/")
    return ([p for p in parts if ADDRESS_RE.fullmatch(p)],
            [p for p in parts if USB_ID_RE.fullmatch(p) and not p.startswith("usb")])


def _block_paths(root: str, sysdev: str, seen: set[str]) -> list[str]:
    """The real device paths behind a block device, through dm/md/LVM slaves."""
    real = os.path.realpath(sysdev)
    if real in seen:
        return []
    seen.add(real)
    found = [real]
    slaves = os.path.join(real, "slaves")
    try:
        for s in os.listdir(slaves):
            found += _block_paths(root, os.path.join(slaves, s), seen)
    except OSError:
        pass
    # A partition's slaves live on the whole disk.
    parent = os.path.dirname(real)
    if os.path.exists(os.path.join(parent, "dev")) and os.path.isdir(os.path.join(parent, "slaves")):
        found += _block_paths(root, parent, seen)
    return found


def _mounted(root: str) -> list[tuple[str, str]]:
    """(major:minor, what) of every mounted filesystem and active swap."""
    out = []
    info = read_text(os.path.join(root, "proc/self/mountinfo"))
    for line in info.splitlines():
        f = line.split()
        if len(f) >= 5 and ":" in f[2] and not f[2].startswith("0:"):
            out.append((f[2], f"the host's mounted filesystem {f[4]}"))
    swaps = read_text(os.path.join(root, "proc/swaps"))
    for line in swaps.splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        if name.startswith("/dev/"):
            dev = read_attr(os.path.join(root, "sys/class/block", os.path.basename(name), "dev"))
            if dev:
                out.append((dev, f"the host's swap {name}"))
    return out


def _default_route_ifaces(root: str) -> list[str]:
    found = []
    route = read_text(os.path.join(root, "proc/net/route"))
    for line in route.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and f[0] not in found:
            found.append(f[0])
    route6 = read_text(os.path.join(root, "proc/net/ipv6_route"))
    for line in route6.splitlines():
        f = line.split()
        if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[-1] not in found \
                and f[-1] != "lo":
            found.append(f[-1])
    return found


def _net_devices(root: str, iface: str, seen: set[str]) -> list[tuple[str, str]]:
    """(sysfs device path, chain) of the physical NICs under a net device."""
    if iface in seen:
        return []
    seen.add(iface)
    base = os.path.join(root, "sys/class/net", iface)
    found = []
    dev = os.path.join(base, "device")
    if os.path.exists(dev):
        found.append((os.path.realpath(dev), iface))
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    lower = [n[6:] for n in names if n.startswith("lower_")]
    try:
        lower += os.listdir(os.path.join(base, "brif"))
    except OSError:
        pass
    for low in lower:
        found += [(p, f"{iface} -> {chain}") for p, chain in _net_devices(root, low, seen)]
    return found


def host_critical(root: str, pci: dict[str, PciDevice],
                  usb: dict[str, UsbDevice] | None = None) -> dict[str, str]:
    """Device key (PCI address or USB id) -> what the host needs it for."""
    critical: dict[str, str] = {}

    def mark(path: str, why: str) -> None:
        addrs, ids = _ancestors(path)
        for key in addrs + ids:
            critical.setdefault(key, why)

    seen: set[str] = set()
    for majmin, what in _mounted(root):
        for path in _block_paths(root, os.path.join(root, "sys/dev/block", majmin), seen):
            mark(path, f"holds {what}")
    for iface in _default_route_ifaces(root):
        for path, chain in _net_devices(root, iface, set()):
            mark(path, f"carries the host's default route ({chain})")
    for addr, dev in pci.items():
        if dev.boot_vga:
            critical.setdefault(addr, "is the host console's VGA device (boot_vga=1)")
    return critical


# -- PCI ---------------------------------------------------------------------

def group_members(devices: dict[str, PciDevice]) -> dict[int, list[str]]:
    """IOMMU group -> its member addresses."""
    members: dict[int, list[str]] = {}
    for addr, dev in devices.items():
        if dev.iommu_group is not None:
            members.setdefault(dev.iommu_group, []).append(addr)
    return members


def assess_pci(devices: dict[str, PciDevice], iommu_on: bool, critical: dict[str, str],
               attached: dict[str, str],
               members: dict[int, list[str]] | None = None) -> dict[str, Assessment]:
    """The status of every PCI function (members: group_members(devices), if at hand)."""
    if members is None:
        members = group_members(devices)
    out = {}
    for addr, dev in devices.items():
        vm = attached.get(addr)
        if vm is not None:
            out[addr] = Assessment(ATTACHED, None, vm)
            continue
        reason = _not_assignable(dev, devices, iommu_on, critical, members)
        out[addr] = Assessment(FREE) if reason is None else Assessment(NOT_ASSIGNABLE, reason)
    return out


def _not_assignable(dev: PciDevice, devices: dict[str, PciDevice], iommu_on: bool,
                    critical: dict[str, str], members: dict[int, list[str]]) -> str | None:
    if not iommu_on:
        return IOMMU_INACTIVE
    if dev.is_bridge:
        return f"it is a PCI bridge (class 0x{dev.class_code})"
    if dev.address in critical:
        return f"the host needs it: it {critical[dev.address]}"
    if dev.iommu_group is None:
        return "it is in no IOMMU group"
    for m in members.get(dev.iommu_group, ()):
        if m == dev.address:
            continue
        other = devices[m]
        if other.is_bridge:
            return f"its IOMMU group {dev.iommu_group} also holds the bridge {m}"
        if m in critical:
            return (f"its IOMMU group {dev.iommu_group} also holds {m}, which the host "
                    f"needs: it {critical[m]}")
    return None


@dataclass(slots=True)
class Refusal:
    """Why a function may not go to a VM, and the error number an attach answers with."""
    reason: str
    number: str          # "1013" already with this VM, "1010" with another, "1011" otherwise


def pci_refusal(dev: PciDevice, status: Assessment, devices: dict[str, PciDevice],
                statuses: dict[str, Assessment], members: dict[int, list[str]],
                vm: str | None) -> Refusal | None:
    """None if dev may be attached to vm (any VM when None), else why not.

    The one rule behind both the candidates list and the attach check (its
    job applies it again to the domains read under the attach lock).
    """
    refusal = status.refusal(vm)
    if refusal is not None:
        if status.status == ATTACHED:
            return Refusal(refusal, "1013" if vm is not None and status.vm == vm else "1010")
        return Refusal(refusal, "1011")
    if dev.sriov_num_vfs:
        return Refusal(f"it is an SR-IOV physical function with {dev.sriov_num_vfs} VFs enabled; "
                       "attach a VF, or set sriov_numvfs to 0 first", "1011")
    group = dev.iommu_group
    for m in members.get(group, ()) if group is not None else ():
        if m == dev.address:
            continue
        other, st = devices[m], statuses[m]
        if st.status == ATTACHED and (vm is None or st.vm != vm):
            return Refusal(f"its IOMMU group {group} member {m} is attached to VM {st.vm}",
                           "1011")
        if st.status != ATTACHED and other.driver is not None \
                and other.driver not in PASSTHROUGH_DRIVERS:
            return Refusal(f"its IOMMU group {group} member {m} is bound to the host driver "
                           f"{other.driver}; bind it to vfio-pci first", "1011")
    return None


def pci_candidate_reason(dev: PciDevice, status: Assessment, devices: dict[str, PciDevice],
                         statuses: dict[str, Assessment], members: dict[int, list[str]],
                         vm: str | None) -> str | None:
    """None if dev may be attached to vm (any VM when None), else why not."""
    refusal = pci_refusal(dev, status, devices, statuses, members, vm)
    return None if refusal is None else refusal.reason


# -- USB ---------------------------------------------------------------------

def assess_usb(devices: dict[str, UsbDevice], critical: dict[str, str],
               attached: dict[str, str]) -> dict[str, Assessment]:
    out = {}
    for key, dev in devices.items():
        vm = attached.get(key)
        if vm is not None:
            out[key] = Assessment(ATTACHED, None, vm)
        elif dev.port_path is None:
            out[key] = Assessment(NOT_ASSIGNABLE, "it is a root hub")
        elif dev.is_hub:
            out[key] = Assessment(NOT_ASSIGNABLE, "it is a USB hub")
        elif key in critical:
            out[key] = Assessment(NOT_ASSIGNABLE, f"the host needs it: it {critical[key]}")
        else:
            out[key] = Assessment(FREE)
    return out
