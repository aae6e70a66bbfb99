"""USB devices read from sysfs: pure functions over a root directory.

``sys/bus/usb/devices`` lists root hubs (``usb1``), devices (``1-1.2``: bus
1, ports 1.2) and interfaces (``1-1.2:1.0``); only devices are kept.  A
device's id is its sysfs name, which stays the same while it sits in the
same port (the device number changes on every re-plug).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .pci import ADDRESS_RE, read_at

USB_DEVICES = "sys/bus/usb/devices"
ID_RE = re.compile(r"^(usb[0-9]+|[0-9]+-[0-9]+(\.[0-9]+)*)$")
BUSDEV_RE = re.compile(r"^([0-9]{3})-([0-9]{3})$")
HUB_CLASS = "09"


@dataclass(slots=True)
class UsbDevice:
    id: str                     # 1-1.2, or usb1 for a root hub
    bus_num: int
    dev_num: int
    id_vendor: str              # 4 hex digits
    id_product: str
    manufacturer: str | None
    product: str | None
    serial: str | None
    usb_version: str | None     # "2.0", "3.1"
    speed: str | None           # Mbit/s as the kernel writes it: 1.5, 12, 480, 5000
    device_class: str | None    # bDeviceClass, 2 hex digits; 09 is a hub
    port_path: str | None       # 1.2; None for a root hub
    parent: str | None          # the hub it hangs off
    controller: str | None      # the PCI address of the host controller
    driver: str | None

    @property
    def is_hub(self) -> bool:
        return self.device_class == HUB_CLASS or self.port_path is None


def _version(raw: str | None) -> str | None:
    if not raw:
        return None
    v = raw.strip()
    major, _, minor = v.partition(".")
    minor = minor.rstrip("0")
    return f"{major}.{minor or '0'}"


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def read_device(root: str, name: str) -> UsbDevice | None:
    """One device; bus, device number, ids, class and driver come from ``uevent``."""
    try:
        bfd = os.open(os.path.join(root, USB_DEVICES), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read(name, bfd)
    finally:
        os.close(bfd)


def _read(name: str, bfd: int) -> UsbDevice | None:
    """One device, by name in the bus's device directory open as bfd.

    As for PCI (pci._read), files are opened through the link's target,
    which is read anyway for the controller, rather than an open directory.
    """
    try:
        target = os.readlink(name, dir_fd=bfd)
    except OSError:         # not a link (or gone: then every read below fails)
        target = name
    d = target + "/"
    ev: dict[str, str] = {}
    for line in (read_at(d + "uevent", bfd) or "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            ev[k] = v
    if ev.get("DEVTYPE", "usb_device") != "usb_device":
        return None
    bus, dev = _int(ev.get("BUSNUM")), _int(ev.get("DEVNUM"))
    ids = ev.get("PRODUCT", "").split("/")
    try:
        vendor, product_id = f"{int(ids[0], 16):04x}", f"{int(ids[1], 16):04x}"
    except (ValueError, IndexError):
        vendor = product_id = None
    types = ev.get("TYPE", "").split("/")
    try:
        device_class: str | None = f"{int(types[0]):02x}"
    except ValueError:
        device_class = None
    driver = ev.get("DRIVER") or None
    if bus is None or dev is None or vendor is None:      # no uevent: the attribute files
        bus, dev = _int(read_at(d + "busnum", bfd)), _int(read_at(d + "devnum", bfd))
        vendor, product_id = read_at(d + "idVendor", bfd), read_at(d + "idProduct", bfd)
        device_class = read_at(d + "bDeviceClass", bfd)
        if bus is None or dev is None or not vendor or not product_id:
            return None
        vendor, product_id = vendor.lower(), product_id.lower()
    port_path = None if name.startswith("usb") else name.partition("-")[2]
    if port_path is None:
        parent = None
    elif "." in port_path:
        parent = name.rsplit(".", 1)[0]
    else:
        parent = f"usb{bus}"
    controller = next((c for c in reversed(target.split("/")) if ADDRESS_RE.fullmatch(c)), None)
    return UsbDevice(
        id=name, bus_num=bus, dev_num=dev, id_vendor=vendor, id_product=product_id,
        manufacturer=read_at(d + "manufacturer", bfd), product=read_at(d + "product", bfd),
        serial=read_at(d + "serial", bfd), usb_version=_version(read_at(d + "version", bfd)),
        speed=read_at(d + "speed", bfd), device_class=device_class,
        port_path=port_path, parent=parent, controller=controller, driver=driver)


def scan(root: str) -> dict[str, UsbDevice]:
    """Every USB device (not interface) under root, by id."""
    try:
        bfd = os.open(os.path.join(root, USB_DEVICES), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        found = {}
        # Interfaces (1-1.2:1.0) are not devices.
        for name in sorted((n for n in os.listdir(bfd) if ":" not in n), key=_order):
            dev = _read(name, bfd)
            if dev is not None:
                found[name] = dev
        return found
    finally:
        os.close(bfd)


def _order(name: str) -> tuple:
    """usb1, usb2, 1-1, 1-1.2, 1-2, 2-1 ... (numeric, not lexical)."""
    if name.startswith("usb"):
        return (0, _int(name[3:]) or 0)
    bus, _, ports = name.partition("-")
    return (1, _int(bus) or 0, tuple(_int(p) or 0 for p in ports.split(":")[0].split(".")))


def parse_id(text: str) -> str | tuple[int, int] | None:
    """A sysfs id ('1-1.2', 'usb1') or a bus-device pair ('001-004' -> (1, 4))."""
    t = text.strip()
    m = BUSDEV_RE.fullmatch(t)
    if m:
        return int(m.group(1)), int(m.group(2))
    return t if ID_RE.fullmatch(t) else None
