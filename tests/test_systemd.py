"""The systemd unit (checked by systemd-analyze) and agent.sdnotify."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path

import pytest

from agent import sdnotify

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "node-agent.service"
EXAMPLE = REPO / "systemd" / "node-agent.toml.example"
INSTALLED_EXEC = "/opt/node-agent/.venv/bin/node-agent"


# --- the unit ----------------------------------------------------------------

def _local_exec() -> str:
    """An existing executable to stand in for /opt/node-agent/... in verify."""
    for cand in (REPO / ".venv" / "bin" / "node-agent",
                 Path(sys.executable).parent / "node-agent"):
        if os.access(cand, os.X_OK):
            return str(cand)
    return sys.executable


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} serve " in text
    # verify fails when the ExecStart binary is missing, and /opt/node-agent
    # exists only on an installed host: point it at this checkout's binary.
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_EXEC}", f"ExecStart={_local_exec()}"))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # verify exits 0 on unknown keys or bad values, only printing them.
    ours = [line for line in out.splitlines() if UNIT.name in line]
    assert not ours, "\n".join(ours)


def _unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            settings[m.group(1)] = m.group(2).strip()
    return settings


def test_unit_keeps_mounts_visible_to_the_host():
    # Each of these gives the service a private mount namespace, which would
    # hide the agent's NFS/loop mounts from the host and from QEMU.
    namespaced = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                  "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
                  "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
                  "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
                  "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
                  "BindReadOnlyPaths", "MountFlags", "PrivateNetwork",
                  "DynamicUser", "RootDirectory", "RootImage"}
    settings = _unit_settings()
    bad = {k: v for k, v in settings.items()
           if k in namespaced and v.lower() not in ("", "no", "false", "0")}
    assert not bad
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert "CAP_SYS_ADMIN" in settings["CapabilityBoundingSet"].split()
    assert settings["RestrictAddressFamilies"].split() == [
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]


def _uncommented(text: str) -> str:
    """The example with its commented-out settings and sections enabled."""
    return re.sub(r"^#(\[\w+\]|\w+ = )", r"\1", text, flags=re.M)


def test_example_config_shows_the_defaults(tmp_path):
    from agent.config import Config, load_config
    from plugins.host import HostSettings

    conf = load_config(EXAMPLE)         # unknown or invalid keys raise
    raw = tomllib.loads(EXAMPLE.read_text())
    assert raw["server"]["host"] == "127.0.0.1" and raw["server"]["port"] == 7070
    assert raw["state"] == {"dir": "/var/lib/node-agent", "result_ttl_seconds": 172800}
    # "Every value shown is the default": each one equals the built-in default.
    defaults = Config()
    for section in ("server", "log", "libvirt"):
        want = getattr(defaults, section).model_dump()
        for key, value in raw.get(section, {}).items():
            assert value == want[key], f"[{section}] {key}"
    assert conf.state.result_ttl_seconds == defaults.state.result_ttl_seconds
    host = HostSettings(**conf.plugins["host"])
    assert host.allow_run_shell is False
    assert set(raw["host"]) <= set(HostSettings.model_fields)


def test_example_config_commented_settings_are_valid(tmp_path):
    from agent.config import load_config

    # Enable every commented-out setting and section: still a valid config.
    text = re.sub(r"^#(\[\w+\]|\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.M)
    for key in ("tls_cert", "tls_key", "tls_client_ca", "max_wait_seconds",
                "token_file", "format", "level", "uri", "call_timeout_seconds"):
        assert re.search(rf"^{key} = ", text, re.M), key
    path = tmp_path / "node-agent.toml"
    path.write_text(text)
    conf = load_config(path)
    assert conf.token_file == Path("/var/lib/node-agent/token")
    assert conf.libvirt.uri == "qemu:///system"


# --- sdnotify ----------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def path_socket(clean_env):
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="na-notify-") as d:
        path = os.path.join(d, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            clean_env.setenv("NOTIFY_SOCKET", path)
            yield sock


def test_notify_without_socket_is_a_noop(clean_env):
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_to_a_path_socket(path_socket):
    assert sdnotify.notify("READY=1") is True
    assert path_socket.recv(4096) == b"READY=1"
    assert sdnotify.notify("STATUS=serving on 127.0.0.1:7070\nREADY=1") is True
    assert path_socket.recv(4096) == b"STATUS=serving on 127.0.0.1:7070\nREADY=1"


def test_notify_sends_to_an_abstract_socket(clean_env):
    name = f"node-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_failures_return_false(clean_env, tmp_path):
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("1000", None, 0.0005),
    ("0", None, None),
    ("-5", None, None),
    ("", None, None),
    ("thirty", None, None),
    ("30000000", "garbage", None),
])
def test_watchdog_interval(clean_env, usec, pid, expected):
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        clean_env.setenv("WATCHDOG_PID", value)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_loop_returns_at_once_without_watchdog(clean_env):
    await asyncio.wait_for(sdnotify.watchdog_loop(), timeout=1)


async def test_watchdog_loop_pets_the_dog_until_cancelled(path_socket, clean_env):
    clean_env.setenv("WATCHDOG_USEC", "40000")          # every 20 ms
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    task = asyncio.create_task(sdnotify.watchdog_loop())
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    path_socket.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(path_socket.recv(4096))
        except BlockingIOError:
            break
    assert len(pings) >= 3
    assert set(pings) == {b"WATCHDOG=1"}
