#!/usr/bin/env python3
"""Capacity and pool listing: through the agent, through the binding, and by the CLI.

One throwaway cluster (tests/services/micro-ceph.sh) with a primary storage
registered (3 pools) plus ``--extra-pools`` more, and one agent.  In the same
run, alternating rounds, each way is timed sequentially (one request at a time):

* ``agent``   - ``GET /v1/primary-storage/ceph/{uuid}/capacity`` and ``.../pools``
                over HTTP (keep-alive, token auth, JSON, one mon command each in the
                agent's runner thread, on its shared handle);
* ``binding`` - the same command in this process on one connected ``rados.Rados``
                (``mon_command`` ``df detail`` / ``osd pool ls detail``): the floor;
* ``cli``     - ``ceph df -f json`` and ``ceph osd pool ls detail -f json`` as
                subprocesses (what an agent spawning the CLI would pay per call).

Target: the agent at least 5x faster than the CLI (median latency).  A markdown
section is printed and appended to bench/RESULTS.md (``--no-append`` to skip).

    .venv/bin/python bench/ceph_capacity.py                 # about 1 minute
    .venv/bin/python bench/ceph_capacity.py --n 50 --cli-n 10 --no-append
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncio

import aiohttp

from ceph_common import (append, machine, now_utc, register_primary, start_agent, start_cluster,
                         stats_ms)

TARGET = 5.0


async def time_agent(url: str, headers: dict, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as http:
        for i in range(n + 5):
            t = time.perf_counter()
            async with http.get(url, headers=headers) as r:
                body = await r.read()
                assert r.status == 200, body
            if i >= 5:                        # the first few warm the connection up
                out.append(time.perf_counter() - t)
    return out


def time_binding(r, prefix: str, n: int, **args) -> list[float]:
    cmd = json.dumps({"prefix": prefix, "format": "json", **args})
    out = []
    for i in range(n + 5):
        t = time.perf_counter()
        ret, buf, err = r.mon_command(cmd, b"")
        json.loads(buf)
        assert ret == 0, err
        if i >= 5:
            out.append(time.perf_counter() - t)
    return out


def time_cli(argv: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True)
        json.loads(p.stdout)
        assert p.returncode == 0, p.stderr
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="agent and binding calls per round")
    ap.add_argument("--cli-n", type=int, default=30, help="CLI calls per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra-pools", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="ceph-bench-cap-"))
    c = start_cluster(base / "cluster")
    agent = None
    try:
        agent = start_agent(base / "agent")
        ps = register_primary(agent, c)
        for i in range(args.extra_pools):
            c.ceph_ok("osd", "pool", "create", f"extra{i}", "8")
        import rados
        r = rados.Rados(conffile=str(c.conf))
        r.connect()
        cap_url = f"{agent.url}/v1/primary-storage/ceph/{ps['uuid']}/capacity"
        pools_url = f"{agent.url}/v1/primary-storage/ceph/{ps['uuid']}/pools"
        cli = ["ceph", "-c", str(c.conf)]
        samples: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
            for what, url, prefix, extra, argv in (
                    ("capacity", cap_url, "df", {"detail": "detail"}, cli + ["df", "-f", "json"]),
                    ("pool listing", pools_url, "osd pool ls", {"detail": "detail"},
                     cli + ["osd", "pool", "ls", "detail", "-f", "json"])):
                samples.setdefault((what, "agent"), []).extend(
                    asyncio.run(time_agent(url, agent.headers, args.n)))
                samples.setdefault((what, "binding"), []).extend(time_binding(r, prefix, args.n, **extra))
                samples.setdefault((what, "cli"), []).extend(time_cli(argv, args.cli_n))
        r.shutdown()
        npools = len(c.ceph("osd", "pool", "ls"))
    finally:
        if agent:
            agent.stop()
        c.purge()
        shutil.rmtree(base, ignore_errors=True)

    lines = [f"### Ceph capacity and pool listing, run of {now_utc()}", "",
             f"Machine: {machine()}.  ",
             f"Script: `bench/ceph_capacity.py --n {args.n} --cli-n {args.cli_n} --rounds {args.rounds} "
             f"--extra-pools {args.extra_pools}`; {npools} pools in the cluster; calls one at a time; "
             "agent = HTTP GET with token over keep-alive (agent log level WARNING); binding = "
             "`mon_command` on one connected handle in the benchmark process; cli = `ceph ... -f json` "
             "subprocess.", "",
             "| what | way | calls | median ms | mean ms | p95 ms | min ms | CLI median / this median |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for what in ("capacity", "pool listing"):
        cli_med = stats_ms(samples[(what, "cli")])["median"]
        for way in ("agent", "binding", "cli"):
            s = stats_ms(samples[(what, way)])
            lines.append(f"| {what} | {way} | {s['n']} | {s['median']:.2f} | {s['mean']:.2f} | "
                         f"{s['p95']:.2f} | {s['min']:.2f} | {cli_med / s['median']:.1f}x |")
        ratio = cli_med / stats_ms(samples[(what, "agent")])["median"]
        verdicts.append(f"- {what}: the agent is {ratio:.0f}x faster than the CLI "
                        f"(target >= {TARGET:g}x: **{'met' if ratio >= TARGET else 'MISSED'}**).")
    section = "\n".join(lines + [""] + verdicts) + "\n"
    print(section)
    if not args.no_append:
        append(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
