"""Host devices in libvirt domains: the XML (xml.etree) and attach/detach.

The functions taking ``conn`` are blocking libvirt calls: the plugin runs them
through the shared connection (``LibvirtConnection.call``), off the loop.

A device counts as attached to a domain when the domain's live definition
(while it runs) or its persistent one names it: a ``<hostdev>`` of type pci
or usb, or an ``<interface type='hostdev'>`` (an SR-IOV VF given as a NIC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent import errors
from agent.lazy import lazy_import
from agent.libvirt_conn import libvirt

from .usb import UsbDevice

# Parsed on first use, in a libvirt call's thread: an idle agent does not pay for the
# XML parser (~0.35 MB of RSS).
ET = lazy_import("xml.etree.ElementTree")


@dataclass(slots=True)
class UsbRef:
    """What a USB hostdev names: vendor/product, a bus/device address, or both."""
    vendor: str | None
    product: str | None
    bus: int | None
    device: int | None

    def matches(self, dev: UsbDevice) -> bool:
        if self.bus is not None and self.device is not None:
            if (self.bus, self.device) != (dev.bus_num, dev.dev_num):
                return False
            return self.vendor in (None, dev.id_vendor) and self.product in (None, dev.id_product)
        return (self.vendor, self.product) == (dev.id_vendor, dev.id_product)


@dataclass(slots=True)
class DomainDevices:
    pci: dict[str, ET.Element] = field(default_factory=dict)        # address -> element
    usb: list[tuple[UsbRef, ET.Element]] = field(default_factory=list)
    redirdevs: list[ET.Element] = field(default_factory=list)       # USB, spicevmc
    spice: bool = False
    usb_controller: bool = True


@dataclass(slots=True)
class DomainInfo:
    uuid: str                        # 32 hex digits
    name: str
    running: bool
    persistent: bool
    live: DomainDevices | None       # while running
    config: DomainDevices | None     # when persistent

    def all(self) -> list[DomainDevices]:
        return [d for d in (self.live, self.config) if d is not None]


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _hexid(text: str | None) -> str | None:
    v = _int(text)
    return None if v is None else f"{v:04x}"


def _pci_address(el: ET.Element | None) -> str | None:
    if el is None:
        return None
    parts = [_int(el.get(k)) for k in ("domain", "bus", "slot", "function")]
    if None in parts[1:]:
        return None
    dom, bus, slot, fn = (parts[0] or 0), parts[1], parts[2], parts[3]
    return f"{dom:04x}:{bus:02x}:{slot:02x}.{fn}"


def parse_devices(xml: str) -> DomainDevices:
    root = ET.fromstring(xml)
    out = DomainDevices()
    devices = root.find("devices")
    if devices is None:
        return out
    for el in devices:
        if el.tag == "hostdev" and el.get("mode", "subsystem") == "subsystem":
            src = el.find("source")
            if src is None:
                continue
            if el.get("type") == "pci":
                addr = _pci_address(src.find("address"))
                if addr:
                    out.pci[addr] = el
            elif el.get("type") == "usb":
                a = src.find("address")
                v, p = src.find("vendor"), src.find("product")
                out.usb.append((UsbRef(
                    _hexid(v.get("id")) if v is not None else None,
                    _hexid(p.get("id")) if p is not None else None,
                    _int(a.get("bus")) if a is not None else None,
                    _int(a.get("device")) if a is not None else None), el))
        elif el.tag == "interface" and el.get("type") == "hostdev":
            src = el.find("source")
            addr = _pci_address(src.find("address")) if src is not None else None
            if addr:
                out.pci[addr] = el
        elif el.tag == "redirdev" and el.get("bus", "usb") == "usb" and el.get("type") == "spicevmc":
            out.redirdevs.append(el)
        elif el.tag == "graphics" and el.get("type") == "spice":
            out.spice = True
        elif el.tag == "controller" and el.get("type") == "usb" and el.get("model") == "none":
            out.usb_controller = False
    return out


def to_xml(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


def pci_hostdev_xml(address: str) -> str:
    dom, bus, rest = address.split(":")
    slot, fn = rest.split(".")
    hostdev = ET.Element("hostdev", mode="subsystem", type="pci", managed="yes")
    src = ET.SubElement(hostdev, "source")
    ET.SubElement(src, "address", domain=f"0x{dom}", bus=f"0x{bus}", slot=f"0x{slot}",
                  function=f"0x{fn}")
    return to_xml(hostdev)


def usb_hostdev_xml(dev: UsbDevice) -> str:
    hostdev = ET.Element("hostdev", mode="subsystem", type="usb", managed="yes")
    src = ET.SubElement(hostdev, "source")
    ET.SubElement(src, "vendor", id=f"0x{dev.id_vendor}")
    ET.SubElement(src, "product", id=f"0x{dev.id_product}")
    ET.SubElement(src, "address", bus=str(dev.bus_num), device=str(dev.dev_num))
    return to_xml(hostdev)


REDIRDEV_XML = "<redirdev bus='usb' type='spicevmc'/>"


# -- reading domains (blocking: run through LibvirtConnection.call) ----------

def _info(dom: Any) -> DomainInfo:
    running = bool(dom.isActive())
    persistent = bool(dom.isPersistent())
    live = parse_devices(dom.XMLDesc(0)) if running else None
    config = None
    if persistent:
        config = parse_devices(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return DomainInfo(dom.UUIDString().replace("-", ""), dom.name(), running, persistent,
                      live, config)


def list_domains(conn: Any) -> list[DomainInfo]:
    found = []
    for dom in conn.listAllDomains(0):
        try:
            found.append(_info(dom))
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                raise
    return found


def domain_info(conn: Any, uuid: str) -> DomainInfo | None:
    try:
        return _info(conn.lookupByUUIDString(uuid))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def attachments(domains: list[DomainInfo]) -> tuple[dict[str, str], list[tuple[UsbRef, str]]]:
    """(PCI address -> domain uuid, [(USB reference, domain uuid)])."""
    pci: dict[str, str] = {}
    usb: list[tuple[UsbRef, str]] = []
    for d in domains:
        for devs in d.all():
            for addr in devs.pci:
                pci.setdefault(addr, d.uuid)
            usb += [(ref, d.uuid) for ref, _ in devs.usb]
    return pci, usb


def usb_attached(devices: dict[str, UsbDevice], refs: list[tuple[UsbRef, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ref, vm in refs:
        for key, dev in devices.items():
            if key not in out and ref.matches(dev):
                out[key] = vm
    return out


def attach(conn: Any, uuid: str, xml: str) -> bool:
    """Attach to the persistent config, and live while the domain runs. True if live.

    qemu applies the live part first and touches the config only if it
    worked, so a failed live attach leaves the definition as it was.
    """
    dom = conn.lookupByUUIDString(uuid)
    live = bool(dom.isActive())
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0
    if dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    dom.attachDeviceFlags(xml, flags)
    return live


def detach(conn: Any, uuid: str, xml: str, *, live: bool, config: bool) -> None:
    dom = conn.lookupByUUIDString(uuid)
    flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | \
        (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
    dom.detachDeviceFlags(xml, flags)


def attach_config_or_live(conn: Any, uuid: str, xml: str, try_live: bool) -> bool:
    """For redirdevs: config always; live too when it works. True if applied live."""
    dom = conn.lookupByUUIDString(uuid)
    if try_live and dom.isActive():
        try:
            dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return True
        except libvirt.libvirtError:
            pass
    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    return False


# -- libvirt errors as wire errors -------------------------------------------

_UNSUPPORTED = ("VIR_ERR_CONFIG_UNSUPPORTED", "VIR_ERR_OPERATION_UNSUPPORTED",
                "VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED")


def map_error(e: Exception, area: str, what: str) -> errors.ApiError:
    """A libvirt error as a clear, stable code; the libvirt text goes along."""
    if libvirt is None or not isinstance(e, libvirt.libvirtError):
        return errors.OperationFailed(f"{what} failed: {e}", code=f"{area}.1510")
    code, text = e.get_error_code(), e.get_error_message() or str(e)
    details = f"libvirt error {code} (domain {e.get_error_domain()}): {text}"
    if code in {getattr(libvirt, n, -1) for n in _UNSUPPORTED} or "doesn't support passthrough" in text:
        return errors.OperationFailed(f"{what} failed: this host cannot do it: {text}",
                                      code=f"{area}.1503", details=details)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return errors.OperationFailed(f"{what} failed: the VM no longer exists: {text}",
                                      code="VM.1004", details=details)
    if "No free USB ports" in text:
        return errors.OperationFailed(
            f"{what} failed: the VM has no free USB port; give it a USB controller with more "
            f"ports (e.g. qemu-xhci ports='8') or a USB hub: {text}",
            code=f"{area}.1505", details=details)
    if code == libvirt.VIR_ERR_SYSTEM_ERROR:
        return errors.OperationFailed(f"{what} failed: libvirt cannot reach the device on "
                                      f"this host: {text}", code=f"{area}.1503", details=details)
    if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED):
        return errors.OperationFailed(f"{what} failed: libvirt refused: {text}",
                                      code=f"{area}.1509", details=details)
    return errors.OperationFailed(f"{what} failed: {text}", code=f"{area}.1510", details=details)
