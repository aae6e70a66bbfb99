"""Is the IOMMU active on this node, and if not, why: evidence read under a root.

Every reader takes ``root`` (``/`` in production, a generated tree in the
tests) and never raises on a missing or unreadable file: the evidence it
feeds becomes empty or None.  ``reason`` turns the evidence into what an
operator should do.  Synchronous and blocking: the plugin calls it off the loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from agent import cpuinfo
from agent.models import WireModel

from . import bootconfig

ACPI_TABLES = {"DMAR": cpuinfo.INTEL, "IVRS": cpuinfo.AMD}


class Evidence(WireModel):
    iommu_class: list[str]            # <root>/sys/class/iommu: dmar0, ivhd0, ...
    iommu_groups: int                 # entries of <root>/sys/kernel/iommu_groups
    acpi_table: str | None            # DMAR (Intel VT-d), IVRS (AMD-Vi) or None
    cmdline: list[str]                # the IOMMU flags of the running kernel
    cpu_vendor: str | None            # GenuineIntel, AuthenticAMD, ...
    virtualization: str | None        # vmx, svm or None
    virtual_machine: bool             # the CPU says it runs under a hypervisor


class IommuStatus(WireModel):
    status: Literal["Active", "Inactive"]
    evidence: Evidence
    reason: str | None = None         # why Inactive, and what to do


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _listdir(path: Path) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def cpu(root: str | os.PathLike) -> tuple[str | None, set[str]]:
    """(vendor_id, flags) of the first processor in <root>/proc/cpuinfo."""
    return cpuinfo.read(root)


def running_cmdline(root: str | os.PathLike) -> list[str]:
    """The running kernel's own parameters (not those after "--", which go to init)."""
    return bootconfig.kernel_tokens(_read(Path(root, "proc/cmdline")) or "")


def intel_default_on(root: str | os.PathLike) -> bool:
    """Whether the running kernel was built to turn Intel's IOMMU on without a flag."""
    release = (_read(Path(root, "proc/sys/kernel/osrelease")) or "").strip()
    if not release or "/" in release:
        return False
    config = _read(Path(root, "boot", f"config-{release}")) or ""
    return "CONFIG_INTEL_IOMMU_DEFAULT_ON=y" in config.splitlines()


def acpi_table(root: str | os.PathLike) -> tuple[str | None, bool]:
    """(DMAR|IVRS|None, whether the ACPI table directory could be looked at)."""
    tables = Path(root, "sys/firmware/acpi/tables")
    for name in ACPI_TABLES:
        if os.path.exists(tables / name):
            return name, True
    return None, os.path.isdir(tables) and os.access(tables, os.X_OK)


def collect(root: str | os.PathLike = "/") -> IommuStatus:
    vendor, flags = cpu(root)
    groups = [g for g in (_listdir(Path(root, "sys/kernel/iommu_groups")) or []) if g.isdigit()]
    table, tables_seen = acpi_table(root)
    tokens = running_cmdline(root)
    evidence = Evidence(
        iommu_class=_listdir(Path(root, "sys/class/iommu")) or [],
        iommu_groups=len(groups),
        acpi_table=table,
        cmdline=bootconfig.relevant(tokens),
        cpu_vendor=vendor,
        virtualization="vmx" if "vmx" in flags else "svm" if "svm" in flags else None,
        virtual_machine="hypervisor" in flags,
    )
    if groups:
        return IommuStatus(status="Active", evidence=evidence)
    return IommuStatus(status="Inactive", evidence=evidence,
                       reason=reason(evidence, tokens, tables_seen, intel_default_on(root)))


def reason(ev: Evidence, tokens: list[str], tables_seen: bool, default_on: bool = False) -> str:
    """Why there are no IOMMU groups, in the order an operator would fix it."""
    kind = cpuinfo.vendor_kind(ev.cpu_vendor)
    firmware = {cpuinfo.INTEL: "VT-d", cpuinfo.AMD: "AMD-Vi (IOMMU)"}.get(kind, "VT-d/AMD-Vi")
    flag = cpuinfo.vendor_flag(kind) or "intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    steps: list[str] = []
    if ev.virtual_machine:
        steps.append("this node is itself a virtual machine: its hypervisor must give it a "
                     "virtual IOMMU (e.g. QEMU's intel-iommu device)")
    if ev.acpi_table is None:
        steps.append(f"enable {firmware} in the firmware (BIOS/UEFI) setup"
                     + ("; the firmware publishes no DMAR/IVRS ACPI table" if tables_seen else ""))
    enabled, why = bootconfig.effective(tokens, kind, default_on)
    if not enabled:
        off = [t for t in tokens if t in ("iommu=off", "intel_iommu=off", "amd_iommu=off")]
        if off:
            steps.append(f"remove {' '.join(off)} from the kernel command line "
                         "(updateHostIommuState Enabled does it) and reboot")
        else:
            steps.append(f"add {flag} to the kernel command line "
                         "(updateHostIommuState Enabled does it) and reboot")
    elif ev.acpi_table is not None:
        steps.append(f"the kernel was started with the IOMMU on ({why}) and the firmware "
                     f"publishes {ev.acpi_table}, yet the IOMMU did not start: check "
                     "`dmesg | grep -i -e DMAR -e AMD-Vi -e IOMMU` for firmware errors")
    return "no IOMMU groups: " + "; ".join(steps)
