"""Generated sysfs trees, laid out like the kernel's, for the devices plugin.

A tree is a directory holding ``sys/`` and a few ``proc/`` files, the same
layout as an umockdev testbed (``$UMOCKDEV_DIR``), so the same tree serves
the scanner's unit tests (``sysfs_root`` = the tree), agent processes, and
pyudev under ``umockdev-wrapper`` (``sysfs_root`` = ``/``, redirected).

Device directories live under ``sys/devices/pci<domain>:<bus>/...``, nested
below their bridges; ``sys/bus/pci/devices/<addr>`` are symlinks to them, and
``driver``, ``iommu_group``, ``subsystem``, ``physfn`` and ``virtfn<N>`` are
relative symlinks as the kernel makes them.

Builders: ``gpu_server`` (the realistic host of the tests), ``no_iommu_host``
and ``large_host`` (1000 PCI functions and 200 USB devices, for the bench).
``send_uevent`` plays udevd: it sends a libudev-format message to the
monitors of processes running under umockdev with this tree.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import struct
from pathlib import Path

# --- the tree -------------------------------------------------------------------


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(f"{value}\n")


def _link(link: Path, target: Path) -> None:
    """A relative symlink, as sysfs has them."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _config_space(vendor: str, device: str, cls: str, revision: str, subvendor: str | None,
                  subdevice: str | None, header: int) -> bytes:
    """The first 256 bytes of config space (the scanner never reads it; lspci would)."""
    b = bytearray(256)
    struct.pack_into("<HH", b, 0, int(vendor, 16), int(device, 16))
    b[8] = int(revision, 16)
    b[9], b[10], b[11] = int(cls[4:6], 16), int(cls[2:4], 16), int(cls[0:2], 16)
    b[0x0E] = header
    if header == 0 and subvendor and subdevice:
        struct.pack_into("<HH", b, 0x2C, int(subvendor, 16), int(subdevice, 16))
    return bytes(b)


