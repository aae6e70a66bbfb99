"""Fake BMC subprocesses (tests/services/fake_bmc.py) for the baremetal tests and bench.

Each fake listens on its own UDP port on 127.0.0.1.  Passwords travel in the
environment (``--users-env``), never in argv, so a test can scan every
process' command line for the chassis password.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FAKE_BMC = Path(__file__).resolve().parent / "services" / "fake_bmc.py"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeBmcProcess:
    def __init__(self, workdir: Path, *, username: str = "admin", password: str = "password",
                 serial: str | None = None, stock_rakp: bool = False, busy: int = 0,
                 port: int | None = None, delay_ms: float = 0.0) -> None:
        self.workdir = workdir
        self.port = port or free_udp_port()
        self.username, self.password = username, password
        self.serial = serial or f"SN{self.port}"
        self.stock_rakp, self.busy, self.delay_ms = stock_rakp, busy, delay_ms
        self.state_file = workdir / f"bmc-{self.port}.json"
        self.log_file = workdir / f"bmc-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "FakeBmcProcess":
        argv = [sys.executable, str(FAKE_BMC), "--port", str(self.port),
                "--users-env", "FAKE_BMC_USERS", "--state-file", str(self.state_file),
                "--serial", self.serial]
        if self.stock_rakp:
            argv.append("--stock-rakp")
        if self.busy:
            argv += ["--busy", str(self.busy)]
        if self.delay_ms:
            argv += ["--delay-ms", str(self.delay_ms)]
        env = dict(os.environ, FAKE_BMC_USERS=f"{self.username}:{self.password}",
                   PYTHONUNBUFFERED="1")
        self.state_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        # The fake writes its state file once its socket is bound.
        deadline = time.monotonic() + timeout
        while not self.state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake BMC on port {self.port} did not start:\n"
                                   + self.log_file.read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        return self

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        evs = self.state()["events"]
        return [e for e in evs if name is None or e["event"] == name]

    def ipmitool(self, *args: str, timeout: float = 20) -> str:
        """ipmitool -I lanplus as a second client (password through -E, not argv)."""
        out = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(self.port),
                              "-U", self.username, "-E", *args],
                             env=dict(os.environ, IPMI_PASSWORD=self.password),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ipmitool {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> "FakeBmcProcess":
        self.stop()
        return self.start()

    def params(self, **over: Any) -> dict[str, Any]:
        """The creation params of this BMC."""
        p = {"ipmiAddress": "127.0.0.1", "ipmiPort": str(self.port),
             "ipmiUsername": self.username, "ipmiPassword": self.password}
        p.update(over)
        return p
