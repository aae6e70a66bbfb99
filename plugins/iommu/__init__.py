"""The IOMMU plugin: GetHostIommuStatus, GetHostIommuState, UpdateHostIommuState.

* ``GET /v1/iommu/status``: is the IOMMU active now (IOMMU groups exist), with
  the evidence and, when it is not, why and what to do (``status.py``).
* ``GET /v1/iommu/state``: does the boot configuration ask for it
  (``grubby --info=DEFAULT`` where grubby exists, else GRUB's defaults), and
  does the running kernel already have it.
* ``PUT /v1/iommu/actions {"updateHostIommuState": {"state": ...}}``: edit
  GRUB_CMDLINE_LINUX (``bootconfig.py``), safely (``system.py``), then
  regenerate the boot configuration with the distribution's tool.

Everything is read and written under ``[iommu] root`` (``/``), so the tests
point it at a generated tree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from typing import Literal

from pydantic import Field, field_validator

from agent import errors
from agent.models import WireModel
from agent.plugin import Plugin, action, get

from . import bootconfig, status, system

audit = logging.getLogger("node_agent.audit")
log = logging.getLogger("node_agent.iommu")

READ_TIMEOUT = 15.0
GRUBBY_TIMEOUT = 60.0
RESERVATION_SECONDS = 60.0     # a reserved update whose job never starts is released
GRUBBY_INFO = "grubby --info=DEFAULT"


class IommuSettings(WireModel):
    """The [iommu] config section."""
    root: str = Field("/", description="everything is read and written under this directory")
    regenerate: bool = Field(True, description="run update-grub / grub2-mkconfig / grubby after an edit")
    regenerate_timeout: int = Field(600, ge=10, le=3600)

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path")
        return v


class IommuState(WireModel):
    state: Literal["Enabled", "Disabled"] = Field(description="what the next boot asks for")
    source: str = Field(description="the file or tool the state was read from")
    flags: list[str] = Field(description="the IOMMU flags of the next boot's kernel command line")
    cpu_vendor: str | None
    vendor_flag: str | None = Field(description="the flag that turns this CPU's IOMMU on")
    note: str = Field(description="why the state is what it is")
    running_state: Literal["Enabled", "Disabled"] = Field(description="the running kernel's, from /proc/cmdline")
    running_flags: list[str]
    reboot_required: bool = Field(description="the next boot differs from the running kernel")


class UpdateHostIommuState(WireModel):
    state: Literal["Enabled", "Disabled"]


class UpdateResult(WireModel):
    state: Literal["Enabled", "Disabled"]
    changed: bool
    reboot_required: bool
    backup: str | None = Field(description="the backup of the first file changed")
    backups: list[str] = []
    files: list[str] = Field([], description="the files changed")
    flags: list[str] = Field([], description="the IOMMU flags of the next boot's command line")
    added: list[str] = []
    removed: list[str] = []
    regenerated: str | None = Field(description="the tool that regenerated the boot configuration")
    command: list[str] | None = Field(None, description="its argv")
    message: str


def _word(enabled: bool) -> str:
    return "Enabled" if enabled else "Disabled"


class IommuPlugin(Plugin):
    name = "iommu"
    config_sections = {"iommu": IommuSettings}
    max_threads = 2
    max_processes = 2

    def __init__(self, agent, settings) -> None:
        super().__init__(agent, settings)
        self._lock = asyncio.Lock()            # one edit of the boot configuration at a time
        self._busy = False                     # an update is reserved or running (409 for others)
        self._reservation: asyncio.TimerHandle | None = None

    @property
    def conf(self) -> IommuSettings:
        return self.settings["iommu"]

    async def _inspect(self) -> system.Host:
        return await self.runner.call(system.inspect, self.conf.root, timeout=READ_TIMEOUT)

    # -- GetHostIommuStatus ---------------------------------------------------

    @get("/v1/iommu/status", result=status.IommuStatus)
    async def get_status(self) -> status.IommuStatus:
        """Whether the IOMMU is active now (IOMMU groups exist), the evidence, and why not."""
        return await self.runner.call(status.collect, self.conf.root, timeout=READ_TIMEOUT)

    # -- GetHostIommuState ----------------------------------------------------

    @get("/v1/iommu/state", result=IommuState)
    async def get_state(self) -> IommuState:
        """Whether the boot configuration turns the IOMMU on, and whether a reboot is due."""
        host = await self._inspect()
        if "grubby" in host.tools:
            entries = await self._grubby_info(host, "DEFAULT")
            tokens = entries[0]["args"].split() if entries else []
            source = GRUBBY_INFO
        elif host.files is not None:
            try:
                tokens = bootconfig.cmdline_tokens(host.files)
            except bootconfig.BootConfigError as e:
                raise errors.OperationFailed(f"the GRUB defaults cannot be read: {e}",
                                             code="IOMMU.1504") from None
            source = " + ".join(f.path for f in host.files)
        else:
            raise self._no_boot_config(host)
        enabled, why = bootconfig.effective(tokens, host.kind, host.intel_default_on)
        running, _ = bootconfig.effective(host.running, host.kind, host.intel_default_on)
        note = why
        if enabled != running:
            note += f"; the running kernel has it {'on' if running else 'off'}: reboot to apply"
        return IommuState(state=_word(enabled), source=source, flags=bootconfig.relevant(tokens),
                          cpu_vendor=host.cpu_vendor, vendor_flag=bootconfig.vendor_flag(host.kind),
                          note=note, running_state=_word(running),
                          running_flags=bootconfig.relevant(host.running),
                          reboot_required=enabled != running)

    # -- UpdateHostIommuState -------------------------------------------------

    @action("/v1/iommu/actions", "updateHostIommuState", params=UpdateHostIommuState,
            result=UpdateResult)
    async def update_state(self, job, params: UpdateHostIommuState) -> UpdateResult:
        """Turn the IOMMU on or off for the next boot: edit GRUB_CMDLINE_LINUX, regenerate."""
        if self._reservation is not None:
            self._reservation.cancel()
            self._reservation = None
        self._busy = True
        try:
            async with self._lock:
                return await self._update(job, params.state == "Enabled")
        finally:
            self._busy = False

    @update_state.check
    async def _update_check(self, params: UpdateHostIommuState) -> None:
        if self._busy or self._lock.locked():
            raise errors.Conflict("another updateHostIommuState is running on this node; "
                                  "try again when it has finished", code="IOMMU.1409")
        self._busy = True      # before the first await: a concurrent request sees it
        try:
            host = await self._inspect()
            self._refusal(host, params.state == "Enabled")
        except BaseException:
            self._busy = False
            raise
        self._reservation = asyncio.get_running_loop().call_later(
            RESERVATION_SECONDS, self._release_reservation)

    def _release_reservation(self) -> None:
        self._reservation = None
        if not self._lock.locked():
            self._busy = False

    def _no_boot_config(self, host: system.Host) -> errors.ApiError:
        return errors.Unavailable(
            f"no boot configuration to read or edit: {os.path.join(host.root, system.GRUB_DEFAULTS)} "
            "does not exist and grubby is not installed; this node does not boot with GRUB, "
            "so set intel_iommu=on / amd_iommu=on on its kernel command line by hand",
            code="IOMMU.1503")

    def _refusal(self, host: system.Host, enable: bool) -> None:
        """Raise what the update must refuse before anything is written."""
        if host.files is None and "grubby" not in host.tools:
            raise self._no_boot_config(host)
        if host.files is None and not self.conf.regenerate:
            raise errors.Unavailable(
                f"{os.path.join(host.root, system.GRUB_DEFAULTS)} does not exist, so only grubby "
                "can change the boot entries, and [iommu] regenerate = false forbids running it",
                code="IOMMU.1503")
        if enable and host.kind is None:
            raise errors.Unavailable(
                f"the CPU vendor is {host.cpu_vendor or 'unknown'}, not Intel or AMD: no known "
                "kernel flag turns its IOMMU on", code="IOMMU.1502")

    async def _update(self, job, enable: bool) -> UpdateResult:
        want = _word(enable)
        job.progress(5, "reading the boot configuration")
        host = await self._inspect()
        self._refusal(host, enable)
        plan = None
        if host.files is not None:
            try:
                plan = bootconfig.plan(host.files, enable, host.kind, host.intel_default_on)
            except bootconfig.BootConfigError as e:
                raise errors.OperationFailed(f"the GRUB defaults cannot be edited safely: {e}",
                                             code="IOMMU.1504") from None
        grubby_add: list[str] = []
        grubby_remove: list[str] = []
        if "grubby" in host.tools:
            entries = await self._grubby_info(host, "ALL")
            grubby_add, grubby_remove = bootconfig.grubby_edit(entries, enable, host.kind,
                                                               host.intel_default_on)
        files_change = bool(plan and plan.changes)
        grubby_change = bool(grubby_add or grubby_remove) and self.conf.regenerate
        running, _ = bootconfig.effective(host.running, host.kind, host.intel_default_on)
        flags = bootconfig.relevant(plan.tokens) if plan else []

        if not files_change and not grubby_change:
            msg = f"nothing changed: the boot configuration already has the IOMMU {want}"
            if grubby_add or grubby_remove:
                msg += ("; grubby's boot entries differ, but [iommu] regenerate = false, so "
                        f"run: grubby --update-kernel=ALL {self._grubby_args(grubby_add, grubby_remove)}")
            return UpdateResult(state=want, changed=False, reboot_required=enable != running,
                                backup=None, flags=flags, regenerated=None, message=msg)

        written: list[system.Written] = []
        if files_change:
            job.progress(30, "writing " + ", ".join(plan.changes))
            try:
                written = await asyncio.shield(self.runner.call(
                    system.write_changes, plan.changes, timeout=READ_TIMEOUT))
            except system.ChangedUnderUs as e:
                raise errors.Conflict(str(e), code="IOMMU.1409") from None
            except OSError as e:
                raise errors.OperationFailed(
                    f"cannot write the boot configuration: {e.strerror or e} ({e.filename})",
                    code="IOMMU.1505") from None

        job.progress(60, "regenerating the boot configuration")
        argv, skipped = self._regenerate_argv(host, files_change, grubby_add, grubby_remove)
        tool = None
        if argv:
            tool = os.path.basename(argv[0])
            await self._run_tool(argv, written)
        audit.info("updateHostIommuState job=%s state=%s files=%s regenerated=%s", job.uuid, want,
                   [w.path for w in written], argv,
                   extra={"audit": {"action": "updateHostIommuState", "job": job.uuid,
                                    "caller": job.caller, "state": want,
                                    "files": [w.path for w in written], "command": argv}})
        parts = [f"the next boot has the IOMMU {want}"]
        if written:
            parts.append("changed " + ", ".join(w.path for w in written)
                         + " (backup " + ", ".join(w.backup for w in written) + ")")
        parts.append(f"ran {shlex.join(argv)}" if argv else f"not regenerated: {skipped}")
        if enable != running:
            parts.append("reboot to apply")
        return UpdateResult(
            state=want, changed=True, reboot_required=enable != running,
            backup=written[0].backup if written else None, backups=[w.backup for w in written],
            files=[w.path for w in written], flags=flags,
            added=plan.added if plan else grubby_add, removed=plan.removed if plan else grubby_remove,
            regenerated=tool, command=argv, message="; ".join(parts))

    # -- tools ----------------------------------------------------------------

    @staticmethod
    def _grubby_args(add: list[str], remove: list[str]) -> str:
        out = []
        if add:
            out.append(f"--args={shlex.quote(' '.join(add))}")
        if remove:
            out.append(f"--remove-args={shlex.quote(' '.join(remove))}")
        return " ".join(out)

    def _regenerate_argv(self, host: system.Host, files_changed: bool, grubby_add: list[str],
                         grubby_remove: list[str]) -> tuple[list[str] | None, str | None]:
        """The command that makes the edit reach the boot loader, or why none runs."""
        if not self.conf.regenerate:
            return None, "[iommu] regenerate = false: run your distribution's tool (update-grub, grub2-mkconfig, grubby)"
        tools = host.tools
        if "grubby" in tools:
            # RHEL family: the boot entries (BLS) carry their own command lines.
            if not (grubby_add or grubby_remove):
                return None, "grubby's boot entries already have the flags"
            argv = [tools["grubby"], "--update-kernel=ALL"]
            if grubby_add:
                argv.append(f"--args={' '.join(grubby_add)}")
            if grubby_remove:
                argv.append(f"--remove-args={' '.join(grubby_remove)}")
            return argv, None
        if not files_changed:
            return None, "nothing changed in the GRUB defaults"
        if "update-grub" in tools:
            return [tools["update-grub"]], None
        for name in ("grub2-mkconfig", "grub-mkconfig"):
            if name in tools:
                return [tools[name], "-o", host.grub_cfg], None
        return None, ("no update-grub, grub2-mkconfig or grubby on this node: regenerate the "
                      "boot configuration with your distribution's tool before rebooting")

    async def _run_tool(self, argv: list[str], written: list[system.Written]) -> None:
        """Run the regeneration; when it fails, the edited files get their old content back."""
        try:
            result = await self.runner.run(argv, timeout=self.conf.regenerate_timeout,
                                           max_output=64 << 10)
        except errors.Timeout:
            await self._undo(written)
            raise errors.OperationFailed(
                f"{os.path.basename(argv[0])} did not finish within {self.conf.regenerate_timeout} s "
                f"and was killed; {self._undone(written)}", code="IOMMU.1408") from None
        except OSError as e:
            await self._undo(written)
            raise errors.OperationFailed(f"cannot run {argv[0]}: {e.strerror or e}; "
                                         f"{self._undone(written)}", code="IOMMU.1510") from None
        if result.returncode != 0:
            await self._undo(written)
            raise errors.OperationFailed(
                f"{os.path.basename(argv[0])} failed with exit code {result.returncode}; "
                f"{self._undone(written)}", code="IOMMU.1510",
                details=result.stderr[-4000:].decode(errors="replace"))

    async def _undo(self, written: list[system.Written]) -> None:
        if written:
            await asyncio.shield(self.runner.call(system.restore, written, timeout=READ_TIMEOUT))

    @staticmethod
    def _undone(written: list[system.Written]) -> str:
        if not written:
            return "nothing was changed"
        return ("the edit was undone (" + ", ".join(w.path for w in written)
                + " hold their old content again; the backups stay)")

    async def _grubby_info(self, host: system.Host, which: str) -> list[dict[str, str]]:
        argv = [host.tools["grubby"], f"--info={which}"]
        try:
            result = await self.runner.run(argv, timeout=GRUBBY_TIMEOUT)
        except OSError as e:
            raise errors.OperationFailed(f"cannot run grubby: {e.strerror or e}",
                                         code="IOMMU.1510") from None
        if result.returncode != 0:
            raise errors.OperationFailed(
                f"grubby --info={which} failed with exit code {result.returncode}",
                code="IOMMU.1510", details=result.stderr[-4000:].decode(errors="replace"))
        entries = bootconfig.parse_grubby_info(result.stdout.decode(errors="replace"))
        if not entries:
            raise errors.OperationFailed(f"grubby --info={which} listed no boot entry with args",
                                         code="IOMMU.1510")
        return entries
