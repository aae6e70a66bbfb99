"""RBD images as volumes: create, inspect, resize, snapshots, clone, flatten, delete.

Blocking; each function takes a connected ``rados.Rados`` and runs in a
runner thread.  Every librbd call is bounded by ``rados_osd_op_timeout``;
long ones (flatten, remove, a shrink) report progress and stop when the job is
cancelled (see progress.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from agent import errors

from .cluster import conflict, not_found, rbd
from .progress import Progress

ENOENT = 2

FEATURES = [(1, "layering"), (2, "striping"), (4, "exclusive-lock"), (8, "object-map"),
            (16, "fast-diff"), (32, "deep-flatten"), (64, "journaling"), (128, "data-pool"),
            (256, "operations"), (512, "migrating"), (1024, "non-primary")]


@contextmanager
def ioctx(r: Any, pool: str) -> Iterator[Any]:
    try:
        io = r.open_ioctx(pool)
    except Exception as e:
        if getattr(e, "errno", None) == ENOENT or type(e).__name__ == "ObjectNotFound":
            raise not_found(f"pool {pool} does not exist in the cluster") from None
        raise
    try:
        yield io
    finally:
        io.close()


@contextmanager
def image(r: Any, pool: str, name: str, read_only: bool = False) -> Iterator[Any]:
    with ioctx(r, pool) as io:
        try:
            img = rbd.Image(io, name, read_only=read_only)
        except rbd.ImageNotFound:
            raise not_found(f"image {pool}/{name} does not exist") from None
        try:
            yield img
        finally:
            img.close()


def exists(r: Any, pool: str, name: str) -> bool:
    with ioctx(r, pool) as io:
        try:
            rbd.Image(io, name, read_only=True).close()
            return True
        except rbd.ImageNotFound:
            return False


def find(r: Any, pools: list[str], name: str) -> str | None:
    """The first of ``pools`` holding an image ``name``."""
    for pool in pools:
        try:
            if exists(r, pool, name):
                return pool
        except Exception as e:
            if getattr(e, "code", None) == "CEPH.1004":   # pool gone
                continue
            raise
    return None


def _iso(ts: Any) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(ts)


def _describe(img: Any, pool: str, name: str, usage: bool) -> dict[str, Any]:
    st = img.stat()
    feats = img.features()
    parent = None
    try:
        spec = img.get_parent_image_spec()
        parent = {"poolName": spec["pool_name"], "imageName": spec["image_name"],
                  "snapshotName": spec["snap_name"]}
    except rbd.ImageNotFound:
        pass
    snaps = []
    for s in img.list_snaps():
        try:
            protected = img.is_protected_snap(s["name"])
        except Exception:
            protected = False
        children = []
        if protected:
            img.set_snap(s["name"])
            try:
                children = [f"{c['pool']}/{c['image']}" for c in img.list_children2() if not c.get("trash")]
            finally:
                img.set_snap(None)
        try:
            created = _iso(img.get_snap_timestamp(s["id"]))
        except Exception:
            created = None
        snaps.append({"name": s["name"], "id": s["id"], "size": s["size"], "protected": protected,
                      "children": children, "createDate": created})
    info: dict[str, Any] = {
        "poolName": pool, "name": name, "installPath": f"ceph://{pool}/{name}",
        "size": st["size"], "objectSize": st["obj_size"], "format": "raw",
        "features": [n for bit, n in FEATURES if feats & bit], "parent": parent,
        "snapshots": snaps, "createDate": _iso(_safe(img.create_timestamp)),
        "lastOpDate": _iso(_safe(img.modify_timestamp)),
    }
    if usage:
        info["actualSize"] = used_bytes(img, st["size"])
    return info


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        return None


def used_bytes(img: Any, size: int) -> int:
    """Allocated bytes (``rbd du``): the object map makes this cheap with fast-diff."""
    total = [0]

    def cb(offset: int, length: int, exists: bool) -> int:
        if exists:
            total[0] += length
        return 0
    try:
        img.diff_iterate(0, size, None, cb, whole_object=True)
    except Exception:
        return 0
    return total[0]


def info(r: Any, pool: str, name: str, usage: bool = False) -> dict[str, Any]:
    with image(r, pool, name, read_only=True) as img:
        return _describe(img, pool, name, usage)


def list_pool(r: Any, pool: str) -> list[dict[str, Any]]:
    out = []
    with ioctx(r, pool) as io:
        for name in sorted(rbd.RBD().list(io)):
            try:
                with rbd.Image(io, name, read_only=True) as img:
                    out.append(_describe(img, pool, name, usage=False))
            except rbd.ImageNotFound:
                continue     # removed meanwhile
    return out


def create(r: Any, pool: str, name: str, size: int) -> dict[str, Any]:
    with ioctx(r, pool) as io:
        try:
            rbd.RBD().create(io, name, size, old_format=False)
        except rbd.ImageExists:
            raise conflict(f"image {pool}/{name} already exists") from None
    return info(r, pool, name)


def resize(r: Any, pool: str, name: str, size: int, allow_shrink: bool, progress: Progress) -> dict:
    with image(r, pool, name) as img:
        current = img.size()
        if size < current and not allow_shrink:
            raise conflict(f"image {pool}/{name} is {current} bytes; shrinking it to {size} "
                           "loses data: pass allowShrink=true to do it anyway")
        if size != current:
            img.resize(size, allow_shrink=allow_shrink)
            progress.report(1, 1)
        return _describe(img, pool, name, usage=False)


def _snap(img: Any, pool: str, name: str, snap: str) -> dict[str, Any]:
    for s in img.list_snaps():
        if s["name"] == snap:
            return s
    raise not_found(f"image {pool}/{name} has no snapshot {snap}")


def _children(img: Any, snap: str) -> list[tuple[str, str]]:
    img.set_snap(snap)
    try:
        return [(c["pool"], c["image"]) for c in img.list_children2() if not c.get("trash")]
    finally:
        img.set_snap(None)


def snap_create(r: Any, pool: str, name: str, snap: str, protect: bool) -> dict:
    with image(r, pool, name) as img:
        if any(s["name"] == snap for s in img.list_snaps()):
            raise conflict(f"image {pool}/{name} already has a snapshot {snap}")
        img.create_snap(snap)
        if protect:
            img.protect_snap(snap)
        return _describe(img, pool, name, usage=False)


def snap_protect(r: Any, pool: str, name: str, snap: str, protect: bool) -> dict:
    with image(r, pool, name) as img:
        _snap(img, pool, name, snap)
        is_protected = img.is_protected_snap(snap)
        if protect and not is_protected:
            img.protect_snap(snap)
        elif not protect and is_protected:
            kids = _children(img, snap)
            if kids:
                raise conflict(f"snapshot {pool}/{name}@{snap} has clones "
                               f"({', '.join(f'{p}/{i}' for p, i in kids)}): flatten or delete "
                               "them first")
            img.unprotect_snap(snap)
        return _describe(img, pool, name, usage=False)


def snap_delete(r: Any, pool: str, name: str, snap: str, force: bool, progress: Progress) -> dict:
    with image(r, pool, name) as img:
        _snap(img, pool, name, snap)
        _drop_snap(r, img, pool, name, snap, force, progress)
        return _describe(img, pool, name, usage=False)


def _drop_snap(r: Any, img: Any, pool: str, name: str, snap: str, force: bool,
               progress: Progress) -> None:
    if img.is_protected_snap(snap):
        kids = _children(img, snap)
        if kids and not force:
            raise conflict(f"snapshot {pool}/{name}@{snap} has clones "
                           f"({', '.join(f'{p}/{i}' for p, i in kids)}): flatten them, or "
                           "pass force=true to flatten them and delete it")
        if not force:
            raise conflict(f"snapshot {pool}/{name}@{snap} is protected: unprotect it, or pass "
                           "force=true")
        for i, (cpool, cname) in enumerate(kids):
            with image(r, cpool, cname) as child:
                child.flatten(on_progress=progress.stage(
                    0, 90, f"flattening clone {cpool}/{cname} ({i + 1}/{len(kids)})").rbd_callback)
        img.unprotect_snap(snap)
    img.remove_snap(snap)


def snap_rollback(r: Any, pool: str, name: str, snap: str, progress: Progress) -> dict:
    with image(r, pool, name) as img:
        _snap(img, pool, name, snap)
        progress.report(0, 1, f"rolling back to {snap}")
        img.rollback_to_snap(snap)
        progress.report(1, 1)
        return _describe(img, pool, name, usage=False)


def clone(r: Any, pool: str, name: str, snap: str, dst_pool: str, dst_name: str) -> dict:
    with image(r, pool, name) as img:
        _snap(img, pool, name, snap)
        if not img.is_protected_snap(snap):
            img.protect_snap(snap)       # v1 clones need it; harmless for v2
    with ioctx(r, pool) as pio, ioctx(r, dst_pool) as cio:
        try:
            rbd.RBD().clone(pio, name, snap, cio, dst_name)
        except rbd.ImageExists:
            raise conflict(f"image {dst_pool}/{dst_name} already exists") from None
    return info(r, dst_pool, dst_name)


def flatten(r: Any, pool: str, name: str, progress: Progress) -> dict:
    with image(r, pool, name) as img:
        try:
            img.get_parent_image_spec()
        except rbd.ImageNotFound:
            return _describe(img, pool, name, usage=False)   # nothing to do
        img.flatten(on_progress=progress.rbd_callback)
        return _describe(img, pool, name, usage=False)


def blockers(r: Any, pool: str, name: str) -> tuple[list[str], list[str]]:
    """(snapshot names, clones) that stop a plain delete."""
    with image(r, pool, name, read_only=True) as img:
        snaps = [s["name"] for s in img.list_snaps()]
        kids = []
        for s in snaps:
            try:
                if img.is_protected_snap(s):
                    kids += [f"{p}/{i}" for p, i in _children(img, s)]
            except rbd.ImageNotFound:
                continue
        return snaps, kids


def remove(r: Any, pool: str, name: str, force: bool, progress: Progress) -> None:
    with image(r, pool, name) as img:
        snaps = [s["name"] for s in img.list_snaps()]
        if snaps and not force:
            raise conflict(f"image {pool}/{name} has snapshots ({', '.join(snaps)}): delete them "
                           "first, or pass force=true")
        for s in snaps:
            _drop_snap(r, img, pool, name, s, True, progress.stage(0, 50, f"deleting snapshot {s}"))
    with ioctx(r, pool) as io:
        deadline = time.monotonic() + 30
        while True:
            try:
                rbd.RBD().remove(io, name, on_progress=progress.stage(
                    50, 100, f"removing {pool}/{name}").rbd_callback)
                return
            except rbd.ImageNotFound:
                return
            except rbd.ImageBusy:
                # A watcher from a just-closed handle lingers a moment (e.g. after a flatten).
                if time.monotonic() > deadline:
                    raise conflict(f"image {pool}/{name} is in use (it has watchers): stop "
                                   "whatever has it open") from None
                time.sleep(0.5)


def clean_cache(r: Any, pool: str, keep: set[str], progress: Progress) -> dict[str, Any]:
    """Remove the images of an image cache pool that nothing clones from.

    An image is kept when a snapshot of it has a clone (in the trash too), when
    something has it open (a watcher), or when it is in ``keep`` (a volume the
    agent created there).  Snapshots are unprotected and removed one by one, never
    with a flatten: a clone made meanwhile makes the unprotect fail and the image
    is kept."""
    with ioctx(r, pool) as io:
        names = sorted(rbd.RBD().list(io))
    removed: list[str] = []
    kept: list[str] = []
    freed = 0
    for n, name in enumerate(names):
        if progress.is_cancelled:
            break
        progress.report(n, len(names), f"checking {pool}/{name}")
        if name in keep:
            kept.append(name)
            continue
        try:
            with image(r, pool, name, read_only=True) as img:   # read-only: no watch of ours
                snaps = list(img.list_snaps())
                clones = []
                for s in snaps:
                    img.set_snap(s["name"])
                    try:
                        clones += list(img.list_children2())
                    finally:
                        img.set_snap(None)
                if clones or _safe(lambda: list(img.watchers_list())):
                    kept.append(name)
                    continue
                used = used_bytes(img, img.size())
            with image(r, pool, name) as img:
                for s in snaps:
                    if img.is_protected_snap(s["name"]):
                        img.unprotect_snap(s["name"])     # EBUSY if a clone appeared
                    img.remove_snap(s["name"])
            with ioctx(r, pool) as io:
                rbd.RBD().remove(io, name)
        except errors.NotFound:
            continue                      # removed by someone else meanwhile
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            kept.append(name)
            continue
        removed.append(name)
        freed += used
    return {"removedImageUuids": removed, "removedBytes": freed, "keptImageUuids": kept}
