"""``node-agent doctor``: check this node the way an operator at its console would.

Each check gives one status and one line saying, in plain words, what to do
when it is not ok.  Checks are independent: every one has its own timeout,
and an exception inside one becomes that check's "fail", never a crash.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import tempfile
import textwrap
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

import aiohttp

from agent import cpuinfo
from agent.client import AgentClient, AgentError, default_base_url, read_token
from agent.config import Config

Status = Literal["ok", "warn", "fail", "skip"]

HEALTH_TIMEOUT = 3.0
LIBVIRT_TIMEOUT = 5.0
FS_TIMEOUT = 5.0
START_HINT = "start it: systemctl start node-agent"


@dataclass
class Check:
    name: str
    status: Status
    detail: str


# -- helpers -----------------------------------------------------------------

async def _in_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """Run a blocking call in a daemon thread, bounded by ``timeout``.

    Not asyncio.to_thread: a libvirt connect or a write to a hung NFS state
    dir can block forever, and the default executor is joined at exit, so the
    CLI would hang after printing.  A daemon thread is simply abandoned.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(exc) if exc else fut.set_result(result)

    def runner() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting check
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting any more

    threading.Thread(target=runner, name="doctor-check", daemon=True).start()
    return await asyncio.wait_for(fut, timeout)


async def _guard(name: str, check: Callable[[], Awaitable[Check | list[Check]]],
                 timeout: float) -> list[Check]:
    try:
        result = await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        return [Check(name, "fail", f"did not finish within {timeout:g} s")]
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        return [Check(name, "fail", f"check failed: {type(e).__name__}: {e}")]
    return result if isinstance(result, list) else [result]


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _host_root(config: Config) -> str:
    """Where /proc and /sys are read: [iommu] root, "/" unless a test generated a tree."""
    root = config.plugins.get("iommu", {}).get("root") or "/"
    return root if os.path.isabs(root) else "/"


def _transport_reason(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError) and e.os_error.errno:
        return os.strerror(e.os_error.errno).lower()   # "connection refused"
    if isinstance(e, TimeoutError):
        return "no answer"
    return str(e) or type(e).__name__


# -- local checks ------------------------------------------------------------

async def check_config(config: Config) -> Check:
    s = config.server
    tls = "TLS" + (" + client certs" if s.tls_client_ca else "") if s.tls_cert else "no TLS"
    return Check("config", "ok", f"loaded; listens on {s.host}:{s.port} ({tls})")


async def check_state_dir(config: Config) -> Check:
    path = config.state_dir

    def probe() -> Check:
        if not path.exists():
            return Check("state dir", "fail",
                         f"{path} does not exist: mkdir -m 700 -p {path} (or start the agent once)")
        if not path.is_dir():
            return Check("state dir", "fail", f"{path} is not a directory: move it away")
        try:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".doctor-")
        except OSError as e:
            return Check("state dir", "fail",
                         f"cannot write in {path} ({e.strerror}): fix its owner/mode "
                         f"for {_user(os.geteuid())}")
        os.close(fd)
        os.unlink(tmp)
        return Check("state dir", "ok", f"{path} is writable")

    return await _in_thread(probe, FS_TIMEOUT)


async def check_token_file(config: Config) -> Check:
    return await _in_thread(lambda: _token_probe(config.token_file), FS_TIMEOUT)


