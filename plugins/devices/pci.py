"""PCI devices read from sysfs: pure functions over a root directory.

Everything comes from the attribute files the kernel caches at enumeration
(``vendor``, ``class``, ``numa_node``...) and from the symlinks it keeps
(``driver``, ``iommu_group``, ``physfn``, ``virtfn<N>``).  The ``config``
file is never read: reading it wakes runtime-suspended devices (GPUs).

``root`` is the directory holding ``sys/`` (``/`` on a real host, a
generated tree in the tests).
"""

from __future__ import annotations

import bisect
import os
import re
import threading
from array import array
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


def read_at(name: str, dfd: int | None) -> str | None:
    """A sysfs attribute, stripped, by name relative to the directory open as dfd
    (or a path, dfd None); None when missing or unreadable."""
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


def read_attr(path: str) -> str | None:
    """A sysfs attribute by path: read_at without a directory."""
    return read_at(path, None)


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
    m = _SHORT_RE.fullmatch(text.strip().lower())
    if not m:
        return None
    dom, bus, slot, fn = m.groups()
    if int(slot, 16) > 0x1f:
        return None
    return f"{int(dom or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{fn}"


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
    """One function's facts, or None when it is gone (or not a PCI function)."""
    base = os.path.join(root, PCI_DEVICES)
    try:
        bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read(address, bfd, base)
    finally:
        os.close(bfd)


def _read(address: str, bfd: int, base: str, pf: str | None = None) -> PciDevice | None:
    """One function, by name in the bus's device directory base, open as bfd.

    The ids, class and driver come from one read of ``uevent`` (the kernel's
    PCI_ID, PCI_SUBSYS_ID, PCI_CLASS, DRIVER); the rest is probed by name:
    about eleven system calls per function and no directory listing.  Files
    are opened through the link's target (``../../../devices/pci0000:00/...``,
    read anyway for the parent bridge) relative to bfd, which spares opening
    and closing each device's directory.  pf: the PF whose virtfn<N> link
    names this function, when the caller has read it (then its physfn link
    is not read again).
    """
    try:
        target = os.readlink(address, dir_fd=bfd)
    except OSError:         # not a link (or gone: then every read below fails)
        target = address
    d = target + "/"
    vendor = device = subvendor = subdevice = cls = driver = None
    for line in (read_at(d + "uevent", bfd) or "").splitlines():
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
        vendor, device = _hex(read_at(d + "vendor", bfd), 4), _hex(read_at(d + "device", bfd), 4)
        cls = _hex(read_at(d + "class", bfd), 6)
        if vendor is None or device is None or cls is None:
            return None
        subvendor = _hex(read_at(d + "subsystem_vendor", bfd), 4)
        subdevice = _hex(read_at(d + "subsystem_device", bfd), 4)
        driver = _link_at(d + "driver", bfd)
    numa = _int(read_at(d + "numa_node", bfd))
    physfn = pf if pf is not None else _link_at(d + "physfn", bfd)
    chain = target.split("/")
    dev = PciDevice(
        address=address, vendor_id=vendor, device_id=device,
        subvendor_id=subvendor, subdevice_id=subdevice, class_code=cls,
        revision=_hex(read_at(d + "revision", bfd), 2), driver=driver,
        iommu_group=_int(_link_at(d + "iommu_group", bfd)),
        numa_node=numa if numa is not None and numa >= 0 else None, physfn=physfn,
        parent=chain[-2] if len(chain) >= 2 and ADDRESS_RE.fullmatch(chain[-2]) else None)
    bridge_class = cls.startswith("06")
    total = None if physfn is not None or bridge_class else read_at(d + "sriov_totalvfs", bfd)
    if total is not None:                   # an SR-IOV PF: list its virtfn<N> links
        dev.sriov_total_vfs = _int(total)
        dev.sriov_num_vfs = _int(read_at(d + "sriov_numvfs", bfd))
        try:
            vfs = [n for n in os.listdir(os.path.join(base, target)) if n.startswith("virtfn")]
        except OSError:
            vfs = []
        vfs.sort(key=lambda n: _int(n[6:]) or 0)
        dev.virtfns = [v for v in (_link_at(d + n, bfd) for n in vfs) if v]
    if bridge_class:
        # The kernel shows the bus numbers only on bridges (pci_is_bridge).
        if read_at(d + "secondary_bus_number", bfd) is not None:
            dev.header_type = 2 if cls.startswith("0607") else 1
    elif cls.startswith("03"):
        dev.boot_vga = read_at(d + "boot_vga", bfd) == "1"
    return dev


