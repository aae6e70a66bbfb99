"""Where the agent may put, mount or hand to QEMU a path: the one rule every plugin uses.

A token is not root.  Every path a caller names (a storage url, an NFS mount
path, a VM disk or ISO, the image store url) goes through ``confine``:

* its shape: absolute, no '.' or '..' component, only letters, digits, space and
  ._+@=,/- (no control character, no shell or XML metacharacter);
* resolved, symlinks included (a path that does not exist yet is resolved at
  its deepest existing ancestor, so ``/srv/link-to-etc/new`` is ``/etc/new``);
* the resolved path lies inside one of ``[storage] allowed_roots`` (or is one);
* it is neither over (an ancestor of) nor inside a protected path: the system
  directories below, the agent's state directory (but for its own NFS mount
  directory ``<state dir>/mnt``) and its token file.

A refusal is ``PathRefused``: 400 with code SYS.1007, naming the rule and the
allowed roots.  Resolving touches the filesystem (lstat, readlink), so callers
run ``confine`` off the event loop, with a timeout (a hung NFS mount may block);
a caller that must not leave a thread stuck there resolves in a process of its
own and passes the result to ``judge`` (the storage plugin's helper does).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import BadRequest

# Never a storage, a mount point or a disk, nor above one of them.  /tmp and /home are
# not here: they are simply outside the default roots.
SYSTEM_DIRS = (
    "/bin", "/boot", "/dev", "/efi", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/root", "/run", "/sbin", "/sys", "/usr",
    "/var/lib/apt", "/var/lib/dpkg", "/var/lib/dnf", "/var/lib/rpm", "/var/lib/yum",
    "/var/lib/systemd", "/var/lib/libvirt/qemu", "/var/lib/libvirt/swtpm", "/var/log",
    "/var/spool", "/var/cache/apt", "/var/cache/debconf",
)

# Defaults that fit a fresh node (README, Configuration): libvirt's own image pool,
# the usual mount and site directories, and the manual's examples (/zstack_ps for
# local primary storage, /data/imagestore for the image store).
DEFAULT_ROOTS = ("/var/lib/libvirt/images", "/mnt", "/srv", "/data", "/zstack_ps")

# What a path may be made of: letters and digits (any script), space and ._+@=,/-.  No
# shell or XML metacharacter, no control or format character (newline, NUL, U+202E...).
SAFE_PATH_RE = re.compile(r"/[\w .+@=,/-]*")

# The kernel RBD block devices a VM disk may be (reached through /dev/rbd/<pool>/<image>).
RBD_DEVICE_RE = re.compile(r"/dev/rbd[0-9]+")

CODE = "SYS.1007"


class PathRefused(BadRequest, ValueError):
    """400 SYS.1007: a path outside the allowed roots, in a system directory, or malformed.

    Also a ValueError, so a pydantic validator may raise it as a field error.
    """
    code = CODE


def _within(path: str, base: str) -> bool:
    """path is base or inside it (both absolute and normalized)."""
    return path == base or base == "/" or path.startswith(base.rstrip("/") + "/")


def _real(path: str) -> str:
    return os.path.realpath(path)


@dataclass(frozen=True)
class Roots:
    """The allowed roots and the protected paths, each as given and as resolved."""
    allowed: tuple[str, ...]
    protected: tuple[str, ...]
    exempt: tuple[str, ...] = ()      # inside a protected path, yet allowed (<state>/mnt)

    @classmethod
    def build(cls, allowed: Iterable[str | os.PathLike], *, state_dir: str | os.PathLike,
              token_file: str | os.PathLike | None = None) -> "Roots":
        """Resolve everything once (at start); raise ValueError for a root that is unsafe."""
        state = os.path.normpath(os.path.abspath(state_dir))
        own_mnt = os.path.join(state, "mnt")
        protected = {os.path.normpath(p) for p in SYSTEM_DIRS} | {state}
        if token_file is not None:
            protected.add(os.path.normpath(os.path.abspath(token_file)))
        protected |= {_real(p) for p in protected}
        exempt = (own_mnt, _real(own_mnt))
        system = {os.path.normpath(p) for p in SYSTEM_DIRS} | {"/"}
        system |= {_real(p) for p in SYSTEM_DIRS}
        resolved: list[str] = []
        for root in [*allowed, own_mnt]:
            root = os.fspath(root)
            shape_error = _shape(root)
            if shape_error:
                raise ValueError(f"allowed root {root!r} {shape_error}")
            real = _real(os.path.normpath(root))
            for p in (os.path.normpath(root), real):
                if p == "/" or any(_within(s, p) for s in system):
                    raise ValueError(f"allowed root {root!r} is or contains a system directory")
                hit = next((d for d in sorted(protected) if _within(p, d)), None)
                if hit is not None and not any(_within(p, e) for e in exempt):
                    raise ValueError(f"allowed root {root!r} is {hit} or inside it, which "
                                     "the agent protects")
            if real not in resolved:
                resolved.append(real)
        return cls(tuple(resolved), tuple(sorted(protected)), exempt)

    def describe(self) -> str:
        return ", ".join(self.allowed)


def _shape(path: str) -> str | None:
    """Why path cannot be used as written, or None."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "must not contain control characters (newline, NUL, ...)"
    if not path.startswith("/"):
        return "must be an absolute path"
    if any(part in (".", "..") for part in path.split("/")):
        return "must not contain '.' or '..' components"
    if not SAFE_PATH_RE.fullmatch(path):
        return "may only hold letters, digits, spaces and ._+@=,/-"
    return None


