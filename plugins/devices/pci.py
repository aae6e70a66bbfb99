"""PCI devices read from sysfs: pure functions over a root directory.

Everything comes from the attribute files the kernel caches at enumeration
(``vendor``, ``class``, ``numa_node``...) and from the symlinks it keeps
(``driver``, ``iommu_group``, ``physfn``, ``virtfn<N>``).  The ``config``
file is never read: reading it wakes runtime-suspended devices (GPUs).

``root`` is the directory holding ``sys/`` (``/`` on a real host, a
generated tree in the tests).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field

ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_SHORT_RE = re.compile(r"^(?:([0-9a-f]{1,4}):)?([0-9a-f]{1,2}):([0-9a-f]{1,2})\.([0-7])$")

PCI_DEVICES = "sys/bus/pci/devices"
IOMMU_GROUPS = "sys/kernel/iommu_groups"

# Drivers that leave a device free for a guest: bound to the VFIO bus driver,
# parked on pci-stub, or unbound.
PASSTHROUGH_DRIVERS = frozenset({"vfio-pci", "pci-stub"})


@dataclass(slots=True)
class PciDevice:
    """The facts of one PCI function, as sysfs shows them."""
    address: str                      # 0000:3b:00.0
    vendor_id: str                    # 4 hex digits, lower case, no 0x
    device_id: str
    subvendor_id: str | None
    subdevice_id: str | None
    class_code: str                   # 6 hex digits: class, subclass, prog-if
    revision: str | None
    driver: str | None
    iommu_group: int | None
    numa_node: int | None             # None when the kernel says -1
    physfn: str | None                # the PF of an SR-IOV VF
    virtfns: list[str] = field(default_factory=list)
    sriov_total_vfs: int | None = None
    sriov_num_vfs: int | None = None
    parent: str | None = None         # the upstream bridge, None on a root bus
    header_type: int = 0              # 0 endpoint, 1 PCI-PCI bridge, 2 CardBus bridge
    boot_vga: bool = False

    @property
    def is_bridge(self) -> bool:
        return self.class_code.startswith("06") or self.header_type in (1, 2)


def read_text(path: str) -> str:
    """A whole (proc) file; '' when missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_attr(path: str) -> str | None:
    """A sysfs attribute, stripped; None when missing or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _hex(value: str | None, width: int) -> str | None:
    if not value:
        return None
    v = value.lower()
    if v.startswith("0x"):
        v = v[2:]
    try:
        int(v, 16)
    except ValueError:
        return None
    return v.rjust(width, "0")[-width:]


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def normalize_address(text: str) -> str | None:
    """'0000:3B:00.0', '3b:00.0' or '0:3b:0.0' as '0000:3b:00.0'; None if malformed."""
    m = _SHORT_RE.match(text.strip().lower())
    if not m:
        return None
    dom, bus, slot, fn = m.groups()
    if int(slot, 16) > 0x1f:
        return None
    return f"{int(dom or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{fn}"


def read_at(name: str, dfd: int) -> str | None:
    """An attribute of the device directory open as dfd."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _link_at(name: str, dfd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd).rpartition("/")[2]
    except OSError:
        return None


def _pair(value: str) -> tuple[str | None, str | None]:
    """'10DE:2230' -> ('10de', '2230')."""
    a, sep, b = value.partition(":")
    if not sep or not a or not b:
        return None, None
    return a.lower().rjust(4, "0"), b.lower().rjust(4, "0")


