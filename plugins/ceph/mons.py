"""Mon endpoints: the ones the agent dials, matched against the live monmap.

``quorum_status`` (one mon command) gives the monmap and the quorum; each
endpoint the agent keeps is matched to a monmap entry by address (its host
resolved, its port if it has one), so every endpoint gets its mon name, whether
it is in the monmap, and whether it is in quorum.
"""

from __future__ import annotations

import socket
from typing import Any

from .cluster import Endpoint, mon_command


def endpoint(rec: dict[str, Any]) -> Endpoint:
    return Endpoint(rec["hostname"], rec.get("monPort"), rec.get("protocol"))


def quorum_status(r: Any) -> dict[str, Any]:
    return mon_command(r, "quorum_status") or {}


def _resolve(host: str) -> set[str]:
    try:
        return {ai[4][0] for ai in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return {host}


def _addrs(mon: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    for a in (mon.get("public_addrs") or {}).get("addrvec", []):
        out.append(_split(a.get("addr", "")))
    if mon.get("addr"):
        out.append(_split(mon["addr"].split("/")[0]))
    return [a for a in out if a[0]]


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    return host, int(port) if port.isdigit() else 0


def match(records: list[dict[str, Any]], qs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """monUuid -> {monName, inMonmap, inQuorum, status} (blocking: resolves host names)."""
    mons = (qs.get("monmap") or {}).get("mons", [])
    quorum = set(qs.get("quorum_names") or [])
    out = {}
    for rec in records:
        ep = endpoint(rec)
        ips = _resolve(ep.host)
        found = None
        for m in mons:
            for host, port in _addrs(m):
                if host in ips and (ep.port is None or ep.port == port):
                    found = m
                    break
            if found:
                break
        if found is None:
            out[rec["monUuid"]] = {"monName": None, "inMonmap": False, "inQuorum": False,
                                   "status": "Disconnected"}
        else:
            inq = found["name"] in quorum
            out[rec["monUuid"]] = {"monName": found["name"], "inMonmap": True, "inQuorum": inq,
                                   "status": "Connected" if inq else "Disconnected"}
    return out


def endpoints_from_monmap(qs: dict[str, Any]) -> list[Endpoint]:
    """One endpoint per mon of a live monmap (for a storage registered by ceph.conf)."""
    out = []
    for m in (qs.get("monmap") or {}).get("mons", []):
        vec = (m.get("public_addrs") or {}).get("addrvec", [])
        pick = next((a for a in vec if a.get("type") == "v2"), vec[0] if vec else None)
        if pick is None:
            continue
        host, port = _split(pick["addr"])
        out.append(Endpoint(host, port or None, pick.get("type") if pick.get("type") in ("v1", "v2") else None))
    return out
