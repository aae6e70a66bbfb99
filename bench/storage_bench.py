#!/usr/bin/env python3
"""Storage benchmarks of issue 4 item 10, against real agent processes on 127.0.0.1.

* ``migration``: a 1 GiB raw volume that is half holes (1 MiB of data every 2 MiB),
  moved between two agents (migrateVolume, streamed over HTTP, checksum-verified at the
  destination with the default ``migration_checksum``, the destination fsyncs and renames) vs ``cp --sparse=always --reflink=never`` vs rsync
  over ssh on loopback (``rsync -S -W``, our own sshd on a free port).  Targets: agent
  >= 0.8x cp's throughput and >= 1x rsync's.  In the same rounds, the floor of
  ``bench/migration_floor.py`` (tcp-2+hash, on the same file): target >= 0.9x its
  throughput (issue 12).  Each run's machine-wide busy CPU time (/proc/stat) is
  reported, and for the agent and the floor the CPU time of their own processes
  (agents, sender, writer, client / the floor's two processes) with the agent's split.
* ``download``: a 1 GiB image from one local HTTP server (aiohttp, sendfile) into an
  agent's image cache (sha256 verified in the same pass) vs ``curl -o``.  Target >= 0.8x.
* ``hang``: ping p99 while 50 statvfs calls hang: 50 storages on one FUSE filesystem
  (tests/services/hangfs.py) whose statfs blocks, all 50 asked for their capacity at
  once, again and again, while pings run; the agent runs in a private mount namespace.
  Targets: p99 <= 2x idle, no failed ping.

Everything lives on a tmpfs the bench mounts (not /dev/shm: no allowed root may lie under
/dev) so the software path is measured, not the disk;
the page cache is warm for every contender.  Rounds alternate the contenders.  A markdown
section is printed and appended to bench/RESULTS.md (``--no-append`` to skip).

    .venv/bin/python bench/storage_bench.py                  # all three (about 2 minutes)
    .venv/bin/python bench/storage_bench.py migration --rounds 1 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from agentproc import AgentProcess  # noqa: E402
from benchlib import cpu_model, fill_half_holes, git_head, own_tmpfs  # noqa: E402
from migration_floor import run_tcp_split  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
HANGFS = REPO / "tests" / "services" / "hangfs.py"
MIB = 1 << 20
GIB = 1 << 30


# --- small helpers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    cpu, (head, dirty) = cpu_model(), git_head("plugins/storage", "agent")
    return (f"nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}; agent at commit {head}"
            + (" with uncommitted changes" if dirty else ""))


async def call(http, agent, method, path, body=None, timeout=600):
    async with http.request(method, agent.url + path, json=body, headers=agent.headers) as r:
        reply = await r.json()
        if r.status != 202:
            return r.status, reply
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(reply["location"], params={"wait": "10"}, headers=agent.headers) as r:
            if r.status != 202:
                return r.status, await r.json()
    raise RuntimeError(f"{method} {path} did not finish")


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy so far (/proc/stat: all but idle and
    iowait): each contender is charged its processes, threads and kernel work alike."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own CPU seconds, CPU seconds of its reaped children) of a process (/proc/PID/stat):
    an agent's loop, threads and job machinery; its sender or writer once it has exited."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tck, (int(f[13]) + int(f[14])) / tck


def helpers_of(pid: int, marker: bytes) -> list[int]:
    """The child processes of pid whose command line has marker."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid \
                    and marker in (p / "cmdline").read_bytes():
                out.append(int(p.name))
        except (OSError, ValueError):
            pass
    return out


