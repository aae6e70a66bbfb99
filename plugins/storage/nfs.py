"""Mounts: NFS URL and option validation, the mount argv, /proc/self/mountinfo.

Nothing here runs a shell: the mount is an argv (``mount -t nfs -o OPTS
server:/export PATH``), and whatever the caller sent is checked against strict
patterns first, so a URL like ``host:/x;rm -rf /`` is a 400, never a command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agent.validation import full_match

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
_EXPORT = r"/[A-Za-z0-9._+@=,/-]*"
NFS_URL_RE = re.compile(rf"^(?P<host>{_HOST}):(?P<path>{_EXPORT})$")
OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(?:=[A-Za-z0-9_.:/+@-]+)?$")
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._+@=,/ -]*$")
FORBIDDEN_OPTIONS = {"remount", "bind", "rbind", "move", "make-shared", "make-private",
                     "make-slave", "make-unbindable", "owner", "user", "users"}
EXCLUSIVE = [{"soft", "hard", "softerr"}, {"ro", "rw"}, {"suid", "nosuid"}, {"dev", "nodev"},
             {"exec", "noexec"}, {"ac", "noac"}, {"lock", "nolock"}, {"intr", "nointr"}]


class BadInput(ValueError):
    """A parameter that cannot be used; the message says which and why."""


def check_nfs_url(url: str) -> tuple[str, str]:
    m = NFS_URL_RE.fullmatch(url)
    if not m:
        raise BadInput(f"url {url!r} is not server:/export (a host name or address, a colon, an "
                       "absolute export path of letters, digits and ._+@=,/- only)")
    path = m.group("path")
    if any(p in (".", "..") for p in path.split("/")) or "//" in path:
        raise BadInput(f"url {url!r}: the export path must not contain '.', '..' or '//'")
    return m.group("host"), path


def check_dir_path(path: str, what: str) -> str:
    """An absolute, normalized directory path of plain characters, not '/'."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadInput(f"{what} {path!r} must be an absolute path")
    if "\0" in path or "\n" in path or not full_match(SAFE_PATH_RE, path):
        raise BadInput(f"{what} {path!r} may only hold letters, digits, spaces and ._+@=,/-")
    if any(p in (".", "..") for p in path.split("/")):
        raise BadInput(f"{what} {path!r} must not contain '.' or '..' components")
    norm = os.path.normpath(path)
    if norm == "/":
        raise BadInput(f"{what} must not be the root directory")
    return norm


def _key(opt: str) -> str:
    return opt.split("=", 1)[0]


def merge_options(user: str | None, defaults: str) -> str:
    """User options first; each default is added unless the user set it or its opposite."""
    opts: list[str] = []
    if user and re.search(r"\s", user):
        raise BadInput(f"mount options {user!r} must not contain white space")
    for opt in (user or "").split(","):
        if not opt:
            continue
        if not full_match(OPTION_RE, opt):
            raise BadInput(f"mount option {opt!r} is not key or key=value of plain characters")
        if _key(opt) in FORBIDDEN_OPTIONS:
            raise BadInput(f"mount option {opt!r} is not allowed here")
        opts.append(opt)
    keys = {_key(o) for o in opts}
    for opt in (defaults or "").split(","):
        opt = opt.strip()
        if not opt:
            continue
        k = _key(opt)
        group = next((g for g in EXCLUSIVE if k in g), {k})
        if keys & group:
            continue
        opts.append(opt)
        keys.add(k)
    return ",".join(opts)


def mount_argv(mount_command: list[str], url: str, path: str, options: str) -> list[str]:
    return [*mount_command, "-t", "nfs", "-o", options, url, path]


def umount_argv(umount_command: list[str], path: str, lazy: bool = False,
                force: bool = False) -> list[str]:
    flags = (["-f"] if force else []) + (["-l"] if lazy else [])
    return [*umount_command, *flags, path]


# --- mountinfo --------------------------------------------------------------------------

@dataclass
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]), dev=fields[2],
                root=unescape(fields[3]), mount_point=unescape(fields[4]), options=fields[5],
                fstype=fields[sep + 1], source=unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else ""))
        except (ValueError, IndexError):
            continue        # a line we do not understand is no mount of ours
    return entries


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """procfs: answered by the kernel without touching any mounted filesystem."""
    with open(path) as f:
        return parse_mountinfo(f.read())


def mount_at(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount visible at exactly path (the last one stacked there)."""
    found = None
    for e in entries:
        if e.mount_point == path:
            found = e
    return found


def mount_containing(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount that path lives on: the longest mount point that is path or a parent of it."""
    best = None
    for e in entries:
        mp = e.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = e
    return best


def same_nfs_source(source: str, url: str) -> bool:
    """mount.nfs may record the export with or without a trailing slash."""
    return source.rstrip("/") == url.rstrip("/") or source == url
