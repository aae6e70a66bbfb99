"""The baremetal plugin: IPMI chassis and provisioning over PXE.

Two halves, each in its own module, joined here into one plugin because a
provisioning crosses both (the chassis boots from PXE; the installed host's
callback marks the chassis Provisioned):

- ``chassis.py``: ChassisRoutes: chassis registration, power, provisioning,
  hardware info, serial console (IPMI through pyghmi).
- ``pxe.py``: PxeRoutes: PXE servers (dnsmasq), host configs and the
  unattended-install files served to installing machines.
"""

from __future__ import annotations

from agent.plugin import Plugin

from .chassis import ChassisRoutes
from .pxe import PxeRoutes


class BaremetalPlugin(ChassisRoutes, PxeRoutes, Plugin):
    name = "baremetal"
    config_sections = {**ChassisRoutes.config_sections, **PxeRoutes.config_sections}
    max_threads = 16

    async def lifecycle(self):
        async with self.chassis_resources(), self.pxe_resources():
            yield

    async def stopping(self) -> None:
        await self.chassis_stopping()
