#!/usr/bin/env python3
"""VM statistics benchmark: the agent's bulk sampler against the raw call and a per-VM loop,
and the agent's ping while 50 libvirt calls hang.

Everything runs against an isolated libvirtd started here (tests/services/libvirtd.sh)
serving libvirt's test driver with a generated node of N running domains
(``test+unix:///abs/node.xml?socket=...``), so every libvirt call is a real RPC to a
daemon, as on a hypervisor.  In the same run:

* raw: ``getAllDomainStats(STATE|CPU_TOTAL|BALLOON|BLOCK|INTERFACE, NOWAIT)`` from this
  process, timed over ``--rounds`` calls;
* loop: ``listAllDomains()`` then ``dom.info()`` for each domain (the cheapest per-domain
  loop: one RPC per VM), timed over a few rounds;
* the agent (a real ``python -m agent serve`` on that URI, ``[vm] stats_interval_seconds
  = 1``): the duration of its sampling passes (bulk call plus parsing, read from its
  ``node_agent_vm_stats_sample_seconds`` gauge after each pass) and the latency of
  ``GET /v1/vm-instances/stats`` (served from the last sample) and of the same with
  ``q=state=Running&count=true``;
* ping: ``GET /v1/host/ping`` latency with 8 concurrent clients for a few seconds, idle,
  then again after SIGSTOPping libvirtd with 50 ``GET /v1/vm-instances/{uuid}`` in flight
  in the agent (each stuck in a libvirt call), then SIGCONT.

Targets (issue 3): a sampling pass <= 1.5x the raw call, >= 10x faster than the loop;
ping p99 with 50 slow libvirt calls in flight <= 2x idle.  The in-process test driver
(``test:///``, no daemon) is timed too, for reference.  A markdown report is printed and
appended to bench/RESULTS.md (``--no-append`` to skip).  Every process started here is
stopped at the end.

    .venv/bin/python bench/vm_stats.py                  # about 1 minute
    .venv/bin/python bench/vm_stats.py --domains 200 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import libvirt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from agentproc import AgentProcess  # noqa: E402
from benchlib import cpu_model  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
LIBVIRTD_SH = REPO / "tests" / "services" / "libvirtd.sh"
GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
          | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_BLOCK
          | libvirt.VIR_DOMAIN_STATS_INTERFACE)
NOWAIT = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
libvirt.registerErrorHandler(lambda *_: None, None)


def node_xml(path: Path, n: int) -> list[str]:
    """A test-driver node with n running domains, each with a disk and a nic."""
    root = ET.Element("node")
    cpu = ET.SubElement(root, "cpu")
    for tag, text in (("mhz", "2400"), ("model", "x86_64"), ("nodes", "1"), ("sockets", "1"),
                      ("cores", "2"), ("threads", "1")):
        ET.SubElement(cpu, tag).text = text
    ET.SubElement(root, "memory").text = str(64 << 20)
    uuids = []
    for i in range(n):
        u = uuid.uuid4().hex
        uuids.append(u)
        dom = ET.SubElement(root, "domain", type="test")
        ET.SubElement(dom, "name").text = f"vm{i:05d}"
        ET.SubElement(dom, "uuid").text = u
        ET.SubElement(dom, "memory", unit="MiB").text = "256"
        ET.SubElement(dom, "vcpu").text = "2"
        os_ = ET.SubElement(dom, "os")
        ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
        devices = ET.SubElement(dom, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "source", file=f"/var/lib/vm/{u}.qcow2")
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge="br0")
        ET.SubElement(nic, "model", type="virtio")
    ET.ElementTree(root).write(path)
    return uuids


def args_passes(rounds: int) -> int:
    return max(5, min(rounds, 15))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f}"


def time_calls(fn, rounds: int) -> list[float]:
    fn()   # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def raw_and_loop(uri: str, rounds: int, loop_rounds: int) -> dict:
    conn = libvirt.open(uri)
    try:
        n = len(conn.listAllDomains(0))
        raw = time_calls(lambda: conn.getAllDomainStats(GROUPS, NOWAIT), rounds)

        def loop():
            for dom in conn.listAllDomains(0):
                dom.UUIDString()
                dom.info()
        per_dom = time_calls(loop, loop_rounds)
    finally:
        conn.close()
    return {"n": n, "raw": raw, "loop": per_dom}


async def scrape(http, agent, names: tuple[str, ...]) -> dict[str, float]:
    async with http.get(agent.url + "/metrics", headers=agent.headers) as r:
        text = await r.text()
    out = {}
    for name in names:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m[1])
    return out


async def sampling_passes(http, agent, count: int) -> dict[str, float]:
    """Mean seconds per pass over `count` passes, from the agent's running totals.

    Two scrapes only, before and after: rendering /metrics for 1000 VMs takes the
    agent's loop for a while, which would slow the very passes being measured.
    """
    names = ("node_agent_vm_stats_passes_total", "node_agent_vm_stats_pass_seconds_spent_total",
             "node_agent_vm_stats_call_seconds_spent_total",
             "node_agent_vm_stats_parse_seconds_spent_total")
    first = await scrape(http, agent, names)
    await asyncio.sleep(count * 1.0 + 0.5)
    last = await scrape(http, agent, names)
    n = last[names[0]] - first[names[0]]
    return {"passes": n, "pass": (last[names[1]] - first[names[1]]) / n,
            "call": (last[names[2]] - first[names[2]]) / n,
            "parse": (last[names[3]] - first[names[3]]) / n}


async def latencies(http, agent, path: str, params: dict, rounds: int) -> list[float]:
    out = []
    for i in range(rounds + 3):
        t0 = time.perf_counter()
        async with http.get(agent.url + path, params=params, headers=agent.headers) as r:
            await r.read()
            assert r.status == 200, (r.status, await r.text())
        if i >= 3:
            out.append(time.perf_counter() - t0)
    return out


async def ping_for(http, agent, seconds: float, clients: int = 8) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + seconds

    async def client():
        while time.monotonic() < end:
            t0 = time.perf_counter()
            async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
                await r.read()
                assert r.status == 200
            out.append(time.perf_counter() - t0)
    await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def agent_part(agent: AgentProcess, uuids: list[str], rounds: int, ping_seconds: float,
                     libvirtd_pid: int, stuck: int) -> dict:
    res: dict = {}
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as http:
        deadline = time.monotonic() + 30
        while True:
            async with http.get(agent.url + "/v1/health") as r:
                vm = next(p for p in (await r.json())["plugins"] if p["name"] == "vm")
            if vm["capabilities"].get("libvirt", {}).get("available"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent never connected to libvirt: {vm}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)               # a few passes first
        res["sampling"] = await sampling_passes(http, agent, args_passes(rounds))
        async with http.get(agent.url + "/v1/vm-instances/stats", params={"count": "true"},
                            headers=agent.headers) as r:
            res["served"] = (await r.json())["total"]
        res["get_all"] = await latencies(http, agent, "/v1/vm-instances/stats", {}, rounds)
        res["get_count"] = await latencies(http, agent, "/v1/vm-instances/stats",
                                           {"q": "state=Running", "count": "true"}, rounds)
        res["list"] = await latencies(http, agent, "/v1/vm-instances",
                                      {"q": "state=Running", "count": "true"}, max(3, rounds // 10))

        res["ping_idle"] = await ping_for(http, agent, ping_seconds)
        os.kill(libvirtd_pid, signal.SIGSTOP)
        try:
            async def slow(u: str):
                t0 = time.perf_counter()
                async with http.get(f"{agent.url}/v1/vm-instances/{u}", headers=agent.headers) as r:
                    await r.read()
                    return r.status, time.perf_counter() - t0
            pending = [asyncio.ensure_future(slow(u)) for u in uuids[:stuck]]
            await asyncio.sleep(0.5)
            res["stuck_before"] = sum(1 for p in pending if not p.done())
            res["ping_stalled"] = await ping_for(http, agent, ping_seconds)
            res["stuck_after"] = sum(1 for p in pending if not p.done())
        finally:
            os.kill(libvirtd_pid, signal.SIGCONT)
        done = await asyncio.gather(*pending)
        res["stuck_status"] = sorted({s for s, _ in done})
        res["stuck_max"] = max(t for _, t in done)
    return res


def run(args) -> str:
    base = Path(tempfile.mkdtemp(prefix="vmbench-"))
    lv_base = Path(f"/tmp/node-agent-bench-libvirt-{os.getpid()}")
    env = dict(os.environ, LV_BASE=str(lv_base))
    agent = None
    try:
        out = subprocess.run(["bash", str(LIBVIRTD_SH), "start"], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        socket_uri = out.stdout.strip().splitlines()[-1]
        sock = socket_uri.split("socket=", 1)[1]
        pid = int((lv_base / "run" / "libvirtd.pid").read_text())
        node = base / "node.xml"
        uuids = node_xml(node, args.domains)
        daemon_uri = f"test+unix://{node}?socket={sock}"
        local_uri = f"test://{node}"

        via_daemon = raw_and_loop(daemon_uri, args.rounds, args.loop_rounds)
        in_process = raw_and_loop(local_uri, args.rounds, args.loop_rounds)
        assert via_daemon["n"] == in_process["n"] == args.domains

        workdir = base / "agent"
        workdir.mkdir()
        agent = AgentProcess(workdir, {"libvirt": {"uri": daemon_uri},
                                       "vm": {"stats_interval_seconds": 1},
                                       "log": {"level": "WARNING"}}).start()
        res = asyncio.run(agent_part(agent, uuids, args.rounds, args.ping_seconds, pid, args.stuck))
        # Again with the agent up (sampling every second), pooled: the machine may drift.
        again = raw_and_loop(daemon_uri, args.rounds, args.loop_rounds)
        via_daemon["raw"] += again["raw"]
        via_daemon["loop"] += again["loop"]
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["bash", str(LIBVIRTD_SH), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(lv_base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return report(args, via_daemon, in_process, res)


def report(args, d: dict, local: dict, res: dict) -> str:
    raw, loop = statistics.median(d["raw"]), statistics.median(d["loop"])
    sm = res["sampling"]
    passes, parse = sm["pass"], sm["parse"]
    pass_vs_raw, loop_vs_pass = passes / raw, loop / passes
    idle99, stall99 = pct(res["ping_idle"], 99), pct(res["ping_stalled"], 99)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = cpu_model()
    ok = lambda good: "met" if good else "**MISSED**"  # noqa: E731
    lines = [
        f"### VM statistics run of {now}",
        "",
        f"Machine: nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, Python "
        f"{platform.python_version()}, libvirt {libvirt.getVersion() // 1000000}."
        f"{libvirt.getVersion() // 1000 % 1000}.{libvirt.getVersion() % 1000}; load average "
        f"{args.load_before} before, {open('/proc/loadavg').read().split()[0]} after (the machine "
        f"is shared: other work runs on it too).  ",
        "How to run: `.venv/bin/python bench/vm_stats.py` (root; about 40 s).  ",
        f"{d['n']} running domains of libvirt's test driver behind an isolated libvirtd "
        f"(`test+unix://`); medians over {len(d['raw'])} raw calls and {len(d['loop'])} loops (half "
        f"before the agent started, half while it ran), "
        f"{sm['passes']:.0f} agent passes (1 a second, means); groups STATE, CPU_TOTAL, BALLOON, BLOCK, INTERFACE, "
        f"flag NOWAIT={'yes' if NOWAIT else 'no'}.",
        "",
        "| what | via libvirtd (ms) | in-process `test:///` (ms) |",
        "|---|---:|---:|",
        f"| raw `getAllDomainStats` (median / p90) | {ms(raw)} / {ms(pct(d['raw'], 90))} | "
        f"{ms(statistics.median(local['raw']))} / {ms(pct(local['raw'], 90))} |",
        f"| per-domain loop, `dom.info()` each (median) | {ms(loop)} | "
        f"{ms(statistics.median(local['loop']))} |",
        f"| agent sampling pass: the bulk call in a runner thread, as the loop sees it (mean) | "
        f"{ms(passes)} | |",
        f"| of which `getAllDomainStats` itself, in the agent's thread (mean) | {ms(sm['call'])} | |",
        f"| parsing a pass into figures, in a thread after it (mean) | {ms(parse)} | |",
        f"| `GET /v1/vm-instances/stats`, {res['served']} entries (p50 / p99) | "
        f"{ms(pct(res['get_all'], 50))} / {ms(pct(res['get_all'], 99))} | |",
        f"| `GET /v1/vm-instances/stats?q=state=Running&count=true` (p50 / p99) | "
        f"{ms(pct(res['get_count'], 50))} / {ms(pct(res['get_count'], 99))} | |",
        f"| `GET /v1/vm-instances?q=state=Running&count=true` (live listing, p50) | "
        f"{ms(pct(res['list'], 50))} | |",
        "",
        f"| ping, 8 clients, {args.ping_seconds:g} s | requests | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| idle | {len(res['ping_idle'])} | {ms(pct(res['ping_idle'], 50))} | {ms(idle99)} | "
        f"{ms(max(res['ping_idle']))} |",
        f"| libvirtd SIGSTOPped, {args.stuck} VM reads stuck in the agent | "
        f"{len(res['ping_stalled'])} | {ms(pct(res['ping_stalled'], 50))} | {ms(stall99)} | "
        f"{ms(max(res['ping_stalled']))} |",
        "",
        f"- Sampling pass / raw call: {pass_vs_raw:.2f}x (target <= 1.5x: {ok(pass_vs_raw <= 1.5)}); "
        f"loop / sampling pass: {loop_vs_pass:.1f}x (target >= 10x: {ok(loop_vs_pass >= 10)}).",
        f"- Counting the parse too (pass + parse): "
        f"{(passes + parse) / raw:.2f}x the raw call, {loop / (passes + parse):.1f}x faster than the loop.",
        f"- Ping p99 with the stuck calls / idle: {stall99 / idle99:.2f}x (target <= 2x: "
        f"{ok(stall99 <= 2 * idle99)}); stuck requests still in flight before / after the "
        f"stalled ping run: {res['stuck_before']} / {res['stuck_after']} of {args.stuck}; after "
        f"SIGCONT they answered {res['stuck_status']} (slowest {res['stuck_max']:.1f} s).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--loop-rounds", type=int, default=5)
    p.add_argument("--ping-seconds", type=float, default=4.0)
    p.add_argument("--stuck", type=int, default=50)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it starts an isolated libvirtd")
    args.load_before = open("/proc/loadavg").read().split()[0]
    text = run(args)
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
