#!/usr/bin/env python3
"""Load benchmark: the agent's authenticated GET /v1/host/ping against a bare aiohttp handler.

Three servers run side by side on 127.0.0.1, all on the same Python:

* ``agent``      - a real ``python -m agent serve`` as it runs by default: INFO
                   logging, one access line per request to stderr (redirected to a file);
* ``agent-warn`` - the same agent with ``[log] level = "WARNING"`` in its TOML config,
                   to show what the per-request log line costs;
* ``bare``       - a ten-line aiohttp ``web.Application`` with one GET route returning a
                   small JSON, access log off.

The same client loads each of them in turn, alternating (A B C A B C) so that drift of
the machine hits every target alike: keep-alive, 64 connections, a warm-up that is thrown
away, then a measured run.  The client is ``wrk`` (installed with apt-get when missing and
we are root); without it, an aiohttp client in a separate process is used instead and the
report says so.

The agent's RSS (VmRSS from /proc/<pid>/status) is read after start and 2 s idle, before
any load, and again after the last run.  Each server's CPU time (utime + stime from
/proc/<pid>/stat) over each measured run, divided by the requests it answered, gives CPU
microseconds per request: on a busy machine the throughput ratio moves with whatever else
runs (wrk shares the cores too), the CPU cost of a request much less, so the report has both.  A markdown report is printed and appended to
bench/RESULTS.md (``--no-append`` to skip).  Every process started here is ended on exit.

    .venv/bin/python bench/ping_load.py                 # the full run (about 1.5 min)
    .venv/bin/python bench/ping_load.py --duration 3 --warmup 1 --no-append   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchlib import cpu_model, git_head

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
HOST = "127.0.0.1"

# Targets: throughput ratio agent/bare >= 0.8, p99 ratio <= 2, idle RSS <= 60 MB.
MIN_RPS_RATIO = 0.8
MAX_P99_RATIO = 2.0
MAX_IDLE_RSS_MB = 60.0

BARE_SERVER = """\
import sys, time
from aiohttp import web
started = time.time()
async def ping(request):
    return web.json_response({"hostUuid": "0" * 32, "version": "0.1.0",
                              "uptime": round(time.time() - started, 3)})
app = web.Application()
app.router.add_get("/v1/host/ping", ping)
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
"""


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """One server process on 127.0.0.1, its output in a log file."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 token_path: Path | None = None, cwd: Path = REPO) -> None:
        self.name, self.argv, self.port, self.cwd = name, argv, port, cwd
        self.log_path, self.token_path = log_path, token_path
        self.proc: subprocess.Popen | None = None
        self.idle_rss_kb: int | None = None
        self.after_rss_kb: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/host/ping"

    @property
    def token(self) -> str | None:
        return self.token_path.read_text().strip() if self.token_path else None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.token}"} if self.token_path else {}

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")   # as the systemd unit runs the agent
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Ready when the ping URL answers with the token (the agent: 200, not 401)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if self.token_path and not self.token_path.exists():
                    raise OSError("no token yet")
                req = urllib.request.Request(self.url, headers=self.headers)
                with urllib.request.urlopen(req, timeout=2) as resp:
                    body = json.loads(resp.read())
                    if resp.status == 200 and "uptime" in body:
                        return
                    last = f"status {resp.status}: {body}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except (OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout} s ({last})")

    def rss(self) -> int:
        return rss_kb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------- clients

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse the wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": float(rps.group(1)), "p50_ms": to_ms(p50.group(1)),
            "p99_ms": to_ms(p99.group(1)), "requests": int(total.group(1)), "errors": errors}


def ensure_wrk() -> str | None:
    path = shutil.which("wrk")
    if path or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    print("wrk is missing: installing it with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"],
                ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=300, check=False)
        except subprocess.TimeoutExpired:
            break
        if cmd[1] == "install" and shutil.which("wrk"):
            break
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).split(" [")[0].strip() or "wrk"


def run_wrk(wrk: str, server: Server, seconds: float, threads: int, connections: int) -> dict:
    cmd = [wrk, "--latency", "-t", str(threads), "-c", str(connections),
           "-d", f"{max(1, round(seconds))}s", "--timeout", "5s"]
    if server.token_path:
        cmd += ["-H", f"Authorization: OAuth {server.token}"]
    cmd.append(server.url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}")
    return parse_wrk(out.stdout)


async def _aiohttp_load(url: str, headers: dict[str, str], seconds: float, connections: int) -> dict:
    import aiohttp
    latencies: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as session:
        t_end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0
    return {"rps": len(latencies) / elapsed, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "requests": len(latencies), "errors": errors}


