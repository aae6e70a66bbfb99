"""A real single-node Ceph cluster for the tests, started once per session.

tests/services/micro-ceph.sh (the project's copy of the shared recipe) makes
1 mon + 1 memstore OSD + a lean mgr with all state under a temp dir, on a
free port pair below the ephemeral range (so no client socket holds it), in
about 5 s.  The fixture stops and removes it at the end of the session.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent / "services" / "micro-ceph.sh"


def free_port_pair(hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> int:
    """An even port P with P and P+1 free on every host (mon v2 and v1)."""
    for _ in range(500):
        port = random.randrange(20000, 32000, 2)
        ok = True
        for host in hosts:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((host, p))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair for a mon")


class MicroCeph:
    def __init__(self, base: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.port = port
        self.conf = base / "ceph.conf"
        self.keyring = base / "ceph.client.admin.keyring"
        self.env = dict(os.environ, MON_PORT=str(port), **(env or {}))

    def script(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(["bash", str(SCRIPT), args[0], str(self.base), *args[1:]],
                             env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"micro-ceph.sh {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start(self) -> "MicroCeph":
        self.script("start")
        return self

    def purge(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "purge", str(self.base)], env=self.env,
                       capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def key(self) -> str:
        return re.search(r"key = (\S+)", self.keyring.read_text()).group(1)

    @property
    def fsid(self) -> str:
        return re.search(r"fsid = (\S+)", self.conf.read_text()).group(1)

    def ceph(self, *args: str, timeout: float = 60) -> Any:
        """`ceph ... -f json`, parsed."""
        out = subprocess.run(["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args,
                              "-f", "json"], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {out.stderr}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def ceph_ok(self, *args: str) -> None:
        out = subprocess.run(["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {out.stderr}")

    def rbd(self, *args: str, binary: bool = False, check: bool = True):
        out = subprocess.run(["rbd", "-c", str(self.conf), *args], capture_output=True,
                             timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(f"rbd {' '.join(args)}: {out.stderr.decode(errors='replace')}")
        return out.stdout if binary else out.stdout.decode()

    def rbd_json(self, *args: str) -> Any:
        return json.loads(self.rbd(*args, "--format", "json"))

    def rados(self):
        """A test-side librados handle (to write data the CLIs then read back)."""
        import rados
        r = rados.Rados(conffile=str(self.conf))
        r.connect()
        return r


@pytest.fixture(scope="session")
def ceph_cluster():
    if os.geteuid() != 0 or not shutil.which("ceph-mon", path="/usr/bin:/usr/sbin"):
        pytest.fail("the Ceph tests need root and ceph-mon/osd/mgr (scripts/install.sh installs them)")
    c = MicroCeph(Path(f"/tmp/node-agent-ceph-{os.getpid()}"), free_port_pair())
    c.purge()
    c.start()
    yield c
    c.purge()
