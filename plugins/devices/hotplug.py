"""udev events for PCI and USB devices, read on the event loop.

A pyudev ``Monitor`` (source "udev": events after udev's rules ran, so a
new device is already bound to its driver) is watched with
``loop.add_reader`` on its socket; each event calls ``on_event(action,
subsystem, sys_name)``.  The plugin only uses events as triggers: it then
rescans sysfs, so a lost or coalesced event costs nothing but latency.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger("node_agent.devices")

try:
    import pyudev
except ImportError as e:  # reported as the hotplug capability's reason
    pyudev = None
    IMPORT_ERROR: str | None = f"pyudev is missing ({e}); install python3-pyudev"
else:
    IMPORT_ERROR = None


class HotplugMonitor:
    def __init__(self, on_event: Callable[[str, str, str], Any]) -> None:
        self.on_event = on_event
        self._monitor: Any = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Open the monitor (raises when udev cannot be listened to)."""
        if pyudev is None:
            raise RuntimeError(IMPORT_ERROR)
        ctx = pyudev.Context()
        mon = pyudev.Monitor.from_netlink(ctx, source="udev")
        mon.filter_by("pci")
        mon.filter_by("usb", "usb_device")
        mon.start()
        self._loop = asyncio.get_running_loop()
        self._monitor, self._fd = mon, mon.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                dev = self._monitor.poll(timeout=0)
            except Exception as e:      # a malformed message must not kill the reader
                log.warning("udev monitor: %s", e)
                return
            if dev is None:
                return
            try:
                self.on_event(dev.action or "change", dev.subsystem or "", dev.sys_name or "")
            except Exception:
                log.exception("udev event handler failed")

    def stop(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None
        self._monitor = None            # libudev closes the socket with the last reference
