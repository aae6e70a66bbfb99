#!/usr/bin/env python3
"""Image store benchmarks of issue 12 item 6, against real agent processes on 127.0.0.1.

* ``import``: a 1 GiB image (random data) from a local HTTP server (aiohttp, sendfile) into
  an image store, its sha256 given and verified in the same pass, ``qemu-img
  info``, renamed to ``blobs/<sha256>`` vs ``curl -o`` from the same server.  Target >= 0.8x.
  Then the same content again given its sha256 (no download: target <= 0.05x the first
  import's time) and given only its md5 (downloaded and verified, no new space).
* ``migration``: a 1 GiB image that is half holes (1 MiB of data every 2 MiB) migrated
  between two agents' image stores (migrateImage) vs the volume migration of the same file
  (migrateVolume) vs the bare floor of ``bench/migration_floor.py`` (TCP sendfile + xxh3 at
  both ends, 2 receiver threads), in the same run.  Target >= 0.9x the floor for both.

Everything lives on a tmpfs the bench mounts (not /dev/shm: no allowed root may lie under /dev).  A markdown section is printed and appended to
bench/RESULTS.md (``--no-append`` to skip).

    .venv/bin/python bench/imagestore_bench.py               # both (about 2 minutes)
    .venv/bin/python bench/imagestore_bench.py import --rounds 1 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402
from benchlib import fill_half_holes  # noqa: E402
from migration_floor import run_tcp  # noqa: E402
from storage_bench import AgentProcess  # noqa: E402  (tests/ is on the path from here)
from storage_bench import (GIB, MIB, RESULTS, SERVER, busy_cpu, call, free_port, machine,  # noqa: E402
                           migrate_volume, rate, volume_pair, warm)


def new_agent(base: Path, name: str) -> AgentProcess:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    # a long start-up allowance: a shared, loaded machine starts Python slowly
    return AgentProcess(d, {"log": {"level": "WARNING"}}).start(timeout=120)


def uid() -> str:
    return os.urandom(16).hex()


def blob_bytes(root: Path) -> int:
    d = root / "blobs"
    return sum(f.stat().st_blocks * 512 for f in d.iterdir() if not f.name.startswith("."))


async def store(http, agent, root: Path) -> str:
    u = uid()
    status, body = await call(http, agent, "POST", "/v1/backup-storage/image-store",
                              {"params": {"uuid": u, "url": str(root)}})
    assert status == 200, body
    return u


async def bench_import(base: Path, rounds: int) -> list[str]:
    www = base / "www"
    www.mkdir(parents=True)
    img = www / "image.raw"
    with open(img, "wb") as f:
        block = os.urandom(8 * MIB)
        for i in range(GIB // (8 * MIB)):
            f.write(hashlib.sha256(str(i).encode()).digest() + block[32:])
    data = img.read_bytes()
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    del data
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(www), str(port)])
    a = new_agent(base, "imp")
    res: dict[str, list[float]] = {"agent": [], "curl": [], "by-sha256": [], "by-md5-again": []}
    space: list[tuple[int, int]] = []
    try:
        for _ in range(100):
            if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode != 7:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/image.raw"
        async with aiohttp.ClientSession() as http:
            bs = await store(http, a, base / "store")
            for _ in range(rounds):
                warm(img)
                first = uid()
                t0 = time.monotonic()
                status, body = await call(http, a, "POST", f"/v1/backup-storage/{bs}/images",
                                          {"params": {"imageUuid": first, "url": url, "sha256": sha}})
                res["agent"].append(time.monotonic() - t0)
                assert status == 200 and body["inventory"]["sha256"] == sha, body
                used = blob_bytes(base / "store")
                # the same content given its sha256: answered from the store
                t0 = time.monotonic()
                status, body = await call(http, a, "POST", f"/v1/backup-storage/{bs}/images",
                                          {"params": {"url": url, "sha256": sha}})
                res["by-sha256"].append(time.monotonic() - t0)
                assert status == 200, body
                second = body["inventory"]["uuid"]
                # given only the md5: downloaded and verified, no new space
                t0 = time.monotonic()
                status, body = await call(http, a, "POST", f"/v1/backup-storage/{bs}/images",
                                          {"params": {"url": url, "md5sum": md5}})
                res["by-md5-again"].append(time.monotonic() - t0)
                assert status == 200, body
                space.append((used, blob_bytes(base / "store")))
                for im in (first, second, body["inventory"]["uuid"]):
                    await call(http, a, "DELETE", f"/v1/backup-storage/{bs}/images/{im}")
                status, body = await call(http, a, "PUT", f"/v1/backup-storage/{bs}/actions",
                                          {"reclaimSpaceFromImageStore": {}})
                assert status == 200 and body["reclaimedBytes"] > 0, body
                warm(img)
                out = base / "curl.out"
                t0 = time.monotonic()
                subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
                res["curl"].append(time.monotonic() - t0)
                assert hashlib.md5(out.read_bytes()).hexdigest() == md5
                out.unlink()
    finally:
        a.stop()
        server.terminate()
        server.wait(10)
    med = {k: statistics.median(v) for k, v in res.items()}
    lines = ["| contender | median s | MiB/s | runs (s) |", "|---|---:|---:|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {med[k]:.3f} | {rate(GIB, med[k]):.0f} | "
                     f"{' / '.join(f'{x:.3f}' for x in v)} |")
    ratio = med["curl"] / med["agent"]
    dedup = med["by-sha256"] / med["agent"]
    grew = max(after - before for before, after in space)
    lines += ["",
              f"- first import vs curl: **{ratio:.2f}x** (target >= 0.8: "
              f"{'met' if ratio >= 0.8 else '**MISSED**'}); the agent verifies the given sha256 in the "
              "same pass (an md5 too when one is given, in a second thread), runs `qemu-img info` and renames into `blobs/<sha256>`; "
              "curl only writes (its file's md5 is checked outside the timing).",
              f"- same content given its sha256: **{dedup:.3f}x** the first import's time (target "
              f"<= 0.05: {'met' if dedup <= 0.05 else '**MISSED**'}); nothing downloaded.",
              f"- same content given only its md5: downloaded and verified again, the store's blob "
              f"bytes grew by **{grew}** (target 0: {'met' if grew == 0 else '**MISSED**'})."]
    return lines


async def bench_migration(base: Path, rounds: int) -> list[str]:
    a, b = new_agent(base, "mig-a"), new_agent(base, "mig-b")
    src_file = base / "files" / "half-holes.raw"
    src_file.parent.mkdir(parents=True)
    fill_half_holes(src_file, GIB)
    digest = hashlib.sha256(src_file.read_bytes()).hexdigest()
    res: dict[str, list[float]] = {"image": [], "volume": [], "floor": []}
    cpu: dict[str, list[float]] = {k: [] for k in res}
    try:
        async with aiohttp.ClientSession() as http:
            sa, sb = await store(http, a, base / "IA"), await store(http, b, base / "IB")
            im = uid()
            status, body = await call(http, a, "POST", f"/v1/backup-storage/{sa}/images",
                                      {"params": {"imageUuid": im, "url": f"file://{src_file}",
                                                  "sha256": digest}})
            assert status == 200, body
            ps, vol, rel = await volume_pair(http, a, b, base, "PA", "PB")
            here, there = (a, "PA"), (b, "PB")
            blob = base / "IA" / "blobs" / digest
            for _ in range(rounds):
                # the image: A -> B, then forgotten and reclaimed at B for the next round
                warm(blob)
                c0, t0 = busy_cpu(), time.monotonic()
                status, body = await call(http, a, "PUT", f"/v1/backup-storage/{sa}/images/{im}/actions",
                                          {"migrateImage": {"destination": {
                                              "url": b.url, "token": b.token, "backupStorageUuid": sb}}})
                res["image"].append(time.monotonic() - t0)
                cpu["image"].append(busy_cpu() - c0)
                assert status == 200, body
                await call(http, b, "DELETE", f"/v1/backup-storage/{sb}/images/{im}")
                await call(http, b, "PUT", f"/v1/backup-storage/{sb}/actions", {"reclaimSpaceFromImageStore": {}})
                await asyncio.sleep(0.5)
                # the volume: ping-pong
                src, sname = here
                dst, dname = there
                warm(base / sname / rel)
                c0, t0 = busy_cpu(), time.monotonic()
                status, body = await migrate_volume(http, src, dst, ps[sname], ps[dname], vol)
                res["volume"].append(time.monotonic() - t0)
                cpu["volume"].append(busy_cpu() - c0)
                assert status == 200, body
                here, there = there, here
                await asyncio.sleep(0.5)
                # the floor
                out = base / "floor.raw"
                warm(src_file)
                c0 = busy_cpu()
                wall, _ = run_tcp(src_file, out, 2, True)
                res["floor"].append(wall)
                cpu["floor"].append(busy_cpu() - c0)
                out.unlink()
                await asyncio.sleep(0.3)
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest, "the source changed"
    finally:
        a.stop()
        b.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    lines = ["| contender | median s | MiB/s (1 GiB logical) | runs (s) | throughput vs floor | CPU-s (median) |",
             "|---|---:|---:|---|---:|---:|"]
    for k, v in res.items():
        lines.append(f"| {k} | {med[k]:.2f} | {rate(GIB, med[k]):.0f} | {' / '.join(f'{x:.2f}' for x in v)} | "
                     f"{med['floor'] / med[k]:.2f}x | {statistics.median(cpu[k]):.2f} |")
    lines.append("")
    for k in ("image", "volume"):
        r = med["floor"] / med[k]
        lines.append(f"- {k} migration vs the floor: **{r:.2f}x** (target >= 0.9: "
                     f"{'met' if r >= 0.9 else '**MISSED**'})")
    lines.append(f"- image vs volume migration of the same 1 GiB half-holes file: "
                 f"**{med['volume'] / med['image']:.2f}x** the volume's throughput. The image's blob "
                 "is sparse (zero MiB blocks stay holes at import), so both send 512 MiB of data.")
    lines.append("- floor: `migration_floor.run_tcp` (tcp-2+hash: sendfile, 2 receiver threads, xxh3 "
                 "at both ends, no HTTP, no job); CPU-s: the whole machine's busy time (/proc/stat).")
    return lines


async def main_async(args) -> int:
    load0 = os.getloadavg()[0]
    sections: list[str] = []
    with benchlib.own_tmpfs("imagestore-bench-") as base:
        if args.what in ("all", "import"):
            sections += ["#### Import (1 GiB, local HTTP server)", "", *await bench_import(base / "imp", args.rounds), ""]
        if args.what in ("all", "migration"):
            sections += ["#### Image migration vs volume migration vs the floor (1 GiB, half holes)", "",
                         *await bench_migration(base / "mig", args.rounds), ""]
    head = [f"### Image store, run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
            f"`bench/imagestore_bench.py`, {args.rounds} rounds, medians, on a tmpfs of its own. Machine: "
            f"{machine()}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at the end "
            f"({args.note}).", ""]
    report = "\n".join(head + sections)
    print(report)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + report + "\n")
        print(f"appended to {RESULTS}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "import", "migration"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--note", default="a quiet machine",
                    help="what else ran meanwhile, for the report")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
