#!/usr/bin/env python3
"""Benchmark: power status of 50 BMCs at once against one call (target: at most 3x).

Everything runs on 127.0.0.1: N fake BMCs (tests/services/fake_bmc.py, one
subprocess each, IPMI 2.0 lanplus over UDP), one real agent (``python -m agent
serve``) with those N chassis registered, and an aiohttp client.

Measured through the agent's HTTP API, ``GET /v1/baremetal/chassis/{uuid}/power``
(a BMC round trip per call, on the agent's reused session of that BMC):

- one call: one request at a time, ``--repeat`` times, each to another chassis
  (so the per-BMC minimum interval between calls is not what is measured);
- N at once: N requests, one per chassis, sent together; the wall time until
  the last answer, ``--repeat`` times (median);
- cold N at once: the same right after the agent restarted, so every call logs
  in to its BMC first (one sample: only the first call after a start is cold).

The ratio is median(N at once) / median(one call).

A dead BMC (issue 11, ``--dead-callers``, default 20): two fake BMCs, one then
stopped with SIGSTOP (it stays silent, as a hung BMC does).  Side by side:

- the healthy BMC's power call alone (baseline), then while the dead one has
  its callers in flight;
- one call to the BMC that just went silent (a fresh agent session each run),
  against N concurrent calls to it (N = ``--dead-callers``): when the last one
  answers;
- a call to it once it is known down (fails fast).  A markdown section with the
machine and date is printed and appended to bench/RESULTS.md (``--no-append``
to skip).  Every process started here is stopped at the end.

    .venv/bin/python bench/bmc_power.py                 # 50 BMCs, about 30 s
    .venv/bin/python bench/bmc_power.py --bmcs 10 --no-append
    .venv/bin/python bench/bmc_power.py --only dead      # the dead-BMC runs alone, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from agentproc import AgentProcess  # noqa: E402
from benchlib import cpu_model, git_head  # noqa: E402
from bmcproc import FakeBmcProcess  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
TARGET_RATIO = 3.0


async def job(http: aiohttp.ClientSession, agent: AgentProcess, method: str, path: str,
              body=None) -> dict:
    async with http.request(method, agent.url + path, json=body, headers=agent.headers) as r:
        reply = await r.json()
        assert r.status == 202, reply
    while True:
        async with http.get(reply["location"], params={"wait": "30"}, headers=agent.headers) as r:
            if r.status != 202:
                out = await r.json()
                assert r.status == 200, out
                return out


async def power(http, agent, uuid: str) -> float:
    t0 = time.perf_counter()
    async with http.get(f"{agent.url}/v1/baremetal/chassis/{uuid}/power",
                        headers=agent.headers) as r:
        body = await r.json()
        assert r.status == 200 and body["status"] in ("on", "off"), body
    return time.perf_counter() - t0


async def all_at_once(http, agent, uuids: list[str]) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(power(http, agent, u) for u in uuids))
    return time.perf_counter() - t0


def machine() -> str:
    cpu, (commit, _) = cpu_model(), git_head()
    from importlib.metadata import version  # noqa: PLC0415
    return (f"nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}, pyghmi "
            f"{version('pyghmi')}; agent at commit {commit} "
            "(plus uncommitted work)")


async def fleet(args, delay_ms: float) -> dict:
    """Start N fakes answering after delay_ms and one agent; measure; stop them all."""
    work = Path(tempfile.mkdtemp(prefix="bmc-bench-"))
    fakes = [FakeBmcProcess(work, delay_ms=delay_ms) for _ in range(args.bmcs)]
    (work / "agent").mkdir()
    agent = AgentProcess(work / "agent", {"baremetal": {}})
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: f.start(timeout=60), fakes))
    started = time.monotonic() - t0
    try:
        agent.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            regs = await asyncio.gather(*(job(http, agent, "POST", "/v1/baremetal/chassis",
                                              {"params": f.params()}) for f in fakes))
            uuids = [r["inventory"]["uuid"] for r in regs]
            await all_at_once(http, agent, uuids)        # warm sessions and connections
            await asyncio.sleep(0.2)
            # One call at a time, each to another chassis than the previous one, so
            # the per-BMC minimum interval between calls ([baremetal]
            # min_interval_seconds, 0.1 s) is never what is measured.
            one = []
            for i in range(args.repeat):
                one.append(await power(http, agent, uuids[(i + 1) % len(uuids)]))
            await asyncio.sleep(0.2)
            many = []
            for _ in range(args.repeat):
                many.append(await all_at_once(http, agent, uuids))
                await asyncio.sleep(0.2)
            cpu0 = agent_cpu(agent)
            for _ in range(args.repeat):
                await all_at_once(http, agent, uuids)
            cpu_per_call = (agent_cpu(agent) - cpu0) / (args.repeat * len(uuids))
        agent.restart()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            cold_one = await power(http, agent, uuids[0])
            cold_many = await all_at_once(http, agent, uuids[1:])
    finally:
        agent.stop()
        for f in fakes:
            f.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"delay": delay_ms, "started": started, "one": one, "many": many,
            "cold_one": cold_one, "cold_many": cold_many, "cpu_per_call": cpu_per_call}


async def power_any(http, agent, uuid: str) -> tuple[float, int, str | None]:
    """(seconds, HTTP status, error code) of one power call, whatever its outcome."""
    t0 = time.perf_counter()
    async with http.get(f"{agent.url}/v1/baremetal/chassis/{uuid}/power",
                        headers=agent.headers) as r:
        body = await r.json()
    return time.perf_counter() - t0, r.status, (body.get("error") or {}).get("code")


async def dead_bmc(args) -> dict:
    """A BMC that goes silent (SIGSTOP) next to a healthy one; see the module doc."""
    work = Path(tempfile.mkdtemp(prefix="bmc-dead-bench-"))
    healthy, dead = FakeBmcProcess(work).start(), FakeBmcProcess(work).start()
    out: dict = {"alone": [], "beside": [], "one": [], "many": [], "known": [],
                 "codes": set()}
    try:
        for run_no in range(args.dead_repeat):
            (work / f"agent{run_no}").mkdir()
            agent = AgentProcess(work / f"agent{run_no}", {"baremetal": {}})
            agent.start()
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                    h, d = await asyncio.gather(*(
                        job(http, agent, "POST", "/v1/baremetal/chassis", {"params": f.params()})
                        for f in (healthy, dead)))
                    hu, du = h["inventory"]["uuid"], d["inventory"]["uuid"]
                    await asyncio.sleep(3)       # the registrations' hardware reads end
                    for _ in range(5):       # paced as below, past min_interval_seconds
                        out["alone"].append(await power(http, agent, hu))
                        await asyncio.sleep(0.5)
                    os.kill(dead.proc.pid, signal.SIGSTOP)
                    try:
                        if run_no % 2 == 0:      # one call to the BMC that just went silent
                            seconds, status, code = await power_any(http, agent, du)
                            out["one"].append(seconds)
                            out["codes"].add(code)
                        else:                    # N concurrent calls, the healthy BMC beside
                            many = asyncio.gather(*(power_any(http, agent, du)
                                                    for _ in range(args.dead_callers)))
                            for _ in range(5):
                                out["beside"].append(await power(http, agent, hu))
                                await asyncio.sleep(0.5)
                            results = await many
                            out["many"].append(max(r[0] for r in results))
                            out["codes"].update(r[2] for r in results)
                        for _ in range(3):
                            out["known"].append((await power_any(http, agent, du))[0])
                    finally:
                        os.kill(dead.proc.pid, signal.SIGCONT)
            finally:
                agent.stop()
    finally:
        healthy.stop()
        dead.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def dead_report(args, r: dict) -> list[str]:
    ms = lambda v: f"{v * 1000:.0f}"   # noqa: E731
    spread = lambda v: (f"{ms(statistics.median(v))} ({ms(min(v))}-{ms(max(v))})"  # noqa: E731
                        if v else "-")
    n = args.dead_callers
    return [
        "",
        f"Dead BMC: two fake BMCs, one stopped with SIGSTOP (silent); default [baremetal] "
        f"settings (call_timeout_seconds 8); a fresh agent for each of {args.dead_repeat} "
        f"runs, alternately one call or {n} concurrent calls to the BMC that just went "
        "silent; the healthy BMC's power call alone and while the dead one has its "
        f"callers in flight. Error codes of the dead BMC's calls: "
        f"{', '.join(sorted(c or 'none' for c in r['codes']))}.",
        "",
        "| what | ms (median, min-max) |",
        "|---|---|",
        f"| healthy BMC, power call alone (baseline) | {spread(r['alone'])} |",
        f"| healthy BMC, power call while {n} calls hang on the dead one | "
        f"{spread(r['beside'])} |",
        f"| dead BMC, one call (just went silent) | {spread(r['one'])} |",
        f"| dead BMC, {n} concurrent calls: the last answer | {spread(r['many'])} |",
        f"| dead BMC, a call once it is known down | {spread(r['known'])} |",
    ]


def agent_cpu(agent: AgentProcess) -> float:
    """The agent process' CPU seconds (user + system) so far."""
    fields = Path(f"/proc/{agent.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dead = dead_report(args, await dead_bmc(args)) if args.only in ("all", "dead") else []
    if args.only == "dead":
        return "\n".join([f"### Dead BMC, run of {now}", "", f"Machine: {machine()}.  ",
                          *dead[1:], ""])
    runs = [await fleet(args, float(d)) for d in args.delays.split(",")]
    ms = lambda v: f"{v * 1000:.1f}"   # noqa: E731
    n = args.bmcs
    lines = [
        f"### BMC power status, run of {now}",
        "",
        f"Machine: {machine()}.  ",
        f"{n} fake BMCs (tests/services/fake_bmc.py subprocesses, lanplus over UDP on "
        f"127.0.0.1), one agent with default [baremetal] settings, "
        f"`GET /v1/baremetal/chassis/{{uuid}}/power` through its HTTP API; {args.repeat} "
        "samples of each; one call = one request at a time, each to another chassis; "
        f"{n} at once = one request per chassis, all sent together, until the last answer. "
        "BMC delay: how long each fake takes over a command (a real BMC's firmware takes "
        "milliseconds; 0 means loopback speed, where the 2 cores running the agent and "
        f"the {n} BMC processes are the limit).",
        "",
        f"| BMC delay ms | one call ms (median, min-max) | {n} at once ms (median, min-max) "
        f"| ratio | target <= {TARGET_RATIO:g}x | agent CPU ms per call | cold: one call ms "
        f"| cold: {n - 1} at once ms |",
        "|---:|---|---|---:|---|---:|---:|---:|",
    ]
    for r in runs:
        one, many = r["one"], r["many"]
        ratio = statistics.median(many) / statistics.median(one)
        lines.append(
            f"| {r['delay']:g} | {ms(statistics.median(one))} ({ms(min(one))}-{ms(max(one))}) "
            f"| {ms(statistics.median(many))} ({ms(min(many))}-{ms(max(many))}) "
            f"| {ratio:.2f}x | {'met' if ratio <= TARGET_RATIO else 'MISSED'} "
            f"| {r['cpu_per_call'] * 1000:.2f} | {ms(r['cold_one'])} | {ms(r['cold_many'])} |")
    return "\n".join(lines + dead + [""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bmcs", type=int, default=50)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--delays", default="0,20",
                   help="comma separated BMC delays in ms, one fleet of fakes each")
    p.add_argument("--dead-callers", type=int, default=20)
    p.add_argument("--dead-repeat", type=int, default=4,
                   help="fresh agents for the dead-BMC runs (alternately 1 and N callers)")
    p.add_argument("--only", choices=("all", "fleet", "dead"), default="all")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    report = asyncio.run(run(args))
    print(report)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
