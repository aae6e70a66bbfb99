"""What the Ceph benchmarks share: a throwaway cluster, an agent, the machine line.

Not a benchmark itself.  The cluster is tests/services/micro-ceph.sh (1 mon, 1
memstore OSD, lean mgr) on a free port pair under a temp dir; the agent is a real
``python -m agent serve`` (tests/agentproc.py).  Both are stopped on exit.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from agentproc import AgentProcess  # noqa: E402
from benchlib import cpu_model, git_head  # noqa: E402
from ceph_fixture import MicroCeph, free_port_pair  # noqa: E402


def start_cluster(base: Path, memstore_bytes: int | None = None) -> MicroCeph:
    env = {"MEMSTORE_BYTES": str(memstore_bytes)} if memstore_bytes else {}
    c = MicroCeph(base, free_port_pair(("127.0.0.1",)), env=env)
    c.purge()
    t0 = time.monotonic()
    c.start()
    print(f"cluster up in {time.monotonic() - t0:.1f} s: ceph -c {c.conf} -s", file=sys.stderr)
    return c


def start_agent(workdir: Path, ceph: dict[str, Any] | None = None) -> AgentProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return AgentProcess(workdir, {"ceph": ceph or {}, "log": {"level": "WARNING"}}).start()


def call(agent: AgentProcess, method: str, path: str, body: Any = None, timeout: float = 3600) -> Any:
    """Submit a call and wait for its job; raises on a failure."""
    def req(m: str, url: str, data: Any = None) -> tuple[int, Any]:
        r = urllib.request.Request(url, method=m, data=None if data is None else json.dumps(data).encode(),
                                   headers={**agent.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(r, timeout=120) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
    status, reply = req(method, agent.url + path, body)
    deadline = time.monotonic() + timeout
    if status == 202:
        while True:
            status, reply = req("GET", reply["location"] + "?wait=30")
            if status != 202 or time.monotonic() > deadline:
                break
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {reply}")
    return reply


def register_primary(agent: AgentProcess, c: MicroCeph, **extra: Any) -> dict[str, Any]:
    return call(agent, "POST", "/v1/primary-storage/ceph", {"params": {
        "name": "bench", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key, **extra}})["inventory"]


def register_backup(agent: AgentProcess, c: MicroCeph, pool: str) -> dict[str, Any]:
    return call(agent, "POST", "/v1/backup-storage/ceph", {"params": {
        "name": "bench", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key, "poolName": pool}})["inventory"]


def stats_ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "median": statistics.median(s) * 1000, "mean": statistics.fmean(s) * 1000,
            "p95": s[min(len(s) - 1, int(len(s) * 0.95))] * 1000, "min": s[0] * 1000}


def machine() -> str:
    cpu = cpu_model()
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / (1 << 20):.0f} GiB"
    except (OSError, ValueError):
        pass
    ceph = subprocess.run(["ceph", "--version"], capture_output=True, text=True).stdout.split("(")[0].strip()
    commit, changed = git_head("plugins/ceph")
    dirty = " (with uncommitted changes)" if changed else ""
    return (f"nproc {os.cpu_count()}, {cpu}, {mem} RAM, kernel {platform.release()}, "
            f"Python {platform.python_version()}, {ceph} (1 mon, 1 memstore OSD, lean mgr, "
            f"loopback); agent at commit {commit}{dirty}")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")




def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
