"""The image store backup storage: a directory of this node holding images by content.

Layout of the store's directory (README "Image store backup storage")::

    <url>/.node-agent-storage.json   the claim (the store's uuid), as primary storage
    <url>/blobs/<sha256>             each distinct image content, once
    <url>/blobs/.<name>.part-<tag>-* a download or copy in flight (swept at connect)

Image metadata (uuid, name, format, sizes, sha256, md5) lives in the state
database (imagestore_db.py); two images with the same content share one blob,
and reclaimSpaceFromImageStore removes the blobs no image names any more.
Every filesystem call goes through the store's hang-proof helper process
(fsclient.py), downloads through the fetcher process (streamio.py fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import hashlib
import logging
import os
import re
import secrets
import socket
import time
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from agent import errors, paths
from agent.jobs import iso
from agent.models import Empty
from agent.plugin import action, create, delete, get, query, raw
from agent.storage_kinds import BACKUP, KindAction, StorageKind

from . import imagecache, imagestore_migrate, volumes
from .fsclient import FsError, FsHelper, StorageHung
from .imagestore_db import ImageStoreDb, StoreImage, StoreRow, blob_path
from .imagestore_models import (IMAGE_STORE, AddImageStoreBackupStorage, AddStoreImage,
                                ExportParams, ExportReply, ImageStoreInventory, ImageStoreReply,
                                StoreImageInventory, StoreImageReply, UpdateImageStore)
from .models import norm_uuid
from .registry import StorageRow
from .writer import temp_name

if TYPE_CHECKING:
    from . import Storage, StoragePlugin

log = logging.getLogger("node_agent.storage")

BS = "/v1/backup-storage/image-store"
BSU = "/v1/backup-storage/{uuid:[0-9a-fA-F-]{32,36}}"
IMG = BSU + "/images/{imageUuid:[0-9a-fA-F-]{32,36}}"
BLOBS = "blobs"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _bad(msg: str) -> errors.BadRequest:
    return errors.BadRequest(msg, code="STORAGE.1001")


# --- the routes (mixed into StoragePlugin) ---------------------------------------------------------

class ImageStoreRoutes:
    """Image store backup storages: registration, images, dedup, export."""

    image_stores: dict[str, "Storage"]

    # -- the path rule ------------------------------------------------------------------------------
    async def confine_dir(self: "StoragePlugin", path: str, what: str) -> str:
        """A directory path a store may use: the core's path rule (agent/paths.py: its shape,
        under [storage] allowed_roots, never a protected directory such as the state
        directory), and, stricter, no symlink on the way (its deepest existing ancestor
        resolves to itself, read by a helper process so a hung filesystem costs a process).
        Raises a 400."""
        norm = paths.check_shape(path, what)
        cur = norm
        while cur != "/":
            h = FsHelper("confine", cur, self.tag, timeout=self.conf.call_timeout_seconds, max_stuck=1)
            try:
                info = await h.call("prepare_root", create=False)
            except FsError as e:
                if e.errno == errno_mod.ENOENT:
                    cur = os.path.dirname(cur)
                    continue
                raise _bad(f"{what} {norm}: {e}") from None
            finally:
                await h.close()
            if info["realpath"] != cur:
                raise _bad(f"{what} {norm}: {cur} is a symlink (to {info['realpath']}); "
                           "give the real path")
            break
        return str(paths.judge(norm, norm, self.agent.config.roots, what=what))

    # -- life cycle ----------------------------------------------------------------------------
    async def imagestore_open(self: "StoragePlugin") -> None:
        self.isdb = ImageStoreDb(self.agent.db)
        await self.isdb.open()
        for row in await self.isdb.stores():
            st = self._make_store(row)
            self.image_stores[row.uuid] = st
            st.monitor = asyncio.create_task(self._store_monitor(st, initial=True),
                                             name=f"imagestore-{row.uuid}")

    async def imagestore_close(self: "StoragePlugin") -> None:
        for st in list(self.image_stores.values()):
            await self._stop(st)

    def _make_store(self: "StoragePlugin", row: StoreRow) -> "Storage":
        st = self._make(StorageRow(uuid=row.uuid, type=IMAGE_STORE, name=row.name, url=row.url,
                                   mount_path=row.url))
        st.store = row               # the persisted row; st.row is what the helpers use
        st.commit_lock = asyncio.Lock()
        return st

    async def _store_monitor(self: "StoragePlugin", st: "Storage", initial: bool = False) -> None:
        if initial:
            with contextlib.suppress(Exception):
                async with st.conn_lock:
                    await self._store_connect(st)
        await self._health_checks(st, "image store", self._store_probe,
                                  before=lambda: self.isdb.expire_exports(time.time()))

    async def _store_status(self: "StoragePlugin", st: "Storage", status: str, reason: str | None) -> None:
        row = st.store
        changed = row.status != status or row.status_reason != reason
        row.status, row.status_reason = status, reason
        st.row.status, st.row.status_reason = status, reason
        if changed:
            await self.isdb.save_store(row)

    async def _store_probe(self: "StoragePlugin", st: "Storage") -> None:
        try:
            await st.helper.call("probe", timeout=self.conf.probe_timeout_seconds)
        except StorageHung as e:
            await self._store_status(st, "Hung", e.description)
            return
        except (FsError, errors.ApiError) as e:
            await self._store_status(st, "Disconnected", f"the probe failed: {e}")
            return
        await self._store_status(st, "Connected", None)
        with contextlib.suppress(errors.ApiError):
            await self._store_capacity(st)

    async def _store_connect(self: "StoragePlugin", st: "Storage", registering: bool = False) -> None:
        """The directory is there and claimed by this store; leftovers swept; probe; capacity."""
        try:
            await self.fs(st, "prepare_root", create=registering)
            owner = (await self.fs(st, "claim", uuid=st.uuid, take=registering))["owner"]
            if owner is None:
                raise errors.OperationFailed(f"{st.root} has no .node-agent-storage.json: is the "
                                             "right filesystem mounted there?", code="STORAGE.1504")
            if owner != st.uuid:
                raise errors.Conflict(f"{st.root} is claimed by storage {owner}", code="STORAGE.1009")
            await self.fs(st, "mkdirs", path=f"{BLOBS}/x")
            await self.fs(st, "sweep")
        except StorageHung as e:
            await self._store_status(st, "Hung", e.description)
            raise
        except errors.ApiError as e:
            await self._store_status(st, "Disconnected", e.description)
            raise
        await self._store_probe(st)
        if st.store.status != "Connected":
            raise errors.OperationFailed(f"image store {st.uuid} is {st.store.status}: "
                                         f"{st.store.status_reason}", code="STORAGE.1504")

    async def _store_capacity(self: "StoragePlugin", st: "Storage") -> dict[str, int]:
        vfs = await self.fs(st, "statvfs")
        blobs = await self.fs(st, "listdir", path=BLOBS)
        used = sum(b.get("allocated", 0) for b in blobs if b["type"] == "file")
        cap = {"totalCapacity": vfs["total"], "availableCapacity": vfs["avail"],
               "totalPhysicalCapacity": vfs["total"], "availablePhysicalCapacity": vfs["avail"],
               "usedCapacity": used}
        if cap != st.store.capacity:
            st.store.capacity = cap
            await self.isdb.save_store(st.store)
        return cap

    def store_inventory(self: "StoragePlugin", st: "Storage") -> dict[str, Any]:
        r, c = st.store, st.store.capacity
        return {"uuid": r.uuid, "name": r.name, "description": r.description, "url": r.url,
                "hostname": r.hostname, "username": r.username, "type": IMAGE_STORE,
                "state": r.state, "status": r.status, "statusReason": r.status_reason,
                "totalCapacity": c.get("totalCapacity"), "availableCapacity": c.get("availableCapacity"),
                "totalPhysicalCapacity": c.get("totalPhysicalCapacity"),
                "availablePhysicalCapacity": c.get("availablePhysicalCapacity"),
                "usedCapacity": c.get("usedCapacity"), "createDate": iso(r.created),
                "lastOpDate": iso(r.updated)}

    def get_store(self: "StoragePlugin", uuid: str) -> "Storage":
        st = self.image_stores.get(norm_uuid(uuid))
        if st is None:
            raise errors.NotFound(f"no image store backup storage {uuid} on this node",
                                  code="STORAGE.1004")
        return st

    def store_usable(self: "StoragePlugin", st: "Storage", for_new: bool = True) -> None:
        if for_new and st.store.state != "Enabled":
            raise errors.Conflict(f"image store {st.uuid} is {st.store.state}: it takes no new "
                                  "images", code="STORAGE.1010")
        if st.store.status in ("Disconnected", "Hung") and st.helper.stuck() >= st.helper.max_stuck:
            raise StorageHung(f"image store {st.uuid} is hung ({st.store.status_reason}); "
                              "call reconnectBackupStorage")

    def _store_overlap(self: "StoragePlugin", root: str, uuid: str) -> None:
        self._overlap(root, uuid, [*self.storages.values(), *self.image_stores.values()], "storage")

    # -- registration ------------------------------------------------------------------------------
    @create(BS, params=AddImageStoreBackupStorage, result=ImageStoreReply)
    async def add_image_store(self: "StoragePlugin", job, params: AddImageStoreBackupStorage):
        """AddImageStoreBackupStorage: a directory of this node (made when missing), claimed."""
        url = await self.confine_dir(params.url, "url")
        uuid = params.resource_uuid                # decided by the core
        if await self._store_uuid_used(uuid):     # taken since the request's check
            raise errors.Conflict(f"resourceUuid {uuid} is already in use", code="SYS.1009")
        self._store_overlap(url, uuid)
        row = StoreRow(uuid=uuid, name=params.name, url=url, description=params.description,
                       hostname=params.hostname, username=params.username)
        st = self._make_store(row)
        self.image_stores[uuid] = st               # reserved: a concurrent add sees it
        try:
            async with st.conn_lock:
                await self._store_connect(st, registering=True)
            await self.isdb.save_store(row)
        except BaseException:
            self.image_stores.pop(uuid, None)
            if row.status != "Hung":
                with contextlib.suppress(Exception):
                    await st.helper.call("unclaim", timeout=2.0, uuid=uuid)
            await st.helper.close()
            raise
        st.monitor = asyncio.create_task(self._store_monitor(st), name=f"imagestore-{uuid}")
        return {"inventory": self.store_inventory(st)}

    @add_image_store.exists
    async def _store_uuid_used(self: "StoragePlugin", new_uuid: str) -> bool:
        """Any storage of this node, of either category and any plugin (the core's registry;
        an image store being registered is in it already)."""
        return self.agent.storage_kinds.holder(new_uuid) is not None

    @add_image_store.check
    async def _add_image_store_check(self: "StoragePlugin", params: AddImageStoreBackupStorage) -> None:
        url = await self.confine_dir(params.url, "url")
        self._store_overlap(url, params.resource_uuid)

    @query(BS, model=ImageStoreInventory)
    async def query_image_stores(self: "StoragePlugin") -> list[dict[str, Any]]:
        """QueryImageStoreBackupStorage."""
        return [self.store_inventory(st) for st in self.image_stores.values()]

    # -- the per-uuid calls (served by the core's /v1/backup-storage/{uuid}, see imagestore_kind) ---
    async def store_reconnect(self: "StoragePlugin", job, params, uuid: str) -> dict[str, Any]:
        """ReconnectImageStoreBackupStorage: claim checked, leftovers swept, probe, capacity."""
        st = self.get_store(uuid)
        async with st.conn_lock:
            await self._store_connect(st)
        return {"inventory": self.store_inventory(st)}

    async def store_capacity(self: "StoragePlugin", uuid: str) -> dict[str, int]:
        return await self._store_capacity(self.get_store(uuid))

    async def store_sync(self: "StoragePlugin", job, params, uuid: str) -> dict[str, Any]:
        st = self.get_store(uuid)
        await self._store_capacity(st)
        return {"inventory": self.store_inventory(st)}

    async def store_change_state(self: "StoragePlugin", job, params, uuid: str) -> dict[str, Any]:
        from . import STATE_EVENTS
        st = self.get_store(uuid)
        st.store.state = STATE_EVENTS[params.state_event]
        await self.isdb.save_store(st.store)
        return {"inventory": self.store_inventory(st)}

    async def store_update_check(self: "StoragePlugin", params: UpdateImageStore, uuid: str) -> None:
        self.get_store(uuid)

    async def store_update(self: "StoragePlugin", job, params: UpdateImageStore, uuid: str):
        """updateBackupStorage: name, description, hostname, username (the url stays)."""
        await self.store_update_check(params, uuid)
        st = self.get_store(uuid)
        for k in ("name", "description", "hostname", "username"):
            v = getattr(params, k)
            if v is not None:
                setattr(st.store, k, v)
        await self.isdb.save_store(st.store)
        return {"inventory": self.store_inventory(st)}

    async def store_delete(self: "StoragePlugin", job, params, uuid: str) -> dict[str, Any]:
        """Forget the store; its blobs stay unless deleteData=true (then they are removed)."""
        await self.store_delete_check(params, uuid)    # still true now the job runs
        st = self.get_store(uuid)
        removed = len((await self._remove_blobs(st, keep=set()))[0]) if params.delete_data else 0
        self.image_stores.pop(st.uuid, None)
        if st.monitor is not None:
            st.monitor.cancel()
            await asyncio.gather(st.monitor, return_exceptions=True)
        with contextlib.suppress(Exception):
            await st.helper.call("unclaim", timeout=min(5.0, self.conf.call_timeout_seconds),
                                 uuid=st.uuid)
        await st.helper.close()
        await self.isdb.delete_store(st.uuid)
        return {"uuid": st.uuid, "removedBlobs": removed}

    async def store_delete_check(self: "StoragePlugin", params, uuid: str) -> None:
        st = self.get_store(uuid)
        if st.busy:
            raise errors.Conflict(f"image store {st.uuid} is busy ({len(st.busy)} operation(s))",
                                  code="STORAGE.1009")

    async def store_reclaim(self: "StoragePlugin", job, params, uuid: str) -> dict[str, Any]:
        """ReclaimSpaceFromImageStore: remove the blobs that no image names any more."""
        st = self.get_store(uuid)
        async with st.commit_lock:       # no blob is being given its name meanwhile
            wanted = {i.sha256 for i in await self.isdb.images(st.uuid)}
            removed, freed = await self._remove_blobs(st, keep=wanted)
        with contextlib.suppress(errors.ApiError):
            await self._store_capacity(st)
        return {"removedBlobs": removed, "reclaimedBytes": freed}

    async def _remove_blobs(self: "StoragePlugin", st: "Storage",
                            keep: set[str]) -> tuple[list[str], int]:
        """Remove the store's blobs (blobs/<sha256> files) but those in keep: their names
        and the bytes they took."""
        removed, freed = [], 0
        for b in await self.fs(st, "listdir", path=BLOBS):
            name = b["name"]
            if b["type"] != "file" or not SHA256_RE.match(name) or name in keep:
                continue
            await self.fs(st, "unlink", path=f"{BLOBS}/{name}", missing_ok=True)
            removed.append(name)
            freed += b.get("allocated", 0)
        return removed, freed

    # -- images ------------------------------------------------------------------------------------
    def store_image_inventory(self: "StoragePlugin", st: "Storage", i: StoreImage) -> dict[str, Any]:
        return {"uuid": i.uuid, "backupStorageUuid": st.uuid, "name": i.name,
                "description": i.description, "url": i.url, "format": i.format, "size": i.size,
                "actualSize": i.actual_size, "sha256": i.sha256, "md5sum": i.md5,
                "installPath": st.abs(i.blob), "status": "Ready", "createDate": iso(i.created)}

    async def _store_image(self: "StoragePlugin", st: "Storage", image_uuid: str) -> StoreImage:
        img = await self.isdb.image(st.uuid, norm_uuid(image_uuid))
        if img is None:
            raise errors.NotFound(f"no image {image_uuid} in image store {st.uuid}",
                                  code="STORAGE.1006")
        return img

    @query(BSU + "/images", model=StoreImageInventory)
    async def query_store_images(self: "StoragePlugin", uuid: str) -> list[dict[str, Any]]:
        """The images of an image store."""
        st = self.get_store(uuid)
        return [self.store_image_inventory(st, i) for i in await self.isdb.images(st.uuid)]

    @get(IMG, result=StoreImageReply)
    async def get_store_image(self: "StoragePlugin", uuid: str, imageUuid: str) -> dict[str, Any]:
        st = self.get_store(uuid)
        return {"inventory": self.store_image_inventory(st, await self._store_image(st, imageUuid))}

    async def _source(self: "StoragePlugin", url: str) -> str | None:
        """The local path of a file:// source, or None for http(s).  Its directory is confined
        like a store's url; the file itself must be a regular file, not a symlink (which
        could point anywhere, /etc/shadow included), nor a FIFO or device (lstat in a helper
        process; the fetcher opens it with O_NOFOLLOW and checks again what it opened)."""
        if url.startswith("file://"):
            u = URL(url)
            if u.host not in (None, "", "localhost") or u.query_string or u.fragment:
                raise _bad(f"url {url!r}: a file:// URL is file:///absolute/path on this node")
            path = u.path
            parent = await self.confine_dir(os.path.dirname(path) or "/", "url")
            name = os.path.basename(path)
            if name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9._+@=,-]{1,255}", name):
                raise _bad(f"url {url!r}: not a plain file name")
            h = FsHelper("source", parent, self.tag, timeout=self.conf.call_timeout_seconds,
                         max_stuck=1)
            try:
                found = await h.call("lookup", path=name)
            except FsError as e:
                raise _bad(f"url {url!r}: {e}") from None
            finally:
                await h.close()
            if not found["exists"]:
                raise _bad(f"url {url!r}: no such file")
            if found["type"] != "file":
                raise _bad(f"url {url!r}: not a regular file (a {found['type']}); a symlink "
                           "is refused, give the file's real path")
            return os.path.join(parent, name)
        imagecache.check_url(url)
        return None

    @create(BSU + "/images", params=AddStoreImage, result=StoreImageReply)
    async def add_store_image(self: "StoragePlugin", job, params: AddStoreImage, uuid: str):
        """Import an image (http/https/file URL): checksums verified in the same pass, stored by
        its sha256 (content already in the store takes no new space)."""
        st = self.get_store(uuid)
        iu = params.resource_uuid                  # decided by the core
        want_sha, want_md5 = params.wanted()
        local = await self._source(params.url)
        with self.busy(st, f"img:{iu}"):
            if await self.isdb.image(st.uuid, iu) is not None:   # made since the request's check
                raise errors.Conflict(f"resourceUuid {iu} is already in use", code="SYS.1009")
            async with st.commit_lock:       # reclaim waits: the blob stays while it is named
                row = await self._known_content(st, iu, params, want_sha, want_md5)
            if row is not None:
                job.progress(100, "the content is in the store already: nothing downloaded")
                return {"inventory": self.store_image_inventory(st, row)}
            row = await self._download(job, st, iu, params, local, want_sha, want_md5)
        with contextlib.suppress(errors.ApiError):
            await self._store_capacity(st)
        return {"inventory": self.store_image_inventory(st, row)}

    async def _known_content(self: "StoragePlugin", st: "Storage", iu: str, params: AddStoreImage,
                             want_sha: str | None, want_md5: str | None) -> StoreImage | None:
        """A new image row on a blob the store has (a sha256 given): no download at all."""
        same = await self.isdb.by_sha256(st.uuid, want_sha) if want_sha else None
        if same is None or not (await self.fs(st, "lookup", path=same.blob))["exists"]:
            return None
        if want_md5 and same.md5 and want_md5 != same.md5:
            raise errors.OperationFailed("the given md5 does not match the stored content of that "
                                         "sha256", code="STORAGE.1531")
        row = StoreImage(bs_uuid=st.uuid, uuid=iu, name=params.name, sha256=same.sha256,
                         format=same.format, size=same.size, actual_size=same.actual_size,
                         url=params.url, md5=want_md5 or same.md5, description=params.description)
        await self.isdb.save_image(row)
        return row

    async def _download(self: "StoragePlugin", job, st: "Storage", iu: str, params: AddStoreImage,
                        local: str | None, want_sha: str | None, want_md5: str | None) -> StoreImage:
        fetcher = imagecache.Fetcher(st.root, temp_name(f"{BLOBS}/{iu}", self.tag), params.url,
                                     "sha256", stall=self.conf.download_stall_seconds,
                                     ca_file=self.conf.tls_ca_file,
                                     extra_algs=("md5",) if want_md5 else (), local_file=local,
                                     sparse=True)
        progress = imagecache.download_progress(job)
        try:
            report = await fetcher.run(progress, self.conf.download_timeout_seconds)
            sha, md5 = report["digest"], report.get("digests", {}).get("md5")
            for alg, want, got in (("sha256", want_sha, sha), ("md5", want_md5, md5)):
                if want and want != got:
                    raise errors.OperationFailed(f"checksum mismatch for {params.url}: expected "
                                                 f"{alg} {want}, got {got}; nothing was kept",
                                                 code="STORAGE.1531")
            infos = await volumes.info(self.runner, fetcher.tmp_path, None,
                                       self.conf.qemu_img_timeout_seconds, chain=False)
            if infos[0].get("backing-filename"):
                raise errors.OperationFailed(f"{params.url} has a backing file of its own "
                                             f"({infos[0]['backing-filename']}); refused",
                                             code="STORAGE.1532")
            fmt = infos[0].get("format") or "raw"
            async with st.commit_lock:
                if (await self.fs(st, "lookup", path=blob_path(sha)))["exists"]:
                    await fetcher.abort()              # the same content is stored already
                else:
                    await fetcher.commit(blob_path(sha))
                row = StoreImage(bs_uuid=st.uuid, uuid=iu, name=params.name, sha256=sha,
                                 format=fmt, size=int(infos[0].get("virtual-size") or report["bytes"]),
                                 actual_size=int(infos[0].get("actual-size") or report["bytes"]),
                                 url=params.url, md5=md5,
                                 description=params.description)
                await self.isdb.save_image(row)
        except BaseException:
            await fetcher.abort()
            raise
        job.progress(100, "imported", downloadedBytes=report["bytes"],
                     seconds=round(report["seconds"], 3))
        return row

    @add_store_image.exists
    async def _store_image_uuid_used(self: "StoragePlugin", new_uuid: str, uuid: str) -> bool:
        """An image of this store, or one being imported or received into it."""
        st = self.image_stores.get(norm_uuid(uuid))
        return st is not None and (f"img:{new_uuid}" in st.busy or
                                   await self.isdb.image(st.uuid, new_uuid) is not None)

    @add_store_image.check
    async def _add_store_image_check(self: "StoragePlugin", params: AddStoreImage, uuid: str) -> None:
        st = self.get_store(uuid)
        if ".." in params.name or "/" in params.name:
            raise _bad("name must not hold '..' or '/'")
        params.wanted()
        await self._source(params.url)
        self.store_usable(st)

    @delete(IMG)
    async def delete_store_image(self: "StoragePlugin", job, params, uuid: str, imageUuid: str):
        """Forget an image; its blob stays until reclaimSpaceFromImageStore (another image may
        share it)."""
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        with self.busy(st, f"img:{img.uuid}"):
            await self.isdb.delete_image(st.uuid, img.uuid)
        return {}

    @delete_store_image.check
    async def _delete_store_image_check(self: "StoragePlugin", params, uuid: str, imageUuid: str) -> None:
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        if f"img:{img.uuid}" in st.busy:
            raise errors.Conflict(f"image {img.uuid} is busy", code="STORAGE.1009")

    # -- export --------------------------------------------------------------------------------------
    def _export_base(self: "StoragePlugin", local: bool = False) -> str:
        """[storage] export_base_url, else the address the agent listens on (its host name
        when it listens on every address; for this node itself, loopback)."""
        if self.conf.export_base_url and not local:
            return self.conf.export_base_url.rstrip("/")
        s = self.agent.config.server
        scheme = "https" if s.tls_cert else "http"
        host = s.host if s.host not in ("0.0.0.0", "::", "") else \
            ("127.0.0.1" if local else socket.getfqdn())
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{s.port}"

    @action(IMG + "/actions", "exportImageFromBackupStorage", params=ExportParams, result=ExportReply)
    async def export_store_image(self: "StoragePlugin", job, params: ExportParams, uuid: str,
                                 imageUuid: str) -> dict[str, Any]:
        """A download URL served by this agent: unguessable, expiring, with Range support."""
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        token = secrets.token_urlsafe(32)
        expires = time.time() + params.expire_seconds
        await self.isdb.add_export(hashlib.sha256(token.encode()).hexdigest(), st.uuid, img.uuid, expires)
        return {"imageUrl": f"{self._export_base()}/v1/backup-storage/exports/{token}",
                "expireDate": iso(expires)}

    @export_store_image.check
    async def _image_found_check(self: "StoragePlugin", params, uuid: str, imageUuid: str) -> None:
        await self._store_image(self.get_store(uuid), imageUuid)

    @action(IMG + "/actions", "deleteExportedImageFromBackupStorage", params=Empty)
    async def unexport_store_image(self: "StoragePlugin", job, params, uuid: str, imageUuid: str):
        """Revoke every export URL of the image."""
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        return {"revoked": await self.isdb.delete_exports(st.uuid, img.uuid)}

    unexport_store_image.check(_image_found_check)

    # -- migrate (imagestore_migrate.py) --------------------------------------------------------------
    @action(IMG + "/actions", "migrateImage", params=imagestore_migrate.MigrateImage,
            result=StoreImageReply)
    async def migrate_store_image(self: "StoragePlugin", job, params, uuid: str, imageUuid: str):
        """Copy the image to another agent's image store, streamed and verified there; the
        source keeps its image."""
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        with self.busy(st, f"send:{img.uuid}"):
            if params.destination.url is None:
                return await imagestore_migrate.send_local(
                    self, job, st, img, norm_uuid(params.destination.backup_storage_uuid))
            return await imagestore_migrate.send(self, job, st, img, params)

    @migrate_store_image.check
    async def _migrate_check(self: "StoragePlugin", params, uuid: str, imageUuid: str) -> None:
        from . import migrate
        st = self.get_store(uuid)
        img = await self._store_image(st, imageUuid)
        dest = params.destination
        if dest.url is not None:
            migrate.check_agent_url(dest.url)
            if not dest.token:
                raise _bad("destination.token (the destination agent's API token) is required "
                           "with destination.url")
        else:
            dst = norm_uuid(dest.backup_storage_uuid)
            if dst == st.uuid:
                raise _bad("the destination is the image's own image store")
            if self.agent.storage_kinds.owner("backup", dst).import_image is None:
                raise _bad(f"backup storage {dst} takes no images from another storage")
        if params.backup_storage_uuid and norm_uuid(params.backup_storage_uuid) != \
                norm_uuid(params.destination.backup_storage_uuid):
            raise _bad("backupStorageUuid and destination.backupStorageUuid disagree")
        if f"send:{img.uuid}" in st.busy:
            raise errors.Conflict(f"image {img.uuid} is being migrated", code="STORAGE.1009")
        self.store_usable(st, for_new=False)

    @raw("PUT", BSU + "/image-streams/{imageUuid}",
         summary="Receive a migrating image from another agent (agent to agent)")
    async def receive_store_image(self: "StoragePlugin", request: web.Request) -> web.StreamResponse:
        return await imagestore_migrate.receive(self, request)

    @raw("GET", "/v1/backup-storage/exports/{token}", auth=False,
         summary="An exported image (the token is the credential; Range requests work)")
    async def serve_export(self: "StoragePlugin", request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        rec = await self.isdb.export(hashlib.sha256(token.encode()).hexdigest()) \
            if len(token) < 100 else None
        if rec is None or rec["expires"] < time.time():
            raise errors.NotFound("no such export (revoked or expired)", code="STORAGE.1006")
        st = self.get_store(rec["bs_uuid"])
        img = await self._store_image(st, rec["image_uuid"])
        return web.FileResponse(st.abs(img.blob), chunk_size=1 << 20,
                                headers={"Content-Type": "application/octet-stream",
                                         "X-Image-Sha256": img.sha256})


def kind(p: "StoragePlugin") -> StorageKind:
    """The image store in the core's backup-storage collection."""
    from .models import ChangePrimaryStorageState

    async def check_get(params, uuid: str) -> None:
        p.get_store(uuid)

    async def import_image(job, uuid: str, img: dict[str, Any]) -> Any:
        """Another backup storage of this node hands over an image (migrateImage): the image
        keeps its uuid, and the create's resourceUuid rule holds as if it came by HTTP."""
        params = AddStoreImage.model_validate({
            "url": img["url"], "imageUuid": img.get("imageUuid"), "name": img.get("name") or "",
            "sha256": img.get("sha256"), "md5sum": img.get("md5")})
        if params.resource_uuid is None:
            params.resource_uuid = uuidlib.uuid4().hex
        elif await p._store_image_uuid_used(params.resource_uuid, uuid):
            raise errors.Conflict(f"image {params.resource_uuid} already exists in image store "
                                  f"{uuid}", code="SYS.1009")
        await p._add_store_image_check(params, uuid)
        return await p.add_store_image(job, params, uuid)

    return StorageKind(
        category=BACKUP, type=IMAGE_STORE, import_image=import_image, plugin=p.name,
        uuids=lambda: list(p.image_stores),
        inventory=lambda u: p.store_inventory(p.get_store(u)), capacity=p.store_capacity,
        delete=p.store_delete, check_delete=p.store_delete_check, available=p.down_reason,
        actions={
            "reconnectBackupStorage": KindAction(p.store_reconnect, Empty, check_get),
            "syncBackupStorageCapacity": KindAction(p.store_sync, Empty, check_get),
            "changeBackupStorageState": KindAction(p.store_change_state, ChangePrimaryStorageState,
                                                   check_get),
            "updateBackupStorage": KindAction(p.store_update, UpdateImageStore, p.store_update_check),
            "reclaimSpaceFromImageStore": KindAction(p.store_reclaim, Empty, check_get),
        })
