"""The CPU's vendor and flags, and which kernel flag turns that vendor's IOMMU on.

Shared by the iommu plugin (``GET /v1/iommu/state``, the boot configuration
edits) and ``node-agent doctor``: the vendor comes from ``vendor_id``, never
from the virtualization flag (an AMD host with SVM off in the firmware, or a
guest without nested SVM, has no ``svm`` flag yet needs ``amd_iommu=on``).
Reads under ``root`` (``/`` in production, a generated tree in the tests) and
never raises on a missing or unreadable file.
"""

from __future__ import annotations

import os
from pathlib import Path

INTEL, AMD = "intel", "amd"
_VENDORS = {"GenuineIntel": INTEL, "AuthenticAMD": AMD, "HygonGenuine": AMD}


def read(root: str | os.PathLike = "/") -> tuple[str | None, set[str]]:
    """(vendor_id, flags) of the first processor in <root>/proc/cpuinfo."""
    try:
        text = Path(root, "proc/cpuinfo").read_text()
    except (OSError, UnicodeDecodeError):
        return None, set()
    vendor, flags = None, set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            continue
        if key == "vendor_id" and vendor is None:
            vendor = value.strip() or None
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def vendor_kind(cpu_vendor: str | None) -> str | None:
    """"intel" or "amd" from /proc/cpuinfo's vendor_id (Hygon is AMD's design)."""
    return _VENDORS.get(cpu_vendor or "")


def vendor_key(kind: str | None) -> str | None:
    return {INTEL: "intel_iommu", AMD: "amd_iommu"}.get(kind or "")


def vendor_flag(kind: str | None, on: bool = True) -> str | None:
    """intel_iommu=on, amd_iommu=on (or =off), or None for another vendor."""
    key = vendor_key(kind)
    return f"{key}={'on' if on else 'off'}" if key else None
