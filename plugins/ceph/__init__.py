"""The Ceph plugin: Ceph primary storage (pools, mons, RBD volumes) and Ceph
backup storage (images imported from URLs, exported, migrated), through the
rados and rbd bindings.

Each URL's code is the decorated method below; the work is in small modules:

- ``cluster.py``: one shared librados handle per cluster login, its timeouts,
  reconnects and the fsid check; errors in plain words.
- ``secrets.py``: keys in 0600 files under the state directory.
- ``store.py``: the records (storages, mons, pools, volumes, images, exports).
- ``pools.py``, ``mons.py``, ``rbdvols.py``, ``backup.py``: the operations,
  blocking, run in this plugin's runner threads with timeouts.
- ``health.py``: the background status/health check and its events.

Ceph storages live under the literal ``ceph`` segment
(``/v1/primary-storage/ceph``, ``/v1/backup-storage/ceph``), beside the
local/NFS/SMP storages of ``/v1/primary-storage/{uuid}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets as pysecrets
import shutil
import socket
import time
import uuid as uuidlib
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from pydantic import Field

from agent import errors
from agent.events import utcnow_iso
from agent.jobs import iso
from agent.models import WireModel
from agent.plugin import Plugin, action, create, delete, get, query, raw
from agent.runner import Runner
from agent.validation import full_match

from . import backup, cluster, health, kinds, mons, pools, rbdvols
from .cluster import (AccessDenied, ClusterDown, Connection, Endpoint, FsidMismatch, Registry,
                      Timeouts, Unreachable, bad, conflict, failed, mon_host_option, not_found,
                      parse_mon_url, translate)
from .models import (AddCephBackupStorage, AddCephPrimaryStorage, AddImage, AddMons, AddPool,
                     BackupReply, Capacity, CephBackupStorageInventory,
                     CephPrimaryStorageInventory, CleanUpResult, CloneVolume, CreateSnapshot, CreateVolume,
                     DeleteImageQuery, DeletePoolQuery, DeleteSnapshot, DeleteVolumeQuery,
                     Deleted, Empty, ExportImage, ExportReply, ImageInventory, ImageReply,
                     MigrateImage, MonInventory, PoolInventory, PoolReply, PrimaryReply,
                     RemoveMonsQuery, ResizeVolume, SnapshotParams, UpdateMon, UpdatePool,
                     VolumeInventory, VolumeReply, UUID_RE)
from .progress import Progress
from .secrets import KeyStore, keyring_has_user, write_quiet_conf
from .store import Store

log = logging.getLogger("node_agent.ceph")

PS = "/v1/primary-storage/ceph"
BS = "/v1/backup-storage/ceph"
# A storage's uuid in a path: 32 lowercase hex digits, so that the literal segments
# beside it (.../ceph/pools, .../ceph/mons) never match it.
PSU = PS + "/{uuid:[0-9a-f]{32}}"
BSU = BS + "/{uuid:[0-9a-f]{32}}"
PRIMARY, BACKUP = "primary", "backup"
KIND_NAME = {PRIMARY: "Ceph primary storage", BACKUP: "Ceph backup storage"}


class CephSettings(WireModel):
    """The [ceph] config section."""
    mount_timeout: float = Field(10.0, gt=0, le=600, description="client_mount_timeout, seconds")
    mon_op_timeout: float = Field(10.0, gt=0, le=600, description="rados_mon_op_timeout, seconds")
    osd_op_timeout: float = Field(30.0, gt=0, le=3600, description="rados_osd_op_timeout, seconds")
    long_op_timeout: float = Field(6 * 3600.0, ge=10, description="flatten, delete, copy: seconds")
    health_interval: float = Field(10.0, ge=0.2, le=3600, description="seconds between checks")
    cluster_threads: int = Field(4, ge=1, le=64, description="threads of each cluster's own "
                                 "pool: a dead cluster's hung calls never wait in another's")
    cluster_io_threads: int = Field(4, ge=1, le=64, description="threads of each cluster's own "
                                    "bulk pool (imports, exports, migrations)")
    cluster_io_processes: int = Field(2, ge=1, le=16, description="qemu-img converts at once "
                                      "into each cluster")
    download_dir: str | None = Field(None, description="qcow2 spool; <state>/ceph/tmp by default")
    verify_tls: bool = Field(True, description="verify https certificates of image URLs")
    export_base_url: str | None = Field(None, description="base of export URLs, e.g. "
                                        "http://10.0.0.5:7070; guessed from [server] when absent")


def _now() -> str:
    return utcnow_iso()


def _new_uuid() -> str:
    return uuidlib.uuid4().hex


class CephPlugin(Plugin):
    name = "ceph"
    config_sections = {"ceph": CephSettings}
    max_threads = 16
    max_processes = 4

    def __init__(self, agent: Any, settings: dict[str, Any]) -> None:
        super().__init__(agent, settings)
        self.conf: CephSettings = settings.get("ceph") or CephSettings()
        self.timeouts = Timeouts(self.conf.mount_timeout, self.conf.mon_op_timeout,
                                 self.conf.osd_op_timeout)
        self.store = Store(agent.db)
        self.registry = Registry()
        self.conns: dict[str, Connection] = {}
        self.keys = KeyStore(agent.state_dir / "ceph" / "keys")
        self.tmp_dir = Path(self.conf.download_dir or agent.state_dir / "ceph" / "tmp")
        self.live: dict[str, dict[str, Any]] = defaultdict(dict)   # uuid -> last check
        self.locks: dict[Any, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.checker = health.HealthChecker(self, self.conf.health_interval)
        # served in the core's /v1/{primary,backup}-storage collections too
        kinds.register(self, PSU + "/actions", BSU + "/actions")
        import_error = cluster.import_error()
        if import_error:
            self.set_available(False, "the rados/rbd Python bindings cannot be imported "
                               f"({import_error}): install Debian's python3-rados and "
                               "python3-rbd and run the agent from a venv made with "
                               "--system-site-packages")

    # --- lifecycle -------------------------------------------------------------------

    async def lifecycle(self):
        if not self.available:
            yield
            return
        await self.store.load()
        for s in list(self.store.storages.values()):
            await self._attach(s)
        await self.runner.call(self._prepare_dirs, timeout=10)
        _register_metrics(self)
        self.checker.start()
        yield
        await self.checker.stop()
        for conn in self.registry.all():
            try:
                await self.runner.call(conn.close, timeout=5)
            except Exception:
                pass
            self._close_runner(conn)

    def _prepare_dirs(self) -> None:
        cluster.QUIET_CONF = str(write_quiet_conf(self.agent.state_dir / "ceph" / "quiet.conf"))
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in self.tmp_dir.glob("import-*"):     # spools of imports cut short by a stop
            try:
                f.unlink()
            except OSError:
                pass

    # --- plumbing ----------------------------------------------------------------------

    def _storage(self, uuid: str, kind: str) -> dict[str, Any]:
        s = self.store.storages.get(uuid) if full_match(UUID_RE, uuid or "") else None
        if s is None or s["kind"] != kind:
            raise not_found(f"no {KIND_NAME[kind]} {uuid[:64]} on this node")
        return s

    def _conn(self, uuid: str) -> Connection:
        conn = self.conns.get(uuid)
        if conn is None:
            raise errors.Unavailable(f"storage {uuid} has no connection yet", code="CEPH.1504")
        return conn

    async def _attach(self, s: dict[str, Any]) -> Connection:
        """(Re)make the storage's connection from its mons and key; close an orphaned one."""
        recs = self.store.mons_of(s["uuid"])
        eps = [mons.endpoint(m) for m in recs]
        digest = Registry.key_digest(await self.runner.call(KeyStore.read, s["keyring"], timeout=10))
        old = self.registry.detach(s["uuid"])
        conn = self.registry.attach(
            s["uuid"], mon_host=mon_host_option(eps), user=s["user"], keyring=s["keyring"],
            digest=digest, conf_path=s.get("confPath"), fsid=s.get("fsid"),
            timeouts=self.timeouts, label=", ".join(e.addr for e in eps) or str(s.get("confPath")))
        self.conns[s["uuid"]] = conn
        if old is not None and old is not conn:
            asyncio.get_running_loop().create_task(self._close(old))
        return conn

    async def _close(self, conn: Connection) -> None:
        try:
            await self.runner.call(conn.close, timeout=self.timeouts.call)
        except Exception:
            log.warning("closing a Ceph connection to %s did not finish", conn.label)
        # Closed later, not now: closing drops the calls still queued in it (a storage's
        # mons were changed under them); by then each has had its full timeout.
        for runner in (conn.runner, conn.bulk):
            if runner is not None:
                asyncio.get_running_loop().call_later(self.timeouts.call, runner.close)
        conn.runner = conn.bulk = None

    def _conn_runner(self, conn: Connection) -> Runner:
        """The cluster's own bounded pool: made on first use, closed with the connection.
        Threads start only when needed, so an idle cluster costs none."""
        if conn.runner is None:
            conn.runner = Runner(f"ceph-{conn.label}"[:60], max_threads=self.conf.cluster_threads,
                                 max_processes=1)
        return conn.runner

    def _bulk_runner(self, conn: Connection) -> Runner:
        """The cluster's own bulk pool (imports, exports, migrations): its own, so a dead
        cluster's hung transfers never hold a thread another cluster's transfer needs, and
        apart from its control pool, so big transfers never queue a capacity call."""
        if conn.bulk is None:
            conn.bulk = Runner(f"ceph-io-{conn.label}"[:60], max_threads=self.conf.cluster_io_threads,
                               max_processes=self.conf.cluster_io_processes)
        return conn.bulk

    @staticmethod
    def _close_runner(conn: Connection) -> None:
        for runner in (conn.runner, conn.bulk):
            if runner is not None:
                runner.close()    # queued calls dropped; a hung thread ends at its timeout
        conn.runner = conn.bulk = None

    async def raw_call(self, label: str, fn: Callable[..., Any], *args: Any, what: str,
                       timeout: float | None = None, runner: Runner | None = None) -> Any:
        """fn(*args) in a runner thread; binding errors become the wire's errors."""
        t = timeout or self.timeouts.call
        runner = runner or self.runner
        try:
            return await runner.call(fn, *args, timeout=t)
        except errors.Timeout:
            raise Unreachable(f"{what}: the Ceph cluster at {label} did not answer within "
                              f"{t:g} s") from None
        except errors.ApiError:
            raise
        except Exception as e:
            raise translate(e, what, label, self.timeouts) from None

    async def call_conn(self, conn: Connection, fn: Callable[..., Any], *args: Any, what: str,
                        timeout: float | None = None, probe: bool = False) -> Any:
        """fn(rados, *args) in the cluster's own pool.  While the cluster is known down
        the call fails fast (also one that was queued when it went down); only a probe
        (the health check, a reconnect) still goes to the cluster."""
        def work() -> Any:
            if not probe:
                self._fail_if_down(conn, what)
            try:
                with conn.use() as r:
                    return fn(r, *args)
            except Exception as e:
                self._translate_in_thread(e, conn, what)
                raise
        return await self._in_pool(conn, work, [] if probe else [conn], what=what, timeout=timeout,
                                   runner=self._conn_runner(conn))

    async def bulk_call(self, conn: Connection, fn: Callable[..., Any], *args: Any, what: str,
                        timeout: float | None = None, also: Connection | None = None) -> Any:
        """fn(*args) in the cluster's own bulk pool; fn opens the cluster itself (conn.use).
        Fails fast while the cluster (or ``also``, the other end of a copy) is known down,
        also when queued as it went down; a cluster found unreachable is marked down in the
        thread.  fn should call ``guard()`` between blocks (see ``guard``)."""
        ends = [conn] if also is None else [conn, also]

        def work() -> Any:
            for c in ends:
                self._fail_if_down(c, what)
            try:
                return fn(*args)
            except Exception as e:
                culprit = getattr(e, "ceph_conn", None) or conn     # the end that failed
                raise self._translate_in_thread(e, culprit, what) from None
        return await self._in_pool(conn, work, ends, what=what, timeout=timeout,
                                   runner=self._bulk_runner(conn))

    def _translate_in_thread(self, e: Exception, conn: Connection, what: str) -> errors.ApiError:
        """e as the wire's error, the cluster marked down when that says unreachable: in
        the thread, before it takes the next queued call (marked on the loop, a second
        batch would already be waiting)."""
        err = translate(e, what, conn.label, self.timeouts)
        if isinstance(err, Unreachable):
            self._mark_down(conn, err.description)
        return err

    async def _in_pool(self, conn: Connection, work: Callable[[], Any], ends: list[Connection], *,
                       what: str, timeout: float | None, runner: Runner) -> Any:
        """work() on runner (the cluster's pool) unless one of ends is known down; the
        cluster is marked down when the call finds it unreachable."""
        for c in ends:
            self._fail_if_down(c, what)
        try:
            return await self.raw_call(conn.label, work, what=what, timeout=timeout, runner=runner)
        except Unreachable as e:       # also the runner's own timeout
            self._mark_down(conn, e.description)
            raise

    def guard(self, *conns: Connection, what: str) -> Callable[[], None]:
        """A check a transfer makes between blocks: it stops (CEPH.1504) as soon as another
        call found one of its clusters unreachable, rather than each block waiting out the
        op timeout."""
        def check() -> None:
            for c in conns:
                self._fail_if_down(c, what)
        return check

    @staticmethod
    def _mark_down(conn: Connection, reason: str) -> None:
        if conn.down is None:
            conn.down = (time.monotonic(), reason)
            log.warning("Ceph cluster at %s is unreachable; its calls fail fast until the "
                        "health check reaches it again", conn.label)

    def _fail_if_down(self, conn: Connection, what: str) -> None:
        down = conn.down
        if down is not None:
            raise ClusterDown(
                f"{what}: the Ceph cluster at {conn.label} is Disconnected (for "
                f"{time.monotonic() - down[0]:.0f} s: {down[1]}); calls fail at once until the "
                f"health check (every {self.conf.health_interval:g} s) reaches it again, or a "
                f"reconnect action succeeds")

    async def ceph(self, uuid: str, fn: Callable[..., Any], *args: Any, what: str,
                   timeout: float | None = None) -> Any:
        """fn(rados, *args) on the storage's cluster; keeps its status up to date."""
        try:
            result = await self.call_conn(self._conn(uuid), fn, *args, what=what, timeout=timeout)
        except (Unreachable, AccessDenied, FsidMismatch) as e:
            await self.set_status(uuid, health.DISCONNECTED, e.description)
            raise
        s = self.store.storages.get(uuid)
        if s is not None and s.get("status") != health.CONNECTED:
            # An OSD op may succeed while the mons are away: let the checker's mon
            # commands decide whether the cluster is back, now rather than later.
            self.checker.wake.set()
        return result

    async def ceph_long(self, uuid: str, job: Any, fn: Callable[..., Any], *args: Any,
                        what: str, message: str) -> Any:
        """A long librbd operation with progress; cancelled with the job (or its timeout)."""
        progress = Progress(job, message=message)
        try:
            return await self.ceph(uuid, fn, *args, progress, what=what,
                                   timeout=self.conf.long_op_timeout)
        except BaseException:
            progress.cancel()
            raise

    async def set_status(self, uuid: str, status: str, reason: str | None,
                         info: dict[str, Any] | None = None) -> None:
        """Record a storage's status (and health); publish StorageStatusChanged on a change."""
        s = self.store.storages.get(uuid)
        if s is None:
            return
        live = self.live[uuid]
        live["lastCheckedDate"] = _now()
        if info is not None:
            live["totalCapacity"] = info.get("totalCapacity")
            live["availableCapacity"] = info.get("availableCapacity")
            live["quorumStatus"] = info.get("quorumStatus")
            live["monStates"] = info.get("monStates") or {}
            if info.get("fsid") and s.get("fsid") and info["fsid"] != s["fsid"]:
                status, reason = health.DISCONNECTED, (
                    f"another Ceph cluster (fsid {info['fsid']}) answers at the registered mons")
        new_health = info.get("health") if info is not None else s.get("health")
        new_checks = info.get("healthChecks") if info is not None else s.get("healthChecks", [])
        old_status, old_health = s.get("status"), s.get("health")
        if status == old_status and new_health == old_health and \
                new_checks == s.get("healthChecks", []) and reason == s.get("statusReason"):
            return
        s = dict(s, status=status, statusReason=reason, health=new_health, healthChecks=new_checks)
        await self.store.save_storage(s)
        if status != old_status or new_health != old_health:
            log.info("Ceph storage %s: %s/%s -> %s/%s%s", uuid, old_status, old_health, status,
                     new_health, f" ({reason})" if reason else "")
            await self.agent.events.publish("StorageStatusChanged",
                                            health.event_data(s, old_status, old_health))

    # --- inventories -------------------------------------------------------------------

    def _mon_inventory(self, s: dict[str, Any], m: dict[str, Any],
                       states: dict[str, Any] | None) -> MonInventory:
        st = (states or {}).get(m["monUuid"]) or {}
        ep = mons.endpoint(m)
        owner = {"primary_storage_uuid": s["uuid"]} if s["kind"] == PRIMARY \
            else {"backup_storage_uuid": s["uuid"]}
        return MonInventory(mon_uuid=m["monUuid"], hostname=m["hostname"], mon_port=m.get("monPort"),
                            mon_addr=ep.addr, protocol=m.get("protocol"),
                            status=st.get("status", "Unknown"), in_quorum=st.get("inQuorum"),
                            in_monmap=st.get("inMonmap"), mon_name=st.get("monName"),
                            create_date=m["createDate"], last_op_date=m["lastOpDate"], **owner)

    def inventory(self, s: dict[str, Any], states: dict[str, Any] | None = None):
        live = self.live.get(s["uuid"], {})
        states = states if states is not None else live.get("monStates")
        common = dict(
            uuid=s["uuid"], name=s.get("name") or "", description=s.get("description"),
            url=f"ceph://{s['fsid']}", status=s.get("status", "Unknown"),
            status_reason=s.get("statusReason"), health=s.get("health"),
            health_checks=s.get("healthChecks", []), fsid=s["fsid"], user=s["user"],
            total_capacity=live.get("totalCapacity", s.get("totalCapacity")),
            available_capacity=live.get("availableCapacity", s.get("availableCapacity")),
            mons=[self._mon_inventory(s, m, states) for m in self.store.mons_of(s["uuid"])],
            create_date=s["createDate"], last_op_date=s["lastOpDate"],
            last_checked_date=live.get("lastCheckedDate"))
        if s["kind"] == PRIMARY:
            return CephPrimaryStorageInventory(
                **common, zone_uuid=s.get("zoneUuid"),
                root_volume_pool_name=s["rootVolumePoolName"],
                data_volume_pool_name=s["dataVolumePoolName"],
                image_cache_pool_name=s["imageCachePoolName"],
                total_physical_capacity=common["total_capacity"],
                available_physical_capacity=common["available_capacity"])
        return CephBackupStorageInventory(**common, pool_name=s["poolName"])

    def _reply(self, s: dict[str, Any], states: dict[str, Any] | None = None):
        inv = self.inventory(s, states)
        return PrimaryReply(inventory=inv) if s["kind"] == PRIMARY else BackupReply(inventory=inv)

    # --- registration ------------------------------------------------------------------

    async def _check_registration(self, params: Any) -> None:
        if params.keyring_path:
            why = await self.runner.call(keyring_has_user, params.keyring_path, params.user, timeout=10)
            if why:
                raise bad(why)
        if params.conf_path and not await self.runner.call(os.path.isfile, params.conf_path, timeout=10):
            raise bad(f"confPath {params.conf_path} is not a file")

    async def _register(self, job: Any, params: Any, kind: str) -> dict[str, Any]:
        uuid = params.resource_uuid
        async with self.locks[("storage", uuid)]:
            if uuid in self.store.storages:
                raise conflict(f"a Ceph storage {uuid} is already registered on this node")
            eps = list(dict.fromkeys(parse_mon_url(u) for u in params.mon_urls))
            owned = params.key is not None
            keyring = str(await self.runner.call(self.keys.write, uuid, params.user, params.key,
                                                 timeout=10)) if owned else params.keyring_path
            label = ", ".join(e.addr for e in eps) or params.conf_path
            conn = Connection(mon_host=mon_host_option(eps), user=params.user, keyring=keyring,
                              conf_path=params.conf_path, timeouts=self.timeouts, fsid=None,
                              label=label)
            if kind == PRIMARY:
                names = {"Root": params.root_volume_pool_name or f"pri-v-r-{uuid}",
                         "Data": params.data_volume_pool_name or f"pri-v-d-{uuid}",
                         "ImageCache": params.image_cache_pool_name or f"pri-c-{uuid}"}
            else:
                names = {"Data": params.pool_name or f"bak-t-{uuid}"}

            def work(r: Any) -> dict[str, Any]:
                created = []
                for n in dict.fromkeys(names.values()):
                    if pools.ensure(r, n, params.pg_num, params.create_pools):
                        created.append(n)
                info = health.summary(r)
                info["created"] = created
                found = eps or mons.endpoints_from_monmap(info["quorumStatus"])
                info["endpoints"] = found
                info["monStates"] = mons.match(
                    [{"monUuid": str(i), "hostname": e.host, "monPort": e.port,
                      "protocol": e.proto} for i, e in enumerate(found)], info["quorumStatus"])
                return info
            job.progress(10, "connecting to the cluster")
            try:
                info = await self.call_conn(conn, work, what=f"registering {KIND_NAME[kind]} {uuid}")
            except BaseException:
                if owned:
                    self.keys.delete(uuid)
                await self._close(conn)
                raise
            fsid = conn.fsid
            await self._close(conn)
            now = _now()
            eps = eps or info.get("endpoints", [])
            s: dict[str, Any] = {
                "uuid": uuid, "kind": kind, "name": params.name, "description": params.description,
                "zoneUuid": params.zone_uuid, "user": params.user, "keyring": keyring,
                "keyringOwned": owned, "confPath": params.conf_path, "fsid": fsid,
                "status": health.CONNECTED, "statusReason": None, "health": info.get("health"),
                "healthChecks": info.get("healthChecks", []),
                "totalCapacity": info.get("totalCapacity"),
                "availableCapacity": info.get("availableCapacity"),
                "createDate": now, "lastOpDate": now}
            if kind == PRIMARY:
                s.update(rootVolumePoolName=names["Root"], dataVolumePoolName=names["Data"],
                         imageCachePoolName=names["ImageCache"])
            else:
                s["poolName"] = names["Data"]
            mon_recs = [{"monUuid": _new_uuid(), "storageUuid": uuid, "hostname": e.host,
                         "monPort": e.port, "protocol": e.proto, "createDate": now, "lastOpDate": now}
                        for e in eps]
            states = {m["monUuid"]: info["monStates"].get(str(i), {}) for i, m in enumerate(mon_recs)}
            pool_recs = []
            for typ, n in names.items():
                if any(p["poolName"] == n for p in pool_recs):
                    continue
                pool_recs.append({"uuid": _new_uuid(), "storageUuid": uuid, "poolName": n,
                                  "aliasName": None, "description": None, "type": typ,
                                  "createDate": now, "lastOpDate": now})
            await self.store.add_storage(s, mon_recs, pool_recs)
            self.live[uuid].update(totalCapacity=info.get("totalCapacity"),
                                   availableCapacity=info.get("availableCapacity"),
                                   lastCheckedDate=now, monStates=states)
            await self._attach(s)
            log.info("registered %s %s (fsid %s, user %s, mons %s; pools created: %s)",
                     KIND_NAME[kind], uuid, fsid, params.user, label, info["created"] or "none")
            self.checker.wake.set()
            return s

    async def _unregister(self, uuid: str) -> Deleted:
        async with self.locks[("storage", uuid)]:
            s = self.store.storages.get(uuid)
            if s is None:
                return Deleted(uuid=uuid)
            old = self.registry.detach(uuid)
            self.conns.pop(uuid, None)
            await self.store.delete_storage(uuid)
            self.live.pop(uuid, None)
            if s.get("keyringOwned"):
                self.keys.delete(uuid)
            if old is not None:
                await self._close(old)
            log.info("forgot %s %s (its pools and images stay in the cluster)",
                     KIND_NAME[s["kind"]], uuid)
            return Deleted(uuid=uuid)

    async def _reconnect(self, uuid: str, kind: str):
        s = self._storage(uuid, kind)
        conn = self._conn(uuid)
        await self.runner.call(conn.invalidate, timeout=self.timeouts.call)
        await self.checker.check(conn)
        s = self._storage(uuid, kind)
        if s.get("status") != health.CONNECTED:
            raise Unreachable(f"reconnecting {KIND_NAME[kind]} {uuid}: {s.get('statusReason')}")
        return self._reply(s)

    async def _capacity(self, uuid: str, kind: str) -> Capacity:
        self._storage(uuid, kind)
        recs = self.store.pools_of(uuid)
        d = await self.ceph(uuid, pools.df, what=f"capacity of {KIND_NAME[kind]} {uuid}")
        cap = pools.capacity(d, recs)
        self.live[uuid].update(totalCapacity=cap["totalCapacity"],
                               availableCapacity=cap["availableCapacity"])
        return Capacity.model_validate(cap)

    # --- primary storage ----------------------------------------------------------------

    @create(PS, params=AddCephPrimaryStorage, result=PrimaryReply)
    async def add_ceph_primary_storage(self, job, params: AddCephPrimaryStorage) -> PrimaryReply:
        """AddCephPrimaryStorage: connect, check the key, create the missing pools."""
        return self._reply(await self._register(job, params, PRIMARY))

    @add_ceph_primary_storage.check
    async def _add_primary_check(self, params: AddCephPrimaryStorage) -> None:
        await self._check_registration(params)

    @add_ceph_primary_storage.exists
    async def _primary_uuid_used(self, new_uuid: str) -> bool:
        # any storage of this node, of either category and any plugin (the core's registry)
        return self.agent.storage_kinds.holder(new_uuid) is not None

    @query(PS, model=CephPrimaryStorageInventory)
    async def query_ceph_primary_storage(self) -> list:
        """QueryCephPrimaryStorage (from the agent's records and the last health check)."""
        return [self.inventory(s) for s in self.store.storages.values() if s["kind"] == PRIMARY]

    @get(PSU, result=PrimaryReply)
    async def get_ceph_primary_storage(self, uuid: str) -> PrimaryReply:
        return self._reply(self._storage(uuid, PRIMARY))

    @delete(PSU, result=Deleted)
    async def delete_ceph_primary_storage(self, job, params, uuid: str) -> Deleted:
        """Forget the storage (its pools and images stay in the cluster)."""
        return await self._unregister(uuid)

    @delete_ceph_primary_storage.check
    async def _delete_primary_check(self, params, uuid: str) -> None:
        self._storage(uuid, PRIMARY)

    @get(PSU + "/capacity", result=Capacity)
    async def ceph_primary_storage_capacity(self, uuid: str) -> Capacity:
        """Cluster total/available and each pool's stored, max available and quota (one df)."""
        return await self._capacity(uuid, PRIMARY)

    @action(PSU + "/actions", "reconnectPrimaryStorage", params=Empty, result=PrimaryReply)
    async def reconnect_ceph_primary_storage(self, job, params: Empty, uuid: str) -> PrimaryReply:
        """Drop the connection and connect again (fsid checked)."""
        return await self._reconnect(uuid, PRIMARY)

    @reconnect_ceph_primary_storage.check
    async def _reconnect_primary_check(self, params, uuid: str) -> None:
        self._storage(uuid, PRIMARY)

    @action(PSU + "/actions", "syncPrimaryStorageCapacity", params=Empty, result=Capacity)
    async def sync_ceph_primary_storage_capacity(self, job, params: Empty, uuid: str) -> Capacity:
        return await self._capacity(uuid, PRIMARY)

    @sync_ceph_primary_storage_capacity.check
    async def _sync_primary_check(self, params, uuid: str) -> None:
        self._storage(uuid, PRIMARY)

    @action(PSU + "/actions", "cleanUpImageCacheOnPrimaryStorage", params=Empty,
            result=CleanUpResult)
    async def clean_up_ceph_image_cache(self, job, params: Empty, uuid: str) -> CleanUpResult:
        """Remove the cached images (and their snapshots) in the image cache pool that no
        volume clones from; cloned-from, open ones and the agent's volumes there stay."""
        s = self._storage(uuid, PRIMARY)
        pool = self._cache_pool(s)
        keep = {v["name"] for v in self.store.volumes.values()
                if v["storageUuid"] == uuid and v["poolName"] == pool}
        async with self.locks[("cache", uuid)]:
            out = await self.ceph_long(uuid, job, rbdvols.clean_cache, pool, keep,
                                       what=f"cleaning up the image cache pool {pool}",
                                       message=f"cleaning up {pool}")
        log.info("Ceph primary storage %s: image cache %s cleaned up: %d removed (%d bytes), %d kept",
                 uuid, pool, len(out["removedImageUuids"]), out["removedBytes"],
                 len(out["keptImageUuids"]))
        return CleanUpResult.model_validate(out)

    @clean_up_ceph_image_cache.check
    async def _clean_up_cache_check(self, params, uuid: str) -> None:
        self._cache_pool(self._storage(uuid, PRIMARY))

    def _cache_pool(self, s: dict[str, Any]) -> str:
        pool = s["imageCachePoolName"]
        if pool in (s["rootVolumePoolName"], s["dataVolumePoolName"]):
            raise conflict(f"the image cache pool {pool} of Ceph primary storage {s['uuid']} is "
                           "also a volume pool: cleaning it up could remove volumes, so nothing "
                           "is done")
        return pool

    # --- mons (both kinds) -----------------------------------------------------------------

    async def _live_mon_states(self, uuid: str) -> dict[str, Any]:
        recs = self.store.mons_of(uuid)

        def work(r: Any) -> dict[str, Any]:
            return mons.match(recs, mons.quorum_status(r))
        states = await self.ceph(uuid, work, what=f"reading the monmap of {uuid}")
        self.live[uuid]["monStates"] = states
        return states

    async def _list_mons(self, uuid: str, kind: str) -> list[MonInventory]:
        s = self._storage(uuid, kind)
        states = await self._live_mon_states(uuid)
        return [self._mon_inventory(s, m, states) for m in self.store.mons_of(uuid)]

    def _same_endpoint(self, a: Endpoint, b: Endpoint) -> bool:
        return a.host == b.host and (a.port == b.port or a.port is None or b.port is None)

    async def _check_add_mons(self, uuid: str, kind: str, params: AddMons) -> None:
        self._storage(uuid, kind)
        have = [mons.endpoint(m) for m in self.store.mons_of(uuid)]
        new: list[Endpoint] = []
        for url in params.mon_urls:
            ep = parse_mon_url(url)
            if any(self._same_endpoint(ep, h) for h in have + new):
                raise conflict(f"mon {ep.addr} is already a mon of {KIND_NAME[kind]} {uuid} "
                               "(or listed twice)")
            new.append(ep)

    async def _verify_endpoint(self, s: dict[str, Any], ep: Endpoint) -> None:
        """The endpoint answers and belongs to the storage's cluster (fsid)."""
        def work() -> str:
            return cluster.probe(mon_host=ep.mon_host(), user=s["user"], keyring=s["keyring"],
                                 conf_path=s.get("confPath"), timeouts=self.timeouts, label=ep.addr)
        fsid = await self.raw_call(ep.addr, work, what=f"checking mon {ep.addr}")
        if fsid != s["fsid"]:
            raise FsidMismatch(f"mon {ep.addr} belongs to another Ceph cluster (fsid {fsid}); "
                               f"this storage's cluster is fsid {s['fsid']}")

    async def _add_mons(self, job: Any, uuid: str, kind: str, params: AddMons):
        async with self.locks[("storage", uuid)]:
            await self._check_add_mons(uuid, kind, params)
            s = self._storage(uuid, kind)
            eps = [parse_mon_url(u) for u in params.mon_urls]
            for i, ep in enumerate(eps):
                job.progress(100 * i / len(eps), f"checking mon {ep.addr}")
                await self._verify_endpoint(s, ep)
            now = _now()
            recs = [{"monUuid": _new_uuid(), "storageUuid": uuid, "hostname": e.host,
                     "monPort": e.port, "protocol": e.proto, "createDate": now, "lastOpDate": now}
                    for e in eps]
            await self.store.replace_mons(uuid, recs, [])
            await self._touch(s)
            await self._attach(self.store.storages[uuid])
            log.info("%s %s: added mon(s) %s", KIND_NAME[kind], uuid, ", ".join(e.addr for e in eps))
        return self._reply(self.store.storages[uuid], await self._states_or_none(uuid))

    async def _states_or_none(self, uuid: str) -> dict[str, Any] | None:
        try:
            return await self._live_mon_states(uuid)
        except errors.ApiError:
            return None

    def _pick_mons(self, uuid: str, kind: str, names: str) -> list[dict[str, Any]]:
        recs = self.store.mons_of(uuid)
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:
            raise bad("monHostnames is empty: give the hostnames (or host:port, or mon uuids) "
                      "of the mons to remove, comma-separated")
        picked: list[dict[str, Any]] = []
        for w in wanted:
            found = [m for m in recs if w in (m["hostname"], m["monUuid"], mons.endpoint(m).addr)]
            if not found:
                known = ", ".join(mons.endpoint(m).addr for m in recs) or "none"
                raise not_found(f"{w[:200]} is not a mon of {KIND_NAME[kind]} {uuid} "
                                f"(its mons: {known})")
            picked += [m for m in found if m not in picked]
        if len(picked) >= len(recs):
            raise conflict(f"removing {', '.join(mons.endpoint(m).addr for m in picked)} would "
                           f"leave {KIND_NAME[kind]} {uuid} without a mon; add another first")
        return picked

    async def _remove_mons(self, uuid: str, kind: str, params: RemoveMonsQuery):
        async with self.locks[("storage", uuid)]:
            s = self._storage(uuid, kind)
            picked = self._pick_mons(uuid, kind, params.mon_hostnames)
            await self.store.replace_mons(uuid, [], [m["monUuid"] for m in picked])
            await self._touch(s)
            await self._attach(self.store.storages[uuid])
            log.info("%s %s: removed mon(s) %s", KIND_NAME[kind], uuid,
                     ", ".join(mons.endpoint(m).addr for m in picked))
        return self._reply(self.store.storages[uuid], await self._states_or_none(uuid))

    def _mon_owner(self, mon_uuid: str, kind: str, uuid: str | None = None) -> tuple[dict, dict]:
        m = self.store.mons.get(mon_uuid)
        s = self.store.storages.get(m["storageUuid"]) if m else None
        if m is None or s is None or s["kind"] != kind or (uuid is not None and s["uuid"] != uuid):
            where = f" of {KIND_NAME[kind]} {uuid}" if uuid else ""
            raise not_found(f"no mon {mon_uuid[:64]}{where} on this node")
        return s, m

    async def _update_mon(self, job: Any, mon_uuid: str, kind: str, params: UpdateMon,
                          uuid: str | None = None):
        s, m = self._mon_owner(mon_uuid, kind, uuid)
        async with self.locks[("storage", s["uuid"])]:
            s, m = self._mon_owner(mon_uuid, kind, uuid)
            old = mons.endpoint(m)
            host, port, proto = old.host, old.port, old.proto
            if params.hostname is not None:
                ep = parse_mon_url(params.hostname)
                host, proto = ep.host, ep.proto or proto
                port = ep.port or port
            if params.mon_port is not None:
                port = params.mon_port
            new = Endpoint(host, port, proto)
            if new != old:
                others = [mons.endpoint(o) for o in self.store.mons_of(s["uuid"])
                          if o["monUuid"] != mon_uuid]
                if any(self._same_endpoint(new, o) for o in others):
                    raise conflict(f"mon {new.addr} is already a mon of this storage")
                job.progress(10, f"checking mon {new.addr}")
                await self._verify_endpoint(s, new)
                rec = dict(m, hostname=host, monPort=port, protocol=proto, lastOpDate=_now())
                await self.store.replace_mons(s["uuid"], [rec], [])
                await self._touch(s)
                await self._attach(self.store.storages[s["uuid"]])
                log.info("%s %s: mon %s is now %s", KIND_NAME[kind], s["uuid"], old.addr, new.addr)
        return self._reply(self.store.storages[s["uuid"]], await self._states_or_none(s["uuid"]))

    async def _touch(self, s: dict[str, Any]) -> None:
        await self.store.save_storage(dict(self.store.storages[s["uuid"]], lastOpDate=_now()))

    @query(PSU + "/mons", model=MonInventory)
    async def query_ceph_primary_storage_mons(self, uuid: str) -> list:
        """The mons the agent uses, each with its quorum state from the live monmap."""
        return await self._list_mons(uuid, PRIMARY)

    @create(PSU + "/mons", params=AddMons, result=PrimaryReply)
    async def add_mon_to_ceph_primary_storage(self, job, params: AddMons, uuid: str):
        """AddMonToCephPrimaryStorage: each mon must answer and share the storage's fsid."""
        return await self._add_mons(job, uuid, PRIMARY, params)

    @add_mon_to_ceph_primary_storage.check
    async def _add_mon_primary_check(self, params: AddMons, uuid: str) -> None:
        await self._check_add_mons(uuid, PRIMARY, params)

    @delete(PSU + "/mons", params=RemoveMonsQuery, result=PrimaryReply)
    async def remove_mon_from_ceph_primary_storage(self, job, params: RemoveMonsQuery, uuid: str):
        """RemoveMonFromCephPrimaryStorage (?monHostnames=a,b); never the last mon."""
        return await self._remove_mons(uuid, PRIMARY, params)

    @remove_mon_from_ceph_primary_storage.check
    async def _remove_mon_primary_check(self, params: RemoveMonsQuery, uuid: str) -> None:
        self._storage(uuid, PRIMARY)
        self._pick_mons(uuid, PRIMARY, params.mon_hostnames)

    @action(PSU + "/mons/{monUuid}/actions", "updateCephPrimaryStorageMon",
            params=UpdateMon, result=PrimaryReply)
    async def update_ceph_primary_storage_mon(self, job, params: UpdateMon, uuid: str, monUuid: str):
        """UpdateCephPrimaryStorageMon: a new address or port, checked before it is saved."""
        return await self._update_mon(job, monUuid, PRIMARY, params, uuid)

    @update_ceph_primary_storage_mon.check
    async def _update_mon_primary_check(self, params, uuid: str, monUuid: str) -> None:
        self._storage(uuid, PRIMARY)
        self._mon_owner(monUuid, PRIMARY, uuid)

    @action(PS + "/mons/{monUuid}/actions", "updateCephPrimaryStorageMon", params=UpdateMon,
            result=PrimaryReply)
    async def update_ceph_primary_storage_mon_by_uuid(self, job, params: UpdateMon, monUuid: str):
        """The manual's path of UpdateCephPrimaryStorageMon (the mon uuid alone)."""
        return await self._update_mon(job, monUuid, PRIMARY, params)

    @update_ceph_primary_storage_mon_by_uuid.check
    async def _update_mon_primary_check2(self, params, monUuid: str) -> None:
        self._mon_owner(monUuid, PRIMARY)

    # --- pools ---------------------------------------------------------------------------

    def _pool_rec(self, pool_uuid: str, uuid: str | None = None) -> tuple[dict, dict]:
        p = self.store.pools.get(pool_uuid)
        s = self.store.storages.get(p["storageUuid"]) if p else None
        if p is None or s is None or s["kind"] != PRIMARY or (uuid is not None and s["uuid"] != uuid):
            where = f" in Ceph primary storage {uuid}" if uuid else ""
            raise not_found(f"no pool {pool_uuid[:64]}{where} on this node")
        return s, p

    def _pool_inventory(self, p: dict[str, Any], detail: dict | None, stats: dict | None = None,
                        live: bool = True) -> PoolInventory:
        fields = pools.live_fields(detail) if live else {}
        return PoolInventory(uuid=p["uuid"], primary_storage_uuid=p["storageUuid"],
                             pool_name=p["poolName"], alias_name=p.get("aliasName"),
                             description=p.get("description"), type=p.get("type", "Data"),
                             create_date=p["createDate"], last_op_date=p["lastOpDate"],
                             stats=stats, **{_snake(k): v for k, v in fields.items()})

    async def _pools_of(self, uuid: str) -> list[PoolInventory]:
        recs = self.store.pools_of(uuid)
        detail = await self.ceph(uuid, pools.ls_detail, what=f"listing the pools of {uuid}")
        return [self._pool_inventory(p, detail.get(p["poolName"])) for p in recs]

    async def _one_pool(self, s: dict, p: dict) -> PoolReply:
        def work(r: Any) -> tuple[dict | None, dict | None]:
            detail = pools.ls_detail(r).get(p["poolName"])
            d = pools.df(r)
            entry = next((x for x in d.get("pools", []) if x["name"] == p["poolName"]), None)
            return detail, pools.stats_fields(entry)
        detail, stats = await self.ceph(s["uuid"], work, what=f"reading pool {p['poolName']}")
        return PoolReply(inventory=self._pool_inventory(p, detail, stats))

    @query(PSU + "/pools", model=PoolInventory)
    async def query_ceph_primary_storage_pools(self, uuid: str) -> list:
        """QueryCephPrimaryStoragePool of one storage (one 'osd pool ls detail')."""
        self._storage(uuid, PRIMARY)
        return await self._pools_of(uuid)

    @query(PS + "/pools", model=PoolInventory)
    async def query_ceph_primary_storage_pool(self) -> list:
        """QueryCephPrimaryStoragePool across every Ceph primary storage (the manual's path)."""
        out: list[PoolInventory] = []
        for s in list(self.store.storages.values()):
            if s["kind"] == PRIMARY:
                out += await self._pools_of(s["uuid"])
        return out

    @get(PSU + "/pools/{poolUuid}", result=PoolReply)
    async def get_ceph_primary_storage_pool(self, uuid: str, poolUuid: str) -> PoolReply:
        """One pool, with its stats (stored, objects, max available)."""
        s, p = self._pool_rec(poolUuid, uuid)
        return await self._one_pool(s, p)

    @get(PS + "/pools/{poolUuid}", result=PoolReply)
    async def get_ceph_primary_storage_pool_by_uuid(self, poolUuid: str) -> PoolReply:
        s, p = self._pool_rec(poolUuid)
        return await self._one_pool(s, p)

    @create(PSU + "/pools", params=AddPool, result=PoolReply)
    async def add_ceph_primary_storage_pool(self, job, params: AddPool, uuid: str) -> PoolReply:
        """AddCephPrimaryStoragePool: create (pg count, application rbd) or adopt a pool."""
        async with self.locks[("storage", uuid)]:
            self._check_add_pool(uuid, params)
            name = params.pool_name
            if params.is_create:
                job.progress(10, f"creating pool {name}")
                await self.ceph(uuid, pools.create, name, params.pg_num, what=f"creating pool {name}")
            else:
                await self.ceph(uuid, pools.adopt, name, what=f"adopting pool {name}")
            now = _now()
            p = {"uuid": params.resource_uuid, "storageUuid": uuid, "poolName": name,
                 "aliasName": params.alias_name, "description": params.description,
                 "type": params.type, "createDate": now, "lastOpDate": now}
            await self.store.put("pools", p["uuid"], uuid, p)
            log.info("Ceph primary storage %s: %s pool %s", uuid,
                     "created" if params.is_create else "adopted", name)
            return await self._one_pool(self.store.storages[uuid], p)

    def _check_add_pool(self, uuid: str, params: AddPool) -> None:
        self._storage(uuid, PRIMARY)
        if any(p["poolName"] == params.pool_name for p in self.store.pools_of(uuid)):
            raise conflict(f"pool {params.pool_name} is already a pool of Ceph primary storage {uuid}")
        if params.resource_uuid in self.store.pools:       # decided by the core; a race
            raise conflict(f"a pool {params.resource_uuid} already exists")

    @add_ceph_primary_storage_pool.exists
    async def _pool_uuid_used(self, new_uuid: str, uuid: str) -> bool:
        return new_uuid in self.store.pools

    @add_ceph_primary_storage_pool.check
    async def _add_pool_check(self, params: AddPool, uuid: str) -> None:
        self._check_add_pool(uuid, params)
        detail = await self.ceph(uuid, pools.ls_detail, what="listing the pools")
        name = params.pool_name
        if params.is_create and name in detail:
            raise conflict(f"pool {name} already exists in the cluster; add it with "
                           "isCreate=false to use it as it is")
        if not params.is_create:
            if name not in detail:
                raise not_found(f"pool {name} does not exist in the cluster; add it with "
                                "isCreate=true to create it")
            pools.adopt_check(name, detail[name])

    async def _delete_pool_check(self, params: DeletePoolQuery | None, p: dict, s: dict) -> None:
        params = params or DeletePoolQuery()
        role = [k for k in ("rootVolumePoolName", "dataVolumePoolName", "imageCachePoolName")
                if s.get(k) == p["poolName"]]
        if role and not (params.force or params.keep):
            raise conflict(f"pool {p['poolName']} is the storage's {role[0]}: delete it with "
                           "force=true (or keep=true to only forget it)")
        if params.keep or params.force:
            return
        names = await self.ceph(s["uuid"], pools.images, p["poolName"],
                                what=f"listing the images of pool {p['poolName']}")
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise conflict(f"pool {p['poolName']} holds {len(names)} image(s) ({shown}): delete "
                           "them first, or pass force=true to delete the pool with them")

    async def _delete_pool(self, params: DeletePoolQuery | None, pool_uuid: str,
                           uuid: str | None) -> Deleted:
        params = params or DeletePoolQuery()
        s, p = self._pool_rec(pool_uuid, uuid)
        async with self.locks[("storage", s["uuid"])]:
            s, p = self._pool_rec(pool_uuid, uuid)
            await self._delete_pool_check(params, p, s)
            if not params.keep:
                await self.ceph(s["uuid"], pools.delete, p["poolName"],
                                what=f"deleting pool {p['poolName']}")
            await self.store.remove("pools", [pool_uuid])
            log.info("Ceph primary storage %s: %s pool %s", s["uuid"],
                     "forgot" if params.keep else "deleted", p["poolName"])
            return Deleted(uuid=pool_uuid)

    @delete(PSU + "/pools/{poolUuid}", params=DeletePoolQuery, result=Deleted)
    async def delete_ceph_primary_storage_pool(self, job, params, uuid: str, poolUuid: str) -> Deleted:
        """DeleteCephPrimaryStoragePool: refused while it holds images unless ?force=true."""
        return await self._delete_pool(params, poolUuid, uuid)

    @delete_ceph_primary_storage_pool.check
    async def _delete_pool_check1(self, params, uuid: str, poolUuid: str) -> None:
        s, p = self._pool_rec(poolUuid, uuid)
        await self._delete_pool_check(params, p, s)

    @delete(PS + "/pools/{poolUuid}", params=DeletePoolQuery, result=Deleted)
    async def delete_ceph_primary_storage_pool_by_uuid(self, job, params, poolUuid: str) -> Deleted:
        return await self._delete_pool(params, poolUuid, None)

    @delete_ceph_primary_storage_pool_by_uuid.check
    async def _delete_pool_check2(self, params, poolUuid: str) -> None:
        s, p = self._pool_rec(poolUuid)
        await self._delete_pool_check(params, p, s)

    async def _update_pool(self, params: UpdatePool, pool_uuid: str, uuid: str | None) -> PoolReply:
        s, p = self._pool_rec(pool_uuid, uuid)
        async with self.locks[("storage", s["uuid"])]:
            s, p = self._pool_rec(pool_uuid, uuid)
            if params.quota_bytes is not None or params.quota_objects is not None:
                await self.ceph(s["uuid"], pools.set_quota, p["poolName"], params.quota_bytes,
                                params.quota_objects, what=f"setting the quota of pool {p['poolName']}")
            p = dict(p, lastOpDate=_now())
            if params.alias_name is not None:
                p["aliasName"] = params.alias_name
            if params.description is not None:
                p["description"] = params.description
            await self.store.put("pools", pool_uuid, s["uuid"], p)
            return await self._one_pool(s, p)

    @action(PSU + "/pools/{poolUuid}/actions", "updateCephPrimaryStoragePool",
            params=UpdatePool, result=PoolReply)
    async def update_ceph_primary_storage_pool(self, job, params: UpdatePool, uuid: str,
                                               poolUuid: str) -> PoolReply:
        """UpdateCephPrimaryStoragePool: alias, description, quota in bytes and objects."""
        return await self._update_pool(params, poolUuid, uuid)

    @update_ceph_primary_storage_pool.check
    async def _update_pool_check(self, params, uuid: str, poolUuid: str) -> None:
        self._pool_rec(poolUuid, uuid)

    @action(PS + "/pools/{poolUuid}/actions", "updateCephPrimaryStoragePool", params=UpdatePool,
            result=PoolReply)
    async def update_ceph_primary_storage_pool_by_uuid(self, job, params: UpdatePool,
                                                       poolUuid: str) -> PoolReply:
        return await self._update_pool(params, poolUuid, None)

    @update_ceph_primary_storage_pool_by_uuid.check
    async def _update_pool_check2(self, params, poolUuid: str) -> None:
        self._pool_rec(poolUuid)

    # --- RBD volumes ---------------------------------------------------------------------

    def _storage_pools(self, uuid: str) -> list[str]:
        return [p["poolName"] for p in self.store.pools_of(uuid)]

    def _volume_pool(self, s: dict, pool_name: str | None, typ: str = "Data") -> str:
        if pool_name is None:
            return s["rootVolumePoolName"] if typ == "Root" else s["dataVolumePoolName"]
        if pool_name not in self._storage_pools(s["uuid"]):
            raise bad(f"pool {pool_name} is not a pool of Ceph primary storage {s['uuid']}: "
                      f"use one of {', '.join(self._storage_pools(s['uuid']))} or add it first")
        return pool_name

    async def _volume(self, uuid: str, volume_uuid: str) -> tuple[str, str, dict | None]:
        """(pool, image, record) of a volume: its record, else an image of that name in the
        storage's pools."""
        rec = self.store.volumes.get(volume_uuid)
        if rec is not None and rec["storageUuid"] == uuid:
            return rec["poolName"], rec["name"], rec
        if not models_name_ok(volume_uuid):
            raise not_found(f"no volume {volume_uuid[:64]} in Ceph primary storage {uuid}")
        pool = await self.ceph(uuid, rbdvols.find, self._storage_pools(uuid), volume_uuid,
                               what=f"looking for volume {volume_uuid}")
        if pool is None:
            raise not_found(f"no volume {volume_uuid} in Ceph primary storage {uuid}")
        rec = next((v for v in self.store.volumes.values() if v["storageUuid"] == uuid
                    and v["poolName"] == pool and v["name"] == volume_uuid), None)
        return pool, volume_uuid, rec

    def _volume_inventory(self, uuid: str, info: dict[str, Any], vol_uuid: str | None = None) -> VolumeInventory:
        if vol_uuid is None:
            vol_uuid = next((v["uuid"] for v in self.store.volumes.values()
                             if v["storageUuid"] == uuid and v["poolName"] == info["poolName"]
                             and v["name"] == info["name"]), info["name"])
        return VolumeInventory.model_validate(dict(info, uuid=vol_uuid, primaryStorageUuid=uuid))

    @query(PSU + "/volumes", model=VolumeInventory)
    async def query_ceph_volumes(self, uuid: str) -> list:
        """The RBD images in the storage's pools."""
        self._storage(uuid, PRIMARY)
        names = self._storage_pools(uuid)

        def work(r: Any) -> list[dict]:
            out = []
            for pool in names:
                try:
                    out += rbdvols.list_pool(r, pool)
                except errors.NotFound:
                    continue
            return out
        infos = await self.ceph(uuid, work, what=f"listing the volumes of {uuid}")
        return [self._volume_inventory(uuid, i) for i in infos]

    @get(PSU + "/volumes/{volumeUuid}", result=VolumeReply)
    async def get_ceph_volume(self, uuid: str, volumeUuid: str) -> VolumeReply:
        """A volume's info: size, allocated bytes, features, parent, snapshots and clones."""
        self._storage(uuid, PRIMARY)
        pool, name, rec = await self._volume(uuid, volumeUuid)
        info = await self.ceph(uuid, rbdvols.info, pool, name, True, what=f"reading {pool}/{name}")
        return VolumeReply(inventory=self._volume_inventory(uuid, info, rec["uuid"] if rec else None))

    @create(PSU + "/volumes", params=CreateVolume, result=VolumeReply)
    async def create_ceph_volume(self, job, params: CreateVolume, uuid: str) -> VolumeReply:
        """An empty RBD image in the data pool (or the root pool, or a named pool)."""
        s = self._storage(uuid, PRIMARY)
        pool = self._volume_pool(s, params.pool_name, params.type)
        vol_uuid = params.resource_uuid
        name = params.name or vol_uuid
        async with self.locks[("volume", uuid, pool, name)]:
            if vol_uuid in self.store.volumes:
                raise conflict(f"a volume {vol_uuid} already exists")
            info = await self.ceph(uuid, rbdvols.create, pool, name, params.size,
                                   what=f"creating {pool}/{name}")
            now = _now()
            await self.store.put("volumes", vol_uuid, uuid, {
                "uuid": vol_uuid, "storageUuid": uuid, "poolName": pool, "name": name,
                "createDate": now, "lastOpDate": now})
        return VolumeReply(inventory=self._volume_inventory(uuid, info, vol_uuid))

    @create_ceph_volume.check
    async def _create_volume_check(self, params: CreateVolume, uuid: str) -> None:
        s = self._storage(uuid, PRIMARY)
        self._volume_pool(s, params.pool_name, params.type)

    @create_ceph_volume.exists
    async def _volume_uuid_used(self, new_uuid: str, uuid: str) -> bool:
        return new_uuid in self.store.volumes

    @delete(PSU + "/volumes/{volumeUuid}", params=DeleteVolumeQuery, result=Deleted)
    async def delete_ceph_volume(self, job, params, uuid: str, volumeUuid: str) -> Deleted:
        """Delete the image; refused with snapshots or clones unless ?force=true."""
        force = bool(params and params.force)
        pool, name, rec = await self._volume(uuid, volumeUuid)
        async with self.locks[("volume", uuid, pool, name)]:
            await self.ceph_long(uuid, job, rbdvols.remove, pool, name, force,
                                 what=f"deleting {pool}/{name}", message=f"deleting {pool}/{name}")
            if rec is not None:
                await self.store.remove("volumes", [rec["uuid"]])
        return Deleted(uuid=volumeUuid)

    @delete_ceph_volume.check
    async def _delete_volume_check(self, params, uuid: str, volumeUuid: str) -> None:
        self._storage(uuid, PRIMARY)
        if params and params.force:
            return
        pool, name, _ = await self._volume(uuid, volumeUuid)
        snaps, kids = await self.ceph(uuid, rbdvols.blockers, pool, name,
                                      what=f"reading {pool}/{name}")
        if snaps:
            extra = f" and clones ({', '.join(kids)})" if kids else ""
            raise conflict(f"volume {pool}/{name} has snapshots ({', '.join(snaps)}){extra}: "
                           "delete them first, or pass force=true")

    async def _volume_op(self, job: Any, uuid: str, volume_uuid: str, what: str,
                         fn: Callable[..., Any], *args: Any, long: bool = False) -> VolumeReply:
        pool, name, rec = await self._volume(uuid, volume_uuid)
        async with self.locks[("volume", uuid, pool, name)]:
            if long:
                info = await self.ceph_long(uuid, job, fn, pool, name, *args,
                                            what=f"{what} {pool}/{name}", message=f"{what} {pool}/{name}")
            else:
                info = await self.ceph(uuid, fn, pool, name, *args, what=f"{what} {pool}/{name}")
        return VolumeReply(inventory=self._volume_inventory(uuid, info, rec["uuid"] if rec else None))

    VOL = PSU + "/volumes/{volumeUuid}/actions"

    @action(VOL, "resizeVolume", params=ResizeVolume, result=VolumeReply)
    async def resize_ceph_volume(self, job, params: ResizeVolume, uuid: str, volumeUuid: str):
        """Grow (or, with allowShrink, shrink) the image."""
        return await self._volume_op(job, uuid, volumeUuid, "resizing", rbdvols.resize,
                                     params.size, params.allow_shrink, long=True)

    @action(VOL, "createVolumeSnapshot", params=CreateSnapshot, result=VolumeReply)
    async def create_ceph_volume_snapshot(self, job, params: CreateSnapshot, uuid: str, volumeUuid: str):
        return await self._volume_op(job, uuid, volumeUuid, "snapshotting", rbdvols.snap_create,
                                     params.snapshot_name, params.protect)

    @action(VOL, "deleteVolumeSnapshot", params=DeleteSnapshot, result=VolumeReply)
    async def delete_ceph_volume_snapshot(self, job, params: DeleteSnapshot, uuid: str, volumeUuid: str):
        """Refused while protected or cloned unless force (which flattens the clones)."""
        return await self._volume_op(job, uuid, volumeUuid, "deleting a snapshot of",
                                     rbdvols.snap_delete, params.snapshot_name, params.force, long=True)

    @action(VOL, "protectVolumeSnapshot", params=SnapshotParams, result=VolumeReply)
    async def protect_ceph_volume_snapshot(self, job, params: SnapshotParams, uuid: str, volumeUuid: str):
        return await self._volume_op(job, uuid, volumeUuid, "protecting a snapshot of",
                                     rbdvols.snap_protect, params.snapshot_name, True)

    @action(VOL, "unprotectVolumeSnapshot", params=SnapshotParams, result=VolumeReply)
    async def unprotect_ceph_volume_snapshot(self, job, params: SnapshotParams, uuid: str, volumeUuid: str):
        return await self._volume_op(job, uuid, volumeUuid, "unprotecting a snapshot of",
                                     rbdvols.snap_protect, params.snapshot_name, False)

    @action(VOL, "rollbackVolumeSnapshot", params=SnapshotParams, result=VolumeReply)
    async def rollback_ceph_volume_snapshot(self, job, params: SnapshotParams, uuid: str, volumeUuid: str):
        return await self._volume_op(job, uuid, volumeUuid, "rolling back", rbdvols.snap_rollback,
                                     params.snapshot_name, long=True)

    @action(VOL, "flattenVolume", params=Empty, result=VolumeReply)
    async def flatten_ceph_volume(self, job, params: Empty, uuid: str, volumeUuid: str):
        """Copy the parent's data into the clone and cut it loose (progress reported)."""
        return await self._volume_op(job, uuid, volumeUuid, "flattening", rbdvols.flatten, long=True)

    @action(VOL, "getVolumeInfo", params=Empty, result=VolumeReply)
    async def ceph_volume_info_action(self, job, params: Empty, uuid: str, volumeUuid: str):
        """The volume's info as an action (the same as GET .../volumes/{volumeUuid})."""
        self._storage(uuid, PRIMARY)
        return await self.get_ceph_volume(uuid, volumeUuid)

    @action(VOL, "cloneVolume", params=CloneVolume, result=VolumeReply)
    async def clone_ceph_volume(self, job, params: CloneVolume, uuid: str, volumeUuid: str):
        """A copy-on-write clone of one of the volume's snapshots (protected on the way)."""
        s = self._storage(uuid, PRIMARY)
        pool, name, _ = await self._volume(uuid, volumeUuid)
        dst_pool = self._volume_pool(s, params.pool_name) if params.pool_name else pool
        vol_uuid = params.volume_uuid or _new_uuid()
        dst_name = params.name or vol_uuid
        if vol_uuid in self.store.volumes:
            raise conflict(f"a volume {vol_uuid} already exists")
        async with self.locks[("volume", uuid, pool, name)]:
            info = await self.ceph(uuid, rbdvols.clone, pool, name, params.snapshot_name, dst_pool,
                                   dst_name, what=f"cloning {pool}/{name}@{params.snapshot_name}")
        now = _now()
        await self.store.put("volumes", vol_uuid, uuid, {
            "uuid": vol_uuid, "storageUuid": uuid, "poolName": dst_pool, "name": dst_name,
            "createDate": now, "lastOpDate": now})
        return VolumeReply(inventory=self._volume_inventory(uuid, info, vol_uuid))

    for _m in (resize_ceph_volume, create_ceph_volume_snapshot, delete_ceph_volume_snapshot,
               protect_ceph_volume_snapshot, unprotect_ceph_volume_snapshot,
               rollback_ceph_volume_snapshot, flatten_ceph_volume, ceph_volume_info_action):
        @_m.check
        async def _volume_action_check(self, params, uuid: str, volumeUuid: str) -> None:
            self._storage(uuid, PRIMARY)

    @clone_ceph_volume.check
    async def _clone_check(self, params: CloneVolume, uuid: str, volumeUuid: str) -> None:
        s = self._storage(uuid, PRIMARY)
        if params.pool_name:
            self._volume_pool(s, params.pool_name)
        if params.volume_uuid and params.volume_uuid in self.store.volumes:
            raise conflict(f"a volume {params.volume_uuid} already exists")

    del _m, _volume_action_check

    # --- backup storage --------------------------------------------------------------------

    @create(BS, params=AddCephBackupStorage, result=BackupReply)
    async def add_ceph_backup_storage(self, job, params: AddCephBackupStorage) -> BackupReply:
        """AddCephBackupStorage: connect, check the key, create the pool if missing."""
        return self._reply(await self._register(job, params, BACKUP))

    @add_ceph_backup_storage.check
    async def _add_backup_check(self, params: AddCephBackupStorage) -> None:
        await self._check_registration(params)

    @add_ceph_backup_storage.exists
    async def _backup_uuid_used(self, new_uuid: str) -> bool:
        # any storage of this node, of either category and any plugin (the core's registry)
        return self.agent.storage_kinds.holder(new_uuid) is not None

    @query(BS, model=CephBackupStorageInventory)
    async def query_ceph_backup_storage(self) -> list:
        """QueryCephBackupStorage."""
        return [self.inventory(s) for s in self.store.storages.values() if s["kind"] == BACKUP]

    @get(BSU, result=BackupReply)
    async def get_ceph_backup_storage(self, uuid: str) -> BackupReply:
        return self._reply(self._storage(uuid, BACKUP))

    @delete(BSU, result=Deleted)
    async def delete_ceph_backup_storage(self, job, params, uuid: str) -> Deleted:
        """Forget the storage (its pool and images stay in the cluster)."""
        return await self._unregister(uuid)

    @delete_ceph_backup_storage.check
    async def _delete_backup_check(self, params, uuid: str) -> None:
        self._storage(uuid, BACKUP)

    @get(BSU + "/capacity", result=Capacity)
    async def ceph_backup_storage_capacity(self, uuid: str) -> Capacity:
        return await self._capacity(uuid, BACKUP)

    @action(BSU + "/actions", "reconnectBackupStorage", params=Empty, result=BackupReply)
    async def reconnect_ceph_backup_storage(self, job, params: Empty, uuid: str) -> BackupReply:
        return await self._reconnect(uuid, BACKUP)

    @reconnect_ceph_backup_storage.check
    async def _reconnect_backup_check(self, params, uuid: str) -> None:
        self._storage(uuid, BACKUP)

    @query(BSU + "/mons", model=MonInventory)
    async def query_ceph_backup_storage_mons(self, uuid: str) -> list:
        return await self._list_mons(uuid, BACKUP)

    @create(BSU + "/mons", params=AddMons, result=BackupReply)
    async def add_mon_to_ceph_backup_storage(self, job, params: AddMons, uuid: str):
        """AddMonToCephBackupStorage."""
        return await self._add_mons(job, uuid, BACKUP, params)

    @add_mon_to_ceph_backup_storage.check
    async def _add_mon_backup_check(self, params: AddMons, uuid: str) -> None:
        await self._check_add_mons(uuid, BACKUP, params)

    @delete(BSU + "/mons", params=RemoveMonsQuery, result=BackupReply)
    async def remove_mon_from_ceph_backup_storage(self, job, params: RemoveMonsQuery, uuid: str):
        """RemoveMonFromCephBackupStorage (?monHostnames=a,b)."""
        return await self._remove_mons(uuid, BACKUP, params)

    @remove_mon_from_ceph_backup_storage.check
    async def _remove_mon_backup_check(self, params: RemoveMonsQuery, uuid: str) -> None:
        self._storage(uuid, BACKUP)
        self._pick_mons(uuid, BACKUP, params.mon_hostnames)

    @action(BSU + "/mons/{monUuid}/actions", "updateCephBackupStorageMon", params=UpdateMon,
            result=BackupReply)
    async def update_ceph_backup_storage_mon(self, job, params: UpdateMon, uuid: str, monUuid: str):
        return await self._update_mon(job, monUuid, BACKUP, params, uuid)

    @update_ceph_backup_storage_mon.check
    async def _update_mon_backup_check(self, params, uuid: str, monUuid: str) -> None:
        self._storage(uuid, BACKUP)
        self._mon_owner(monUuid, BACKUP, uuid)

    @action(BS + "/mons/{monUuid}/actions", "updateCephBackupStorageMon", params=UpdateMon,
            result=BackupReply)
    async def update_ceph_backup_storage_mon_by_uuid(self, job, params: UpdateMon, monUuid: str):
        """The manual's path of UpdateCephBackupStorageMon."""
        return await self._update_mon(job, monUuid, BACKUP, params)

    @update_ceph_backup_storage_mon_by_uuid.check
    async def _update_mon_backup_check2(self, params, monUuid: str) -> None:
        self._mon_owner(monUuid, BACKUP)

    # --- backup images ---------------------------------------------------------------------

    def _image(self, uuid: str, image_uuid: str) -> dict[str, Any]:
        self._storage(uuid, BACKUP)
        rec = self.store.images.get((uuid, image_uuid))
        if rec is None:
            raise not_found(f"no image {image_uuid[:64]} in Ceph backup storage {uuid}")
        return rec

    def _image_inventory(self, rec: dict[str, Any]) -> ImageInventory:
        return ImageInventory.model_validate({k: v for k, v in rec.items() if k != "storageUuid"})

    @query(BSU + "/images", model=ImageInventory)
    async def query_ceph_backup_images(self, uuid: str) -> list:
        """The images imported into (or migrated to) this backup storage."""
        self._storage(uuid, BACKUP)
        return [self._image_inventory(r) for (s, _), r in self.store.images.items() if s == uuid]

    @get(BSU + "/images/{imageUuid}", result=ImageReply)
    async def get_ceph_backup_image(self, uuid: str, imageUuid: str) -> ImageReply:
        return ImageReply(inventory=self._image_inventory(self._image(uuid, imageUuid)))

    @create(BSU + "/images", params=AddImage, result=ImageReply)
    async def add_ceph_backup_image(self, job, params: AddImage, uuid: str) -> ImageReply:
        """Download an image (http/https, checksum checked) into the pool as raw RBD."""
        s = self._storage(uuid, BACKUP)
        image_uuid = params.resource_uuid
        key = (uuid, image_uuid)
        if key in self.store.images:
            raise conflict(f"image {image_uuid} already exists in Ceph backup storage {uuid}")
        now = _now()
        pool = s["poolName"]
        rec = {"uuid": image_uuid, "storageUuid": uuid, "backupStorageUuid": uuid,
               "name": params.name, "poolName": pool, "installPath": f"ceph://{pool}/{image_uuid}",
               "url": backup.public_url(params.url), "size": None, "actualSize": None,
               "format": "raw", "originalFormat": None, "md5sum": None, "checksum": None,
               "status": "Downloading", "createDate": now, "lastOpDate": now}
        await self.store.put_image(uuid, rec)
        spool = self.tmp_dir / f"import-{image_uuid}-{os.getpid()}"
        state: dict[str, Any] = {}
        try:
            rec = await self._import(job, s, rec, params, spool, state)
        except BaseException:
            await self.store.remove_image(uuid, image_uuid)
            await self._cleanup_import(uuid, pool, image_uuid, spool, bool(state.get("wrote")))
            raise
        finally:
            await self.runner.call(_unlink, spool, spool.with_suffix(".conf"), timeout=10)
        await self.store.put_image(uuid, rec)
        log.info("Ceph backup storage %s: imported image %s from %s (%s, %s bytes)", uuid,
                 image_uuid, rec["url"], rec["originalFormat"], rec["size"])
        return ImageReply(inventory=self._image_inventory(rec))

    @add_ceph_backup_image.exists
    async def _image_uuid_used(self, new_uuid: str, uuid: str) -> bool:
        return (uuid, new_uuid) in self.store.images

    @add_ceph_backup_image.check
    async def _add_image_check(self, params: AddImage, uuid: str) -> None:
        self._storage(uuid, BACKUP)
        if params.md5sum and params.checksum:
            raise bad("give md5sum or checksum, not both")

    async def _cleanup_import(self, uuid: str, pool: str, name: str, spool: Path,
                              wrote_image: bool) -> None:
        if wrote_image:
            try:
                await self.ceph(uuid, rbdvols.remove, pool, name, True, Progress(None),
                                what=f"removing the partial image {pool}/{name}",
                                timeout=self.conf.long_op_timeout)
            except errors.ApiError as e:
                if e.code != "CEPH.1004":
                    log.warning("the partial image %s/%s could not be removed: %s", pool, name,
                                e.description)

    async def _import(self, job: Any, s: dict, rec: dict, params: AddImage, spool: Path,
                      state: dict[str, Any]) -> dict:
        uuid, pool, name = s["uuid"], s["poolName"], rec["uuid"]
        conn = self._conn(uuid)
        loop = asyncio.get_running_loop()
        progress = Progress(job, loop)
        algo, hasher, expected = backup.new_hasher(params.checksum, params.md5sum)
        feed = backup._Feed(loop)
        deadline = time.monotonic() + params.timeout
        shown = backup.public_url(params.url)

        exists = await self.ceph(uuid, rbdvols.exists, pool, name, what=f"checking {pool}/{name}")
        if exists:
            raise conflict(f"an RBD image {pool}/{name} already exists (left by an earlier "
                           "import?): delete it first")

        async def first(head: bytes, length: int | None) -> asyncio.Future:
            is_qcow2 = head[:4] == backup.QCOW2_MAGIC
            if params.format == "qcow2" and not is_qcow2:
                raise failed(f"{shown} is not a qcow2 image (no qcow2 header)", code="CEPH.1522")
            fmt = "qcow2" if params.format == "qcow2" or (params.format == "auto" and is_qcow2) else "raw"
            state["format"] = fmt
            remaining = max(deadline - time.monotonic(), 1)
            if fmt == "raw":
                state["wrote"] = True
                what = f"writing {pool}/{name}"
                fut = asyncio.ensure_future(self.bulk_call(
                    conn, backup.rbd_sink, conn, pool, name, length, feed, hasher, progress,
                    self.guard(conn, what=what), what=what, timeout=remaining))
            else:
                await self.runner.call(self.tmp_dir.mkdir, parents=True, exist_ok=True, timeout=10)
                free = (await self.runner.call(shutil.disk_usage, self.tmp_dir, timeout=10)).free
                if length is not None and length + (256 << 20) > free:
                    raise failed(f"{shown} is {length} bytes and {self.tmp_dir} (download_dir, "
                                 f"where qcow2 images are spooled) has {free} bytes free",
                                 code="CEPH.1523")
                # in the cluster's bulk pool: the thread is held for the whole download
                fut = asyncio.ensure_future(self.raw_call(
                    str(spool), backup.file_sink, spool, feed, hasher, progress,
                    what=f"spooling {shown}", timeout=remaining, runner=self._bulk_runner(conn)))
            state["worker"] = fut
            feed.worker = fut
            return fut

        async def watch() -> None:
            # Ends the import as soon as the cluster is known down or the sink failed, not
            # when a stalled upstream sends its next byte (sock_read timeout: a minute).
            while True:
                await asyncio.sleep(0.5)
                self._fail_if_down(conn, f"importing {shown} into {pool}/{name}")
                worker = state.get("worker")
                if worker is not None and worker.done():
                    worker.result()
                    raise failed("the import stopped before the download ended")

        dl_progress = Progress(job, loop, 0, 100, f"downloading {shown}")
        dl = asyncio.ensure_future(backup.download(
            params.url, feed=feed, first=first, progress=dl_progress, timeout=params.timeout,
            verify_tls=self.conf.verify_tls))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait([dl, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not dl.done():
                dl.cancel()
                watcher.result()            # raises why
            watcher.cancel()
            got = dl.result()
            await feed.put(None)
            result = await state["worker"]
        except BaseException:
            dl.cancel()
            watcher.cancel()
            progress.cancel()
            feed.abort.set()
            worker = state.get("worker")
            if worker is not None:
                # A sink sees the abort within 0.5 s.  One inside a librbd call on a dead
                # cluster (up to a few rados_osd_op_timeout) is left to end in that
                # cluster's own bulk pool: the job does not wait for it.
                await asyncio.wait([worker], timeout=2)
                worker.add_done_callback(_retrieve)
            raise
        digest = hasher.hexdigest()
        if expected and digest != expected:
            raise failed(f"the checksum of {shown} does not match: expected {algo} {expected}, "
                         f"got {digest}; the image was not kept", code="CEPH.1521")
        size = result["size"]
        if state["format"] == "qcow2":
            state["wrote"] = True       # qemu-img creates the image
            size = await self._convert_qcow2(job, s, spool, pool, name, deadline)
        return dict(rec, size=size, actualSize=got, originalFormat=state["format"],
                    md5sum=digest if algo == "md5" else None, checksum=f"{algo}:{digest}",
                    status="Ready", lastOpDate=_now())

    async def _convert_qcow2(self, job: Any, s: dict, spool: Path, pool: str, name: str,
                             deadline: float) -> int:
        job.progress(70, "checking the qcow2 image")
        out = await self.runner.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(spool)],
                                    timeout=60)
        if out.returncode != 0:
            raise failed("the downloaded file is not a usable qcow2 image",
                         code="CEPH.1522", details=out.stderr[-2000:].decode(errors="replace"))
        info = backup.parse_qemu_info(out.stdout)
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise failed("qcow2 images with a backing file are not accepted (it would name a "
                         "file on this node); flatten it first", code="CEPH.1522")
        data_file = (((info.get("format-specific") or {}).get("data") or {}).get("data-file"))
        if data_file:
            raise failed("qcow2 images with an external data file are not accepted",
                         code="CEPH.1522")
        size = int(info["virtual-size"])
        conf = spool.with_suffix(".conf")
        recs = self.store.mons_of(s["uuid"])
        await self.runner.call(backup.qemu_conf, conf,
                               mon_host_option([mons.endpoint(m) for m in recs]), s["keyring"],
                               self.timeouts, timeout=10)
        job.progress(75, f"converting qcow2 to raw RBD {pool}/{name}")
        conn = self._conn(s["uuid"])
        self._fail_if_down(conn, f"converting qcow2 to raw RBD {pool}/{name}")
        remaining = max(deadline - time.monotonic(), 1)
        # the cluster's own process slots: converts into a dead cluster hold none of another's
        out = await self._bulk_runner(conn).run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-m", "8", "-W", str(spool),
             backup.rbd_target(pool, name, s["user"], conf)], timeout=remaining)
        if out.returncode != 0:
            raise failed(f"qemu-img could not convert the image into {pool}/{name}",
                         code="CEPH.1510", details=out.stderr[-2000:].decode(errors="replace"))
        job.progress(99, "converted")
        return size

    @delete(BSU + "/images/{imageUuid}", params=DeleteImageQuery, result=Deleted)
    async def delete_ceph_backup_image(self, job, params, uuid: str, imageUuid: str) -> Deleted:
        """Delete the image from the pool (and its export links)."""
        rec = self._image(uuid, imageUuid)
        pool, name = rec["poolName"], rec["uuid"]
        async with self.locks[("image", uuid, imageUuid)]:
            try:
                await self.ceph_long(uuid, job, rbdvols.remove, pool, name, bool(params and params.force),
                                     what=f"deleting image {pool}/{name}", message=f"deleting {pool}/{name}")
            except errors.NotFound:
                pass     # already gone from the pool: forget it anyway
            await self.store.remove_image(uuid, imageUuid)
        return Deleted(uuid=imageUuid)

    @delete_ceph_backup_image.check
    async def _delete_image_check(self, params, uuid: str, imageUuid: str) -> None:
        rec = self._image(uuid, imageUuid)
        if rec.get("status") == "Downloading":
            raise conflict(f"image {imageUuid} is still downloading: cancel its job first")

    IMG = BSU + "/images/{imageUuid}/actions"

    @action(IMG, "exportImageFromBackupStorage", params=ExportImage, result=ExportReply)
    async def export_ceph_backup_image(self, job, params: ExportImage, uuid: str,
                                       imageUuid: str) -> ExportReply:
        """A download URL of the image (raw), served by this agent until it expires."""
        rec = self._image(uuid, imageUuid)
        size = await self.ceph(uuid, lambda r: rbdvols.info(r, rec["poolName"], rec["uuid"])["size"],
                               what=f"reading image {imageUuid}")
        token = pysecrets.token_urlsafe(32)
        expires = time.time() + params.expire_seconds
        await self.store.purge_exports(time.time())
        await self.store.add_export(hashlib.sha256(token.encode()).hexdigest(), uuid, imageUuid,
                                    expires)
        url = f"{self._base_url()}{BS}/{uuid}/exports/{imageUuid}?token={token}"
        return ExportReply(image_url=url, export_md5_sum=rec.get("md5sum") if rec.get("originalFormat") == "raw" else None,
                           expire_date=iso(expires), size=size)

    @action(IMG, "deleteExportedImageFromBackupStorage", params=Empty, result=Deleted)
    async def delete_exported_ceph_backup_image(self, job, params: Empty, uuid: str,
                                                imageUuid: str) -> Deleted:
        """Revoke every export URL of the image."""
        self._image(uuid, imageUuid)
        await self.store.remove_exports(uuid, imageUuid)
        return Deleted(uuid=imageUuid)

    @action(IMG, "migrateImage", params=MigrateImage, result=ImageReply)
    async def migrate_ceph_backup_image(self, job, params: MigrateImage, uuid: str,
                                        imageUuid: str) -> ImageReply:
        """Copy the image to another Ceph backup storage (another pool or cluster), or to
        another kind of backup storage of this node (an image store), found in the core's
        registry."""
        rec = self._image(uuid, imageUuid)
        other = self._other_kind(params.target)
        if other is not None:
            return await self._migrate_to_kind(job, other, params, rec, uuid, imageUuid)
        dst = self._migrate_target(uuid, imageUuid, params)
        src_conn, dst_conn = self._conn(uuid), self._conn(dst["uuid"])
        progress = Progress(job, message=f"copying image {imageUuid}")
        async with self.locks[("image", uuid, imageUuid)]:
            try:
                what = f"migrating image {imageUuid}"
                await self.bulk_call(src_conn, backup.copy_image,
                                     src_conn, rec["poolName"], rec["uuid"], dst_conn,
                                     dst["poolName"], rec["uuid"], progress,
                                     self.guard(src_conn, dst_conn, what=what),
                                     what=what, timeout=self.conf.long_op_timeout, also=dst_conn)
            except BaseException:
                progress.cancel()
                raise
            now = _now()
            new = dict(rec, storageUuid=dst["uuid"], backupStorageUuid=dst["uuid"],
                       poolName=dst["poolName"], installPath=f"ceph://{dst['poolName']}/{rec['uuid']}",
                       createDate=now, lastOpDate=now)
            await self.store.put_image(dst["uuid"], new)
            if params.delete_source:
                await self.ceph_long(uuid, job, rbdvols.remove, rec["poolName"], rec["uuid"], True,
                                     what=f"deleting the source of image {imageUuid}",
                                     message="deleting the source")
                await self.store.remove_image(uuid, imageUuid)
        return ImageReply(inventory=self._image_inventory(new))

    def _other_kind(self, target: str) -> Any:
        """The registry's kind that owns ``target`` when it is not a Ceph backup storage (404
        for a uuid no kind owns), else None.  Never the storage plugin itself: plugins meet
        only in the registry."""
        s = self.store.storages.get(target)
        if s is not None and s["kind"] == BACKUP:
            return None
        kind = self.agent.storage_kinds.owner(BACKUP, target)
        return None if kind.type == "Ceph" else kind

    def _content_sums(self, rec: dict[str, Any]) -> dict[str, str]:
        """The checksum of the bytes an export serves: known when the image came in raw (its
        import hashed exactly those bytes); a qcow2 import hashed the qcow2 file."""
        algo, _, digest = (rec.get("checksum") or "").partition(":")
        if rec.get("originalFormat") == "raw" and algo in ("sha256", "md5") and digest:
            return {algo: digest}
        raise bad(f"image {rec['uuid']} came in as {rec.get('originalFormat')} with "
                  f"{algo or 'no'} checksum: its raw content has no sha256 or md5 to verify at "
                  "another kind of storage; export it and import the URL with a checksum instead")

    async def _migrate_to_kind(self, job, kind: Any, params: MigrateImage, rec: dict[str, Any],
                               uuid: str, image_uuid: str) -> Any:
        """To another kind of backup storage of this node: it downloads a one-off export of
        this agent and verifies the checksum before it lists the image (its import's rule);
        the export is revoked at the end.  The source stays unless deleteSource."""
        sums = self._content_sums(rec)
        token = pysecrets.token_urlsafe(32)
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        async with self.locks[("image", uuid, image_uuid)]:
            await self.store.add_export(token_hash, uuid, image_uuid,
                                        time.time() + self.conf.long_op_timeout)
            try:
                job.progress(0, f"copying into {kind.type} backup storage {params.target}")
                reply = await kind.import_image(job, params.target, {
                    "url": f"{self._base_url(local=True)}{BS}/{uuid}/exports/{image_uuid}"
                           f"?token={token}",
                    "imageUuid": image_uuid, "name": rec.get("name") or "", **sums})
            finally:
                # this export only (the store has no per-token removal: drop it here)
                await self.store.db.execute("DELETE FROM ceph_exports WHERE token_sha256=?",
                                            (token_hash,))
                self.store.exports.pop(token_hash, None)
            if params.delete_source:
                await self.ceph_long(uuid, job, rbdvols.remove, rec["poolName"], rec["uuid"], True,
                                     what=f"deleting the source of image {image_uuid}",
                                     message="deleting the source")
                await self.store.remove_image(uuid, image_uuid)
        return reply

    def _migrate_target(self, uuid: str, image_uuid: str, params: MigrateImage) -> dict[str, Any]:
        dst = self._storage(params.target, BACKUP)
        src = self._storage(uuid, BACKUP)
        if dst["uuid"] == uuid:
            raise bad("the destination is the image's own backup storage")
        if (dst["uuid"], image_uuid) in self.store.images:
            raise conflict(f"image {image_uuid} already exists in Ceph backup storage {dst['uuid']}")
        if dst.get("fsid") == src.get("fsid") and dst["poolName"] == src["poolName"]:
            raise conflict(f"both backup storages use pool {src['poolName']} of the same cluster")
        return dst

    for _m in (export_ceph_backup_image, delete_exported_ceph_backup_image):
        @_m.check
        async def _image_action_check(self, params, uuid: str, imageUuid: str) -> None:
            rec = self._image(uuid, imageUuid)
            if rec.get("status") != "Ready":
                raise conflict(f"image {imageUuid} is {rec.get('status')}, not Ready")

    @migrate_ceph_backup_image.check
    async def _migrate_check(self, params: MigrateImage, uuid: str, imageUuid: str) -> None:
        rec = self._image(uuid, imageUuid)
        if rec.get("status") != "Ready":
            raise conflict(f"image {imageUuid} is {rec.get('status')}, not Ready")
        other = self._other_kind(params.target)
        if other is None:
            self._migrate_target(uuid, imageUuid, params)
            return
        if other.import_image is None:
            raise bad(f"{other.type} backup storage {params.target} takes no images from another "
                      "storage")
        self._content_sums(rec)

    del _m, _image_action_check

    def _base_url(self, local: bool = False) -> str:
        """Where export URLs point: export_base_url, else the listening address; for this
        node itself (local), the listening address or loopback."""
        if self.conf.export_base_url and not local:
            return self.conf.export_base_url.rstrip("/")
        srv = self.agent.config.server
        scheme = "https" if srv.tls_cert else "http"
        host = srv.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if local else _primary_address()
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{srv.port}"

    @raw("GET", BSU + "/exports/{imageUuid}", auth=False)
    async def download_exported_ceph_image(self, request: web.Request) -> web.StreamResponse:
        """An exported image (raw), by the token in its URL; Range requests supported."""
        uuid, image_uuid = request.match_info["uuid"], request.match_info["imageUuid"]
        token = request.query.get("token", "")
        row = self.store.exports.get(hashlib.sha256(token.encode()).hexdigest()) if token else None
        if row is None or row["storageUuid"] != uuid or row["imageUuid"] != image_uuid \
                or row["expires"] < time.time():
            raise not_found("no such export: the link is unknown, revoked or expired")
        rec = self._image(uuid, image_uuid)
        conn = self._conn(uuid)
        reader = backup.ImageReader(conn, rec["poolName"], rec["uuid"])
        size = await self.bulk_call(conn, reader.open, what=f"opening image {image_uuid}")
        pending: deque = deque()
        prepared = False
        try:
            rng = backup.parse_range(request.headers.get("Range"), size)
            if rng == "bad":
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = rng if rng else (0, size - 1)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "Content-Length": str(end - start + 1),
                       "Content-Disposition": f'attachment; filename="{image_uuid}.raw"'}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
            await resp.prepare(request)
            prepared = True
            pos = start

            def schedule() -> None:
                nonlocal pos
                n = min(backup.BLOCK, end + 1 - pos)
                pending.append(asyncio.ensure_future(self.bulk_call(
                    conn, reader.read, pos, n, what=f"reading image {image_uuid}")))
                pos += n
            while pos <= end and len(pending) < 3:
                schedule()
            while pending:
                data = await pending.popleft()
                if pos <= end:
                    schedule()
                await resp.write(data)
            await resp.write_eof()
            return resp
        except errors.ApiError as e:
            if not prepared:
                raise
            log.warning("export of image %s stopped: %s", image_uuid, e.description)
            if request.transport is not None:
                request.transport.close()     # the client sees a short body, not a lie
            return resp
        except ConnectionError:
            log.info("the client of export %s went away", image_uuid)
            return resp
        finally:
            for f in pending:
                f.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            try:
                await self._bulk_runner(conn).call(reader.close, timeout=self.timeouts.call)
            except Exception:
                pass


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a left-behind future's outcome as seen (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def models_name_ok(name: str) -> bool:
    from .models import NAME_RE
    return full_match(NAME_RE, name)


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


def _primary_address() -> str:
    """The address this node uses to reach the outside (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def _register_metrics(plugin: CephPlugin) -> None:
    class Collector:
        def collect(self):
            # Imported on the first scrape (the agent's metrics registry is built then): memory at idle.
            from prometheus_client.core import GaugeMetricFamily
            up = GaugeMetricFamily("node_agent_ceph_storage_connected",
                                   "1 when the Ceph storage's cluster answers", labels=["uuid", "kind"])
            hl = GaugeMetricFamily("node_agent_ceph_storage_health",
                                   "0 HEALTH_OK, 1 HEALTH_WARN, 2 HEALTH_ERR, -1 unknown",
                                   labels=["uuid", "kind"])
            for s in list(plugin.store.storages.values()):
                up.add_metric([s["uuid"], s["kind"]], 1.0 if s.get("status") == health.CONNECTED else 0.0)
                hl.add_metric([s["uuid"], s["kind"]],
                              {"HEALTH_OK": 0.0, "HEALTH_WARN": 1.0, "HEALTH_ERR": 2.0}.get(s.get("health"), -1.0))
            yield up
            yield hl

    try:
        plugin.agent.metrics.registry.register(Collector())
    except ValueError:
        pass   # registered already (a second lifecycle in one process)
