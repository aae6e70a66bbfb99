#!/usr/bin/env python3
"""What the job guard (agent/jobguard.py, issue 11.3) costs and how fast it acts.

Side by side in one run, alternating so the machine's drift hits both alike:

* ``direct``  - Runner.run(["true"]) spawning the command itself (the guard bypassed);
* ``guarded`` - the same call as the agent makes it, under the guard;

and the time from a ``kill -9`` of an agent-like process (a Python process running a
Runner) until its job's whole tree (a shell, a background grandchild and a setsid'd
one) is gone.

    .venv/bin/python bench/job_guard.py [--runs 40] [--kills 5] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import REPO, cpu_model, git_head  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from agentproc import process_gone  # noqa: E402
from agent.runner import Runner  # noqa: E402

AGENT = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from agent.runner import Runner
asyncio.run(Runner("b").run(["bash", "-c", sys.argv[1]], timeout=600, guard=True))
"""


async def spawn_costs(runs: int) -> dict[str, list[float]]:
    r = Runner("bench", max_processes=1)
    out: dict[str, list[float]] = {"direct": [], "guarded": []}
    try:
        for _ in range(runs):
            for name in ("direct", "guarded"):
                t = time.perf_counter()
                await r.run(["true"], timeout=10, guard=name == "guarded")
                out[name].append(time.perf_counter() - t)
    finally:
        r.close()
    return out


def kill_latency(kills: int) -> list[float]:
    took = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(kills):
            pids = Path(d) / f"pids{i}"
            script = (f"sleep 60 & echo $! >> {pids}; setsid sleep 61 & echo $! >> {pids}; "
                      f"echo $$ >> {pids}; sleep 62")
            agent = subprocess.Popen([sys.executable, "-c", AGENT, script, str(REPO)])
            deadline = time.monotonic() + 10
            while not (pids.exists() and len(pids.read_text().split()) >= 3):
                if time.monotonic() > deadline:
                    raise RuntimeError("the job did not start")
                time.sleep(0.01)
            tree = [int(x) for x in pids.read_text().split()]
            t = time.perf_counter()
            agent.kill()
            agent.wait()
            while not all(process_gone(p) for p in tree):
                if time.perf_counter() - t > 5:
                    raise RuntimeError(f"the tree outlived the agent: {tree}")
                time.sleep(0.001)
            took.append(time.perf_counter() - t)
    return took


def ms(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    costs = asyncio.run(spawn_costs(args.runs))
    kills = kill_latency(args.kills)
    head, dirty = git_head("agent")
    load = os.getloadavg()[0]
    lines = [
        f"\n### Job guard: spawn cost and kill -9 reaction "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load:.1f} at the end (shared with other work). Commit {head}"
        + (f" + changes in {', '.join(dirty)}" if dirty else "") + ".\n",
        "| what | runs | p50 ms | p90 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, xs in costs.items():
        lines.append(f"| Runner.run(['true']) {name} | {len(xs)} | {ms(xs, .5):.1f} | {ms(xs, .9):.1f} "
                     f"| {statistics.mean(xs) * 1000:.1f} |")
    lines.append(f"| kill -9 of the agent -> job tree (3 processes) gone | {len(kills)} | "
                 f"{ms(kills, .5):.1f} | {ms(kills, .9):.1f} | {statistics.mean(kills) * 1000:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_append:
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
