"""DHCP lease changes -> PxeDhcpLease events.

dnsmasq runs its ``dhcp-script`` (as root, dnsmasq's default) on every lease
add, renewal ("old") and release/expiry ("del").  Our script writes each call
as one small JSON file into the server's spool directory (write, then rename:
never a half-written file); the agent picks the files up in order, publishes
the events and deletes them.  Calls made while the agent was down wait in the
spool.  dnsmasq re-announces every lease as "old" on each SIGHUP; an "old"
that changes nothing is not published again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from agent.runner import Runner
from agent.validation import full_match

log = logging.getLogger("node_agent.baremetal.pxe")

POLL_SECONDS = 0.2
MAX_FILES_PER_POLL = 500

HOOK = '''#!{python} -I
# node-agent: dnsmasq's dhcp-script for PXE server {uuid}.  One JSON file per call.
import json, os, sys, time
SPOOL = {spool!r}
args = sys.argv[1:]
if len(args) >= 3 and args[0] in ("add", "old", "del"):
    env = os.environ
    event = {{"action": args[0], "mac": args[1], "ip": args[2],
             "hostname": args[3] if len(args) > 3 else None,
             "tags": env.get("DNSMASQ_TAGS", ""), "expires": env.get("DNSMASQ_LEASE_EXPIRES"),
             "interface": env.get("DNSMASQ_INTERFACE"), "time": time.time()}}
    name = "%020d-%d" % (time.time_ns(), os.getpid())
    tmp = os.path.join(SPOOL, "." + name)
    with open(tmp, "w") as f:
        json.dump(event, f)
    os.rename(tmp, os.path.join(SPOOL, name + ".json"))
'''

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IP = re.compile(r"^[0-9.]{7,15}$|^[0-9a-f:]{2,39}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


def write_hook(path: Path, spool: Path, uuid: str) -> None:
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(HOOK.format(python=sys.executable, uuid=uuid, spool=str(spool)))
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)


def _clean(ev: dict[str, Any]) -> dict[str, Any] | None:
    """What dnsmasq passed through the client is not trusted: keep only well-formed values."""
    mac = str(ev.get("mac", "")).lower()
    ip = str(ev.get("ip", ""))
    if ev.get("action") not in ("add", "old", "del") or not full_match(_MAC, mac) or not full_match(_IP, ip):
        return None
    host = ev.get("hostname")
    host = host if isinstance(host, str) and full_match(_NAME, host) else None
    tags = set(str(ev.get("tags") or "").split())
    expires = None
    try:
        exp = int(ev.get("expires") or 0)
        if exp > 0:
            expires = datetime.fromtimestamp(exp, timezone.utc).isoformat().replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError):
        pass
    return {"action": ev["action"], "mac": mac, "ip": ip, "hostname": host, "expires": expires,
            "ipxe": "ipxe" in tags, "efi": "efi64" in tags, "reserved": "known" in tags}


def _drain(spool: Path) -> list[dict[str, Any]]:
    """Read and delete the spooled calls, oldest first (runs in a thread)."""
    try:
        names = sorted(n for n in os.listdir(spool) if n.endswith(".json"))[:MAX_FILES_PER_POLL]
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        p = spool / n
        try:
            ev = json.loads(p.read_text(errors="replace"))
        except (OSError, ValueError):
            ev = None
        try:
            p.unlink()
        except OSError:
            pass
        if isinstance(ev, dict) and (clean := _clean(ev)) is not None:
            out.append(clean)
    return out


DRAIN_TIMEOUT = 10.0         # reading the spool of lease events, in the plugin's pool


class LeaseWatcher:
    def __init__(self, server_uuid: str, spool: Path,
                 publish: Callable[[dict[str, Any]], Awaitable[None]], runner: Runner) -> None:
        self.server_uuid = server_uuid
        self.runner = runner              # the plugin's bounded pool: the spool is read there
        self.spool = spool
        self._publish = publish
        self._last: dict[str, tuple] = {}      # mac -> (ip, hostname, expires)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leases-{self.server_uuid}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.poll()       # what dnsmasq reported up to its stop

    async def poll(self) -> None:
        for ev in await self.runner.call(_drain, self.spool, timeout=DRAIN_TIMEOUT):
            key = (ev["ip"], ev["hostname"], ev["expires"])
            if ev["action"] == "old" and self._last.get(ev["mac"]) == key:
                continue          # a re-announcement (SIGHUP), not a change
            if ev["action"] == "del":
                self._last.pop(ev["mac"], None)
            else:
                self._last[ev["mac"]] = key
            try:
                await self._publish(ev)
            except Exception:
                log.exception("PXE server %s: could not publish a lease event", self.server_uuid)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:
                log.exception("PXE server %s: reading lease events failed", self.server_uuid)
            await asyncio.sleep(POLL_SECONDS)


def read_lease_file(path: Path) -> dict[str, str]:
    """dnsmasq's lease file -> mac -> ip (runs in a thread)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and full_match(_MAC, parts[1].lower()):
            out[parts[1].lower()] = parts[2]
    return out