async def wait_gone(pids: list[int], timeout: float) -> None:
    """Until those processes are reaped (their CPU is then in their parent's children's time);
    the sender frees the moved source's blocks after the job's answer."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MIB


def new_agent(base: Path, name: str, storage: dict | None = None, wrapper=None) -> AgentProcess:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return AgentProcess(d, {"log": {"level": "WARNING"}, "storage": storage or {}}, wrapper=wrapper).start()


# --- migration ----------------------------------------------------------------------------------

class Sshd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.key = base / "client_key"
        self.proc = None

    def start(self) -> "Sshd":
        b = self.base
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(b / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        (b / "authorized_keys").write_text((b / "client_key.pub").read_text())
        os.chmod(b / "authorized_keys", 0o600)
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-p", str(self.port), "-h", str(b / "host_key"),
             "-o", f"AuthorizedKeysFile={b / 'authorized_keys'}", "-o", "ListenAddress=127.0.0.1",
             "-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no", "-o", f"PidFile={b / 'sshd.pid'}",
             "-o", "StrictModes=no"], stdout=subprocess.DEVNULL, stderr=open(b / "sshd.log", "wb"))
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def ssh_cmd(self) -> str:
        return (f"ssh -p {self.port} -i {self.key} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


async def volume_pair(http, a, b, base: Path, name_a: str, name_b: str) -> tuple[dict[str, str], str, str]:
    """A local primary storage at base/name_a on agent a and one at base/name_b on b (their
    uuids by name), and a 1 GiB raw volume on a's, 1 MiB of data every 2 MiB: its uuid and path."""
    ps = {}
    for ag, name in ((a, name_a), (b, name_b)):
        u = os.urandom(16).hex()
        status, body = await call(http, ag, "POST", "/v1/primary-storage/local",
                                  {"params": {"uuid": u, "url": str(base / name)}})
        assert status == 200, body
        ps[name] = u
    vol = os.urandom(16).hex()
    status, body = await call(http, a, "POST", f"/v1/primary-storage/{ps[name_a]}/volumes",
                              {"params": {"uuid": vol, "size": GIB, "format": "raw"}})
    assert status == 200, body
    rel = body["inventory"]["path"]
    fill_half_holes(base / name_a / rel, GIB)
    return ps, vol, rel


async def migrate_volume(http, src, dst, ps_src: str, ps_dst: str, vol: str) -> tuple[int, dict]:
    return await call(http, src, "PUT", f"/v1/primary-storage/{ps_src}/volumes/{vol}/actions",
                      {"migrateVolume": {"destination": {"primaryStorageUuid": ps_dst, "url": dst.url,
                                                         "token": dst.token}}})


