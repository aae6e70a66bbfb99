"""Real agent processes for the tests: started, killed and restarted over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] in (b"Z", b"X")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_toml(path: Path, config: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """One `node-agent serve` process with its own state directory and port."""

    def __init__(self, workdir: Path, config: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        self.workdir = workdir
        # argv put in front of the agent's, e.g. ["unshare", "-m", "--propagation", "private"]
        # (a wrapper that execs, so the process is the agent itself)
        self.wrapper = list(wrapper or [])
        self.state_dir = workdir / "state"
        self.port = free_port()
        # allowed_roots: the test's own directory (storages and disks live there) and /mnt
        # (mounts in the agent's private namespace); a test of the rule sets its own.
        self.config = {"server": {"host": "127.0.0.1", "port": self.port},
                       "state": {"dir": str(self.state_dir)},
                       "storage": {"allowed_roots": [str(workdir.parent), "/mnt"]}}
        for section, values in (config or {}).items():
            self.config.setdefault(section, {}).update(values)
        self.env = env or {}
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "agent.log"
        self.ready_seconds: float | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config["server"].get("tls_cert") else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.token}"}

    def start(self, timeout: float = 15.0, wait: bool = True) -> "AgentProcess":
        cfg = write_toml(self.workdir / "agent.toml", self.config)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "agent", "serve", "--config", str(cfg), *self.args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready(timeout, t0)
        return self

    def wait_ready(self, timeout: float, t0: float) -> None:
        ctx = None
        if self.scheme == "https":
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/health", timeout=1, context=ctx).read()
                self.ready_seconds = time.monotonic() - t0
                return
            except urllib.error.HTTPError:
                self.ready_seconds = time.monotonic() - t0
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"agent not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else 0

    def restart(self) -> "AgentProcess":
        self.stop()
        return self.start()
