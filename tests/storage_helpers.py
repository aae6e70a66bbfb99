"""Helpers of the storage tests: agents in private mount namespaces, FUSE hangs, loop mounts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from aiohttp import web

from conftest import run_job, submit, wait_for, wait_job  # noqa: F401 (wait_for: for the tests)

SERVICES = Path(__file__).resolve().parent / "services"
HANGFS = SERVICES / "hangfs.py"
FAKE_MOUNT = SERVICES / "fake_mount.py"
FAKE_UMOUNT = SERVICES / "fake_umount.py"
PS = "/v1/primary-storage"
NS_WRAPPER = ["unshare", "-m", "--propagation", "private"]


def uid() -> str:
    return uuidlib.uuid4().hex


def fast_storage(**extra: Any) -> dict[str, Any]:
    # generous call timeouts (a loaded CI machine); the hang tests set short ones themselves
    conf = {"call_timeout_seconds": 5, "probe_interval_seconds": 0.3, "probe_timeout_seconds": 5,
            "mount_timeout_seconds": 20, "qemu_img_timeout_seconds": 60}
    conf.update(extra)
    return {"storage": conf}


# --- the agent's mount namespace ---------------------------------------------------------------

def nsrun(agent, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a command inside the agent's mount namespace."""
    return subprocess.run(["nsenter", "-t", str(agent.proc.pid), "-m", "--", *argv], check=check,
                          capture_output=True, text=True, timeout=timeout, **kw)


def nspath(agent, path: str | Path) -> Path:
    """The agent's view of a path (its mount namespace), from the test process."""
    return Path(f"/proc/{agent.proc.pid}/root{path}")


def mountinfo(agent) -> list[list[str]]:
    return [line.split(" ") for line in Path(f"/proc/{agent.proc.pid}/mountinfo").read_text().splitlines()]


def mount_entry(agent, path: str) -> list[str] | None:
    found = None
    for f in mountinfo(agent):
        if f[4] == path:
            found = f
    return found


def fstype_source(entry: list[str]) -> tuple[str, str]:
    sep = entry.index("-", 6)
    return entry[sep + 1], entry[sep + 2]


class FuseMount:
    """hangfs mounted inside the agent's namespace; abort() frees every waiter."""

    def __init__(self, agent, backing: Path, mountpoint: str, control: Path, fsname: str = "hangfs") -> None:
        self.agent, self.backing, self.mountpoint, self.control = agent, backing, mountpoint, control
        backing.mkdir(parents=True, exist_ok=True)
        nsrun(agent, "mkdir", "-p", mountpoint)
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(agent.proc.pid), "-m", "--", sys.executable, str(HANGFS), str(backing),
             mountpoint, str(control), "--fsname", fsname],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while mount_entry(agent, mountpoint) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("hangfs did not mount")
            time.sleep(0.05)

    def hang(self, ops: str = "all") -> None:
        self.control.write_text(ops)

    def release(self) -> None:
        self.control.unlink(missing_ok=True)

    def abort(self) -> None:
        abort_fuse(self.agent)

    def stop(self) -> None:
        """Kill the daemon (after abort(): nothing waits on it any more)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def abort_fuse(agent) -> None:
    """Abort every FUSE connection mounted in the agent's namespace (like umount -f on dead NFS)."""
    if agent.proc is None or agent.proc.poll() is not None:
        return
    try:
        entries = mountinfo(agent)
    except OSError:
        return
    conns = {f[2].split(":")[1] for f in entries if fstype_source(f)[0].startswith("fuse")}
    if not conns:
        return
    ctl = nspath(agent, "/sys/fs/fuse/connections")
    try:
        ready = any(ctl.iterdir())
    except OSError:
        ready = False
    if not ready:
        nsrun(agent, "mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections", check=False)
    for c in conns:
        p = nspath(agent, f"/sys/fs/fuse/connections/{c}/abort")
        try:
            p.write_text("1")
        except OSError:
            pass


