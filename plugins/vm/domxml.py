"""Domain XML: a VmSpec rendered with ElementTree, and an inventory parsed back.

Never string formatting: every value from the caller goes into an attribute
or a text node through ElementTree, which escapes it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

from .models import VmSpec

KIB = 1024
_UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": KIB, "kib": KIB, "mb": 1000 ** 2, "m": KIB ** 2,
          "mib": KIB ** 2, "gb": 1000 ** 3, "g": KIB ** 3, "gib": KIB ** 3, "tb": 1000 ** 4,
          "t": KIB ** 4, "tib": KIB ** 4}
_PREFIX = {"virtio": "vd", "sata": "sd", "ide": "hd"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        el.text = text
    return el


def _target_name(prefix: str, index: int) -> str:
    return prefix + "abcdefghijklmnopqrstuvwxyz"[index]


def kvm_usable(dev: str = "/dev/kvm") -> bool:
    """/dev/kvm exists and this process can open it read-write."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_domain_type(caps_xml: str, kvm_ok: bool, wanted: str = "auto") -> tuple[str, str]:
    """(domain type, guest arch) from the host's capabilities.

    kvm when /dev/kvm is usable and the capabilities offer it for the host's
    arch, else qemu (TCG); with a driver offering neither (the test driver),
    whatever it offers.
    """
    root = ET.fromstring(caps_xml)
    host_arch = root.findtext("host/cpu/arch") or "x86_64"
    guests = [g for g in root.findall("guest") if g.findtext("os_type") == "hvm"]
    if not guests:
        raise ValueError("the hypervisor offers no hvm guests")
    guest = next((g for g in guests if g.find("arch").get("name") == host_arch), guests[0])
    arch = guest.find("arch")
    offered = [d.get("type") for d in arch.findall("domain")]
    if wanted != "auto":
        if wanted not in offered:
            raise ValueError(f"domain type {wanted} is not offered here (offered: {', '.join(offered)})")
        return wanted, arch.get("name")
    if "kvm" in offered and kvm_ok:
        return "kvm", arch.get("name")
    if "qemu" in offered:
        return "qemu", arch.get("name")
    return offered[0], arch.get("name")


XHCI_PORTS = {"qemu-xhci": 15, "nec-xhci": 15}   # QEMU's maximum for both


def render(spec: VmSpec, uuid: str, domain_type: str, arch: str,
           block_paths: frozenset[str] = frozenset()) -> str:
    """The domain XML of spec; block_paths are disk paths that are block devices."""
    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", uuid)
    if spec.description:
        _sub(dom, "description", spec.description)
    kib = str(spec.memory_size // KIB)
    _sub(dom, "memory", kib, unit="KiB")
    _sub(dom, "currentMemory", kib, unit="KiB")
    _sub(dom, "vcpu", str(spec.cpu_num), placement="static")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=arch)
    for dev in spec.boot_order:
        _sub(os_el, "boot", dev=dev)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")

    used: dict[str, int] = {}
    for d in spec.disks:
        is_block = d.path is not None and d.path in block_paths
        disk = _sub(devices, "disk", type="block" if is_block else "file", device=d.device)
        _sub(disk, "driver", name="qemu", type=d.format)
        if d.path is not None:
            _sub(disk, "source", **{"dev" if is_block else "file": d.path})
        prefix = _PREFIX[d.bus]
        index = used.get(prefix, 0)
        used[prefix] = index + 1
        _sub(disk, "target", dev=_target_name(prefix, index), bus=d.bus)
        if d.readonly:
            _sub(disk, "readonly")

    for n in spec.nics:
        if n.bridge is not None:
            iface = _sub(devices, "interface", type="bridge")
            _sub(iface, "source", bridge=n.bridge)
        else:
            iface = _sub(devices, "interface", type="network")
            _sub(iface, "source", network=n.network)
        if n.mac:
            _sub(iface, "mac", address=n.mac)
        _sub(iface, "model", type=n.model)

    for g in spec.graphics:
        attrs = {"autoport": "yes" if g.autoport else "no",
                 "port": "-1" if g.autoport else str(g.port)}
        if g.password is not None:
            attrs["passwd"] = g.password.get_secret_value()
        gr = _sub(devices, "graphics", type=g.type, **attrs)
        _sub(gr, "listen", type="address", address=g.listen)
    # Without a USB controller libvirt adds a 2-port piix3-uhci: the tablet takes one
    # port and setVmUsbRedirect's two channels find no room.
    usb = {"model": spec.usb_controller}
    if spec.usb_controller in XHCI_PORTS:
        usb["ports"] = str(XHCI_PORTS[spec.usb_controller])
    _sub(devices, "controller", type="usb", index="0", **usb)
    if spec.graphics:
        _sub(devices, "input", type="tablet", bus="usb")

    if spec.serial_console:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")

    for h in spec.hostdevs:
        hd = _sub(devices, "hostdev", mode="subsystem", type=h.type, managed="yes")
        src = _sub(hd, "source")
        if h.type == "pci":
            dom_, bus, rest = h.pci_device_address.split(":")
            slot, fn = rest.split(".")
            _sub(src, "address", domain="0x" + dom_, bus="0x" + bus, slot="0x" + slot,
                 function="0x" + fn)
        else:
            _sub(src, "vendor", id="0x" + h.id_vendor)
            _sub(src, "product", id="0x" + h.id_product)

    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