def run_aiohttp_client(server: Server, seconds: float, connections: int) -> dict:
    """The fallback client, in its own process so it does not share a loop with anything."""
    cmd = [sys.executable, __file__, "_client", server.url, "--seconds", str(seconds),
           "--connections", str(connections), "--headers", json.dumps(server.headers)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"the aiohttp client failed: {out.stderr}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------- report

def machine() -> dict[str, str]:
    import aiohttp
    return {"nproc": str(os.cpu_count()), "cpu": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "commit": commit()}


def commit() -> str:
    """The agent's code as measured: HEAD, and whether agent/ or plugins/ differ from it."""
    head, dirty = git_head("agent", "plugins")
    return head + (" with uncommitted changes in agent/ or plugins/" if dirty else "")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def report(args, client: str, servers: dict[str, Server], runs: dict[str, list[dict]],
           info: dict[str, str], logs: dict[str, int]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    agg = {n: {"rps": mean([r["rps"] for r in rs]), "p50": mean([r["p50_ms"] for r in rs]),
               "p99": mean([r["p99_ms"] for r in rs]), "errors": sum(r["errors"] for r in rs),
               "cpu_us": sorted(r["cpu_us"] for r in rs)[len(rs) // 2]}
           for n, rs in runs.items()}
    bare = agg["bare"]
    lines = [
        f"### Run of {now}",
        "",
        f"Machine: nproc {info['nproc']}, {info['cpu']}, kernel {info['kernel']}, "
        f"Python {info['python']}, aiohttp {info['aiohttp']}; agent at commit {info['commit']}"
        + (f", agent-base at {info['baseline']}" if info.get("baseline") else "") + ".  ",
        f"Client: {client}; {args.connections} keep-alive connections"
        + (f", {args.threads} threads" if client.startswith("wrk") else "")
        + f"; {args.warmup:g} s warm-up (discarded) + {args.duration:g} s measured per run; "
        f"{args.rounds} rounds alternating {' '.join(runs)}; all on 127.0.0.1.  ",
        f"Load average (1 min) {info['load_before']} before, {info['load_after']} after"
        + (" (the machine is busy: the throughput and p99 ratios are noisy, the CPU per request "
           "less so)." if max(float(info['load_before']), float(info['load_after'])) > 1.0 else "."),
        "",
        "| target | req/s (mean) | req/s per round | p50 ms | p99 ms | p99 per round | errors "
        "| idle RSS MB | RSS after load MB | rps ratio vs bare | p99 ratio vs bare "
        "| CPU us/req (median) | CPU ratio vs bare |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in agg.items():
        s = servers[name]
        rs = runs[name]
        lines.append(
            f"| {name} | {a['rps']:.0f} | {' / '.join(format(r['rps'], '.0f') for r in rs)} "
            f"| {a['p50']:.2f} | {a['p99']:.2f} | {' / '.join(format(r['p99_ms'], '.2f') for r in rs)} "
            f"| {a['errors']} | {s.idle_rss_kb / 1024:.1f} | {s.after_rss_kb / 1024:.1f} "
            f"| {a['rps'] / bare['rps']:.2f} | {a['p99'] / bare['p99']:.2f} "
            f"| {a['cpu_us']:.1f} | {a['cpu_us'] / bare['cpu_us']:.2f} |")
    lines.append("")
    for name in ("agent", "agent-warn"):
        if name not in agg:
            continue
        a, s = agg[name], servers[name]
        rr, pr, mb = a["rps"] / bare["rps"], a["p99"] / bare["p99"], s.idle_rss_kb / 1024
        label = "default config (INFO, access line per request)" if name == "agent" \
            else '`[log] level = "WARNING"`'
        lines.append(
            f"- `{name}`, {label}: throughput ratio {rr:.2f} (target >= {MIN_RPS_RATIO}: "
            f"{verdict(rr >= MIN_RPS_RATIO)}), p99 ratio {pr:.2f} (target <= {MAX_P99_RATIO:g}: "
            f"{verdict(pr <= MAX_P99_RATIO)}), idle RSS {mb:.1f} MB (target <= {MAX_IDLE_RSS_MB:g}: "
            f"{verdict(mb <= MAX_IDLE_RSS_MB)}).")
    for name in ("agent", "agent-base", "agent-warn"):
        if name in runs:
            # Each round's runs are back to back: their ratio shares the machine's state
            # of that moment, where the means above mix rounds a busy machine made unlike.
            per_round = [a["rps"] / b["rps"] for a, b in zip(runs[name], runs["bare"])]
            lines.append(f"- `{name}` throughput ratio per round (vs the bare run of the same round): "
                         f"{' / '.join(format(r, '.2f') for r in per_round)}; median "
                         f"{sorted(per_round)[len(per_round) // 2]:.2f}.")
    for name, n in logs.items():
        lines.append(f"- `{name}` wrote {n} log lines during the load (warm-ups included).")
    if any(a["errors"] for a in agg.values()):
        lines.append("- **Errors were seen** (non-2xx answers or socket errors): the numbers above "
                     "are suspect.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="discarded warm-up seconds before each run (2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all targets (2: A B C A B C)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--idle", type=float, default=2.0, help="idle seconds before the idle RSS (2)")
    p.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto")
    p.add_argument("--no-warn", action="store_true", help="skip the WARNING-level agent")
    p.add_argument("--baseline", metavar="REF",
                   help="also run the agent of this git commit (target agent-base), side by side")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)

    wrk = None if args.client == "aiohttp" else ensure_wrk()
    if args.client == "wrk" and not wrk:
        print("wrk is not installed and cannot be installed here", file=sys.stderr)
        return 2
    if wrk:
        client = f"{wrk_version(wrk)} (--latency)"
    else:
        why = "chosen with --client aiohttp" if args.client == "aiohttp" else "wrk unavailable"
        client = f"aiohttp client in a separate process ({why})"

    tmp = Path(tempfile.mkdtemp(prefix="ping-load-"))
    servers: dict[str, Server] = {}
    try:
        port = free_port()
        servers["agent"] = Server(
            "agent", [sys.executable, "-m", "agent", "serve", "--state-dir", str(tmp / "state-info"),
                      "--port", str(port)], port, tmp / "agent.log", tmp / "state-info" / "token")
        if args.baseline:
            # The agent of another commit, from a `git archive` of it: `-m agent` in that
            # directory imports its agent/ and plugins/ (the current directory comes first).
            base = tmp / "base"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline, "agent", "plugins"],
                                     cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            port = free_port()
            servers["agent-base"] = Server(
                "agent-base", [sys.executable, "-m", "agent", "serve", "--state-dir",
                               str(tmp / "state-base"), "--port", str(port)],
                port, tmp / "agent-base.log", tmp / "state-base" / "token", cwd=base)
        if not args.no_warn:
            cfg = tmp / "agent-warn.toml"
            cfg.write_text('[log]\nlevel = "WARNING"\n')
            port = free_port()
            servers["agent-warn"] = Server(
                "agent-warn", [sys.executable, "-m", "agent", "serve", "--config", str(cfg),
                               "--state-dir", str(tmp / "state-warn"), "--port", str(port)],
                port, tmp / "agent-warn.log", tmp / "state-warn" / "token")
        bare_py = tmp / "bare_server.py"
        bare_py.write_text(BARE_SERVER)
        port = free_port()
        servers["bare"] = Server("bare", [sys.executable, str(bare_py), HOST, str(port)], port,
                                 tmp / "bare.log")
        load_before = f"{os.getloadavg()[0]:.2f}"
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready()
        # A request without the token must be refused, or we would not be measuring auth.
        try:
            urllib.request.urlopen(servers["agent"].url, timeout=2)
            raise RuntimeError("the agent answered /v1/host/ping without a token")
        except urllib.error.HTTPError as e:
            if e.code != 401:
                raise RuntimeError(f"the agent answered {e.code} without a token, expected 401")
        time.sleep(args.idle)
        for s in servers.values():
            s.idle_rss_kb = s.rss()
        log_start = {n: line_count(s.log_path) for n, s in servers.items() if n != "bare"}

        def load(s: Server, seconds: float) -> dict:
            if wrk:
                return run_wrk(wrk, s, seconds, args.threads, args.connections)
            return run_aiohttp_client(s, seconds, args.connections)

        runs: dict[str, list[dict]] = {n: [] for n in servers}
        for rnd in range(1, args.rounds + 1):
            for name, s in servers.items():
                if args.warmup > 0:
                    load(s, args.warmup)
                cpu0 = cpu_seconds(s.proc.pid)
                r = load(s, args.duration)
                r["cpu_us"] = (cpu_seconds(s.proc.pid) - cpu0) / max(1, r["requests"]) * 1e6
                runs[name].append(r)
                print(f"round {rnd} {name:10s} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  cpu {r['cpu_us']:6.1f} us/req  errors {r['errors']}",
                      file=sys.stderr)
        for s in servers.values():
            s.after_rss_kb = s.rss()
        logs = {n: line_count(servers[n].log_path) - c for n, c in log_start.items()}
        info = dict(machine(), load_before=load_before, load_after=f"{os.getloadavg()[0]:.2f}")
        if args.baseline:
            info["baseline"] = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO,
                                              capture_output=True, text=True).stdout.strip()
        text = report(args, client, servers, runs, info, logs)
        print(text)
        if not args.no_append:
            if not RESULTS.exists():
                RESULTS.write_text("# Ping load benchmark results\n\n## Runs\n\n")
            with open(RESULTS, "a") as f:
                f.write("\n" + text)
            print(f"(appended to {RESULTS.relative_to(REPO)})", file=sys.stderr)
        return 0
    finally:
        for s in servers.values():
            s.stop()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--headers", default="{}")
    a = p.parse_args(argv)
    print(json.dumps(asyncio.run(_aiohttp_load(a.url, json.loads(a.headers), a.seconds, a.connections))))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        sys.exit(client_main(sys.argv[2:]))
    sys.exit(main())
