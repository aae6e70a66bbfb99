"""A real, isolated libvirtd with QEMU (TCG) for the tests, started once per session.

tests/services/libvirtd.sh runs libvirtd in its own mount namespace with its
state under a temp dir, so the machine's own libvirt (if any) is untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "services" / "libvirtd.sh"


class Libvirtd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = dict(os.environ, LV_BASE=str(base))
        self.uri = ""

    def start(self) -> str:
        out = subprocess.run(["bash", str(SCRIPT), "start"], env=self.env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"libvirtd did not start:\n{out.stdout}\n{out.stderr}")
        self.uri = out.stdout.strip().splitlines()[-1]
        return self.uri

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=self.env, capture_output=True,
                       text=True, timeout=60)

    def restart(self) -> str:
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("libvirtd", path="/usr/sbin:/usr/bin"):
        pytest.fail("the libvirt tests need root and libvirtd (scripts/install.sh installs it)")
    d = Libvirtd(Path(f"/tmp/node-agent-libvirt-{os.getpid()}"))
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.base, ignore_errors=True)
