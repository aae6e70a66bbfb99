"""The IOMMU plugin's file and tool work: reading the boot configuration, safe writes.

Everything lives under ``root``.  Files are written the careful way: the old
content is kept as ``<file>.node-agent.bak-<UTC time>``, the new one goes to a
temporary file in the same directory, gets the old mode and owner, is fsynced
and renamed over the original, and the directory is fsynced.  The generated
grub.cfg is only ever named to the tools that regenerate it, never written here.
Synchronous and blocking: the plugin calls these off the event loop.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import cpuinfo

from . import bootconfig, status

GRUB_DEFAULTS = "etc/default/grub"
GRUB_DROPINS = "etc/default/grub.d"
TOOLS = ("grubby", "update-grub", "grub-mkconfig", "grub2-mkconfig")
# Daemons usually have /usr/sbin on PATH, interactive users on Debian do not.
_SYSTEM_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
BACKUP_INFIX = ".node-agent.bak-"


@dataclass
class Host:
    """What the plugin needs to know about the node before it reads or edits anything."""
    root: str
    cpu_vendor: str | None
    kind: str | None                  # intel | amd | None
    intel_default_on: bool
    running: list[str]                # the running kernel's parameters
    tools: dict[str, str] = field(default_factory=dict)      # name -> absolute path
    defaults: str | None = None       # <root>/etc/default/grub, when it exists
    files: list[bootconfig.GrubFile] | None = None           # it and its drop-ins
    grub_cfg: str | None = None       # where grub(2)-mkconfig must write


def is_live(root: str) -> bool:
    return os.path.realpath(root) == "/"


def find_tools(root: str) -> dict[str, str]:
    """The boot tools on the agent's PATH (plus the sbin dirs when root is this machine).

    With a root other than "/" only PATH counts, so a generated tree never
    makes the agent run this machine's own update-grub by accident.
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    if is_live(root):
        dirs += [d for d in _SYSTEM_BIN_DIRS if d not in dirs]
    path = os.pathsep.join(d for d in dirs if d)
    found = {}
    for name in TOOLS:
        exe = shutil.which(name, path=path)
        if exe:
            found[name] = os.path.abspath(exe)
    return found


def read_text(path: Path) -> str:
    # surrogateescape: a stray non-UTF-8 byte survives a rewrite unchanged.
    return path.read_bytes().decode("utf-8", "surrogateescape")


def read_grub_files(root: str) -> list[bootconfig.GrubFile] | None:
    """/etc/default/grub then its drop-ins in the order grub-mkconfig sources them."""
    main = Path(root, GRUB_DEFAULTS)
    if not main.is_file():
        return None
    files = [bootconfig.GrubFile(str(main), read_text(main))]
    try:
        dropins = sorted(p for p in Path(root, GRUB_DROPINS).iterdir()
                         if p.name.endswith(".cfg") and p.is_file())
    except OSError:
        dropins = []
    files += [bootconfig.GrubFile(str(p), read_text(p)) for p in dropins]
    return files


def grub_cfg(root: str) -> str:
    """The grub.cfg that grub2-mkconfig must write on this node.

    BIOS and current RHEL/Fedora UEFI installs read /boot/grub2/grub.cfg (the
    one in the EFI partition is a stub that loads it).  Older RHEL UEFI
    installs (7, 8) read the EFI partition's own, complete grub.cfg.
    """
    boot = Path(root, "boot")
    if Path(root, "sys/firmware/efi").is_dir():
        try:
            candidates = sorted(Path(boot, "efi/EFI").glob("*/grub.cfg"))
        except OSError:
            candidates = []
        for cfg in candidates:
            try:
                text = read_text(cfg)
            except OSError:
                continue
            stub = "configfile" in text and "### BEGIN" not in text
            if not stub and text.strip():
                return str(cfg)
    for rel in ("grub2/grub.cfg", "grub/grub.cfg"):
        if Path(boot, rel).exists():
            return str(Path(boot, rel))
    return str(Path(boot, "grub2/grub.cfg"))


def inspect(root: str) -> Host:
    vendor, _ = status.cpu(root)
    host = Host(root=root, cpu_vendor=vendor, kind=cpuinfo.vendor_kind(vendor),
                intel_default_on=status.intel_default_on(root),
                running=status.running_cmdline(root), tools=find_tools(root))
    host.files = read_grub_files(root)
    if host.files is not None:
        host.defaults = host.files[0].path
    if "grub2-mkconfig" in host.tools or "grub-mkconfig" in host.tools:
        host.grub_cfg = grub_cfg(root)
    return host


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, like: os.stat_result) -> None:
    """Replace path with data: temp file in the same dir, mode and owner of ``like``,
    fsync, rename, fsync the directory.  A crash leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.node-agent.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(like.st_mode))
            if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), like.st_uid, like.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def backup_path(path: Path, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}-{n}")
        n += 1
    return candidate


class ChangedUnderUs(Exception):
    """A file changed between reading and writing it."""


@dataclass
class Written:
    path: str
    backup: str
    old: bytes


def write_changes(changes: dict[str, tuple[str, str]]) -> list[Written]:
    """Back up and rewrite each changed file; all or nothing, as far as files allow.

    A file that no longer holds what was read is left alone (ChangedUnderUs),
    and whatever was already rewritten is put back.
    """
    done: list[Written] = []
    try:
        for name, (old_text, new_text) in changes.items():
            path = Path(os.path.realpath(name))      # keep a symlinked file a symlink
            old = path.read_bytes()
            if old != old_text.encode("utf-8", "surrogateescape"):
                raise ChangedUnderUs(f"{name} changed while it was being edited; try again")
            st = path.stat()
            backup = backup_path(path)
            atomic_write(backup, old, st)
            atomic_write(path, new_text.encode("utf-8", "surrogateescape"), st)
            done.append(Written(name, str(backup), old))
    except BaseException:
        restore(done)
        raise
    return done


def restore(written: list[Written]) -> None:
    """Put the old contents back (after a failed regeneration, say)."""
    for w in reversed(written):
        path = Path(os.path.realpath(w.path))
        atomic_write(path, w.old, path.stat())
