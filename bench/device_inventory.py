#!/usr/bin/env python3
"""Device inventory benchmark: PCI and USB inventory of a generated large host.

The tree comes from tests/sysfs_fixtures.py (``large_host``): 1000 PCI functions
(a host bridge, an xHCI, 8 root ports with an X710 PF each, 976 VFs, each VF in
its own IOMMU group) and 200 USB devices (root hubs, hubs, sticks).  It is
generated once in a temporary directory (on the same filesystem as /tmp).

In-process, with the plugin's own functions:

* **cold**: what the agent does when its cache is empty or stale: read sysfs
  (PCI, USB, IOMMU, the host-critical devices), then the statuses and the
  inventory dicts (``take_snapshot`` + ``build_view``).  "Cold" is the agent's
  cache, not the kernel's: the files are in the page cache, as sysfs always is;
* **cached**: the read path of ``GET /v1/pci-devices`` with a warm cache: the
  cached view's ``FrozenItems.reply``, which runs the query API and the JSON
  encoding on the first read of a view for a query string and keeps the body
  for the next ones (until a rescan or an attach/detach makes a new view).
  Both are measured: "first read" (a fresh ``FrozenItems`` each round, as a new
  view has) and the kept body.

Through HTTP, a real agent on the tree (libvirt unreachable, so no domain reads):

* cold: ``GET /v1/pci-devices?refresh=true`` (rescans before answering);
* cached: ``GET /v1/pci-devices``, and a filtered query and a single device.

Targets: cold <= 50 ms, cached <= 5 ms.  A markdown report is printed and
appended to bench/RESULTS.md (``--no-append`` to skip).

    .venv/bin/python bench/device_inventory.py
    .venv/bin/python bench/device_inventory.py --rounds 5 --requests 20 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import sysfs_fixtures  # noqa: E402
from benchlib import cpu_model, git_head  # noqa: E402
from agent.query import FrozenItems, QuerySpec  # noqa: E402
from plugins.devices import (PciDeviceInventory, UsbDeviceInventory, build_view,  # noqa: E402
                             pci, take_snapshot, usb)

COLD_TARGET_MS = 50.0
CACHED_TARGET_MS = 5.0
PCI_IDS = "/usr/share/misc/pci.ids"


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"min": s[0] * 1e3, "p50": statistics.median(s) * 1e3,
            "p95": s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1e3, "max": s[-1] * 1e3}


def timed(fn, rounds: int) -> dict[str, float]:
    fn()                                        # warm-up (imports, pci.ids, allocator)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return stats(samples)


def in_process(root: str, rounds: int) -> list[tuple[str, dict[str, float], float | None]]:
    pci.pci_ids(PCI_IDS)                        # loaded once per process by the agent too
    rows = []
    rows.append(("PCI sysfs scan (1000 functions)", timed(lambda: pci.scan(root), rounds), None))
    rows.append(("USB sysfs scan (200 devices)", timed(lambda: usb.scan(root), rounds), None))
    rows.append(("cold: scan everything + statuses + inventories",
                 timed(lambda: build_view(take_snapshot(root, PCI_IDS), {}, [], "h"), rounds),
                 COLD_TARGET_MS))
    view = build_view(take_snapshot(root, PCI_IDS), {}, [], "h")
    pspec, uspec = QuerySpec.from_model(PciDeviceInventory), QuerySpec.from_model(UsbDeviceInventory)
    filtered = ("q=driver%3Dvfio-pci&limit=10", {"q": ["driver=vfio-pci"], "limit": ["10"]})
    for label, items, (qs, params), spec in (
            ("PCI list (1000 items)", view.pci_list, ("", {}), pspec),
            ("PCI query q=driver=vfio-pci&limit=10", view.pci_list, filtered, pspec),
            ("USB list (200 items)", view.usb_list, ("", {}), uspec)):
        # The first read of a view renders the body (query API + JSON; no dump(): the
        # inventories are JSON-ready); later reads of the same view reuse it.
        rows.append((f"cached view, first read: {label}, query API + JSON",
                     timed(lambda: FrozenItems(items).reply(qs, params, spec), rounds),
                     CACHED_TARGET_MS))
        rows.append((f"cached: {label}, body kept on the view",
                     timed(lambda: items.reply(qs, params, spec), rounds), CACHED_TARGET_MS))
    return rows


async def over_http(root: str, workdir: Path, requests: int) -> tuple[list, float]:
    import aiohttp
    from agentproc import AgentProcess
    agent = AgentProcess(workdir, {
        "devices": {"sysfs_root": root, "refresh_seconds": 3600},
        "libvirt": {"uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"},
        "log": {"level": "WARNING"}})
    agent.start(timeout=60)
    rows = []
    try:
        async with aiohttp.ClientSession(headers=agent.headers) as http:
            async def measure(path: str, n: int) -> tuple[dict[str, float], int]:
                size = 0
                for _ in range(3):
                    async with http.get(agent.url + path) as r:
                        assert r.status == 200, (path, r.status, await r.text())
                        size = len(await r.read())
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    async with http.get(agent.url + path) as r:
                        await r.read()
                    samples.append(time.perf_counter() - t0)
                return stats(samples), size
            for label, path, target in (
                    ("cold: GET /v1/pci-devices?refresh=true", "/v1/pci-devices?refresh=true",
                     COLD_TARGET_MS),
                    ("cold: GET /v1/usb-devices?refresh=true", "/v1/usb-devices?refresh=true",
                     COLD_TARGET_MS),
                    ("cached: GET /v1/pci-devices (1000 items)", "/v1/pci-devices", CACHED_TARGET_MS),
                    ("cached: GET /v1/pci-devices?q=driver=vfio-pci&limit=10",
                     "/v1/pci-devices?q=driver%3Dvfio-pci&limit=10", CACHED_TARGET_MS),
                    ("cached: GET /v1/pci-devices?fields=pciDeviceAddress,status",
                     "/v1/pci-devices?fields=pciDeviceAddress,status", CACHED_TARGET_MS),
                    ("cached: GET /v1/pci-devices/0000:11:02.0", "/v1/pci-devices/0000:11:02.0",
                     CACHED_TARGET_MS),
                    ("cached: GET /v1/usb-devices (200 items)", "/v1/usb-devices", CACHED_TARGET_MS)):
                st, size = await measure(path, requests)
                rows.append((f"{label} [{size // 1024} KiB]", st, target))
        ready = agent.ready_seconds or 0.0
    finally:
        agent.stop()
    return rows, ready


def table(rows) -> str:
    out = ["| what | min ms | p50 ms | p95 ms | max ms | target | met (p50) |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for label, st, target in rows:
        met = "" if target is None else ("yes" if st["p50"] <= target else "**no**")
        out.append(f"| {label} | {st['min']:.2f} | {st['p50']:.2f} | {st['p95']:.2f} | "
                   f"{st['max']:.2f} | {'' if target is None else f'<= {target:g}'} | {met} |")
    return "\n".join(out)


def machine() -> str:
    cpu = cpu_model()
    # The read path runs through the core too (agent/query.py, agent/server.py).
    commit, dirty = git_head("plugins/devices", "agent")
    if dirty:
        commit += " + uncommitted " + ", ".join(dirty)
    load = os.getloadavg()
    return (f"Machine: nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, Python "
            f"{platform.python_version()}; load average {load[0]:.2f} at start; agent at commit "
            f"{commit}.")


def append(report: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + report + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="in-process repetitions")
    ap.add_argument("--requests", type=int, default=50, help="HTTP requests per URL")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="device-bench-") as tmp:
        root = Path(tmp) / "root"
        t0 = time.perf_counter()
        sysfs_fixtures.large_host(root)
        generated = time.perf_counter() - t0
        head = machine()
        rows = in_process(str(root), args.rounds)
        http_rows, ready = asyncio.run(over_http(str(root), Path(tmp), args.requests))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join([
        f"### Device inventory, run of {now}", "",
        "`bench/device_inventory.py`: the PCI and USB inventory of a generated host with 1000 "
        "PCI functions and 200 USB devices (see the script's docstring), in-process and through "
        "a real agent over HTTP. Targets: cold <= 50 ms, cached <= 5 ms. \"Cold\" is the "
        "agent's cache, not the kernel's: sysfs lives in memory.", "", head + "  ",
        f"Tree generated in {generated:.1f} s. In-process: {args.rounds} rounds after one "
        f"warm-up. HTTP: {args.requests} sequential requests per URL (keep-alive, one client) "
        f"after 3 warm-ups, agent at [log] level WARNING; agent ready in {ready:.2f} s "
        "(includes its first scan).", "",
        "In-process:", "", table(rows), "", "Through HTTP (request to last byte):", "",
        table(http_rows), ""])
    print(report)
    if not args.no_append:
        append(report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
