"""The storage plugin: local, NFS and shared-mount-point primary storage on this node.

Every URL is the decorated method below; the work is in small modules:

* ``registry.py``: the rows (storages, volumes, image cache) in the state database;
* ``fsworker.py`` / ``fsclient.py``: the hang-proof helper process per storage,
  through which every filesystem call on a storage goes, with a timeout;
* ``writer.py``: data into a hidden temporary, renamed only on commit;
* ``nfs.py``: URL and option checks, the mount argv, mountinfo;
* ``volumes.py``: qemu-img; ``imagecache.py``: downloads and clean-up;
* ``migrate.py`` / ``streamio.py``: moving volumes between agents and storages.

The agent itself never touches a storage's files: a dead NFS server can block
a helper, a writer or qemu-img, each a process with a timeout, never the
event loop or one of its threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
from typing import Any, Awaitable, Callable, Iterator

from aiohttp import web

from agent import errors, paths
from agent.plugin import Plugin, action, create, delete, get, query, raw

from . import imagecache, imagestore, kinds, migrate, nfs, volumes
from .fsclient import FsError, FsHelper, StorageHung, helper_argv
from .fsworker import Confinement, split_rel
from .imagestore import ImageStoreRoutes
from .models import (AddLocalPrimaryStorage, AddNfsPrimaryStorage, AddSmpPrimaryStorage,
                     ChangePrimaryStorageState, CreateVolume, DownloadImage, HostDiskCapacities,
                     ImageCacheInventory, ImageCacheReply, MigrateVolume, PrimaryStorageReply,
                     PrimaryStorageTypes, ResizeVolume, StorageSettings, VolumeInventory,
                     VolumeReply, norm_uuid)
from .registry import ImageRow, Registry, StorageRow, VolumeRow
from .spares import Spare
from .writer import spawn_writer, temp_name

log = logging.getLogger("node_agent.storage")

LOCAL, NFS, SMP = "LocalStorage", "NFS", "SharedMountPoint"
CONNECTED, CONNECTING, HUNG, DISCONNECTED = "Connected", "Connecting", "Hung", "Disconnected"
STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled", "maintain": "Maintenance",
                "Enabled": "Enabled", "Disabled": "Disabled", "Maintenance": "Maintenance"}
MOUNTINFO_TIMEOUT = 5.0
STATUS_EVENT = "StorageStatusChanged"


class Storage:
    """A registered storage at run time: its row, helper, monitor and what is busy on it."""

    def __init__(self, row: StorageRow, helper: FsHelper) -> None:
        self.row = row
        self.helper = helper
        self.monitor: asyncio.Task | None = None
        self.busy: set[str] = set()
        self.conn_lock = asyncio.Lock()
        self.cache_lock = asyncio.Lock()

    @property
    def uuid(self) -> str:
        return self.row.uuid

    @property
    def root(self) -> str:
        return self.row.mount_path

    def abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)


class StoragePlugin(ImageStoreRoutes, Plugin):
    name = "storage"
    config_sections = {"storage": StorageSettings}
    max_threads = 4
    max_processes = 32

    def __init__(self, agent, settings) -> None:
        super().__init__(agent, settings)
        self.registry = Registry(agent.db)
        self.storages: dict[str, Storage] = {}
        self._collector: StorageCollector | None = None
        self._background: set[asyncio.Task] = set()
        # idle migration helpers, started ahead (see spares.py)
        self.sender_spare = Spare(migrate.spawn_sender)
        self.writer_spare = Spare(spawn_writer)
        kinds.register(self, (LOCAL, NFS, SMP))
        self.image_stores: dict[str, Storage] = {}     # image store backup storages
        self.agent.storage_kinds.register(imagestore.kind(self))

    @property
    def conf(self) -> StorageSettings:
        return self.settings.get("storage") or StorageSettings()

    @property
    def tag(self) -> str:
        """This node in temporary file names, so a shared storage's sweep removes only ours."""
        return (self.agent.node_uuid or "node")[:12]

    # --- life cycle ------------------------------------------------------------------------------
    async def lifecycle(self):
        await self.registry.open()
        await self.imagestore_open()
        for row in await self.registry.storages():
            try:     # the stored path is the resolved one: judged without touching the storage
                paths.judge(row.mount_path, row.mount_path, self.agent.config.roots)
            except paths.PathRefused as e:
                log.warning("primary storage %s is kept, but a new registration would be "
                            "refused: %s", row.uuid, e.description)
            st = self._make(row)
            self.storages[row.uuid] = st
            st.monitor = asyncio.create_task(self._monitor(st, initial=True), name=f"storage-{row.uuid}")
        if self.storages:
            self.prime_spares()
        self._collector = StorageCollector(self)
        self.agent.metrics.registry.register(self._collector)
        yield
        self.agent.metrics.registry.unregister(self._collector)
        await self.sender_spare.close()
        await self.writer_spare.close()
        if self._background:     # removals of moved volumes: a hidden leftover is swept at start
            await asyncio.wait(self._background, timeout=5)
            for t in self._background:
                t.cancel()
        for st in list(self.storages.values()):
            await self._stop(st)
        await self.imagestore_close()

    def _make(self, row: StorageRow) -> Storage:
        c = self.conf
        st = Storage(row, FsHelper(row.uuid, row.mount_path, self.tag, timeout=c.call_timeout_seconds,
                                   max_stuck=c.max_stuck_helpers))
        st.helper.on_hung = lambda reason: self._mark_hung(st, reason)
        return st

    def _mark_hung(self, st: Storage, reason: str) -> None:
        """A call timed out (or was refused as hung): Hung now, not at the next probe.
        Only from Connected: Disconnected stays until a probe or reconnect says more."""
        if st.row.status != CONNECTED or self.storages.get(st.uuid) is not st:
            return
        task = asyncio.get_running_loop().create_task(self._set_status(st, HUNG, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop(self, st: Storage) -> None:
        if st.monitor is not None:
            st.monitor.cancel()
            await asyncio.gather(st.monitor, return_exceptions=True)
            st.monitor = None
        await st.helper.close()

    # --- shared helpers (also used by migrate.py) ------------------------------------------------
    def get_storage(self, uuid: str) -> Storage:
        st = self.storages.get(norm_uuid(uuid))
        if st is None:
            raise errors.NotFound(f"no primary storage {uuid} on this node", code="STORAGE.1004")
        return st

    def check_usable(self, st: Storage, for_new: bool = True) -> None:
        if for_new and st.row.state != "Enabled":
            raise errors.Conflict(f"primary storage {st.uuid} is {st.row.state}: it takes no new "
                                  "volumes or images; changePrimaryStorageState to enable it",
                                  code="STORAGE.1010")
        if st.row.status == HUNG and st.helper.stuck() >= st.helper.max_stuck:
            raise StorageHung(f"primary storage {st.uuid} is hung ({st.row.status_reason}); check "
                              "the storage, then call reconnectPrimaryStorage")
        if st.row.status == DISCONNECTED:
            raise errors.OperationFailed(f"primary storage {st.uuid} is disconnected "
                                         f"({st.row.status_reason}); call reconnectPrimaryStorage",
                                         code="STORAGE.1504")

    @staticmethod
    def check_rel(path: str | None, what: str = "path") -> str:
        try:
            split_rel(path)
        except Confinement as e:
            raise errors.BadRequest(f"{what}: {e}; paths are relative to the storage root",
                                    code="STORAGE.1002") from None
        if any(p.startswith(".") for p in path.split("/")):
            raise errors.BadRequest(f"{what} {path!r}: hidden names (starting with '.') are "
                                    "reserved for the agent", code="STORAGE.1002")
        if len(path) > 1024 or "\n" in path:
            raise errors.BadRequest(f"{what} is too long or holds a newline", code="STORAGE.1002")
        return path

    def fs_error(self, st: Storage, e: FsError, what: str) -> errors.ApiError:
        if e.kind == "confinement":
            return errors.BadRequest(f"{what}: {e} (symlinks and '..' are refused inside primary "
                                     "storage)", code="STORAGE.1002")
        if e.errno == errno_mod.ENOENT:
            return errors.NotFound(f"{what}: {e}", code="STORAGE.1005")
        if e.errno == errno_mod.ENOSPC:
            return errors.OperationFailed(f"{what}: primary storage {st.uuid} is full", code="STORAGE.1507")
        return errors.OperationFailed(f"{what} on primary storage {st.uuid} failed: {e}",
                                      code="STORAGE.1503")

    async def fs(self, st: Storage, op: str, timeout: float | None = None, **args: Any) -> Any:
        """One helper call, its errors as API errors."""
        try:
            return await st.helper.call(op, timeout=timeout, **args)
        except FsError as e:
            raise self.fs_error(st, e, op) from None

    async def remove_moved(self, st: Storage, rel: str) -> None:
        """A moved volume's old copy: renamed at once to a hidden temporary (gone from view,
        and swept at the next start if the agent stops first), then removed in the
        background by a process of its own: freeing a big file's blocks takes a while
        (0.1 s for 512 MiB on tmpfs, longer on disks), and neither the job nor the
        storage's helper should wait for it."""
        hidden = temp_name(rel, self.tag)
        try:
            await st.helper.call("rename", src=rel, dst=hidden)
        except Exception as e:
            log.warning("storage %s: could not rename %s away: %s", st.uuid, rel, e)
            await self.remove_quietly(st, rel)
            return
        self.remove_later(st, hidden)

    def prime_spares(self) -> None:
        """Start the idle sender and writer (once there is a storage to migrate from or to)."""
        self.sender_spare.prime()
        self.writer_spare.prime()

    def remove_later(self, st: Storage, hidden: str) -> None:
        """Remove a hidden temporary in the background (see remove_moved)."""
        task = asyncio.create_task(self._unlink_process(st, hidden))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unlink_process(self, st: Storage, rel: str) -> None:
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                *helper_argv("unlink", st.root, rel), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd="/",
                start_new_session=True)
            async with asyncio.timeout(3600):
                out, _ = await proc.communicate()
            if proc.returncode != 0:
                log.warning("storage %s: could not remove %s: %s", st.uuid, rel,
                            out.decode(errors="replace").strip())
        except asyncio.CancelledError:
            raise
        except Exception as e:       # timed out (a hung storage): the next sweep does it
            log.warning("storage %s: removing %s did not finish (%s); the next sweep does it",
                        st.uuid, rel, type(e).__name__)
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()

    async def remove_quietly(self, st: Storage, rel: str) -> None:
        try:
            await st.helper.call("unlink", timeout=min(5.0, self.conf.call_timeout_seconds),
                                 path=rel, missing_ok=True)
        except Exception as e:   # a hidden leftover is swept at the next start or reconnect
            log.warning("storage %s: could not remove %s: %s", st.uuid, rel, e)

    @contextlib.contextmanager
    def busy(self, st: Storage, key: str) -> Iterator[None]:
        if key in st.busy:
            raise errors.Conflict(f"{key} on primary storage {st.uuid} is busy with another "
                                  "operation", code="STORAGE.1009")
        st.busy.add(key)
        try:
            yield
        finally:
            st.busy.discard(key)

    async def _mountinfo(self) -> list[nfs.MountEntry]:
        return await self.runner.call(nfs.read_mountinfo, timeout=MOUNTINFO_TIMEOUT)

    async def _set_status(self, st: Storage, status: str, reason: str | None) -> None:
        old = st.row.status
        st.row.status_reason = reason
        if status == old:
            return
        st.row.status = status
        await self.registry.save_storage(st.row)
        log.warning("primary storage %s: %s -> %s (%s)", st.uuid, old, status, reason)
        await self.agent.events.publish(STATUS_EVENT, {
            "primaryStorageUuid": st.uuid, "type": st.row.type, "url": st.row.url,
            "mountPath": st.row.mount_path, "oldStatus": old, "newStatus": status, "reason": reason})

    # --- health and capacity ---------------------------------------------------------------------
    async def _mount_problem(self, st: Storage) -> str | None:
        """Why the storage's mount is not there, or None."""
        if st.row.type == LOCAL:
            return None
        entries = await self._mountinfo()
        if st.row.type == NFS:
            e = nfs.mount_at(entries, st.root)
            if e is None or not nfs.same_nfs_source(e.source, st.row.url):
                return f"{st.row.url} is not mounted at {st.root}"
            return None
        real = st.row.extra.get("realpath") or st.root
        e = nfs.mount_containing(entries, real)
        if e is None:
            return f"{real} is on no mount"
        if e.fstype not in self.conf.shared_fs_types and not st.row.extra.get("allowLocalFilesystem"):
            return f"{real} is on a {e.fstype} filesystem, not a shared one"
        return None

    async def _check(self, st: Storage) -> None:
        """Probe the storage once and record what is found (events on changes)."""
        problem = await self._mount_problem(st)
        if problem:
            await self._set_status(st, DISCONNECTED, problem)
            return
        try:
            probe = await st.helper.call("probe", timeout=self.conf.probe_timeout_seconds)
        except StorageHung as e:
            await self._set_status(st, HUNG, e.description)
            return
        except FsError as e:
            await self._set_status(st, DISCONNECTED, f"the probe failed: {e}")
            return
        except errors.ApiError as e:
            await self._set_status(st, DISCONNECTED, e.description)
            return
        stuck = st.helper.stuck()
        if stuck:
            # The probe's own I/O passed, but calls are still stuck in the kernel
            # (one hung operation, e.g. statfs): not Connected until they are out.
            await self._set_status(st, HUNG, f"{stuck} filesystem helper(s) are still stuck "
                                             f"in the kernel on {st.root}")
            return
        await self._set_status(st, CONNECTED, None)
        st.row.extra["lastProbeMs"] = probe.get("ms")
        try:
            await self._capacity(st)
        except errors.ApiError:
            pass

    async def _monitor(self, st: Storage, initial: bool = False) -> None:
        if initial:
            try:
                async with st.conn_lock:
                    await self._connect(st, remount=False)
            except errors.ApiError as e:
                log.warning("primary storage %s could not be connected at start: %s", st.uuid, e)
            except Exception:
                log.exception("primary storage %s: start-up connect failed", st.uuid)
        await self._health_checks(st, "primary storage", self._check)

    async def _health_checks(self, st: Storage, kind: str, check: Callable[[Storage], Awaitable[None]],
                             before: Callable[[], Awaitable[None]] | None = None) -> None:
        """check(st) under st.conn_lock every probe interval (skipped while a connect holds
        the lock), after before() when given; a failure is logged and the next one comes."""
        while True:
            await asyncio.sleep(self.conf.probe_interval_seconds)
            if st.conn_lock.locked():
                continue
            try:
                if before is not None:
                    await before()
                async with st.conn_lock:
                    await check(st)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s %s: the health check failed", kind, st.uuid)

    async def _capacity(self, st: Storage, save: bool = False) -> dict[str, int]:
        vfs = await self.fs(st, "statvfs")
        vols = await self.registry.volumes(st.uuid)
        imgs = await self.registry.images(st.uuid)
        stats = await self.fs(st, "stat_many", paths=[v.path for v in vols] + [i.path for i in imgs])
        alloc = {s["path"]: s.get("allocated", 0) for s in stats if s.get("exists")}
        growth = sum(max(0, v.size - alloc.get(v.path, 0)) for v in vols)
        ours = sum(alloc.values())
        cap = {"totalCapacity": vfs["total"], "availableCapacity": max(0, vfs["avail"] - growth),
               "totalPhysicalCapacity": vfs["total"], "availablePhysicalCapacity": vfs["avail"],
               "systemUsedCapacity": max(0, vfs["total"] - vfs["free"] - ours)}
        changed = cap != st.row.capacity
        st.row.capacity = cap
        if save or changed:
            await self.registry.save_storage(st.row)
        return cap

    # --- mounting and connecting -----------------------------------------------------------------
    async def _run_mount(self, argv: list[str], what: str) -> None:
        try:
            result = await self.runner.run(argv, timeout=self.conf.mount_timeout_seconds)
        except errors.Timeout:
            raise errors.OperationFailed(f"{what} did not finish within "
                                         f"{self.conf.mount_timeout_seconds:g} s", code="STORAGE.1510") from None
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            raise errors.OperationFailed(f"{what} failed (exit {result.returncode}): "
                                         f"{err.splitlines()[-1] if err else ''}", code="STORAGE.1510",
                                         details=err[-2000:] or None)

    async def _mount(self, st: Storage) -> bool:
        """Mount the NFS export unless it already is (mountinfo); True when this call mounted it."""
        e = nfs.mount_at(await self._mountinfo(), st.root)
        if e is not None and nfs.same_nfs_source(e.source, st.row.url):
            return False
        if e is not None:
            raise errors.Conflict(f"{st.root} already has {e.source} ({e.fstype}) mounted on it",
                                  code="STORAGE.1009")
        await self.fs(st, "prepare_root", create=True)     # the mount point
        options = nfs.merge_options(st.row.mount_options, self.conf.nfs_default_options)
        await self._run_mount(nfs.mount_argv(self.conf.mount_command, st.row.url, st.root, options),
                              f"mounting {st.row.url} at {st.root}")
        e = nfs.mount_at(await self._mountinfo(), st.root)
        if e is None or not nfs.same_nfs_source(e.source, st.row.url):
            raise errors.OperationFailed(f"the mount command succeeded but {st.root} shows no mount "
                                         f"of {st.row.url}", code="STORAGE.1510")
        return True

    async def _umount(self, st: Storage, hung: bool) -> None:
        """Unmount (lazily when hung or when a plain unmount fails); quiet when not mounted."""
        e = nfs.mount_at(await self._mountinfo(), st.root)
        if e is None:
            return
        c = self.conf
        if not hung:
            try:
                await self._run_mount(nfs.umount_argv(c.umount_command, st.root), f"unmounting {st.root}")
                return
            except errors.ApiError as err:
                log.warning("storage %s: plain unmount failed (%s); unmounting lazily", st.uuid, err)
        await self._run_mount(nfs.umount_argv(c.umount_command, st.root, lazy=True, force=hung),
                              f"lazily unmounting {st.root}")

    async def _connect(self, st: Storage, remount: bool, registering: bool = False) -> None:
        """Make the storage usable: (re)mount NFS, check the root and the claim, probe, capacity.

        Only a registration makes the root and writes the id file: a known storage whose
        root or id file is gone is Disconnected (say, its disk is not mounted yet at boot),
        never silently started afresh on whatever directory is there now.
        """
        if st.row.type == NFS:
            if remount and st.row.status == HUNG:
                await self._umount(st, hung=True)
            try:
                await self._mount(st)
            except errors.ApiError as e:
                await self._set_status(st, DISCONNECTED, e.description)
                raise
        problem = await self._mount_problem(st)
        if problem:
            await self._set_status(st, DISCONNECTED, problem)
            raise errors.OperationFailed(f"primary storage {st.uuid}: {problem}", code="STORAGE.1504")
        try:
            await self.fs(st, "prepare_root", create=registering and st.row.type == LOCAL)
            owner = (await self.fs(st, "claim", uuid=st.uuid, take=registering))["owner"]
            if owner is None:
                raise errors.OperationFailed(
                    f"{st.root} has no .node-agent-storage.json: is the right filesystem mounted "
                    "there? (the agent does not adopt a directory it did not register)",
                    code="STORAGE.1504")
            if owner != st.uuid:
                raise errors.Conflict(f"{st.root} is claimed by primary storage {owner}",
                                      code="STORAGE.1009")
            removed = await self.fs(st, "sweep")
            if removed:
                log.info("storage %s: removed %d leftover temporary file(s)", st.uuid, len(removed))
        except StorageHung as e:
            await self._set_status(st, HUNG, e.description)
            raise
        except errors.ApiError as e:
            await self._set_status(st, DISCONNECTED, e.description)
            raise
        await self._check(st)
        if st.row.status != CONNECTED:
            raise errors.OperationFailed(f"primary storage {st.uuid} is {st.row.status}: "
                                         f"{st.row.status_reason}",
                                         code="STORAGE.1408" if st.row.status == HUNG else "STORAGE.1504")

    # --- registration ------------------------------------------------------------------------------
    def _overlap(self, root: str, uuid: str | None, others: list[Storage] | None = None,
                 kind: str = "primary storage") -> None:
        """409 when root contains, or lies under, the root of one of others (default: the
        primary storages) but storage uuid itself."""
        for other in self.storages.values() if others is None else others:
            if other.uuid == uuid:
                continue
            a, b = root.rstrip("/") + "/", other.root.rstrip("/") + "/"
            if a.startswith(b) or b.startswith(a):
                raise errors.Conflict(f"{root} overlaps {kind} {other.uuid} at {other.root}",
                                      code="STORAGE.1009")

    async def _plan(self, kind: str, params) -> StorageRow:
        """The row a registration would create; every refusal of its parameters, as a 4xx.

        The directory (local/smp url, NFS mountPath) must lie under [storage] allowed_roots
        once resolved (agent/paths.py); the row keeps the resolved path as its mount path,
        so nothing later follows a symlink the check did not see.
        """
        try:
            if kind == NFS:
                nfs.check_nfs_url(params.url)
                nfs.merge_options(params.mount_options, self.conf.nfs_default_options)
                uuid = params.resource_uuid        # decided by the core
                root_base = self.conf.nfs_mount_root or str(self.agent.state_dir / "mnt")
                mp = nfs.check_dir_path(params.mount_path or f"{root_base}/{uuid}", "mountPath")
                url = params.url
            else:
                url = mp = nfs.check_dir_path(params.url, "url")
                uuid = params.resource_uuid
        except nfs.BadInput as e:
            raise errors.BadRequest(str(e), code="STORAGE.1001") from None
        same = self.storages.get(uuid)
        if same is not None and same.row.type == kind and same.row.url == url:
            mp = same.row.mount_path      # judged when it was registered; it may be hung now
        else:
            mp = str(paths.judge(mp, await self._realpath(uuid, mp), self.agent.config.roots,
                                 what="mountPath" if kind == NFS else "url"))
        row = StorageRow(uuid=uuid, type=kind, name=params.name or "", url=url, mount_path=mp,
                         description=params.description, zone_uuid=params.zone_uuid,
                         mount_options=getattr(params, "mount_options", None))
        if kind == SMP and params.allow_local_filesystem:
            row.extra["allowLocalFilesystem"] = True
        return row

    async def _realpath(self, uuid: str, path: str) -> str:
        """path with its symlinks resolved, by a one-shot helper: a hung filesystem on the way
        costs a process (STORAGE.1408 after call_timeout_seconds), never one of our threads."""
        probe = FsHelper(uuid, path, self.tag, timeout=self.conf.call_timeout_seconds, max_stuck=1)
        try:
            return (await probe.call("realpath"))["realpath"]
        except FsError as e:
            raise errors.BadRequest(f"{path}: {e}", code="STORAGE.1001") from None
        finally:
            await probe.close()

    async def _register_check(self, kind: str, params) -> None:
        row = await self._plan(kind, params)
        # The same registration again is idempotent (200); the uuid used otherwise, a 409.
        existing = self.storages.get(row.uuid)
        if existing is not None:
            if existing.row.type != kind or existing.row.url != row.url:
                raise errors.Conflict(f"primary storage {row.uuid} is already registered as "
                                      f"{existing.row.type} {existing.row.url}", code="STORAGE.1009")
            return
        self._uuid_free(row.uuid)
        self._overlap(row.mount_path, row.uuid)
        if kind == NFS:
            e = nfs.mount_at(await self._mountinfo(), row.mount_path)
            if e is not None and not nfs.same_nfs_source(e.source, row.url):
                raise errors.Conflict(f"{row.mount_path} already has {e.source} ({e.fstype}) "
                                      "mounted on it", code="STORAGE.1009")
            return
        # Local and shared: look at the directory now (through a helper), so a wrong one is a 4xx.
        probe = FsHelper(row.uuid, row.mount_path, self.tag, timeout=self.conf.call_timeout_seconds,
                         max_stuck=1)
        try:
            try:
                info = await probe.call("prepare_root", create=False)
            except FsError as e:
                if kind == LOCAL and e.errno == errno_mod.ENOENT:
                    return                       # made by the job
                raise errors.BadRequest(f"url {row.url}: {e}", code="STORAGE.1001") from None
            if kind == SMP:
                real = info["realpath"]
                m = nfs.mount_containing(await self._mountinfo(), real)
                fstype = m.fstype if m else "unknown"
                if fstype not in self.conf.shared_fs_types and not params.allow_local_filesystem:
                    raise errors.BadRequest(
                        f"url {row.url} is on a {fstype} filesystem, which is not shared between "
                        "hosts; mount a shared filesystem there (or pass allowLocalFilesystem=true)",
                        code="STORAGE.1003")
            try:
                owner = (await probe.call("claim", uuid=row.uuid, take=False))["owner"]
            except FsError as e:
                raise errors.BadRequest(f"url {row.url}: {e}", code="STORAGE.1001") from None
            if owner not in (None, row.uuid):
                raise errors.Conflict(f"{row.url} already belongs to primary storage {owner} "
                                      "(its .node-agent-storage.json says so)", code="STORAGE.1009")
        finally:
            await probe.close()

    def _uuid_free(self, uuid: str) -> None:
        """The core's resourceUuid rule for the one create it leaves to us (re-registering is
        idempotent): a uuid of any other storage of this node, of any kind, is a 409."""
        holder = self.agent.storage_kinds.holder(uuid)
        if holder is not None:
            raise errors.Conflict(f"resourceUuid {uuid} is already in use by a {holder.category} "
                                  f"storage of type {holder.type}", code="SYS.1009")

    async def _register(self, job, kind: str, params) -> PrimaryStorageReply:
        row = await self._plan(kind, params)
        existing = self.storages.get(row.uuid)
        if existing is not None:
            return PrimaryStorageReply(inventory=existing.row.inventory())
        self._uuid_free(row.uuid)                # taken since the request's check
        self._overlap(row.mount_path, row.uuid)
        st = self._make(row)
        self.storages[row.uuid] = st          # reserved: a concurrent registration sees it
        self.prime_spares()
        mounted = False
        try:
            if kind == SMP:
                info = await self.fs(st, "prepare_root", create=False)
                row.extra["realpath"] = info["realpath"]
            elif kind == LOCAL:
                info = await self.fs(st, "prepare_root", create=True)
                row.extra["realpath"] = info["realpath"]
            else:
                job.progress(10, f"mounting {row.url}")
                mounted = await self._mount(st)
            async with st.conn_lock:
                await self._connect(st, remount=False, registering=True)
            await self._capacity(st)
            await self.registry.save_storage(row)
        except BaseException:
            self.storages.pop(row.uuid, None)
            if mounted:
                with contextlib.suppress(Exception):
                    await self._umount(st, hung=row.status == HUNG)
            if row.status != HUNG:
                with contextlib.suppress(Exception):
                    await st.helper.call("unclaim", timeout=2.0, uuid=row.uuid)
            await st.helper.close()
            raise
        st.monitor = asyncio.create_task(self._monitor(st), name=f"storage-{row.uuid}")
        return PrimaryStorageReply(inventory=row.inventory())

    @create("/v1/primary-storage/local", params=AddLocalPrimaryStorage, result=PrimaryStorageReply)
    async def add_local(self, job, params: AddLocalPrimaryStorage) -> PrimaryStorageReply:
        """AddLocalPrimaryStorage: a directory of this node (made when missing)."""
        return await self._register(job, LOCAL, params)

    @add_local.check
    async def _add_local_check(self, params: AddLocalPrimaryStorage) -> None:
        await self._register_check(LOCAL, params)

    @create("/v1/primary-storage/local-storage", params=AddLocalPrimaryStorage, result=PrimaryStorageReply)
    async def add_local_storage(self, job, params: AddLocalPrimaryStorage) -> PrimaryStorageReply:
        """The manual's path of AddLocalPrimaryStorage (same as /v1/primary-storage/local)."""
        return await self._register(job, LOCAL, params)

    @add_local_storage.check
    async def _add_local_storage_check(self, params: AddLocalPrimaryStorage) -> None:
        await self._register_check(LOCAL, params)

    @create("/v1/primary-storage/nfs", params=AddNfsPrimaryStorage, result=PrimaryStorageReply)
    async def add_nfs(self, job, params: AddNfsPrimaryStorage) -> PrimaryStorageReply:
        """AddNfsPrimaryStorage: mount url (server:/export) at mountPath, by argv."""
        return await self._register(job, NFS, params)

    @add_nfs.check
    async def _add_nfs_check(self, params: AddNfsPrimaryStorage) -> None:
        await self._register_check(NFS, params)

    @create("/v1/primary-storage/smp", params=AddSmpPrimaryStorage, result=PrimaryStorageReply)
    async def add_smp(self, job, params: AddSmpPrimaryStorage) -> PrimaryStorageReply:
        """AddSharedMountPointPrimaryStorage: a directory on a mounted shared filesystem."""
        return await self._register(job, SMP, params)

    @add_smp.check
    async def _add_smp_check(self, params: AddSmpPrimaryStorage) -> None:
        await self._register_check(SMP, params)

    # --- reads -------------------------------------------------------------------------------------
    @get("/v1/primary-storage/types", result=PrimaryStorageTypes)
    async def storage_types(self) -> PrimaryStorageTypes:
        """GetPrimaryStorageTypes: the types this plugin serves."""
        return PrimaryStorageTypes(primary_storage_types=[LOCAL, NFS, SMP])

    async def get_capacity(self, uuid: str) -> dict[str, int]:
        """GetPrimaryStorageCapacity, read now (statvfs in the helper, with its timeout)."""
        st = self.get_storage(uuid)
        cap = await self._capacity(st)
        return {k: cap[k] for k in ("totalCapacity", "availableCapacity", "totalPhysicalCapacity",
                                    "availablePhysicalCapacity")}

    @get("/v1/primary-storage/local-storage/{uuid:[0-9a-fA-F-]{32,36}}/capacities", result=HostDiskCapacities)
    async def host_disk_capacity(self, uuid: str) -> dict[str, Any]:
        """GetLocalStorageHostDiskCapacity: this node's share of a local storage."""
        cap = await self.get_capacity(uuid)
        target = self.agent.events.target
        host = target["hostUuid"] if target else self.agent.node_uuid
        return {"inventories": [{"hostUuid": host, **cap}]}

    # --- the per-uuid calls (served by the core's collection routes, see kinds.py) ----------------
    async def reconnect(self, job, params, uuid: str) -> dict[str, Any]:
        """Remount (lazily unmounting a hung NFS first), re-check the claim, probe, capacity."""
        st = self.get_storage(uuid)
        async with st.conn_lock:
            await self._connect(st, remount=True)
        return {"inventory": st.row.inventory()}

    async def _found_check(self, params, uuid: str) -> None:
        """The request's check of reconnect, sync capacity and change state: a 404 at once."""
        self.get_storage(uuid)

    async def sync_capacity(self, job, params, uuid: str) -> dict[str, Any]:
        st = self.get_storage(uuid)
        await self._capacity(st, save=True)
        return {"inventory": st.row.inventory()}

    async def change_state(self, job, params: ChangePrimaryStorageState, uuid: str) -> dict[str, Any]:
        """enable / disable / maintain: a storage that is not Enabled takes no new volumes."""
        st = self.get_storage(uuid)
        st.row.state = STATE_EVENTS[params.state_event]
        await self.registry.save_storage(st.row)
        return {"inventory": st.row.inventory()}

    async def clean_up_cache(self, job, params, uuid: str) -> dict[str, Any]:
        """Remove the cached images that no image on the storage has in its backing chain."""
        st = self.get_storage(uuid)
        async with st.cache_lock:
            images = await self.registry.images(st.uuid)
            cached = {i.path: i for i in images}
            # Every image file on the storage (other hosts' volumes too, on a shared storage).
            files = await self.fs(st, "walk_images", skip=[imagecache.CACHE_DIR],
                                  timeout=max(self.conf.call_timeout_seconds, 60.0))
            chains: dict[str, list] = {}
            for n, f in enumerate(files):
                if not f["qcow2"]:
                    continue
                job.progress(90.0 * n / max(1, len(files)), "reading backing chains")
                chains[f["path"]] = await volumes.info(self.runner, st.abs(f["path"]), "qcow2",
                                                       self.conf.qemu_img_timeout_seconds)
            for i in images:       # a cached image may itself stand on another cached image
                if i.format == "qcow2":
                    chains[i.path] = await volumes.info(self.runner, st.abs(i.path), "qcow2",
                                                        self.conf.qemu_img_timeout_seconds)
            roots = [st.root, st.row.extra.get("realpath") or st.root]
            refs = imagecache.referenced({k: v for k, v in chains.items() if k not in cached}, roots)
            # what the kept images stand on is kept too
            changed = True
            while changed:
                changed = False
                for path, infos in chains.items():
                    if path in cached and path in refs:
                        more = imagecache.referenced({path: infos}, roots) - refs
                        if more:
                            refs |= more
                            changed = True
            vol_refs = {v.image_uuid for v in await self.registry.volumes(st.uuid) if v.image_uuid and v.backing}
            removed, kept, freed = [], [], 0
            for i in images:
                if i.path in refs or i.uuid in vol_refs or f"{st.uuid}:{i.uuid}" in st.busy:
                    kept.append(i.uuid)
                    continue
                await self.fs(st, "unlink", path=i.path, missing_ok=True)
                await self.registry.delete_image(st.uuid, i.uuid)
                removed.append(i.uuid)
                freed += i.actual_size
        with contextlib.suppress(errors.ApiError):
            await self._capacity(st)
        return {"removedImageUuids": removed, "removedBytes": freed, "keptImageUuids": kept}

    async def _cleanup_check(self, params, uuid: str) -> None:
        self.check_usable(self.get_storage(uuid), for_new=False)

    async def delete_storage(self, job, params, uuid: str) -> dict[str, Any]:
        """DeletePrimaryStorage: forget it and unmount NFS; no data is ever deleted."""
        st = self.get_storage(uuid)
        self.storages.pop(st.uuid, None)
        await self._stop(st)
        hung = st.row.status == HUNG or st.helper.stuck() > 0
        if not hung:
            # A fresh helper: the registration's own is closed.
            h = FsHelper(st.uuid, st.root, self.tag, timeout=min(5.0, self.conf.call_timeout_seconds),
                         max_stuck=1)
            try:
                await h.call("unclaim", uuid=st.uuid)
            except Exception as e:
                log.warning("storage %s: the claim file stays: %s", st.uuid, e)
                hung = isinstance(e, StorageHung)
            finally:
                await h.close()
        if st.row.type == NFS:
            await self._umount(st, hung=hung)
        await self.registry.delete_storage(st.uuid)
        return {}

    async def _delete_check(self, params, uuid: str) -> None:
        st = self.get_storage(uuid)
        if st.busy:
            raise errors.Conflict(f"primary storage {st.uuid} is busy ({len(st.busy)} operation(s) "
                                  "running)", code="STORAGE.1009")

    # --- volumes -------------------------------------------------------------------------------------
    async def volume_inventory(self, st: Storage, v: VolumeRow, live: bool = False,
                               actual: int | None = None) -> dict[str, Any]:
        from agent.jobs import iso
        inv = {"uuid": v.uuid, "name": v.name, "description": v.description,
               "primaryStorageUuid": st.uuid, "vmInstanceUuid": None, "diskOfferingUuid": None,
               "rootImageUuid": v.image_uuid, "installPath": st.abs(v.path), "path": v.path,
               "type": v.type, "format": v.format, "size": v.size, "actualSize": actual,
               "backingFile": v.backing, "backingChain": None, "state": "Enabled", "status": "Ready",
               "createDate": iso(v.created), "lastOpDate": iso(v.updated), "isShareable": False}
        if live:
            infos = await volumes.info(self.runner, st.abs(v.path), v.format,
                                       self.conf.qemu_img_timeout_seconds)
            inv["size"] = infos[0].get("virtual-size", v.size)
            inv["actualSize"] = infos[0].get("actual-size")
            inv["backingChain"] = volumes.chain_of(infos)
        return inv

    async def _volume(self, st: Storage, volume_uuid: str) -> VolumeRow:
        v = await self.registry.volume(norm_uuid(volume_uuid))
        if v is None or v.ps_uuid != st.uuid:
            raise errors.NotFound(f"no volume {volume_uuid} on primary storage {st.uuid}",
                                  code="STORAGE.1005")
        return v

    @query("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes", model=VolumeInventory)
    async def list_volumes(self, uuid: str) -> list[dict[str, Any]]:
        """The volumes of a storage, with their allocated size read now (in the helper)."""
        st = self.get_storage(uuid)
        vols = await self.registry.volumes(st.uuid)
        stats = await self.fs(st, "stat_many", paths=[v.path for v in vols]) if vols else []
        alloc = {s["path"]: s.get("allocated") for s in stats if s.get("exists")}
        return [await self.volume_inventory(st, v, actual=alloc.get(v.path)) for v in vols]

    @get("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes/{volumeUuid}", result=VolumeReply)
    async def get_volume(self, uuid: str, volumeUuid: str) -> dict[str, Any]:
        """One volume, with qemu-img info (virtual and actual size, backing chain)."""
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        return {"inventory": await self.volume_inventory(st, v, live=True)}

    @create("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes", params=CreateVolume, result=VolumeReply)
    async def create_volume(self, job, params: CreateVolume, uuid: str) -> dict[str, Any]:
        """Create an empty volume (qcow2 or raw) or one from a cached image."""
        st = self.get_storage(uuid)
        vu = params.resource_uuid
        path = params.path or f"volumes/{vu}.{params.format}"
        img = await self.registry.image(st.uuid, norm_uuid(params.image_uuid)) if params.image_uuid else None
        if params.image_uuid and img is None:
            raise errors.NotFound(f"image {params.image_uuid} is not cached on primary storage "
                                  f"{st.uuid}", code="STORAGE.1006")
        with self.busy(st, vu), self.busy(st, f"path:{path}"):
            async with st.cache_lock if img else contextlib.nullcontext():
                return await self._create_volume(job, st, params, vu, path, img)

    async def _create_volume(self, job, st: Storage, params: CreateVolume, vu: str, path: str,
                             img: ImageRow | None) -> dict[str, Any]:
        if await self.registry.volume(vu) is not None:
            raise errors.Conflict(f"volume {vu} already exists", code="STORAGE.1009")
        found = await self.fs(st, "lookup", path=path)
        if found.get("exists"):
            raise errors.Conflict(f"{path} already exists on primary storage {st.uuid}",
                                  code="STORAGE.1009")
        await self.fs(st, "mkdirs", path=path)
        tmp = temp_name(path, self.tag)
        t = self.conf.qemu_img_timeout_seconds
        backing = None
        try:
            if img is None:
                await volumes.create(self.runner, st.abs(tmp), params.format, params.size, t)
            elif params.format == "qcow2":
                backing = volumes.relative_backing(path, img.path)
                await volumes.create(self.runner, st.abs(tmp), "qcow2", params.size, t,
                                     backing=backing, backing_fmt=img.format)
            else:
                job.progress(10, f"copying image {img.uuid}")
                await volumes.convert(self.runner, st.abs(img.path), img.format, st.abs(tmp), "raw", t)
                if params.size and params.size > img.size:
                    await volumes.resize(self.runner, st.abs(tmp), "raw", params.size, t)
            try:
                await st.helper.call("rename", src=tmp, dst=path)
            except FsError as e:
                if e.errno == errno_mod.EEXIST:
                    raise errors.Conflict(f"{path} already exists on primary storage {st.uuid}",
                                          code="STORAGE.1009") from None
                raise self.fs_error(st, e, "creating the volume") from None
        except BaseException:
            await self.remove_quietly(st, tmp)
            raise
        infos = await volumes.info(self.runner, st.abs(path), params.format, t)
        row = VolumeRow(uuid=vu, ps_uuid=st.uuid, name=params.name, path=path, format=params.format,
                        size=int(infos[0]["virtual-size"]), type=params.type,
                        description=params.description, image_uuid=img.uuid if img else None,
                        backing=backing)
        await self.registry.save_volume(row)
        inv = await self.volume_inventory(st, row)
        inv["actualSize"] = infos[0].get("actual-size")
        inv["backingChain"] = volumes.chain_of(infos)
        with contextlib.suppress(errors.ApiError):
            await self._capacity(st)
        return {"inventory": inv}

    def _check_size(self, size: int | None, what: str = "size") -> None:
        if size is None:
            return
        if size <= 0:
            raise errors.BadRequest(f"{what} must be a positive number of bytes, got {size}",
                                    code="STORAGE.1001")
        if size > self.conf.max_volume_bytes:
            raise errors.BadRequest(f"{what} {size} is larger than the limit of "
                                    f"{self.conf.max_volume_bytes} bytes", code="STORAGE.1001")

    @create_volume.exists
    async def _volume_uuid_used(self, new_uuid: str, uuid: str) -> bool:
        return await self.registry.volume(new_uuid) is not None

    @create_volume.check
    async def _create_volume_check(self, params: CreateVolume, uuid: str) -> None:
        st = self.get_storage(uuid)
        self._check_size(params.size)
        if params.size is None and params.image_uuid is None:
            raise errors.BadRequest("size is required for an empty volume", code="STORAGE.1001")
        if params.path is not None:
            self.check_rel(params.path)
        if params.image_uuid:
            img = await self.registry.image(st.uuid, norm_uuid(params.image_uuid))
            if img is None:
                raise errors.NotFound(f"image {params.image_uuid} is not cached on primary storage "
                                      f"{st.uuid}: download it into the cache first", code="STORAGE.1006")
            if params.size is not None and params.size < img.size:
                raise errors.BadRequest(f"size {params.size} is smaller than the image's virtual size "
                                        f"{img.size}", code="STORAGE.1011")
        self.check_usable(st)
        path = params.path or f"volumes/{params.resource_uuid}.{params.format}"
        if await self.registry.volume_at(st.uuid, path) is not None:
            raise errors.Conflict(f"{path} is already a volume", code="STORAGE.1009")
        if params.path is not None:
            found = await self.fs(st, "lookup", path=path)    # symlinks on the way are a 400
            if found.get("exists"):
                raise errors.Conflict(f"{path} already exists on primary storage {st.uuid}",
                                      code="STORAGE.1009")

    @delete("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes/{volumeUuid}")
    async def delete_volume(self, job, params, uuid: str, volumeUuid: str) -> dict[str, Any]:
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        with self.busy(st, v.uuid):
            await self.fs(st, "unlink", path=v.path, missing_ok=True)
            await self.registry.delete_volume(v.uuid)
        with contextlib.suppress(errors.ApiError):
            await self._capacity(st)
        return {}

    @delete_volume.check
    async def _delete_volume_check(self, params, uuid: str, volumeUuid: str) -> None:
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        if v.uuid in st.busy:
            raise errors.Conflict(f"volume {v.uuid} is busy", code="STORAGE.1009")

    @action("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes/{volumeUuid}/actions", "resizeVolume",
            params=ResizeVolume, result=VolumeReply)
    async def resize_volume(self, job, params: ResizeVolume, uuid: str, volumeUuid: str) -> dict[str, Any]:
        """Grow a volume's virtual size (qemu-img resize); a shrink is refused."""
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        with self.busy(st, v.uuid):
            if params.size < v.size:
                raise errors.BadRequest(f"shrinking volume {v.uuid} from {v.size} to {params.size} "
                                        "bytes is refused: only growing is safe", code="STORAGE.1011")
            if params.size > v.size:
                await volumes.resize(self.runner, st.abs(v.path), v.format, params.size,
                                     self.conf.qemu_img_timeout_seconds)
            inv = await self.volume_inventory(st, v, live=True)
            v.size = int(inv["size"])
            await self.registry.save_volume(v)
            inv["lastOpDate"] = (await self.volume_inventory(st, v))["lastOpDate"]
        return {"inventory": inv}

    @resize_volume.check
    async def _resize_check(self, params: ResizeVolume, uuid: str, volumeUuid: str) -> None:
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        self._check_size(params.size)
        if params.size < v.size:
            raise errors.BadRequest(f"shrinking volume {v.uuid} from {v.size} to {params.size} bytes "
                                    "is refused: only growing is safe", code="STORAGE.1011")
        if v.uuid in st.busy:
            raise errors.Conflict(f"volume {v.uuid} is busy", code="STORAGE.1009")
        self.check_usable(st, for_new=False)

    @action("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volumes/{volumeUuid}/actions", "migrateVolume",
            params=MigrateVolume, result=VolumeReply)
    async def migrate_volume(self, job, params: MigrateVolume, uuid: str, volumeUuid: str) -> dict[str, Any]:
        """Move a volume to another node's agent (streamed) or another storage of this node."""
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        dest = params.destination
        with self.busy(st, v.uuid):
            if dest is not None and dest.url:
                return await migrate.migrate_remote(self, job, st, v, dest, params.backing_chain)
            dst = self.get_storage(dest.primary_storage_uuid if dest else params.dst_primary_storage_uuid)
            self.check_usable(dst)
            with self.busy(dst, v.uuid):
                return await migrate.migrate_local(self, job, st, v, dst, params.backing_chain)

    @migrate_volume.check
    async def _migrate_check(self, params: MigrateVolume, uuid: str, volumeUuid: str) -> None:
        st = self.get_storage(uuid)
        v = await self._volume(st, volumeUuid)
        if v.uuid in st.busy:
            raise errors.Conflict(f"volume {v.uuid} is busy", code="STORAGE.1009")
        dest = params.destination
        if dest is None and params.dst_primary_storage_uuid is None:
            raise errors.BadRequest("destination is required: {primaryStorageUuid, url, token} for "
                                    "another node, {primaryStorageUuid} for this one", code="STORAGE.1001")
        self.check_usable(st, for_new=False)
        if dest is not None and dest.url:
            migrate.check_agent_url(dest.url)
            if not dest.token:
                raise errors.BadRequest("destination.token (the destination agent's API token) is "
                                        "required with destination.url", code="STORAGE.1001")
            return
        dst = self.get_storage(dest.primary_storage_uuid if dest else params.dst_primary_storage_uuid)
        if dst is st:
            raise errors.BadRequest("the destination is the volume's own primary storage",
                                    code="STORAGE.1001")
        self.check_usable(dst)
        if await self.registry.volume_at(dst.uuid, v.path) is not None:
            raise errors.Conflict(f"{v.path} is already a volume on {dst.uuid}", code="STORAGE.1009")

    @raw("PUT", "/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/volume-streams/{volumeUuid}",
         summary="Receive a migrating volume from another agent (agent to agent)")
    async def receive_volume(self, request: web.Request) -> web.Response:
        return await migrate.receive(self, request, "volume")

    @raw("PUT", "/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/image-streams/{imageUuid}",
         summary="Receive a cached image from another agent (agent to agent)")
    async def receive_image(self, request: web.Request) -> web.Response:
        return await migrate.receive(self, request, "image")

    async def check_backing(self, st: Storage, path: str, backing: str, image_uuid: str | None,
                            kind: str) -> str:
        """A received image may only stand on an image of this storage's cache (relative path)."""
        if kind != "volume" or backing.startswith("/") or ":" in backing.split("/")[0]:
            raise errors.BadRequest(f"the received {kind} has a backing file {backing!r}: only "
                                    "volumes on a cached image (relative path) are accepted",
                                    code="STORAGE.1002")
        rel = os.path.normpath(os.path.join(os.path.dirname(path), backing))
        for img in await self.registry.images(st.uuid):
            if img.path == rel and (image_uuid is None or img.uuid == image_uuid):
                return img.uuid
        raise errors.BadRequest(f"the received volume stands on {rel}, which is not an image in "
                                f"this storage's cache", code="STORAGE.1002")

    # --- image cache -----------------------------------------------------------------------------------
    def image_inventory(self, st: Storage, i: ImageRow) -> dict[str, Any]:
        from agent.jobs import iso
        return {"uuid": i.uuid, "primaryStorageUuid": st.uuid, "url": i.url, "path": i.path,
                "installPath": st.abs(i.path), "format": i.format, "size": i.size,
                "actualSize": i.actual_size, "checksum": i.checksum, "checksumType": i.checksum_type,
                "md5sum": i.checksum if i.checksum_type == "md5" else None,
                "sha256": i.checksum if i.checksum_type == "sha256" else None,
                "createDate": iso(i.created)}

    @query("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/image-cache", model=ImageCacheInventory)
    async def list_images(self, uuid: str) -> list[dict[str, Any]]:
        st = self.get_storage(uuid)
        return [self.image_inventory(st, i) for i in await self.registry.images(st.uuid)]

    @create("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/image-cache", params=DownloadImage, result=ImageCacheReply)
    async def download_image(self, job, params: DownloadImage, uuid: str) -> dict[str, Any]:
        """Download an image into the storage's cache, its checksum verified in the same pass."""
        st = self.get_storage(uuid)
        iu = norm_uuid(params.image_uuid)
        expected, alg = imagecache.checksum_spec(params.checksum, params.checksum_type, params.md5sum)
        with self.busy(st, f"{st.uuid}:{iu}"):
            existing = await self.registry.image(st.uuid, iu)
            if existing is not None:
                if expected and existing.checksum and existing.checksum_type == alg \
                        and existing.checksum != expected:
                    raise errors.Conflict(f"image {iu} is cached with another checksum",
                                          code="STORAGE.1009")
                return {"inventory": self.image_inventory(st, existing)}
            provisional = imagecache.cache_path(iu, "img")
            fetcher = imagecache.Fetcher(st.root, temp_name(provisional, self.tag), params.url, alg,
                                         stall=self.conf.download_stall_seconds,
                                         ca_file=self.conf.tls_ca_file)
            progress = imagecache.download_progress(job)
            try:
                report = await fetcher.run(progress, self.conf.download_timeout_seconds)
                if expected and report["digest"] != expected:
                    raise errors.OperationFailed(
                        f"checksum mismatch for {params.url}: expected {alg} {expected}, got "
                        f"{report['digest']}; nothing was kept", code="STORAGE.1531")
                infos = await volumes.info(self.runner, fetcher.tmp_path, None,
                                           self.conf.qemu_img_timeout_seconds, chain=False)
                fmt = infos[0].get("format")
                if fmt not in volumes.FORMATS:
                    raise errors.OperationFailed(f"{params.url} is a {fmt} image; the cache takes "
                                                 "qcow2 and raw", code="STORAGE.1532")
                if infos[0].get("backing-filename"):
                    raise errors.OperationFailed(f"{params.url} has a backing file of its own "
                                                 f"({infos[0]['backing-filename']}); refused",
                                                 code="STORAGE.1532")
                final = imagecache.cache_path(iu, fmt)
                await fetcher.commit(final)
            except BaseException:
                await fetcher.abort()
                raise
            row = ImageRow(ps_uuid=st.uuid, uuid=iu, path=final, format=fmt,
                           size=int(infos[0].get("virtual-size") or report["bytes"]),
                           actual_size=int(infos[0].get("actual-size") or report["bytes"]),
                           url=params.url, checksum=report["digest"], checksum_type=alg)
            await self.registry.save_image(row)
        with contextlib.suppress(errors.ApiError):
            await self._capacity(st)
        job.progress(100, "downloaded", downloadedBytes=report["bytes"], seconds=round(report["seconds"], 3))
        return {"inventory": self.image_inventory(st, row)}

    @download_image.check
    async def _download_check(self, params: DownloadImage, uuid: str) -> None:
        st = self.get_storage(uuid)
        imagecache.check_url(params.url)
        imagecache.checksum_spec(params.checksum, params.checksum_type, params.md5sum)
        if f"{st.uuid}:{norm_uuid(params.image_uuid)}" in st.busy:
            raise errors.Conflict(f"image {params.image_uuid} is being downloaded", code="STORAGE.1009")
        self.check_usable(st)

    @delete("/v1/primary-storage/{uuid:[0-9a-fA-F-]{32,36}}/image-cache/{imageUuid}")
    async def delete_image(self, job, params, uuid: str, imageUuid: str) -> dict[str, Any]:
        st = self.get_storage(uuid)
        iu = norm_uuid(imageUuid)
        async with st.cache_lock:
            img = await self.registry.image(st.uuid, iu)
            if img is None:
                raise errors.NotFound(f"image {imageUuid} is not cached here", code="STORAGE.1006")
            users = [v.uuid for v in await self.registry.volumes(st.uuid) if v.image_uuid == iu and v.backing]
            if users:
                raise errors.Conflict(f"image {iu} backs volume(s) {', '.join(users)}",
                                      code="STORAGE.1009")
            await self.fs(st, "unlink", path=img.path, missing_ok=True)
            await self.registry.delete_image(st.uuid, iu)
        return {}

    @delete_image.check
    async def _delete_image_check(self, params, uuid: str, imageUuid: str) -> None:
        st = self.get_storage(uuid)
        iu = norm_uuid(imageUuid)
        if await self.registry.image(st.uuid, iu) is None:
            raise errors.NotFound(f"image {imageUuid} is not cached on primary storage {st.uuid}",
                                  code="STORAGE.1006")
        users = [v.uuid for v in await self.registry.volumes(st.uuid) if v.image_uuid == iu and v.backing]
        if users:
            raise errors.Conflict(f"image {iu} backs volume(s) {', '.join(users)}", code="STORAGE.1009")


class StorageCollector:
    """Prometheus gauges from what the plugin already knows (a scrape touches no storage)."""

    def __init__(self, plugin: StoragePlugin) -> None:
        self.plugin = plugin

    def describe(self):
        return []

    def collect(self):
        # Imported on the first scrape (the agent's metrics registry is built then): memory at idle.
        from prometheus_client.core import GaugeMetricFamily
        cap = GaugeMetricFamily("node_agent_storage_capacity_bytes",
                                "Primary storage capacity by kind (as of the last check)",
                                labels=["primary_storage_uuid", "type", "kind"])
        status = GaugeMetricFamily("node_agent_storage_status",
                                   "1 for the current status of each primary storage",
                                   labels=["primary_storage_uuid", "status"])
        stuck = GaugeMetricFamily("node_agent_storage_stuck_helpers",
                                  "Abandoned filesystem helpers still stuck in the kernel",
                                  labels=["primary_storage_uuid"])
        for st in list(self.plugin.storages.values()):
            for kind, key in (("total", "totalCapacity"), ("available", "availableCapacity"),
                              ("total_physical", "totalPhysicalCapacity"),
                              ("available_physical", "availablePhysicalCapacity")):
                if st.row.capacity.get(key) is not None:
                    cap.add_metric([st.uuid, st.row.type, kind], st.row.capacity[key])
            for s in (CONNECTED, CONNECTING, HUNG, DISCONNECTED):
                status.add_metric([st.uuid, s], 1.0 if st.row.status == s else 0.0)
            stuck.add_metric([st.uuid], st.helper.stuck())
        yield cap
        yield status
        yield stuck
