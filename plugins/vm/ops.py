"""Blocking libvirt calls, each run in a runner thread as fn(virConnect, ...).

Every function here takes the connection first, as LibvirtConnection.call
passes it, and touches one domain (or one bulk call), so a call stuck on one
VM holds only its own thread.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

from agent import errors
from agent.libvirt_conn import libvirt   # loaded before any connection exists

from . import domxml
from .states import state_name
from .stats import STATS_STATE


def _undefine_all() -> int:
    return (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))


def lookup(conn: Any, uuid: str) -> Any:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise errors.NotFound(f"no VM {uuid} on this node", code="VM.1004") from None
        raise


def _uuid(dom: Any) -> str:
    return dom.UUIDString().replace("-", "")


# XML parsing dominates a listing of many domains: parse each distinct XML once.
_parsed: dict[str, tuple[str, dict[str, Any]]] = {}
_parsed_lock = threading.Lock()


def _parse_cached(uuid: str, xml: str) -> dict[str, Any]:
    with _parsed_lock:
        hit = _parsed.get(uuid)
    if hit is not None and hit[0] == xml:
        return hit[1]
    parsed = domxml.parse(xml)
    with _parsed_lock:
        _parsed[uuid] = (xml, parsed)
    return parsed


def forget(uuid: str) -> None:
    with _parsed_lock:
        _parsed.pop(uuid, None)


def _inventory(uuid: str, xml: str, state: int, reason: int, persistent: bool) -> dict[str, Any]:
    inv = {"uuid": uuid}
    inv.update(_parse_cached(uuid, xml))
    name, why = state_name(state, reason)
    inv.update(state=name, stateReason=why, persistent=bool(persistent))
    return inv


def inventory(conn: Any, uuid: str) -> dict[str, Any]:
    dom = lookup(conn, uuid)
    xml = dom.XMLDesc(0)
    state, reason = dom.state()
    return _inventory(uuid, xml, state, reason, dom.isPersistent())


def list_inventories(conn: Any) -> list[dict[str, Any]]:
    """Every domain: one bulk call for the states, one for persistence, one XMLDesc each."""
    states = conn.getAllDomainStats(STATS_STATE, 0)
    persistent = {_uuid(d) for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)}
    out = []
    for dom, st in states:
        uuid = _uuid(dom)
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue      # undefined while we were listing
            raise
        out.append(_inventory(uuid, xml, st.get("state.state", 0), st.get("state.reason", 0),
                              uuid in persistent))
    seen = {i["uuid"] for i in out}
    with _parsed_lock:
        for gone in [u for u in _parsed if u not in seen]:
            del _parsed[gone]        # undefined behind our back
    return out


def all_states(conn: Any) -> dict[str, tuple[str, str]]:
    """uuid -> (name, state name): one bulk call."""
    out = {}
    for dom, st in conn.getAllDomainStats(STATS_STATE, 0):
        out[_uuid(dom)] = (dom.name(), state_name(st.get("state.state", 0),
                                                  st.get("state.reason", 0))[0])
    return out


def status(conn: Any, uuid: str) -> tuple[str, str | None, bool]:
    """(state name, reason, active) of one VM."""
    dom = lookup(conn, uuid)
    state, reason = dom.state()
    name, why = state_name(state, reason)
    return name, why, bool(dom.isActive())


def exists(conn: Any, uuid: str | None, name: str | None) -> str | None:
    """What already uses this uuid or name, or None."""
    if uuid is not None:
        try:
            dom = conn.lookupByUUIDString(uuid)
            return f"a VM with uuid {uuid} already exists (named '{dom.name()}')"
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    if name is None:
        return None
    try:
        dom = conn.lookupByName(name)
        return f"a VM named '{name}' already exists (uuid {_uuid(dom)})"
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    return None


def domain_type(conn: Any, wanted: str) -> tuple[str, str]:
    try:
        return domxml.choose_domain_type(conn.getCapabilities(), domxml.kvm_usable(), wanted)
    except ValueError as e:
        raise errors.OperationFailed(f"cannot define VMs here: {e}", code="VM.1501") from None


def define(conn: Any, uuid: str, name: str, xml: str) -> dict[str, Any]:
    found = exists(conn, uuid, name)      # defineXML would silently redefine a twin
    if found:
        raise errors.Conflict(found, code="VM.1010")
    dom = conn.defineXML(xml)
    return inventory(conn, _uuid(dom))


def start(conn: Any, uuid: str) -> None:
    lookup(conn, uuid).create()


def shutdown(conn: Any, uuid: str) -> None:
    lookup(conn, uuid).shutdown()


def destroy(conn: Any, uuid: str) -> bool:
    """Destroy if running; False when it was not running any more."""
    dom = lookup(conn, uuid)
    try:
        dom.destroy()
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
            return False
        raise
    return True


def suspend(conn: Any, uuid: str) -> None:
    lookup(conn, uuid).suspend()


def resume(conn: Any, uuid: str) -> None:
    lookup(conn, uuid).resume()


def undefine(conn: Any, uuid: str, force: bool) -> None:
    dom = lookup(conn, uuid)
    if dom.isActive():
        if not force:
            raise errors.Conflict(f"VM {uuid} is running: stop it first, or delete with force=true",
                                  code="VM.1009")
        dom.destroy()
        if not dom.isPersistent():
            return        # a transient domain is gone once destroyed
    try:
        dom.undefineFlags(_undefine_all())
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG,
                                      libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
            raise
        dom.undefine()
    forget(uuid)


def migrate(conn: Any, uuid: str, destination: str, params: dict[str, Any], flags: int) -> None:
    lookup(conn, uuid).migrateToURI3(destination, params, flags)


def job_stats(conn: Any, uuid: str) -> dict[str, Any]:
    return lookup(conn, uuid).jobStats()


def abort_job(conn: Any, uuid: str) -> None:
    lookup(conn, uuid).abortJob()


def check_disk_paths(paths: list[str]) -> tuple[list[str], frozenset[str]]:
    """(problems, block device paths) for disk paths that must exist; blocking (stat)."""
    problems, block = [], set()
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            problems.append(f"{p} does not exist")
            continue
        except OSError as e:
            problems.append(f"{p} cannot be read: {e.strerror}")
            continue
        if stat.S_ISBLK(st.st_mode):
            block.add(p)
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"{p} is neither a regular file nor a block device")
    return problems, frozenset(block)