def scan(root: str) -> dict[str, PciDevice]:
    """Every PCI function under root, by address (sorted)."""
    base = os.path.join(root, PCI_DEVICES)
    try:
        bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        found = {}
        # A VF's PF is known from the PF's virtfn<N> links, read first: in address
        # order a PF comes before its VFs (a VF's routing ID is the PF's plus a
        # positive offset).  That spares a thousand VFs their physfn link.
        pf_of: dict[str, str] = {}
        for name in sorted(os.listdir(bfd)):
            dev = _read(name, bfd, base, pf_of.get(name))
            if dev is not None:
                found[name] = dev
                pf_of.update(dict.fromkeys(dev.virtfns, name))
        return found
    finally:
        os.close(bfd)


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
    """Vendor, device and class names from a pci.ids file, read when asked for.

    The 1.3 MB text is not kept: loading reads it once to index the vendor
    lines into three small arrays (~30 KB) and the class names; a name is
    looked up in its vendor's block, read back from the file (pread), the
    first time it is asked for, and only the answer is kept.  A host asks
    for a few dozen.
    """

    _VENDOR = re.compile(rb"^([0-9a-f]{4})  ", re.M)
    _CLASS = re.compile(rb"^C [0-9a-f]{2}  ", re.M)
    _DEVICE = re.compile(r"^\t[0-9a-f]{4}  ", re.M)

    def __init__(self, path: str, text: bytes) -> None:
        self.path = path
        cut = self._CLASS.search(text)
        class_start = cut.start() if cut else len(text)
        spans = []                               # (vendor id, line start, block end)
        found = list(self._VENDOR.finditer(text, 0, class_start))
        for m, nxt in zip(found, found[1:] + [None]):
            spans.append((int(m.group(1), 16), m.start(), nxt.start() if nxt else class_start))
        spans.sort()
        self._vid = array("H", (v for v, _, _ in spans))
        self._start = array("I", (a for _, a, _ in spans))
        self._end = array("I", (b for _, _, b in spans))
        self._classes = self._parse_classes(text[class_start:].decode("utf-8", "replace"))
        self._names: dict[tuple, tuple[str | None, str | None, str | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | None) -> "PciIds | None":
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return cls(path, f.read())
        except OSError:
            return None

    @staticmethod
    def _parse_classes(text: str) -> dict[str, str]:
        classes, base = {}, None
        for line in text.splitlines():
            if line.startswith("C "):
                base = line[2:4]
                classes[base] = line[6:]
            elif line.startswith("\t") and not line.startswith("\t\t") and base:
                classes[base + line[1:3]] = line[5:]
        return classes

    def names(self, vid: str, did: str, svid: str | None = None,
              sdid: str | None = None) -> tuple[str | None, str | None, str | None]:
        """(vendor, device, subsystem) names; None for what pci.ids does not know."""
        key = (vid, did, svid, sdid)
        found = self._names.get(key)
        if found is None:
            found = self._find(vid, did, svid, sdid)
            with self._lock:
                self._names[key] = found
        return found

    def _find(self, vid: str, did: str, svid: str | None,
              sdid: str | None) -> tuple[str | None, str | None, str | None]:
        block = self._block(vid)
        if block is None:
            return None, None, None
        vendor = block.partition("\n")[0][6:].strip() or None
        line = block.find(f"\n\t{did}  ")
        if line < 0:
            return vendor, None, None
        start = line + len(did) + 4
        end = block.find("\n", start) % (len(block) + 1)     # -1: the block's end
        subsys = None
        if svid and sdid:
            nxt = self._DEVICE.search(block, end)
            stop = nxt.start() if nxt else len(block)
            sub = block.find(f"\n\t\t{svid} {sdid}  ", end, stop)
            if sub >= 0:
                sub_start = sub + len(svid) + len(sdid) + 6
                sub_end = block.find("\n", sub_start)
                subsys = block[sub_start:sub_end if sub_end >= 0 else len(block)]
        return vendor, block[start:end], subsys

    def _block(self, vid: str) -> str | None:
        try:
            key = int(vid, 16)
        except ValueError:
            return None
        i = bisect.bisect_left(self._vid, key)
        if i == len(self._vid) or self._vid[i] != key:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, self._end[i] - self._start[i], self._start[i])
            finally:
                os.close(fd)
        except OSError:         # the file went away since: no names, no error
            return None
        return data.decode("utf-8", "replace")

    def vendor(self, vid: str) -> str | None:
        return self.names(vid, "")[0]

    def device(self, vid: str, did: str) -> str | None:
        return self.names(vid, did)[1]

    def subsystem(self, vid: str, did: str, svid: str | None, sdid: str | None) -> str | None:
        return self.names(vid, did, svid, sdid)[2]

    def class_name(self, code: str) -> str | None:
        """The name lspci shows for a 6-digit class code: its subclass's, else its class's."""
        return self._classes.get(code[:4]) or self._classes.get(code[:2])


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
