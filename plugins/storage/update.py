"""updatePrimaryStorage: name and description; the url or mount options of an NFS or
shared-mount-point storage, remounted safely.

A url or mount-option change is refused while a running VM has a disk on the
storage (read from libvirt through the agent's shared connection: the VM plugin
is not asked, plugins never import each other).  The change is then: unmount the
old NFS export (or leave the old directory), mount the new one, check that it
holds this storage's claim file (the same data, reached another way), probe.  Any
failure puts the old url and options back and remounts them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import Field

from agent import errors
from agent.lazy import lazy_import
from agent.models import WireModel

from . import nfs
from .fsclient import FsHelper

# Parsed on first use, in a libvirt call's thread: an idle agent does not pay for the
# XML parser (~0.35 MB of RSS).
ET = lazy_import("xml.etree.ElementTree")

if TYPE_CHECKING:
    from . import Storage, StoragePlugin

LIBVIRT_TIMEOUT = 10.0


class UpdatePrimaryStorage(WireModel):
    name: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=2048)
    url: str | None = Field(None, min_length=1, max_length=4096,
                            description="NFS: server:/export; shared mount point: the directory")
    mount_options: str | None = Field(None, max_length=1024, description="NFS only")


def _no_control(v: str | None, what: str) -> None:
    if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise errors.BadRequest(f"{what} holds control characters", code="STORAGE.1001")


def _plan(p: "StoragePlugin", st: "Storage", params: UpdatePrimaryStorage) -> tuple[str, str | None] | None:
    """The new (url, mountOptions) when they change, checked; None when they do not."""
    from . import LOCAL, NFS
    url = params.url if params.url is not None else st.row.url
    opts = params.mount_options if params.mount_options is not None else st.row.mount_options
    if url == st.row.url and opts == st.row.mount_options:
        return None
    if st.row.type == LOCAL:
        raise errors.BadRequest("a local storage's url is its directory and cannot change",
                                code="STORAGE.1001")
    try:
        if st.row.type == NFS:
            nfs.check_nfs_url(url)
            nfs.merge_options(opts, p.conf.nfs_default_options)
        else:
            if params.mount_options is not None:
                raise nfs.BadInput("mountOptions apply to NFS storage only")
            url = nfs.check_dir_path(url, "url")
    except nfs.BadInput as e:
        raise errors.BadRequest(str(e), code="STORAGE.1001") from None
    return url, opts


def _running_disks(conn: Any) -> dict[str, list[str]]:
    """Every running domain's disk sources: uuid -> paths (in a libvirt thread)."""
    import libvirt
    out: dict[str, list[str]] = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        root = ET.fromstring(dom.XMLDesc(0))
        for src in root.findall("./devices/disk/source"):
            path = src.get("file") or src.get("dev")
            if path:
                out.setdefault(dom.UUIDString(), []).append(path)
    return out


async def vms_using(p: "StoragePlugin", st: "Storage") -> list[str]:
    """The running VMs with a disk on the storage.  When libvirt cannot be asked, a storage
    with volumes is taken as in use (a remount under a running VM would break it)."""
    roots = {os.path.normpath(st.root), os.path.normpath(st.row.extra.get("realpath") or st.root)}
    lv = p.agent.libvirt()
    if not lv.connected:
        if await p.registry.volumes(st.uuid):
            raise errors.Conflict(f"primary storage {st.uuid} has volumes and libvirt cannot be "
                                  f"asked which are in use ({lv.reason}); the url stays",
                                  code="STORAGE.1009")
        return []
    disks = await lv.call(_running_disks, timeout=LIBVIRT_TIMEOUT, runner=p.runner)
    return sorted(vm for vm, paths in disks.items()
                  if any(os.path.normpath(x).startswith(r + "/") for x in paths for r in roots))


async def check(p: "StoragePlugin", params: UpdatePrimaryStorage, uuid: str) -> None:
    st = p.get_storage(uuid)
    _no_control(params.name, "name")
    _no_control(params.description, "description")
    change = _plan(p, st, params)
    if change is None:
        return
    if st.busy:
        raise errors.Conflict(f"primary storage {st.uuid} is busy", code="STORAGE.1009")
    if st.row.type != "NFS":
        p._overlap(change[0], st.uuid)
    users = await vms_using(p, st)
    if users:
        raise errors.Conflict(f"running VM(s) {', '.join(users)} have disks on primary storage "
                              f"{st.uuid}: stop them before changing its url or mount options",
                              code="STORAGE.1009")


async def update(p: "StoragePlugin", job, params: UpdatePrimaryStorage, uuid: str) -> dict[str, Any]:
    await check(p, params, uuid)
    st = p.get_storage(uuid)
    change = _plan(p, st, params)
    if change is not None:
        async with st.conn_lock:
            await _move(p, job, st, *change)
    if params.name is not None:
        st.row.name = params.name
    if params.description is not None:
        st.row.description = params.description
    await p.registry.save_storage(st.row)
    return {"inventory": st.row.inventory()}


async def _move(p: "StoragePlugin", job, st: "Storage", url: str, opts: str | None) -> None:
    from . import HUNG, NFS
    old = (st.row.url, st.row.mount_options, st.row.mount_path, dict(st.row.extra), st.helper)

    def point(u: str, o: str | None, mp: str, extra: dict, helper: FsHelper) -> None:
        st.row.url, st.row.mount_options, st.row.mount_path, st.helper = u, o, mp, helper
        st.row.extra = extra

    if st.row.type == NFS:
        job.progress(10, f"unmounting {st.row.url}")
        await p._umount(st, hung=st.row.status == HUNG)
        point(url, opts, st.row.mount_path, old[3], st.helper)
    else:
        point(url, st.row.mount_options, url, {**old[3], "realpath": url},
              FsHelper(st.uuid, url, p.tag, timeout=p.conf.call_timeout_seconds,
                       max_stuck=p.conf.max_stuck_helpers))
    try:
        job.progress(40, f"connecting {url}")
        if st.row.type != NFS:
            info = await p.fs(st, "prepare_root", create=False)
            st.row.extra["realpath"] = info["realpath"]
        await p._connect(st, remount=False)
    except BaseException:
        # back to the old url: the storage stays as it was
        if st.row.type == NFS:
            try:
                await p._umount(st, hung=st.row.status == HUNG)
            except Exception:
                pass
        elif st.helper is not old[4]:
            await st.helper.close()
        point(*old)
        try:
            await p._connect(st, remount=False)
        except Exception:
            pass
        raise
    if st.row.type != NFS and old[4] is not st.helper:
        await old[4].close()
    await p.registry.save_storage(st.row)