def _bytes(el: ET.Element | None, default_unit: str = "KiB") -> int:
    if el is None or not (el.text or "").strip():
        return 0
    unit = (el.get("unit") or default_unit).lower()
    return int(el.text.strip()) * _UNITS.get(unit, KIB)


def _hex4(v: str | None) -> str | None:
    if v is None:
        return None
    return f"{int(v, 16):04x}"


def parse(xml: str) -> dict[str, Any]:
    """The inventory fields that come from the domain XML (everything but state)."""
    root = ET.fromstring(xml)
    out: dict[str, Any] = {
        "name": root.findtext("name"),
        "description": root.findtext("description"),
        "cpuNum": int((root.findtext("vcpu") or "0").strip() or 0),
        "memorySize": _bytes(root.find("memory")),
        "hypervisorType": "KVM",
        "domainType": root.get("type"),
    }
    disks, nics, graphics, hostdevs = [], [], [], []
    devices = root.find("devices")
    devices = devices if devices is not None else ET.Element("devices")
    for d in devices.findall("disk"):
        src = d.find("source")
        tgt = d.find("target")
        drv = d.find("driver")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name")
        disks.append({"device": d.get("device", "disk"),
                      "bus": tgt.get("bus") if tgt is not None else None,
                      "target": tgt.get("dev") if tgt is not None else None,
                      "path": path,
                      "format": drv.get("type") if drv is not None else None,
                      "readonly": d.find("readonly") is not None})
    for n in devices.findall("interface"):
        src = n.find("source")
        mac = n.find("mac")
        model = n.find("model")
        tgt = n.find("target")
        nics.append({"mac": mac.get("address") if mac is not None else None,
                     "bridge": src.get("bridge") if src is not None else None,
                     "network": src.get("network") if src is not None else None,
                     "model": model.get("type") if model is not None else None,
                     "target": tgt.get("dev") if tgt is not None else None})
    for g in devices.findall("graphics"):
        listen = g.find("listen")
        address = (listen.get("address") if listen is not None else None) or g.get("listen")
        port = g.get("port")
        graphics.append({"type": g.get("type"), "listen": address,
                         "port": int(port) if port and port.lstrip("-").isdigit() and int(port) > 0 else None,
                         "autoport": g.get("autoport") == "yes"})
    for h in devices.findall("hostdev"):
        src = h.find("source")
        if h.get("type") == "pci" and src is not None and src.find("address") is not None:
            a = src.find("address")
            addr = "%04x:%02x:%02x.%x" % (int(a.get("domain", "0"), 16), int(a.get("bus", "0"), 16),
                                          int(a.get("slot", "0"), 16), int(a.get("function", "0"), 16))
            hostdevs.append({"type": "pci", "pciDeviceAddress": addr, "idVendor": None,
                             "idProduct": None})
        elif h.get("type") == "usb" and src is not None:
            v, p = src.find("vendor"), src.find("product")
            hostdevs.append({"type": "usb", "pciDeviceAddress": None,
                             "idVendor": _hex4(v.get("id")) if v is not None else None,
                             "idProduct": _hex4(p.get("id")) if p is not None else None})
    console = None
    for c in devices.findall("serial") + devices.findall("console"):
        src = c.find("source")
        console = {"type": c.get("type"),
                   "path": (src.get("path") if src is not None else None) or c.get("tty")}
        break
    out.update(disks=disks, nics=nics, graphics=graphics, hostdevs=hostdevs, serialConsole=console)
    return out