class SysfsTree:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sys = self.root / "sys"
        self.paths: dict[str, Path] = {}          # PCI address / USB id -> device dir
        (self.sys / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
        (self.sys / "bus/pci/drivers").mkdir(parents=True, exist_ok=True)
        (self.sys / "dev/block").mkdir(parents=True, exist_ok=True)
        (self.sys / "class/net").mkdir(parents=True, exist_ok=True)
        (self.root / "proc/self").mkdir(parents=True, exist_ok=True)
        (self.root / "proc/net").mkdir(parents=True, exist_ok=True)
        self._mounts: list[str] = []
        self._routes: list[str] = []

    # -- PCI
    def pci(self, addr: str, vendor: str, device: str, cls: str, *, parent: str | None = None,
            subvendor: str | None = None, subdevice: str | None = None, revision: str = "00",
            driver: str | None = None, group: int | None = None, numa: int = -1,
            boot_vga: bool | None = None, totalvfs: int | None = None,
            physfn: str | None = None) -> Path:
        if parent is not None:
            base = self.paths[parent] / addr
        else:
            base = self.sys / "devices" / f"pci{addr[:7]}" / addr
        bridge = cls.startswith("0604") or cls.startswith("0609") or cls.startswith("0607")
        header = (2 if cls.startswith("0607") else 1) if bridge else 0
        if bridge:                      # bridges have no subsystem ids in their header
            subvendor = subvendor or "0000"
            subdevice = subdevice or "0000"
        base.mkdir(parents=True)
        self.paths[addr] = base
        attrs = {
            "vendor": f"0x{vendor}", "device": f"0x{device}", "class": f"0x{cls}",
            "subsystem_vendor": f"0x{subvendor or vendor}", "subsystem_device": f"0x{subdevice or '0000'}",
            "revision": f"0x{revision}", "numa_node": numa, "enable": 1 if driver else 0,
            "irq": 0, "local_cpulist": "0-15", "d3cold_allowed": 1, "msi_bus": 1,
            "driver_override": "(null)", "broken_parity_status": 0,
            "modalias": f"pci:v0000{vendor.upper()}d0000{device.upper()}sv0000"
                        f"{(subvendor or vendor).upper()}sd0000{(subdevice or '0000').upper()}"
                        f"bc{cls[:2].upper()}sc{cls[2:4].upper()}i{cls[4:].upper()}",
        }
        if bridge:
            attrs["secondary_bus_number"] = 0
            attrs["subordinate_bus_number"] = 0
        if boot_vga is not None:
            attrs["boot_vga"] = 1 if boot_vga else 0
        if totalvfs is not None:
            attrs.update(sriov_totalvfs=totalvfs, sriov_numvfs=0, sriov_offset=16, sriov_stride=1,
                         sriov_vf_device=0, sriov_drivers_autoprobe=1)
        for k, v in attrs.items():
            _write(base / k, v)
        _write(base / "config", _config_space(vendor, device, cls, revision, subvendor,
                                              subdevice, header))
        uevent = [f"PCI_CLASS={cls.lstrip('0').upper() or '0'}",
                  f"PCI_ID={vendor.upper()}:{device.upper()}",
                  f"PCI_SUBSYS_ID={(subvendor or vendor).upper()}:{(subdevice or '0000').upper()}",
                  f"PCI_SLOT_NAME={addr}", f"MODALIAS={attrs['modalias']}"]
        _write(base / "uevent", "\n".join(uevent))          # DRIVER= comes with bind()
        (base / "power").mkdir()
        _write(base / "power/control", "auto")
        _link(base / "subsystem", self.sys / "bus/pci")
        if driver:
            self.bind(addr, driver)
        if group is not None:
            gdir = self.sys / "kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            _write(gdir / "type", "DMA")
            _link(gdir / "devices" / addr, base)
            _link(base / "iommu_group", gdir)
        if physfn is not None:
            _link(base / "physfn", self.paths[physfn])
        _link(self.sys / "bus/pci/devices" / addr, base)     # last: now it is visible
        return base

    def bind(self, addr: str, driver: str | None) -> None:
        """Bind to driver (None: unbind), moving the driver symlinks."""
        base = self.paths[addr]
        if (base / "driver").is_symlink():
            old = os.path.basename(os.readlink(base / "driver"))
            (self.sys / "bus/pci/drivers" / old / addr).unlink(missing_ok=True)
            (base / "driver").unlink()
        if driver:
            ddir = self.sys / "bus/pci/drivers" / driver
            ddir.mkdir(parents=True, exist_ok=True)
            _link(ddir / addr, base)
            _link(base / "driver", ddir)
        # The kernel generates uevent when read: its DRIVER line follows the binding.
        if (base / "uevent").exists():
            lines = [ln for ln in (base / "uevent").read_text().splitlines()
                     if not ln.startswith("DRIVER=")]
            _write(base / "uevent", "\n".join(([f"DRIVER={driver}"] if driver else []) + lines))

    def sriov(self, pf: str, vfs: list[str], vendor: str, device: str, *, driver: str | None,
              groups: list[int] | None, numa: int = -1) -> None:
        """Enable VFs on a PF: the VF functions, physfn/virtfnN links, sriov_numvfs."""
        pf_dir = self.paths[pf]
        parent = pf_dir.parent.name if pf_dir.parent.name[:4].isdigit() else None
        for i, vf in enumerate(vfs):
            vf_dir = self.pci(vf, vendor, device, "020000", parent=parent, driver=driver,
                              group=groups[i] if groups else None, numa=numa,
                              subvendor="8086", subdevice="0000", physfn=pf)
            index = len(list(pf_dir.glob("virtfn*")))
            _link(pf_dir / f"virtfn{index}", vf_dir)
        _write(pf_dir / "sriov_numvfs", len(list(pf_dir.glob("virtfn*"))))

    def remove_pci(self, addr: str) -> None:
        """Hot-unplug: the device dir and every link to it go."""
        base = self.paths.pop(addr)
        for link in [self.sys / "bus/pci/devices" / addr,
                     *self.sys.glob(f"kernel/iommu_groups/*/devices/{addr}"),
                     *self.sys.glob(f"bus/pci/drivers/*/{addr}")]:
            link.unlink(missing_ok=True)
        shutil.rmtree(base)

    # -- USB
    def usb(self, name: str, busnum: int, devnum: int, vendor: str, product_id: str, *,
            controller: str, device_class: str = "00", manufacturer: str | None = None,
            product: str | None = None, serial: str | None = None, version: str = "2.00",
            speed: str = "480", interfaces: list[str] = ("00",), maxchild: int = 0) -> Path:
        if name.startswith("usb"):
            base = self.paths[controller] / name
        else:
            bus, _, ports = name.partition("-")
            parent = f"usb{bus}" if "." not in ports else name.rsplit(".", 1)[0]
            base = self.paths[parent] / name
        base.mkdir(parents=True)
        self.paths[name] = base
        attrs = {"busnum": busnum, "devnum": devnum, "idVendor": vendor, "idProduct": product_id,
                 "bDeviceClass": device_class, "bDeviceSubClass": "00",
                 "bDeviceProtocol": "01" if device_class == "09" else "00",
                 "bNumConfigurations": 1, "bConfigurationValue": 1, "bMaxPacketSize0": 64,
                 "bcdDevice": "0100", "version": f" {version}", "speed": speed,
                 "maxchild": maxchild, "devpath": name.partition("-")[2] or "0",
                 "removable": "unknown" if name.startswith("usb") else "removable",
                 "authorized": 1, "bNumInterfaces": f" {len(interfaces)}",
                 "dev": f"189:{(busnum - 1) * 128 + devnum - 1}"}
        for k, v in (("manufacturer", manufacturer), ("product", product), ("serial", serial)):
            if v is not None:
                attrs[k] = v
        for k, v in attrs.items():
            _write(base / k, v)
        _write(base / "uevent", "\n".join([
            "MAJOR=189", f"MINOR={(busnum - 1) * 128 + devnum - 1}",
            f"DEVNAME=bus/usb/{busnum:03d}/{devnum:03d}", "DEVTYPE=usb_device", "DRIVER=usb",
            f"PRODUCT={int(vendor, 16):x}/{int(product_id, 16):x}/100",
            f"TYPE={int(device_class, 16)}/0/0", f"BUSNUM={busnum:03d}", f"DEVNUM={devnum:03d}"]))
        usbdir = self.sys / "bus/usb"
        (usbdir / "devices").mkdir(parents=True, exist_ok=True)
        (usbdir / "drivers/usb").mkdir(parents=True, exist_ok=True)
        _link(base / "subsystem", usbdir)
        _link(base / "driver", usbdir / "drivers/usb")
        _link(usbdir / "devices" / name, base)
        for i, icls in enumerate(interfaces):
            iname = f"{'%s-0' % name[3:] if name.startswith('usb') else name}:1.{i}"
            idir = base / iname
            idir.mkdir()
            for k, v in {"bInterfaceClass": icls, "bInterfaceNumber": f"{i:02d}",
                         "bAlternateSetting": " 0", "bNumEndpoints": "01"}.items():
                _write(idir / k, v)
            _write(idir / "uevent", "DEVTYPE=usb_interface")
            _link(idir / "subsystem", usbdir)
            _link(usbdir / "devices" / iname, idir)
        return base

    def remove_usb(self, name: str) -> None:
        base = self.paths.pop(name)
        for entry in list((self.sys / "bus/usb/devices").iterdir()):
            if entry.name == name or entry.name.startswith(name + ":"):
                entry.unlink()
        shutil.rmtree(base)

    # -- what the host uses: disks, mounts, NICs, routes
    def block(self, under: str, relpath: str, name: str, majmin: str,
              partitions: dict[str, str] | None = None) -> Path:
        """A disk below a device: e.g. under='0000:00:17.0', relpath='ata1/host0/...'."""
        disk = self.paths[under] / relpath / "block" / name
        _write(disk / "dev", majmin)
        _write(disk / "size", 1953525168)
        (disk / "slaves").mkdir(parents=True, exist_ok=True)
        (disk / "holders").mkdir(exist_ok=True)
        _link(self.sys / "dev/block" / majmin, disk)
        _link(self.sys / "class/block" / name, disk)
        for part, pmm in (partitions or {}).items():
            _write(disk / part / "dev", pmm)
            _write(disk / part / "partition", part[-1])
            _link(self.sys / "dev/block" / pmm, disk / part)
            _link(self.sys / "class/block" / part, disk / part)
        return disk

    def mount(self, majmin: str, mountpoint: str, fstype: str, source: str) -> None:
        n = len(self._mounts) + 21
        parent = 1 if mountpoint == "/" else 21
        self._mounts.append(f"{n} {parent} {majmin} / {mountpoint} rw,relatime shared:{n - 20} "
                            f"- {fstype} {source} rw")
        extra = ["90 21 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
                 "91 21 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=65536k",
                 "92 21 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw"]
        _write(self.root / "proc/self/mountinfo", "\n".join(self._mounts + extra))
        _write(self.root / "proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority")

    def nic(self, iface: str, addr: str | None = None, lowers: list[str] = ()) -> Path:
        """A net device: on a PCI function, or virtual (bridge/bond) over lowers."""
        if addr is not None:
            ndir = self.paths[addr] / "net" / iface
            ndir.mkdir(parents=True)
            _link(ndir / "device", self.paths[addr])
        else:
            ndir = self.sys / "devices/virtual/net" / iface
            ndir.mkdir(parents=True)
            (ndir / "brif").mkdir()
        for k, v in {"operstate": "up", "mtu": 1500, "type": 1, "address": "3c:ec:ef:00:00:01"}.items():
            _write(ndir / k, v)
        for low in lowers:
            low_dir = Path(os.path.realpath(self.sys / "class/net" / low))
            _link(ndir / f"lower_{low}", low_dir)
            _link(low_dir / f"upper_{iface}", ndir)
            (low_dir / "brport").mkdir(exist_ok=True)
            _link(low_dir / "brport/bridge", ndir)
            _link(ndir / "brif" / low, low_dir / "brport")
        _link(self.sys / "class/net" / iface, ndir)
        return ndir

    def default_route(self, iface: str, gateway_hex: str = "0100000A") -> None:
        self._routes.append(f"{iface}\t00000000\t{gateway_hex}\t0003\t0\t0\t0\t00000000\t0\t0\t0")
        self._routes.append(f"{iface}\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0")
        header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
        _write(self.root / "proc/net/route", "\n".join([header] + self._routes))

    def devpath(self, key: str) -> str:
        """The udev DEVPATH of a device: its path below sys/."""
        return "/" + str(self.paths[key].relative_to(self.sys))


# --- the hosts ---------------------------------------------------------------------

# The GPU server's devices, for the tests' expectations.
GPU0, GPU0_AUDIO = "0000:3b:00.0", "0000:3b:00.1"
GPU1, GPU1_AUDIO = "0000:86:00.0", "0000:86:00.1"
NIC_PF = "0000:af:00.0"
NIC_VFS = ["0000:af:02.0", "0000:af:02.1", "0000:af:02.2", "0000:af:02.3"]
NVME = "0000:5e:00.0"
SATA = "0000:00:17.0"
XHCI = "0000:00:14.0"
HOST_BRIDGE = "0000:00:00.0"
BMC_BRIDGE, BMC_VGA = "0000:02:00.0", "0000:03:00.0"
ONBOARD_NIC = "0000:04:00.0"
PCH_LPC, PCH_PMC, PCH_SMBUS, PCH_SPI = "0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.4", "0000:00:1f.5"
ROOT_PORTS = ["0000:00:1c.0", "0000:00:1c.5", "0000:3a:00.0", "0000:5d:00.0", "0000:85:00.0",
              "0000:ae:00.0"]
USB_HUB, USB_STICK, USB_RECEIVER, USB_KEY = "1-1", "1-1.2", "1-1.3", "1-4"


def gpu_server(root: Path, *, iommu: bool = True) -> SysfsTree:
    """A 2-socket Skylake-SP GPU server.

    * 2 GPUs (RTX A6000), each with its HDMI audio function in one IOMMU
      group: GPU0 bound to vfio-pci (ready), GPU1 to nvidia/snd_hda_intel;
    * an X710 NIC PF with 4 SR-IOV VFs, each VF in its own group;
    * an NVMe drive (unused), the boot SATA controller (/ and /boot/efi);
    * the BMC's VGA (the console, boot_vga=1) behind its PCI bridge;
    * the onboard I210 NIC, bridged into br0, which holds the default route;
    * PCH functions sharing a group with the LPC (ISA) bridge;
    * an xHCI controller: USB 2 and 3 root hubs, a hub and 3 devices.
    """
    t = SysfsTree(root)
    g = (lambda n: n) if iommu else (lambda n: None)
    t.pci(HOST_BRIDGE, "8086", "2020", "060000", subvendor="15d9", subdevice="095d", revision="04",
          group=g(0), numa=0)
    t.pci(XHCI, "8086", "a1af", "0c0330", subvendor="15d9", subdevice="095d", revision="09",
          driver="xhci_hcd", group=g(5), numa=0)
    t.pci(SATA, "8086", "a182", "010601", subvendor="15d9", subdevice="095d", revision="09",
          driver="ahci", group=g(7), numa=0)
    t.pci("0000:00:1c.0", "8086", "a190", "060400", revision="f9", driver="pcieport", group=g(8),
          numa=0)
    t.pci(BMC_BRIDGE, "1a03", "1150", "060400", parent="0000:00:1c.0", revision="04",
          group=g(9), numa=0)
    t.pci(BMC_VGA, "1a03", "2000", "030000", parent=BMC_BRIDGE, subvendor="15d9",
          subdevice="095d", revision="41", driver="ast", group=g(9), numa=0, boot_vga=True)
    t.pci("0000:00:1c.5", "8086", "a195", "060400", revision="f9", driver="pcieport", group=g(10),
          numa=0)
    t.pci(ONBOARD_NIC, "8086", "1533", "020000", parent="0000:00:1c.5", subvendor="15d9",
          subdevice="1533", revision="03", driver="igb", group=g(11), numa=0)
    t.pci(PCH_LPC, "8086", "a1c2", "060100", subvendor="15d9", subdevice="095d", revision="09",
          group=g(12), numa=0)
    t.pci(PCH_PMC, "8086", "a1a1", "058000", subvendor="15d9", subdevice="095d", revision="09",
          group=g(12), numa=0)
    t.pci(PCH_SMBUS, "8086", "a1a3", "0c0500", subvendor="15d9", subdevice="095d", revision="09",
          driver="i801_smbus", group=g(12), numa=0)
    t.pci(PCH_SPI, "8086", "a1a4", "0c8000", subvendor="15d9", subdevice="095d", revision="09",
          group=g(12), numa=0)
    # GPU0 on socket 0, prepared for passthrough.
    t.pci("0000:3a:00.0", "8086", "2030", "060400", revision="04", driver="pcieport", group=g(20),
          numa=0)
    t.pci(GPU0, "10de", "2230", "030000", parent="0000:3a:00.0", subvendor="10de",
          subdevice="1459", revision="a1", driver="vfio-pci", group=g(21), numa=0, boot_vga=False)
    t.pci(GPU0_AUDIO, "10de", "1aef", "040300", parent="0000:3a:00.0", subvendor="10de",
          subdevice="1459", revision="a1", driver="vfio-pci", group=g(21), numa=0)
    # NVMe on socket 0, not mounted.
    t.pci("0000:5d:00.0", "8086", "2030", "060400", revision="04", driver="pcieport", group=g(30),
          numa=0)
    t.pci(NVME, "144d", "a80a", "010802", parent="0000:5d:00.0", subvendor="144d",
          subdevice="a813", revision="00", driver="nvme", group=g(31), numa=0)
    # GPU1 on socket 1, used by the host.
    t.pci("0000:85:00.0", "8086", "2030", "060400", revision="04", driver="pcieport", group=g(40),
          numa=1)
    t.pci(GPU1, "10de", "2230", "030000", parent="0000:85:00.0", subvendor="10de",
          subdevice="1459", revision="a1", driver="nvidia", group=g(41), numa=1, boot_vga=False)
    t.pci(GPU1_AUDIO, "10de", "1aef", "040300", parent="0000:85:00.0", subvendor="10de",
          subdevice="1459", revision="a1", driver="snd_hda_intel", group=g(41), numa=1)
    # X710 on socket 1 with 4 VFs.
    t.pci("0000:ae:00.0", "8086", "2030", "060400", revision="04", driver="pcieport", group=g(50),
          numa=1)
    t.pci(NIC_PF, "8086", "1572", "020000", parent="0000:ae:00.0", subvendor="8086",
          subdevice="0007", revision="02", driver="i40e", group=g(51), numa=1, totalvfs=64)
    t.sriov(NIC_PF, NIC_VFS, "8086", "154c", driver="iavf",
            groups=[g(52), g(53), g(54), g(55)] if iommu else None, numa=1)
    # Disks, mounts, NICs and the default route.
    t.block(SATA, "ata1/host0/target0:0:0/0:0:0:0", "sda", "8:0", {"sda1": "8:1", "sda2": "8:2"})
    t.block(NVME, "nvme/nvme0", "nvme0n1", "259:0")
    t.mount("8:2", "/", "ext4", "/dev/sda2")
    t.mount("8:1", "/boot/efi", "vfat", "/dev/sda1")
    t.nic("eno1", ONBOARD_NIC)
    t.nic("ens2f0", NIC_PF)
    t.nic("br0", lowers=["eno1"])
    t.default_route("br0")
    # USB: root hubs, a 4-port hub, a stick, a receiver, a security key.
    t.usb("usb1", 1, 1, "1d6b", "0002", controller=XHCI, device_class="09",
          manufacturer="Linux 6.1.0-13-amd64 xhci-hcd", product="xHCI Host Controller",
          serial=XHCI, version="2.00", speed="480", interfaces=["09"], maxchild=16)
    t.usb("usb2", 2, 1, "1d6b", "0003", controller=XHCI, device_class="09",
          manufacturer="Linux 6.1.0-13-amd64 xhci-hcd", product="xHCI Host Controller",
          serial=XHCI, version="3.00", speed="5000", interfaces=["09"], maxchild=10)
    t.usb(USB_HUB, 1, 2, "0424", "2514", controller=XHCI, device_class="09",
          product="USB 2.0 Hub", version="2.00", speed="480", interfaces=["09"], maxchild=4)
    t.usb(USB_STICK, 1, 4, "0781", "5583", controller=XHCI, manufacturer="SanDisk",
          product="Ultra Fit", serial="4C530001230101108113", version="2.10", speed="480",
          interfaces=["08"])
    t.usb(USB_RECEIVER, 1, 5, "046d", "c52b", controller=XHCI, manufacturer="Logitech",
          product="USB Receiver", version="2.00", speed="12", interfaces=["03", "03", "03"])
    t.usb(USB_KEY, 1, 3, "1050", "0407", controller=XHCI, manufacturer="Yubico",
          product="YubiKey OTP+FIDO+CCID", version="2.00", speed="12",
          interfaces=["03", "03", "0b"])
    return t


def no_iommu_host(root: Path) -> SysfsTree:
    """The same server booted without intel_iommu=on: no IOMMU groups at all."""
    return gpu_server(root, iommu=False)


def large_host(root: Path, pci_count: int = 1000, usb_count: int = 200) -> SysfsTree:
    """pci_count PCI functions (8 SR-IOV PFs with ~120 VFs each) and usb_count USB devices."""
    t = SysfsTree(root)
    t.pci(HOST_BRIDGE, "8086", "2020", "060000", group=0, numa=0)
    t.pci(XHCI, "8086", "a1af", "0c0330", driver="xhci_hcd", group=1, numa=0)
    n, group = 2, 2
    pfs = 8
    vf_total = pci_count - n - 2 * pfs
    for i in range(pfs):
        port, bus = f"0000:{0x10 + i * 0x10:02x}:00.0", 0x11 + i * 0x10
        pf = f"0000:{bus:02x}:00.0"
        t.pci(port, "8086", "2030", "060400", driver="pcieport", group=group, numa=i % 2)
        t.pci(pf, "8086", "1572", "020000", parent=port, driver="i40e", group=group + 1,
              numa=i % 2, totalvfs=128)
        group += 2
        count = vf_total // pfs + (1 if i < vf_total % pfs else 0)
        vfs = [f"0000:{bus:02x}:{2 + k // 8:02x}.{k % 8}" for k in range(count)]
        t.sriov(pf, vfs, "8086", "154c", driver="vfio-pci" if i % 2 else "iavf",
                groups=list(range(group, group + count)), numa=i % 2)
        group += count
    usb_made, bus = 0, 1
    while usb_made < usb_count:
        t.usb(f"usb{bus}", bus, 1, "1d6b", "0002", controller=XHCI, device_class="09",
              product="xHCI Host Controller", interfaces=["09"], maxchild=16)
        usb_made += 1
        devnum = 2
        for hub in range(1, 4):
            if usb_made >= usb_count:
                break
            t.usb(f"{bus}-{hub}", bus, devnum, "0424", "2514", controller=XHCI,
                  device_class="09", product="USB 2.0 Hub", interfaces=["09"], maxchild=7)
            devnum += 1
            usb_made += 1
            for port in range(1, 8):
                if usb_made >= usb_count:
                    break
                t.usb(f"{bus}-{hub}.{port}", bus, devnum, "0781", "5583", controller=XHCI,
                      manufacturer="SanDisk", product="Ultra Fit", serial=f"SN{bus:02d}{devnum:03d}",
                      interfaces=["08"])
                devnum += 1
                usb_made += 1
        bus += 1
    return t


# --- udev events for processes running under umockdev -------------------------------

def _murmur2(data: bytes) -> int:
    """MurmurHash2 as libudev hashes subsystem and devtype for its socket filters."""
    m, h = 0x5BD1E995, len(data) & 0xFFFFFFFF
    while len(data) >= 4:
        k = int.from_bytes(data[:4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
        data = data[4:]
    if len(data) == 3:
        h ^= data[2] << 16
    if len(data) >= 2:
        h ^= data[1] << 8
    if len(data) >= 1:
        h ^= data[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


_seqnum = [1000]


def send_uevent(root: Path, devpath: str, subsystem: str, action: str,
                devtype: str | None = None) -> int:
    """Deliver a udev event to every monitor of the processes using this testbed.

    libumockdev-preload turns each NETLINK_KOBJECT_UEVENT socket of a process
    into a Unix socket ``$UMOCKDEV_DIR/event<N>``; this writes the message
    udevd would send there (libudev's header, then NUL-separated properties),
    as umockdev's own uevent_sender does.  Returns how many monitors got it.
    """
    _seqnum[0] += 1
    props = [f"ACTION={action}", f"DEVPATH={devpath}", f"SUBSYSTEM={subsystem}",
             f"SEQNUM={_seqnum[0]}"]
    if devtype:
        props.append(f"DEVTYPE={devtype}")
    body = b"".join(p.encode() + b"\0" for p in props)
    size = 40                     # struct udev_monitor_netlink_header
    header = (b"libudev\0" + struct.pack("!I", 0xFEEDCAFE) + struct.pack("=III", size, size, len(body))
              + struct.pack("!II", _murmur2(subsystem.encode()),
                            _murmur2(devtype.encode()) if devtype else 0)
              + struct.pack("=II", 0, 0))
    sent = 0
    for path in glob.glob(os.path.join(str(root), "event[0-9]*")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(path)
                s.send(header + body)
                sent += 1
            except OSError:       # that process closed its monitor
                pass
    return sent
