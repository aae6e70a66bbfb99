"""The wire models of the VM routes: the define spec, actions, inventories, stats.

Field names follow the manual's VmInstanceInventory where it has them
(uuid, name, description, state, cpuNum, memorySize, hypervisorType), its
PciDeviceInventory (pciDeviceAddress) and UsbDeviceInventory (idVendor,
idProduct).  Validation here is everything that can be judged from the
request alone; what needs the node (a disk file exists, the name is free)
is judged in the routes' checks.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.models import CreateParams, WireModel
from agent.paths import check_shape
from agent.validation import full_match

UUID_RE = re.compile(r"^[0-9a-fA-F]{32}$|^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
PCI_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-1][0-9a-fA-F]\.[0-7]$")
USB_ID_RE = re.compile(r"^(0x)?[0-9a-fA-F]{4}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
NETNAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
MIB = 1 << 20


def normalize_uuid(value: str) -> str:
    """32 lower-case hex digits, the form the manual uses everywhere."""
    return value.replace("-", "").lower()


def _check_path(path: str) -> str:
    # The shape only (no I/O); where it may lie is judged by the define's check,
    # with agent.paths.confine_disk (allowed roots after symlinks, or an RBD device).
    return check_shape(path, "disk path")


class DiskSpec(WireModel):
    path: str | None = Field(None, max_length=4096,
                             description="absolute path of a qcow2 or raw file under [storage] "
                                         "allowed_roots (symlinks resolved), or a kernel RBD device "
                                         "(/dev/rbd/<pool>/<image>); may be omitted for an empty "
                                         "cdrom drive")
    format: Literal["qcow2", "raw"] | None = Field(
        None, description="required for disks: the format is never guessed from the file's content")
    bus: Literal["virtio", "sata", "ide"] | None = Field(
        None, description="default virtio for disks, sata for cdroms")
    device: Literal["disk", "cdrom"] = "disk"
    readonly: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else _check_path(v)

    @model_validator(mode="after")
    def _consistent(self) -> "DiskSpec":
        if self.device == "disk":
            if self.path is None:
                raise ValueError("a disk needs a path (only a cdrom may be empty)")
            if self.format is None:
                raise ValueError("a disk needs its format (qcow2 or raw)")
            self.bus = self.bus or "virtio"
        else:
            self.bus = self.bus or "sata"
            if self.bus == "virtio":
                raise ValueError("a cdrom must be on the sata or ide bus")
            self.format = self.format or "raw"
            self.readonly = True
        return self


class NicSpec(WireModel):
    bridge: str | None = Field(None, description="a Linux bridge on this node")
    network: str | None = Field(None, description="a libvirt network")
    mac: str | None = Field(None, description="aa:bb:cc:dd:ee:ff (unicast); generated when absent")
    model: Literal["virtio", "e1000"] = "virtio"

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str | None) -> str | None:
        if v is not None and not full_match(IFNAME_RE, v):
            raise ValueError("must be an interface name (1-15 letters, digits, '_', '.', ':' or '-')")
        return v

    @field_validator("network")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is not None and not full_match(NETNAME_RE, v):
            raise ValueError("must be a libvirt network name (letters, digits, '_', '.', '+' or '-')")
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not full_match(MAC_RE, v):
            raise ValueError("must be six hex octets separated by ':'")
        v = v.lower()
        if int(v[:2], 16) & 1:
            raise ValueError("must be a unicast address (the first octet must be even)")
        if v == "00:00:00:00:00:00":
            raise ValueError("must not be all zeros")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "NicSpec":
        if (self.bridge is None) == (self.network is None):
            raise ValueError("give exactly one of bridge or network")
        return self


class GraphicsSpec(WireModel):
    type: Literal["vnc", "spice"]
    listen: str = Field("127.0.0.1", description="the address to listen on; 0.0.0.0 for every address")
    port: int | None = Field(None, ge=5900, le=65535, description="a fixed port; absent: autoport")
    autoport: bool | None = None
    password: SecretStr | None = Field(None, description="never returned nor logged; VNC: at most 8 characters")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError("must be an IP address") from None

    @model_validator(mode="after")
    def _ports(self) -> "GraphicsSpec":
        if self.port is not None and self.autoport:
            raise ValueError("give a port or autoport=true, not both")
        if self.autoport is False and self.port is None:
            raise ValueError("autoport=false needs a port")
        self.autoport = self.port is None
        if self.password is not None:
            pw = self.password.get_secret_value()
            limit = 8 if self.type == "vnc" else 60
            if not 1 <= len(pw) <= limit:
                # The value itself never goes into a message.
                raise ValueError(f"the {self.type} password must be 1 to {limit} characters")
            if any(ord(c) < 32 or ord(c) > 126 for c in pw):
                raise ValueError("the password must be printable ASCII")
        return self


class HostdevSpec(WireModel):
    type: Literal["pci", "usb"]
    pci_device_address: str | None = Field(None, description="pci: domain:bus:slot.function, e.g. 0000:03:00.0")
    id_vendor: str | None = Field(None, description="usb: vendor id, 4 hex digits")
    id_product: str | None = Field(None, description="usb: product id, 4 hex digits")

    @model_validator(mode="after")
    def _by_type(self) -> "HostdevSpec":
        if self.type == "pci":
            if self.id_vendor is not None or self.id_product is not None:
                raise ValueError("a pci hostdev takes pciDeviceAddress only")
            if self.pci_device_address is None or not full_match(PCI_RE, self.pci_device_address):
                raise ValueError("pciDeviceAddress must look like 0000:03:00.0")
            self.pci_device_address = self.pci_device_address.lower()
        else:
            if self.pci_device_address is not None:
                raise ValueError("a usb hostdev takes idVendor and idProduct only")
            for name, v in (("idVendor", self.id_vendor), ("idProduct", self.id_product)):
                if v is None or not full_match(USB_ID_RE, v):
                    raise ValueError(f"{name} must be 4 hex digits, e.g. 1d6b")
            self.id_vendor = self.id_vendor.lower().removeprefix("0x")
            self.id_product = self.id_product.lower().removeprefix("0x")
        return self


class VmSpec(CreateParams):
    """POST /v1/vm-instances {"params": VmSpec}: a domain defined on this node."""
    name: str = Field(min_length=1, max_length=128)
    description: str | None = Field(None, max_length=4096)
    cpu_num: int = Field(ge=1, le=512)
    memory_size: int = Field(ge=16 * MIB, le=16 << 40, description="bytes, a multiple of 1 MiB")
    disks: list[DiskSpec] = Field([], max_length=60)
    nics: list[NicSpec] = Field([], max_length=32)
    graphics: list[GraphicsSpec] = Field([], max_length=2, description="one object or a list")
    serial_console: bool = Field(True, description="a serial console on a pty")
    hostdevs: list[HostdevSpec] = Field([], max_length=32)
    boot_order: list[Literal["hd", "cdrom", "network"]] = Field(["hd", "cdrom"], min_length=1,
                                                                 max_length=3)
    usb_controller: Literal["qemu-xhci", "nec-xhci", "ich9-ehci1", "piix3-uhci", "none"] = Field(
        "qemu-xhci", description="the USB controller's model: qemu-xhci (USB 3, 15 ports, room for "
        "the tablet, USB redirection and USB passthrough); piix3-uhci has 2 ports; none: no USB "
        "(then no graphics tablet and no USB hostdev)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not contain '/' or control characters")
        if v.strip() != v:
            raise ValueError("must not start or end with white space")
        return v

    @field_validator("memory_size")
    @classmethod
    def _memory(cls, v: int) -> int:
        if v % MIB:
            raise ValueError("must be a multiple of 1 MiB (1048576 bytes)")
        return v

    @field_validator("graphics", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _unique(self) -> "VmSpec":
        if len({g.type for g in self.graphics}) != len(self.graphics):
            raise ValueError("at most one vnc and one spice display")
        macs = [n.mac for n in self.nics if n.mac]
        if len(set(macs)) != len(macs):
            raise ValueError("two nics have the same mac")
        keys = [(h.type, h.pci_device_address, h.id_vendor, h.id_product) for h in self.hostdevs]
        if len(set(keys)) != len(keys):
            raise ValueError("the same host device is listed twice")
        if len(set(self.boot_order)) != len(self.boot_order):
            raise ValueError("bootOrder lists a device twice")
        if self.usb_controller == "none" and (self.graphics or any(h.type == "usb" for h in self.hostdevs)):
            raise ValueError("usbController none leaves no USB bus for the graphics tablet or a USB hostdev")
        for prefix, buses in (("vd", ("virtio",)), ("sd", ("sata",)), ("hd", ("ide",))):
            n = sum(1 for d in self.disks if d.bus in buses)
            limit = 4 if prefix == "hd" else 26
            if n > limit:
                raise ValueError(f"at most {limit} drives on the {buses[0]} bus")
        return self


# ---------------------------------------------------------------- actions

class StopVm(WireModel):
    type: Literal["grace", "cold"] = Field("grace", description="grace: ACPI shutdown, then "
                                           "destroy after the timeout; cold: destroy at once")
    timeout: int = Field(60, ge=1, le=3600, description="seconds to wait for a grace shutdown")


class RebootVm(StopVm):
    """Reboot = stop (grace or cold, as stopVmInstance) then start."""


class MigrateVm(WireModel):
    destination: str = Field(min_length=3, max_length=1024,
                             description="a libvirt URI of the other node, e.g. qemu+tcp://host/system")
    migrate_uri: str | None = Field(None, max_length=1024,
                                    description="where the memory stream goes, e.g. tcp://10.0.0.2; "
                                                "default: the destination's host name")
    copy_storage: bool = Field(False, description="copy non-shared disks too (local storage)")
    auto_converge: bool = False
    bandwidth: int | None = Field(None, ge=1, description="MiB/s")
    timeout: int = Field(3600, ge=1, le=86400, description="seconds; the migration is aborted after it")
    unsafe: bool = Field(False, description="migrate even if libvirt thinks it is unsafe "
                                            "(e.g. a disk cache mode other than none)")

    @field_validator("destination")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not re.match(r"^[a-z][a-z0-9+]*://", v) or any(c.isspace() for c in v):
            raise ValueError("must be a libvirt URI such as qemu+tcp://host/system")
        return v


class DeleteVm(WireModel):
    force: bool = Field(False, description="destroy a running VM first instead of refusing")


# ---------------------------------------------------------------- inventories

class DiskInventory(WireModel):
    device: str
    bus: str | None = None
    target: str | None = None
    path: str | None = None
    format: str | None = None
    readonly: bool = False


class NicInventory(WireModel):
    mac: str | None = None
    bridge: str | None = None
    network: str | None = None
    model: str | None = None
    target: str | None = Field(None, description="the tap device while running")


class GraphicsInventory(WireModel):
    type: str
    listen: str | None = None
    port: int | None = Field(None, description="the live port while running")
    autoport: bool = False


class HostdevInventory(WireModel):
    type: str
    pci_device_address: str | None = None
    id_vendor: str | None = None
    id_product: str | None = None


class ConsoleInventory(WireModel):
    type: str
    path: str | None = Field(None, description="the pty while running")


class VmInventory(WireModel):
    uuid: str
    name: str
    description: str | None = None
    state: str = Field(description="Running, Stopped, Paused, Stopping, Crashed, Suspended, "
                                   "Migrating or Unknown")
    state_reason: str | None = None
    cpu_num: int
    memory_size: int = Field(description="bytes")
    hypervisor_type: str = "KVM"
    domain_type: str = Field(description="libvirt's domain type: kvm, or qemu for TCG")
    persistent: bool
    disks: list[DiskInventory] = []
    nics: list[NicInventory] = []
    graphics: list[GraphicsInventory] = []
    hostdevs: list[HostdevInventory] = []
    serial_console: ConsoleInventory | None = None


class VmReply(WireModel):
    inventory: VmInventory


class VmStopReply(WireModel):
    inventory: VmInventory
    forced: bool = Field(False, description="a grace stop timed out and the VM was destroyed")


class VmMigrateReply(WireModel):
    vm_instance_uuid: str
    destination: str
    seconds: float


class DiskStats(WireModel):
    name: str | None = None
    path: str | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None


class NicStats(WireModel):
    name: str | None = None
    rx_bytes: int | None = None
    tx_bytes: int | None = None


class VmStats(WireModel):
    uuid: str
    name: str
    state: str
    age_seconds: float = Field(description="how old these figures are")
    sample_date: str
    cpu_time_seconds: float | None = None
    balloon_current: int | None = Field(None, description="bytes")
    balloon_maximum: int | None = Field(None, description="bytes")
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    disks: list[DiskStats] = []
    nics: list[NicStats] = []