def loop_mount(agent, image: Path, mountpoint: str, fstype: str, size_mb: int) -> None:
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    mkfs = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.xfs", "-q", "-f"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    nsrun(agent, "mkdir", "-p", mountpoint)
    nsrun(agent, "mount", "-o", "loop", str(image), mountpoint)


# --- a download server ------------------------------------------------------------------------------

class FileServer:
    """A real HTTP server on 127.0.0.1 answering GET /{name} with handle() (the subclass's)."""

    runner: web.AppRunner | None = None
    port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self):
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


# --- API shortcuts ---------------------------------------------------------------------------------

async def add_storage(http, agent, kind: str, params: dict, timeout: float = 30) -> tuple[int, dict]:
    status, body = await submit(http, agent, "POST", f"{PS}/{kind}", {"params": params})
    if status != 202:
        return status, body
    return await wait_job(http, agent, body["location"], timeout)


async def get(http, agent, path: str, params=None) -> tuple[int, Any]:
    async with http.get(agent.url + path, params=params, headers=agent.headers) as r:
        return r.status, await r.json()


async def job(http, agent, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, dict]:
    """Submit; a 4xx at submission is returned as is, else the job's outcome."""
    status, reply = await submit(http, agent, method, path, body)
    if status != 202:
        return status, reply
    return await wait_job(http, agent, reply["location"], timeout)


async def connect_events(http, agent, receiver) -> None:
    status, body = await run_job(http, agent, "PUT", "/v1/host/actions",
                                 {"connectHost": {"hostUuid": uid(),
                                                  "managementServerUrl": receiver.url("/events")}})
    assert status == 200, body


def status_events(receiver, ps_uuid: str) -> list[dict]:
    return [r["body"]["data"] for r in receiver.received
            if r["headers"].get("X-Event-Type") == "StorageStatusChanged"
            and r["body"]["data"]["primaryStorageUuid"] == ps_uuid]


async def wait_status_event(receiver, ps_uuid: str, new_status: str, after: int = 0,
                            timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        evs = status_events(receiver, ps_uuid)[after:]
        for e in evs:
            if e["newStatus"] == new_status:
                return e
        if time.monotonic() > deadline:
            raise AssertionError(f"no StorageStatusChanged to {new_status} in {timeout} s; got "
                                 f"{status_events(receiver, ps_uuid)}")
        await asyncio.sleep(0.05)


def fake_mount_log(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- migrations between two agents ------------------------------------------------------------

def migration_pair(agent_factory) -> tuple[Any, Any]:
    """Two started agents, "src" and "dst", that give up on a migration stalled for 10 s."""
    conf = fast_storage(migration_stall_seconds=10)
    return agent_factory(conf, name="src").start(), agent_factory(conf, name="dst").start()


def fill(path, size: int, data_every: int, chunk: int) -> None:
    """Write distinct data chunks at every data_every bytes; the rest stays a hole."""
    with open(path, "r+b") as f:
        for i, off in enumerate(range(0, size, data_every)):
            f.seek(off)
            f.write(hashlib.sha256(str(i).encode()).digest() * (chunk // 32))


def kill9_source_mid_stream(src, dst) -> None:
    """kill -9 the source while the destination is held (SIGSTOP), so the stream is cut mid-way."""
    os.kill(dst.proc.pid, signal.SIGSTOP)
    try:
        src.kill9()
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)


async def wait_streaming(http, agent, location: str, timeout: float) -> None:
    """Until the migration job at location reports sent bytes (it must still be running)."""
    async def streaming():
        async with http.get(location, headers=agent.headers) as r:
            got = await r.json()
            assert r.status == 202, got
            return (got.get("progress") or {}).get("sentBytes", 0) > 0
    await wait_for(streaming, timeout, "the stream started", interval=0.01)


async def temporary_removed(root: Path, timeout: float = 10,
                            what: str = "the destination's temporary removed") -> None:
    await wait_for(lambda: not any(".part-" in f for f in all_files(root)), timeout, what)


def visible_files(root: Path) -> set[str]:
    """Files under root whose names do not start with '.' (what a user would see)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if not any(part.startswith(".") for part in rel.split(os.sep)):
                out.add(rel)
    return out


def all_files(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return out