async def bench_migration(base: Path, rounds: int, rsync: bool = True) -> tuple[list[str], dict]:
    a, b = new_agent(base, "mig-a"), new_agent(base, "mig-b")
    sshd = Sshd(base).start() if rsync and (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) \
        else None
    results: dict[str, list[float]] = {"agent": [], "floor": [], "cp": [], "rsync": []}
    cpu: dict[str, list[float]] = {k: [] for k in results}
    # CPU of the processes that do the work (exact, whatever else runs on the machine):
    # the agent's two agents, their sender/writer/unlink children and this client; the
    # floor's sender and receiver.  parts: the agent's split, per round.
    own: dict[str, list[float]] = {"agent": [], "floor": []}
    parts: list[dict[str, float]] = []
    floor_parts: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession() as http:
            ps, vol, rel = await volume_pair(http, a, b, base, "A", "B")
            digest = hashlib.sha256((base / "A" / rel).read_bytes()).hexdigest()
            here, there = (a, "A"), (b, "B")
            for _ in range(rounds):
                # the agent: here -> there
                src, sname = here
                dst, dname = there
                warm(base / sname / rel)
                senders = helpers_of(src.proc.pid, b"streamio.py\0send")     # the spare it takes
                p0 = {ag: proc_cpu(ag.proc.pid) for ag in (src, dst)}
                k0, c0, t0 = client_cpu(), busy_cpu(), time.monotonic()
                status, body = await migrate_volume(http, src, dst, ps[sname], ps[dname], vol)
                results["agent"].append(time.monotonic() - t0)
                cpu["agent"].append(busy_cpu() - c0)
                kc = client_cpu() - k0
                assert status == 200, body
                # After its job the sender frees the moved source's blocks and the agent starts
                # its next spare helpers (0.2 s later): the first is counted here (the sender
                # once it is reaped), the new spares not (the next migration's start-up; the
                # start-up of the ones this migration used is in their reaped time).
                await wait_gone(senders, 10.0)
                p1 = {ag: proc_cpu(ag.proc.pid) for ag in (src, dst)}
                split = {"source agent": p1[src][0] - p0[src][0],
                         "sender (source's children)": p1[src][1] - p0[src][1],
                         "destination agent": p1[dst][0] - p0[dst][0],
                         "writer (destination's children)": p1[dst][1] - p0[dst][1],
                         "client (job polling)": kc}
                parts.append(split)
                own["agent"].append(sum(split.values()))
                here, there = there, here
                await asyncio.sleep(0.5)
                cur = base / here[1] / rel
                # the floor: migration_floor's bare pipeline on the same file (tcp-2+hash)
                warm(cur)
                out = base / "floor-copy.raw"
                c0 = busy_cpu()
                wall, receiver_cpu, sender_cpu = run_tcp_split(cur, out, 2, True)
                results["floor"].append(wall)
                cpu["floor"].append(busy_cpu() - c0)
                own["floor"].append(receiver_cpu + sender_cpu)
                floor_parts.append({"sender": sender_cpu, "receiver": receiver_cpu})
                out.unlink()
                await asyncio.sleep(0.3)
                # cp
                warm(cur)
                out = base / "cp-copy.raw"
                c0, t0 = busy_cpu(), time.monotonic()
                subprocess.run(["cp", "--sparse=always", "--reflink=never", str(cur), str(out)], check=True)
                results["cp"].append(time.monotonic() - t0)
                cpu["cp"].append(busy_cpu() - c0)
                out.unlink()
                # rsync over ssh on loopback
                if sshd:
                    out = base / "rsync-copy.raw"
                    c0, t0 = busy_cpu(), time.monotonic()
                    subprocess.run(["rsync", "-S", "-W", "-e", sshd.ssh_cmd(), str(cur),
                                    f"root@127.0.0.1:{out}"], check=True)
                    results["rsync"].append(time.monotonic() - t0)
                    cpu["rsync"].append(busy_cpu() - c0)
                    out.unlink()
            final = base / here[1] / rel
            assert hashlib.sha256(final.read_bytes()).hexdigest() == digest, "the volume changed in transit"
    finally:
        a.stop()
        b.stop()
        if sshd:
            sshd.stop()
    med = {k: statistics.median(v) for k, v in results.items() if v}
    lines = ["| contender | median s | MiB/s (1 GiB logical) | runs (s) | ratio vs agent | CPU-s machine (median) "
             "| CPU-s own processes (median) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for k, v in results.items():
        if v:
            mine = f"{statistics.median(own[k]):.2f}" if k in own else ""
            lines.append(f"| {k} | {med[k]:.2f} | {rate(GIB, med[k]):.0f} | "
                         f"{' / '.join(f'{x:.2f}' for x in v)} | {med[k] / med['agent']:.2f} | "
                         f"{statistics.median(cpu[k]):.2f} | {mine} |")
    cp_ratio = med["cp"] / med["agent"]
    floor_ratio = med["floor"] / med["agent"]
    cpu_ratio = statistics.median(own["agent"]) / statistics.median(own["floor"])
    machine_ratio = statistics.median(cpu["agent"]) / statistics.median(cpu["floor"])
    lines.append("")
    lines.append(f"- agent throughput vs the floor (same run): **{floor_ratio:.2f}x** (target >= 0.9: "
                 f"{'met' if floor_ratio >= 0.9 else '**MISSED**'}); agent CPU-s vs the floor's: "
                 f"**{cpu_ratio:.2f}x** counting the processes that do the work, {machine_ratio:.2f}x "
                 "counting the whole machine")
    lines.append("- the agent's CPU-s, medians per part: " + ", ".join(
        f"{name} {statistics.median(p[name] for p in parts):.3f}" for name in parts[0])
        + "; the floor's: " + ", ".join(
        f"{name} {statistics.median(p[name] for p in floor_parts):.3f}" for name in floor_parts[0]))
    lines.append(f"- agent throughput vs cp: **{cp_ratio:.2f}x** (target >= 0.8: "
                 f"{'met' if cp_ratio >= 0.8 else '**MISSED**'})")
    if "rsync" in med:
        rs = med["rsync"] / med["agent"]
        lines.append(f"- agent throughput vs rsync over ssh: **{rs:.2f}x** (target >= 1: "
                     f"{'met' if rs >= 1 else '**MISSED**'})")
    lines.append("- The agent's time is the whole job: pre-flight reads of the destination, extent map, "
                 "512 MiB streamed (holes not sent) and hashed on both sides (xxh3-128, the default "
                 "`migration_checksum`), fsync and rename at the destination, the source renamed away "
                 "(its blocks are freed in the background), job polling.")
    lines.append("- floor: `bench/migration_floor.py`'s tcp-2+hash (sendfile over loopback TCP, a receiver "
                 "thread and a hash-and-write thread, xxh3-128 at both ends; no HTTP, no job, no agent), "
                 "on the same file, in the same rounds.")
    lines.append("- CPU-s machine: busy time of the whole machine during each run (/proc/stat, every "
                 "process and the kernel, 10 ms ticks): what the run took from the 2 vCPUs, other "
                 "people's work included on a shared machine. CPU-s own processes: for the agent, both "
                 "agents' own time and their reaped children's (sender, writer) "
                 "from /proc/PID/stat (their whole lives, start-up of the idle spares included), plus this client's; for the floor, its sender's and receiver's "
                 "rusage. This one does not count other work on the machine (but a busy machine still "
                 "inflates it: caches and memory bandwidth are shared).")
    return lines, med


# --- download -------------------------------------------------------------------------------------

SERVER = """\
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


async def bench_download(base: Path, rounds: int) -> tuple[list[str], dict]:
    www = base / "www"
    www.mkdir(parents=True)
    img = www / "image.raw"
    with open(img, "wb") as f:
        block = os.urandom(8 * MIB)
        for _ in range(GIB // (8 * MIB)):
            f.write(block)
    sha = hashlib.sha256(img.read_bytes()).hexdigest()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(www), str(port)])
    a = new_agent(base, "dl")
    results: dict[str, list[float]] = {"agent": [], "curl": []}
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/image.raw"
        async with aiohttp.ClientSession() as http:
            ps = os.urandom(16).hex()
            status, body = await call(http, a, "POST", "/v1/primary-storage/local",
                                      {"params": {"uuid": ps, "url": str(base / "cache-ps")}})
            assert status == 200, body
            for _ in range(rounds):
                warm(img)
                iu = os.urandom(16).hex()
                t0 = time.monotonic()
                status, body = await call(http, a, "POST", f"/v1/primary-storage/{ps}/image-cache",
                                          {"params": {"imageUuid": iu, "url": url, "checksum": sha}})
                results["agent"].append(time.monotonic() - t0)
                assert status == 200, body
                status, body = await call(http, a, "DELETE", f"/v1/primary-storage/{ps}/image-cache/{iu}")
                warm(img)
                out = base / "curl.out"
                t0 = time.monotonic()
                subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
                results["curl"].append(time.monotonic() - t0)
                out.unlink()
    finally:
        a.stop()
        server.terminate()
        server.wait(10)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["curl"] / med["agent"]
    lines = ["| contender | median s | MiB/s | runs (s) |", "|---|---:|---:|---|"]
    for k, v in results.items():
        lines.append(f"| {k} | {med[k]:.2f} | {rate(GIB, med[k]):.0f} | {' / '.join(f'{x:.2f}' for x in v)} |")
    lines += ["", f"- agent throughput vs curl: **{ratio:.2f}x** (target >= 0.8: "
                  f"{'met' if ratio >= 0.8 else '**MISSED**'}); the agent also verifies sha256 in the same "
                  "pass, runs `qemu-img info` on the result and renames it into place; curl only writes."]
    return lines, med


# --- ping while statvfs hangs -------------------------------------------------------------------------

PINGER = """\
import http.client, json, sys, time
port, token, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
lat, failed = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/v1/host/ping", headers={"Authorization": "OAuth " + token})
        r = conn.getresponse(); r.read()
        failed += r.status != 200
    except Exception:
        failed += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    lat.append(time.perf_counter() - t0)
    time.sleep(0.005)
print(json.dumps({"lat": lat, "failed": failed}))
"""


async def ping_for(agent, seconds: float) -> tuple[list[float], int]:
    """Sequential pings from a separate process (the load generator's loop stays out of it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PINGER, str(agent.port), agent.token,
                                                str(seconds), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    import json
    data = json.loads(out)
    return data["lat"], data["failed"]


CALL_TIMEOUT = 3.0


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98]


async def bench_hang(base: Path, seconds: float, n: int = 50) -> tuple[list[str], dict]:
    a = new_agent(base, "hang", {"call_timeout_seconds": CALL_TIMEOUT},
                  wrapper=["unshare", "-m", "--propagation", "private"])
    backing, control = base / "hang-backing", base / "hang.ctl"
    backing.mkdir(parents=True)
    for i in range(n):
        (backing / f"ps{i}").mkdir()
    pid = str(a.proc.pid)
    subprocess.run(["nsenter", "-t", pid, "-m", "--", "mkdir", "-p", "/mnt/hang"], check=True)
    fuse = subprocess.Popen(["nsenter", "-t", pid, "-m", "--", sys.executable, str(HANGFS), str(backing),
                             "/mnt/hang", str(control)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            start_new_session=True)
    conn = None
    try:
        for _ in range(200):
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
                if line.split(" ")[4] == "/mnt/hang":
                    conn = line.split(" ")[2].split(":")[1]
            if conn:
                break
            time.sleep(0.05)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:
            uuids = []
            for i in range(n):
                u = os.urandom(16).hex()
                status, body = await call(http, a, "POST", "/v1/primary-storage/local",
                                          {"params": {"uuid": u, "url": f"/mnt/hang/ps{i}"}})
                assert status == 200, body
                uuids.append(u)
            await ping_for(a, 1.0)                      # warm-up
            idle, idle_failed = await ping_for(a, seconds)
            control.write_text("statfs")
            answers: list[tuple[int, float]] = []
            stop = asyncio.Event()

            async def hammer(u: str) -> None:
                # one call per storage at a time, at most one every call timeout: 50 statvfs
                # calls hang at any moment (no storm of fast refusals)
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        async with http.get(f"{a.url}/v1/primary-storage/{u}/capacity", headers=a.headers,
                                            timeout=aiohttp.ClientTimeout(total=30)) as r:
                            await r.read()
                            answers.append((r.status, time.monotonic() - t0))
                    except Exception:
                        answers.append((0, time.monotonic() - t0))
                    await asyncio.sleep(max(0.0, CALL_TIMEOUT - (time.monotonic() - t0)))
            tasks = [asyncio.ensure_future(hammer(u)) for u in uuids]
            stuck = 0
            mntns = os.readlink(f"/proc/{pid}/ns/mnt")

            async def count_stuck() -> None:
                nonlocal stuck
                while not stop.is_set():
                    stuck = max(stuck, sum(1 for p in Path("/proc").iterdir()
                                           if p.name.isdigit() and _stuck_helper(p, mntns)))
                    await asyncio.sleep(0.5)
            counter = asyncio.ensure_future(count_stuck())
            await asyncio.sleep(0.5)
            hung, hung_failed = await ping_for(a, seconds)
            stop.set()
            hung_answers = list(answers)
            control.unlink()
            await asyncio.gather(*tasks, counter, return_exceptions=True)
            answers = hung_answers
    finally:
        if conn:
            subprocess.run(["nsenter", "-t", pid, "-m", "--", "sh", "-c",
                            "mountpoint -q /sys/fs/fuse/connections || mount -t fusectl fusectl "
                            f"/sys/fs/fuse/connections; echo 1 > /sys/fs/fuse/connections/{conn}/abort"])
        fuse.kill()
        fuse.wait(10)
        a.stop()
    codes = sorted({s for s, _ in answers})
    worst = max(t for _, t in answers)
    ratio = p99(hung) / p99(idle)
    lines = ["| phase | pings | p50 ms | p99 ms | failed |", "|---|---:|---:|---:|---:|",
             f"| idle | {len(idle)} | {statistics.median(idle) * 1000:.2f} | {p99(idle) * 1000:.2f} | {idle_failed} |",
             f"| {n} storages' statvfs hung | {len(hung)} | {statistics.median(hung) * 1000:.2f} | "
             f"{p99(hung) * 1000:.2f} | {hung_failed} |", "",
             f"- p99 ratio hung/idle: **{ratio:.2f}x** (target <= 2: {'met' if ratio <= 2 else '**MISSED**'}), "
             f"failed pings: {hung_failed} (target 0: {'met' if hung_failed == 0 else '**MISSED**'}).",
             f"- {len(answers)} capacity calls on the hung storages meanwhile (one per storage at a time, at "
             f"most one per storage every 3 s; `call_timeout_seconds = 3`, default `max_stuck_helpers = 2`: "
             f"after two abandoned helpers a storage's calls are refused at once), "
             f"HTTP statuses {codes}, slowest answer {worst:.2f} s (call timeout 3 s); "
             f"up to {stuck} helper processes were stuck in the kernel at once (D state)."]
    return lines, {"idle_p99": p99(idle), "hung_p99": p99(hung)}


def _stuck_helper(p: Path, mntns: str) -> bool:
    """A helper of the benchmark's agent (same mount namespace) in D state."""
    try:
        cmd = (p / "cmdline").read_bytes()
        state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return b"fsworker.py" in cmd and state == "D" and os.readlink(p / "ns" / "mnt") == mntns
    except (OSError, IndexError):
        return False


# --- main ----------------------------------------------------------------------------------------------

async def main_async(args) -> int:
    sections: list[str] = []
    load_before = os.getloadavg()[0]
    # A tmpfs of our own (like /dev/shm, which is under /dev: no allowed root may be there).
    with own_tmpfs("storage-bench-") as base:
        if args.what in ("all", "migration"):
            lines, _ = await bench_migration(base / "m", args.rounds, not args.no_rsync)
            sections += ["#### Migration of a 1 GiB volume, half holes", ""] + lines + [""]
            print("\n".join(lines), flush=True)
        if args.what in ("all", "download"):
            lines, _ = await bench_download(base / "d", args.rounds)
            sections += ["#### Image download (1 GiB) vs curl, same local HTTP server", ""] + lines + [""]
            print("\n".join(lines), flush=True)
        if args.what in ("all", "hang"):
            lines, _ = await bench_hang(base / "h", args.seconds)
            sections += ["#### Ping while 50 statvfs calls hang", ""] + lines + [""]
            print("\n".join(lines), flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = [f"### Storage run of {now}", "", f"Machine: {machine()}.  ",
              f"Data on a tmpfs; {args.rounds} round(s) per contender, alternating; "
              f"everything on 127.0.0.1. Load average (1 min) {load_before:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end (the machine is shared with other work).", ""] + sections
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + "\n".join(report))
        print(f"(appended to {RESULTS.relative_to(REPO)})", file=sys.stderr)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", default="all", choices=["all", "migration", "download", "hang"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="ping measurement per phase (hang)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--no-rsync", action="store_true", help="migration: skip rsync over ssh (slow)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root (mount namespaces, FUSE, sshd)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