def _token_probe(path: Path) -> Check:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check("token file", "fail",
                     f"{path} is missing: start the agent once to create it, "
                     f"or write a random token there and chmod 600 {path}")
    me = os.geteuid()
    if st.st_uid != me:
        return Check("token file", "fail",
                     f"{path} is owned by {_user(st.st_uid)}, not {_user(me)}: "
                     f"chown {_user(me)} {path} (or run doctor as the agent's user)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        # The token is the node's only credential: nobody else may read it.
        return Check("token file", "fail",
                     f"{path} is readable by others (mode {mode:04o}): chmod 600 {path}")
    read_token(path)  # raises when empty or unreadable
    return Check("token file", "ok", f"{path} (mode {mode:04o}, owner {_user(me)})")


def _libvirt_probe(uri: str) -> Check:
    try:
        import libvirt
    except ImportError:
        return Check("libvirt", "warn",
                     "python3-libvirt missing: apt install python3-libvirt "
                     "(dnf install python3-libvirt)")
    # libvirt prints every error to stderr by default; we report it ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        msg = " ".join(str(e.get_error_message() or e).split())
        return Check("libvirt", "fail",
                     f"cannot open {uri}: {msg}; start it: systemctl start libvirtd")
    try:
        v = conn.getLibVersion()
        return Check("libvirt", "ok",
                     f"{uri}: libvirt {v // 1000000}.{v // 1000 % 1000}.{v % 1000}")
    finally:
        conn.close()


async def check_libvirt(config: Config) -> Check:
    uri = config.plugins.get("libvirt", {}).get("uri") or "qemu:///system"
    return await _in_thread(lambda: _libvirt_probe(uri), LIBVIRT_TIMEOUT)


async def check_kvm() -> Check:
    if not os.path.exists("/dev/kvm"):
        return Check("/dev/kvm", "fail",
                     "absent: enable VT-x/AMD-V in firmware or load kvm_intel/kvm_amd")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Check("/dev/kvm", "fail",
                     f"not usable by {_user(os.geteuid())}: run as root or add the user to group kvm")
    return Check("/dev/kvm", "ok", "present and usable")


_VIRT = {cpuinfo.INTEL: "VT-x", cpuinfo.AMD: "AMD-V (SVM)"}
_FIRMWARE_IOMMU = {cpuinfo.INTEL: "VT-d", cpuinfo.AMD: "AMD-Vi (IOMMU)"}


async def check_cpu_virt(root: str = "/") -> Check:
    vendor, flags = await _in_thread(lambda: cpuinfo.read(root), FS_TIMEOUT)
    if "vmx" in flags:
        return Check("cpu virtualization", "ok", "Intel VT-x (vmx)")
    if "svm" in flags:
        return Check("cpu virtualization", "ok", "AMD-V (svm)")
    what = _VIRT.get(cpuinfo.vendor_kind(vendor), "VT-x/AMD-V")
    return Check("cpu virtualization", "fail",
                 f"no vmx/svm flag: enable {what} in firmware "
                 "(or nested virtualization on the parent hypervisor)")


async def check_iommu(root: str = "/") -> Check:
    def probe() -> Check:
        groups = Path(root, "sys/kernel/iommu_groups")
        count = len(os.listdir(groups)) if groups.is_dir() else 0
        if count:
            return Check("iommu", "ok", f"active, {count} groups")
        try:
            cmdline = Path(root, "proc/cmdline").read_text().split()
        except OSError:
            cmdline = []
        # The vendor's own flag, from vendor_id (as GET /v1/iommu/state), never from
        # svm/vmx: an AMD host with SVM off still needs amd_iommu=on, not intel_iommu=on.
        kind = cpuinfo.vendor_kind(cpuinfo.read(root)[0])
        flag = cpuinfo.vendor_flag(kind)
        firmware = _FIRMWARE_IOMMU.get(kind, "VT-d/AMD-Vi")
        asked = [flag] if flag else ["intel_iommu=on", "amd_iommu=on"]
        if any(f in cmdline for f in asked):
            hint = f"asked for on the kernel command line: enable {firmware} in firmware"
        else:
            param = flag or "intel_iommu=on (Intel) or amd_iommu=on (AMD)"
            hint = f"add {param} to the kernel command line and reboot"
        # Only PCI passthrough needs it, so this is a warning, not a failure.
        return Check("iommu", "warn", f"inactive (needed for PCI passthrough): {hint}")

    return await _in_thread(probe, FS_TIMEOUT)


# -- checks against the running agent ----------------------------------------

async def check_agent(config: Config, base_url: str | None) -> list[Check]:
    """Reachability, the token, and each plugin's availability, in that order."""
    url = base_url or default_base_url(config)
    # Our own agent on loopback: its certificate names the node, not 127.0.0.1,
    # so verifying it here would only produce a false alarm.
    ssl = None if base_url else False
    async with AgentClient(url, None, ssl=ssl, timeout=HEALTH_TIMEOUT) as anon:
        try:
            health = await anon.get("/v1/health")
        except AgentError as e:
            down = f"agent at {url} answered {e}"
            return [Check("agent", "fail", f"{down}: check journalctl -u node-agent"),
                    Check("auth", "fail", "agent not healthy; fix the agent first"),
                    Check("plugins", "fail", "agent not healthy; fix the agent first")]
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            hint = f"{START_HINT} (journalctl -u node-agent says why it stopped)"
            if config.server.tls_client_ca:
                hint += "; it requires client certificates, so check from a controller too"
            return [Check("agent", "fail", f"{_transport_reason(e)} at {url}: {hint}"),
                    Check("auth", "fail", f"agent not reachable: {START_HINT}"),
                    Check("plugins", "fail", f"agent not reachable: {START_HINT}")]

    status = health.get("status", "?")
    checks = [Check("agent", "ok" if status == "ok" else "warn",
                    f"{url}: version {health.get('version', '?')}, status {status}")]
    checks += await _guard("auth", lambda: _check_auth(config, url, ssl), HEALTH_TIMEOUT + 1)
    checks += _plugin_checks(health)
    return checks


async def _check_auth(config: Config, url: str, ssl: Any) -> Check:
    try:
        token = read_token(config.token_file)
    except (OSError, ValueError) as e:
        return Check("auth", "fail", f"cannot read the token: {e}")
    async with AgentClient(url, token, ssl=ssl, timeout=HEALTH_TIMEOUT) as client:
        try:
            await client.get("/v1/host/ping")
        except AgentError as e:
            if e.status == 401:
                return Check("auth", "fail",
                             f"token rejected: the agent does not accept {config.token_file}; "
                             "if you changed it, systemctl restart node-agent")
            return Check("auth", "warn", f"token accepted, but ping answered {e}")
    return Check("auth", "ok", "token accepted (GET /v1/host/ping)")


def _plugin_checks(health: dict) -> list[Check]:
    plugins = health.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        return [Check("plugins", "warn", "the agent reports no plugins: check its install")]
    checks = []
    for p in plugins:
        name = f"plugin {p.get('name', '?')}"
        if p.get("available"):
            checks.append(Check(name, "ok", "available"))
        else:
            checks.append(Check(name, "warn", f"unavailable: {p.get('reason') or 'no reason given'}"))
    return checks


# -- entry points ------------------------------------------------------------

async def run_checks(config: Config, *, base_url: str | None = None) -> list[Check]:
    # All checks run at once; the list keeps this fixed, readable order.
    groups = await asyncio.gather(
        _guard("config", lambda: check_config(config), 1),
        _guard("state dir", lambda: check_state_dir(config), FS_TIMEOUT + 1),
        _guard("token file", lambda: check_token_file(config), FS_TIMEOUT + 1),
        _guard("agent", lambda: check_agent(config, base_url), 3 * HEALTH_TIMEOUT + 2),
        _guard("libvirt", lambda: check_libvirt(config), LIBVIRT_TIMEOUT + 1),
        _guard("/dev/kvm", check_kvm, 2),
        _guard("cpu virtualization", lambda: check_cpu_virt(_host_root(config)), FS_TIMEOUT + 1),
        _guard("iommu", lambda: check_iommu(_host_root(config)), FS_TIMEOUT + 1),
    )
    return [c for group in groups for c in group]


def render_table(checks: list[Check], width: int = 80) -> str:
    name_w = max([len("CHECK")] + [len(c.name) for c in checks])
    prefix = f"{'STATUS':<6}  {'CHECK':<{name_w}}  "
    detail_w = max(30, width - len(prefix))
    lines = [prefix + "DETAIL"]
    for c in checks:
        # Long details wrap under the DETAIL column so the columns stay aligned.
        wrapped = textwrap.wrap(c.detail, detail_w, break_on_hyphens=False) or [""]
        lines.append(f"{c.status.upper():<6}  {c.name:<{name_w}}  {wrapped[0]}")
        lines += [" " * len(prefix) + more for more in wrapped[1:]]
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


def to_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0,
                       "checks": [asdict(c) for c in checks]}, indent=2)