def check_shape(path: str, what: str = "path") -> str:
    """The lexical part of the rule (no I/O): absolute, no control character, no '.'/'..'."""
    why = _shape(path)
    if why:
        raise PathRefused(f"{what} {path!r} {why}")
    return os.path.normpath(path)


def confine(path: str, roots: Roots, *, must_exist: bool = False, what: str = "path") -> Path:
    """The resolved path, if path may be used; else PathRefused.  Blocking (lstat/readlink)."""
    real = _real(check_shape(path, what))
    judged = judge(path, real, roots, what=what)
    if must_exist and not os.path.exists(real):
        raise PathRefused(f"{what} {path!r} does not exist")
    return judged


def judge(path: str, real: str, roots: Roots, *, what: str = "path") -> Path:
    """confine() for a path already resolved elsewhere (os.path.realpath in a process
    that may hang on a dead NFS server without harm): no I/O here."""
    norm = check_shape(path, what)
    real = os.path.normpath(real)
    if not real.startswith("/"):
        raise PathRefused(f"{what} {path!r} did not resolve to an absolute path")
    for d in roots.protected:
        if _within(d, real) or _within(d, norm):
            raise PathRefused(f"{what} {path!r} is {'' if d == real else 'over '}{d}, "
                              "which the agent protects (a system directory, its state "
                              "directory or its token): nothing may be put, mounted or opened "
                              f"there; allowed roots: {roots.describe()}")
        if (_within(real, d) or _within(norm, d)) and not any(_within(real, e) for e in roots.exempt):
            raise PathRefused(f"{what} {path!r} is in or resolves into {d}, which the agent protects "
                              f"(a system directory, its state directory or its token); "
                              f"allowed roots: {roots.describe()}")
    if not any(_within(real, r) for r in roots.allowed):
        shown = "" if real == norm else f" (it resolves to {real})"
        raise PathRefused(f"{what} {path!r}{shown} is outside the allowed roots "
                          f"([storage] allowed_roots): {roots.describe()}")
    return Path(real)


def confine_disk(path: str, roots: Roots, *, what: str = "disk") -> Path:
    """A VM disk or ISO: inside an allowed root, or a kernel RBD device (a Ceph volume)."""
    norm = check_shape(path, what)
    real = _real(norm)
    if RBD_DEVICE_RE.fullmatch(real) and (norm.startswith("/dev/rbd/") or norm == real):
        return Path(real)
    return confine(path, roots, what=what)
