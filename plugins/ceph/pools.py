"""Pools: list, create, adopt, delete, quotas, capacity.  Blocking; run in runner threads.

Listing is one ``osd pool ls detail`` and capacity one ``df detail``, each a
single mon command through the handle (the mon forwards ``df`` to the mgr):
no CLI is spawned.  Quotas are read from ``osd pool ls detail``, not
``osd pool get-quota``, which answers ENOENT for about a second after a create.
"""

from __future__ import annotations

from typing import Any

from .cluster import CommandFailed, conflict, failed, mon_command, not_found, rbd

ERANGE, ENOENT, EEXIST, EPERM = 34, 2, 17, 1


def ls_detail(r: Any) -> dict[str, dict[str, Any]]:
    """Every pool of the cluster by name, from one command."""
    return {p["pool_name"]: p for p in mon_command(r, "osd pool ls", detail="detail") or []}


def df(r: Any) -> dict[str, Any]:
    return mon_command(r, "df", detail="detail") or {}


def live_fields(detail: dict[str, Any] | None) -> dict[str, Any]:
    """The inventory fields of a pool from its ``osd pool ls detail`` entry."""
    if detail is None:
        return {"exists": False}
    return {"exists": True, "poolId": detail.get("pool_id"), "pgNum": detail.get("pg_num"),
            "replicatedSize": detail.get("size"), "minSize": detail.get("min_size"),
            "quotaBytes": detail.get("quota_max_bytes"),
            "quotaObjects": detail.get("quota_max_objects"),
            "applications": sorted((detail.get("application_metadata") or {}).keys())}


def stats_fields(df_pool: dict[str, Any] | None) -> dict[str, Any] | None:
    if df_pool is None:
        return None
    s = df_pool.get("stats", {})
    return {"stored": int(s.get("stored", s.get("bytes_used", 0))), "objects": int(s.get("objects", 0)),
            "usedBytes": int(s.get("bytes_used", 0)), "maxAvailable": int(s.get("max_avail", 0)),
            "percentUsed": float(s.get("percent_used", 0.0))}


def capacity(d: dict[str, Any], pools: list[dict[str, Any]]) -> dict[str, Any]:
    """Cluster totals and the given pools (records: poolName, uuid, type) from a ``df``."""
    st = d.get("stats", {})
    total, avail = int(st.get("total_bytes", 0)), int(st.get("total_avail_bytes", 0))
    by_name = {p["name"]: p for p in d.get("pools", [])}
    out = []
    for rec in pools:
        p = by_name.get(rec["poolName"])
        entry: dict[str, Any] = {"poolName": rec["poolName"], "poolUuid": rec.get("uuid"),
                                 "type": rec.get("type"), "reported": p is not None}
        if p is not None:
            s = p.get("stats", {})
            entry.update(stats_fields(p) or {})
            entry["quotaBytes"] = s.get("quota_bytes")
            entry["quotaObjects"] = s.get("quota_objects")
        out.append(entry)
    return {"totalCapacity": total, "availableCapacity": avail,
            "totalPhysicalCapacity": total, "availablePhysicalCapacity": avail,
            "usedCapacity": int(st.get("total_used_raw_bytes", st.get("total_used_bytes", 0))),
            "pools": out}


def create(r: Any, name: str, pg_num: int | None) -> None:
    """Create a replicated pool for rbd; refuses an existing one."""
    if name in ls_detail(r):
        raise conflict(f"pool {name} already exists in the cluster; add it with "
                       "isCreate=false to use it as it is")
    args: dict[str, Any] = {"pool": name}
    if pg_num:
        args["pg_num"] = pg_num
        args["pgp_num"] = pg_num
    try:
        mon_command(r, "osd pool create", **args)
    except CommandFailed as e:
        if e.ret == -ERANGE:
            raise failed(f"the cluster refused pool {name} with pg_num {pg_num or 'default'}: "
                         f"{e.message}", code="CEPH.1502") from None
        raise
    mon_command(r, "osd pool application enable", pool=name, app="rbd")
    r.wait_for_latest_osdmap()


def ensure(r: Any, name: str, pg_num: int | None, create_missing: bool) -> bool:
    """The pool exists afterwards (created if missing and allowed); True if created."""
    detail = ls_detail(r).get(name)
    if detail is None:
        if not create_missing:
            raise not_found(f"pool {name} does not exist in the cluster (createPools is false)")
        create(r, name, pg_num)
        return True
    adopt_check(name, detail)
    return False


def adopt_check(name: str, detail: dict[str, Any]) -> None:
    apps = set((detail.get("application_metadata") or {}).keys())
    if apps and "rbd" not in apps:
        raise conflict(f"pool {name} is used by {', '.join(sorted(apps))}, not rbd")


def adopt(r: Any, name: str) -> dict[str, Any]:
    detail = ls_detail(r).get(name)
    if detail is None:
        raise not_found(f"pool {name} does not exist in the cluster; add it with isCreate=true "
                        "to create it")
    adopt_check(name, detail)
    if not detail.get("application_metadata"):
        mon_command(r, "osd pool application enable", pool=name, app="rbd")
    return detail


def images(r: Any, name: str) -> list[str]:
    """The RBD images in a pool ([] when the pool does not exist)."""
    try:
        io = r.open_ioctx(name)
    except Exception as e:
        if getattr(e, "errno", None) == ENOENT or type(e).__name__ == "ObjectNotFound":
            return []
        raise
    try:
        return sorted(rbd.RBD().list(io))
    finally:
        io.close()


def delete(r: Any, name: str) -> None:
    try:
        mon_command(r, "osd pool delete", pool=name, pool2=name, yes_i_really_really_mean_it=True)
    except CommandFailed as e:
        if e.ret == -EPERM:
            raise failed(f"the cluster refused to delete pool {name}: {e.message} (set "
                         "mon_allow_pool_delete=true on the mons, or delete with keep=true to "
                         "only forget it)", code="CEPH.1503") from None
        raise


def set_quota(r: Any, name: str, quota_bytes: int | None, quota_objects: int | None) -> None:
    if quota_bytes is not None:
        mon_command(r, "osd pool set-quota", pool=name, field="max_bytes", val=str(quota_bytes))
    if quota_objects is not None:
        mon_command(r, "osd pool set-quota", pool=name, field="max_objects", val=str(quota_objects))