def read_device(root: str, address: str) -> PciDevice | None:
    """One function's facts, or None when it is gone (or not a PCI function).

    The ids, class and driver come from one read of ``uevent`` (the kernel's
    PCI_ID, PCI_SUBSYS_ID, PCI_CLASS, DRIVER); the rest is probed by name
    relative to the open directory: about eight system calls per function
    and no directory listing.
    """
    link = os.path.join(root, PCI_DEVICES, address)
    try:
        dfd = os.open(link, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_at(link, address, dfd)
    finally:
        os.close(dfd)


def _read_at(link: str, address: str, dfd: int) -> PciDevice | None:
    vendor = device = subvendor = subdevice = cls = driver = None
    for line in (read_at("uevent", dfd) or "").splitlines():
        key, _, value = line.partition("=")
        if key == "PCI_ID":
            vendor, device = _pair(value)
        elif key == "PCI_SUBSYS_ID":
            subvendor, subdevice = _pair(value)
        elif key == "PCI_CLASS":
            cls = _hex(value, 6)
        elif key == "DRIVER":
            driver = value or None
    if vendor is None or device is None or cls is None:     # no uevent: the attribute files
        vendor, device = _hex(read_at("vendor", dfd), 4), _hex(read_at("device", dfd), 4)
        cls = _hex(read_at("class", dfd), 6)
        if vendor is None or device is None or cls is None:
            return None
        subvendor = _hex(read_at("subsystem_vendor", dfd), 4)
        subdevice = _hex(read_at("subsystem_device", dfd), 4)
        driver = _link_at("driver", dfd)
    numa = _int(read_at("numa_node", dfd))
    physfn = _link_at("physfn", dfd)
    dev = PciDevice(
        address=address, vendor_id=vendor, device_id=device,
        subvendor_id=subvendor, subdevice_id=subdevice, class_code=cls,
        revision=_hex(read_at("revision", dfd), 2), driver=driver,
        iommu_group=_int(_link_at("iommu_group", dfd)),
        numa_node=numa if numa is not None and numa >= 0 else None, physfn=physfn)
    bridge_class = cls.startswith("06")
    total = None if physfn is not None or bridge_class else read_at("sriov_totalvfs", dfd)
    if total is not None:                   # an SR-IOV PF: list its virtfn<N> links
        dev.sriov_total_vfs = _int(total)
        dev.sriov_num_vfs = _int(read_at("sriov_numvfs", dfd))
        try:
            vfs = [n for n in os.listdir(dfd) if n.startswith("virtfn")]
        except OSError:
            vfs = []
        vfs.sort(key=lambda n: _int(n[6:]) or 0)
        dev.virtfns = [v for v in (_link_at(n, dfd) for n in vfs) if v]
    if bridge_class:
        # The kernel shows the bus numbers only on bridges (pci_is_bridge).
        if read_at("secondary_bus_number", dfd) is not None:
            dev.header_type = 2 if cls.startswith("0607") else 1
    elif cls.startswith("03"):
        dev.boot_vga = read_at("boot_vga", dfd) == "1"
    try:
        chain = os.readlink(link).split("/")
    except OSError:
        chain = []
    if len(chain) >= 2 and ADDRESS_RE.match(chain[-2]):
        dev.parent = chain[-2]
    return dev


def scan(root: str) -> dict[str, PciDevice]:
    """Every PCI function under root, by address (sorted)."""
    try:
        names = sorted(os.listdir(os.path.join(root, PCI_DEVICES)))
    except OSError:
        return {}
    found = {}
    for name in names:
        dev = read_device(root, name)
        if dev is not None:
            found[name] = dev
    return found


def iommu_active(root: str) -> bool:
    """The kernel made IOMMU groups: an IOMMU is on and a driver uses it."""
    try:
        return any(os.scandir(os.path.join(root, IOMMU_GROUPS)))
    except OSError:
        return False


# -- the type of a device, from its class code -------------------------------

def device_type(class_code: str) -> str:
    """GPU, Audio, NIC, Storage, Bridge or Other (PCI class codes, PCI SIG)."""
    base, sub = class_code[:2], class_code[2:4]
    if base == "03":
        return "GPU"
    if base == "04" and sub in ("01", "03"):
        return "Audio"
    if base == "02":
        return "NIC"
    if base == "01":
        return "Storage"
    if base == "06":
        return "Bridge"
    return "Other"


# -- names from pci.ids (pciutils' database) --------------------------------

class PciIds:
    """Vendor, device and class names, looked up lazily in a pci.ids text.

    Loading indexes only the vendor lines (a few ms for the 1.3 MB file);
    a vendor's device block is parsed the first time it is asked for.
    """

    _VENDOR = re.compile(r"^([0-9a-f]{4})  (.+)$", re.M)
    _DEVICE = re.compile(r"^\t([0-9a-f]{4})  (.+)$", re.M)
    _SUBSYS = re.compile(r"^\t\t([0-9a-f]{4}) ([0-9a-f]{4})  (.+)$", re.M)

    def __init__(self, text: str) -> None:
        self._text = text
        cut = re.search(r"^C [0-9a-f]{2}  ", text, re.M)
        self._class_start = cut.start() if cut else len(text)
        self._vendors: dict[str, tuple[str, int, int]] = {}
        prev: tuple[str, str, int] | None = None
        for m in self._VENDOR.finditer(text, 0, self._class_start):
            if prev:
                self._vendors[prev[0]] = (prev[1], prev[2], m.start())
            prev = (m.group(1), m.group(2), m.end())
        if prev:
            self._vendors[prev[0]] = (prev[1], prev[2], self._class_start)
        self._devices: dict[str, dict[str, tuple[str, int, int]]] = {}
        self._classes: dict[str, str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | None) -> "PciIds | None":
        if not path:
            return None
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return cls(f.read())
        except OSError:
            return None

    def vendor(self, vid: str) -> str | None:
        v = self._vendors.get(vid)
        return v[0] if v else None

    def _block(self, vid: str) -> dict[str, tuple[str, int, int]]:
        with self._lock:
            found = self._devices.get(vid)
            if found is not None:
                return found
            found = {}
            v = self._vendors.get(vid)
            if v:
                prev = None
                for m in self._DEVICE.finditer(self._text, v[1], v[2]):
                    if prev:
                        found[prev[0]] = (prev[1], prev[2], m.start())
                    prev = (m.group(1), m.group(2), m.end())
                if prev:
                    found[prev[0]] = (prev[1], prev[2], v[2])
            self._devices[vid] = found
            return found

    def device(self, vid: str, did: str) -> str | None:
        d = self._block(vid).get(did)
        return d[0] if d else None

    def subsystem(self, vid: str, did: str, svid: str | None, sdid: str | None) -> str | None:
        d = self._block(vid).get(did)
        if not d or not svid or not sdid:
            return None
        for m in self._SUBSYS.finditer(self._text, d[1], d[2]):
            if m.group(1) == svid and m.group(2) == sdid:
                return m.group(3)
        return None

    def class_name(self, code: str) -> str | None:
        """The name lspci shows for a 6-digit class code: its subclass's, else its class's."""
        with self._lock:
            if self._classes is None:
                self._classes = {}
                base = None
                for line in self._text[self._class_start:].splitlines():
                    if line.startswith("C "):
                        base = line[2:4]
                        self._classes[base] = line[6:]
                    elif line.startswith("\t") and not line.startswith("\t\t") and base:
                        self._classes[base + line[1:3]] = line[5:]
        c = self._classes
        return c.get(code[:4]) or c.get(code[:2])


_ids_cache: dict[str, PciIds | None] = {}
_ids_lock = threading.Lock()


def pci_ids(path: str | None) -> PciIds | None:
    """The database at path, loaded once per process."""
    if not path:
        return None
    with _ids_lock:
        if path not in _ids_cache:
            _ids_cache[path] = PciIds.load(path)
        return _ids_cache[path]
