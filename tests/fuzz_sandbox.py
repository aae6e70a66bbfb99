"""A sandboxed agent for the fuzz tests and bench/fuzz_long.py.

Every plugin is pointed at temp dirs: a generated sysfs (devices), a generated
/proc + /etc/default/grub (iommu, regeneration off), storage and Ceph spools,
the isolated libvirtd of tests/libvirt_fixture.py.  mount, umount and the
package managers are stubs that refuse.  And the agent runs with / as an
overlay (tests/services/overlay-root.sh in a private mount namespace): a
fuzzed request that writes anywhere outside the sandbox writes into the
overlay's upper dir, where ``writes_outside()`` finds it, never on this host.
kvmRunShell stays disabled (the default) and updateHostOS is never sent:
``fuzz_schema()`` drops both from the document given to schemathesis.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sysfs_fixtures as fx  # noqa: E402
from agentproc import REPO, AgentProcess  # noqa: E402

OVERLAY = HERE / "services" / "overlay-root.sh"
#: never sent by the fuzzer: they change the host itself by design
EXCLUDED_ACTIONS = ("updateHostOS", "kvmRunShell")
#: not fuzzed by schemathesis: an endless event stream (each case would wait for the
#: request timeout); tests/test_durability.py covers its input, Last-Event-ID
EXCLUDED_PATHS = ("/v1/events",)
REFUSE = "#!/bin/sh\necho \"$0: refused by the fuzz sandbox\" >&2\nexit 32\n"
STUBS = ("mount", "umount", "apt-get", "dnf", "yum")
GRUB = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
# The fuzz venv's schemathesis CLI (scripts/install.sh makes it).
ST = REPO / ".venv-fuzz" / "bin" / "st"
# 503 is the wire contract's answer for a failed operation or an unavailable
# plugin (API.md), documented on every operation; 500 is a bug.
ST_CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,ignored_auth,unsupported_method,allow_header_conformance,"
          "missing_required_header,negative_data_rejection")


def _write(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)


class Sandbox:
    """The dirs, stubs and config of one sandboxed agent under ``base``."""

    def __init__(self, base: Path, libvirt_uri: str, libvirt_dir: Path) -> None:
        self.base = base
        self.dir = base / "sandbox"          # every plugin's root
        self.overlay = base / "overlay"      # upper/ holds the writes made outside
        self.workdir = base / "agent"        # the agent's config, state and log
        self.libvirt_uri = libvirt_uri
        self.libvirt_dir = libvirt_dir
        self.binds = [self.dir, self.workdir, libvirt_dir]

    def prepare(self) -> None:
        for d in (self.dir, self.overlay, self.workdir):
            d.mkdir(parents=True, exist_ok=True)
        fx.gpu_server(self.dir / "sysfs")
        iommu = self.dir / "iommu"
        _write(iommu / "proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n")
        _write(iommu / "proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\n"
                                       "flags\t\t: fpu vmx lm\n\n")
        (iommu / "sys/kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
        _write(iommu / "etc/default/grub", GRUB)
        for name in STUBS:
            _write(self.dir / "bin" / name, REFUSE, 0o755)
        for d in ("nfs", "ceph-spool"):
            (self.dir / d).mkdir(exist_ok=True)

    def config(self) -> dict[str, dict[str, Any]]:
        d = self.dir
        return {
            "libvirt": {"uri": self.libvirt_uri, "call_timeout_seconds": 10},
            "vm": {"domain_type": "qemu", "stats_interval_seconds": 5},
            "devices": {"sysfs_root": str(d / "sysfs"), "hotplug": False},
            "iommu": {"root": str(d / "iommu"), "regenerate": False},
            "storage": {"mount_command": [str(d / "bin/mount")],
                        "umount_command": [str(d / "bin/umount")],
                        "nfs_mount_root": str(d / "nfs"), "call_timeout_seconds": 3,
                        "probe_timeout_seconds": 3},
            "baremetal": {"call_timeout_seconds": 2, "retries": 0},
            "ceph": {"download_dir": str(d / "ceph-spool"), "mount_timeout": 2,
                     "mon_op_timeout": 2, "osd_op_timeout": 3},
        }

    def agent(self) -> AgentProcess:
        self.prepare()
        wrapper = ["unshare", "-m", "--propagation", "private", "bash", str(OVERLAY),
                   str(self.overlay), *map(str, self.binds), "--"]
        env = {"PATH": f"{self.dir / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1"}
        return AgentProcess(self.workdir, self.config(), env=env, wrapper=wrapper)

    def writes_outside(self) -> list[str]:
        """Every file the agent made or changed outside the sandbox (the overlay's upper
        dir), less the directories the overlay script made as mount points."""
        upper = self.overlay / "upper"
        skeleton = {Path("/")}
        for b in self.binds:
            p = Path(b)
            skeleton |= {p, *p.parents}
        found = []
        for dirpath, dirnames, filenames in os.walk(upper):
            rel = Path("/") / Path(dirpath).relative_to(upper)
            for n in filenames:
                found.append(str(rel / n))
            for n in dirnames:
                if rel / n not in skeleton:
                    found.append(str(rel / n) + "/")
            dirnames[:] = [n for n in dirnames if rel / n in skeleton]
        return sorted(found)


def domain_names(uri: str) -> set[str]:
    import libvirt
    conn = libvirt.open(uri)
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


def remove_domains(uri: str, keep: set[str]) -> list[str]:
    """Destroy and undefine the domains fuzzing made (all but keep): the isolated
    libvirtd is shared by the session's other tests."""
    import libvirt
    conn = libvirt.open(uri)
    removed = []
    try:
        for dom in conn.listAllDomains(0):
            if dom.name() in keep:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                      | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                removed.append(dom.name())
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    return removed


def get_json(agent: AgentProcess, path: str, token: bool = True) -> Any:
    req = urllib.request.Request(agent.url + path, headers=agent.headers if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def internal_error_jobs(agent: AgentProcess) -> list[dict[str, Any]]:
    """The agent's failed jobs whose result is an internal error (SYS.1500), with that result."""
    bad = []
    for job in get_json(agent, "/v1/api-jobs")["inventories"]:
        if job["state"] != "Failed":
            continue
        req = urllib.request.Request(f"{agent.url}/v1/api-jobs/{job['uuid']}", headers=agent.headers)
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            if "SYS.1500" in body:
                bad.append({"job": job, "result": body})
    return bad


def own_traceback_lines(log: str) -> list[str]:
    """The lines of a log's tracebacks that go through the agent's own files."""
    return [line for line in log.splitlines() if line.strip().startswith(f'File "{REPO}/')]


def fuzz_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The agent's document without the actions that must never be fuzzed."""
    doc = copy.deepcopy(document)
    for item in doc["paths"].values():
        for op in item.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            variants = body.get("schema", {}).get("oneOf")
            if variants:
                body["schema"]["oneOf"] = [v for v in variants
                                           if not set(v.get("required", ())) & set(EXCLUDED_ACTIONS)]
    return doc


def run_schemathesis(agent: AgentProcess, out: Path, *, max_examples: int, seed: int | None = None,
                     phases: str = "examples,coverage,fuzzing", workers: int = 4,
                     max_time: float | None = None, checks: str = CHECKS,
                     extra: list[str] = ()) -> subprocess.CompletedProcess:
    """``st run`` over the sandboxed agent; its JUnit report goes to out/junit.xml."""
    out.mkdir(parents=True, exist_ok=True)
    schema = out / "openapi.json"
    schema.write_text(json.dumps(fuzz_schema(get_json(agent, "/v1/openapi.json"))))
    config = out / "schemathesis.toml"
    config.write_text(ST_CONFIG)
    argv = [str(ST), "--config-file", str(config), "--no-color", "run", str(schema), "--url", agent.url,
            "--header", f"Authorization: OAuth {agent.token}",
            "--checks", checks,
            *[a for p in EXCLUDED_PATHS for a in ("--exclude-path", p)],
            "--phases", phases, "--max-examples", str(max_examples), "--workers", str(workers),
            "--request-timeout", "30", "--suppress-health-check", "all",
            "--report", "junit", "--report-junit-path", str(out / "junit.xml"), *extra]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if max_time is not None:
        argv += ["--max-time", str(max(1, int(max_time)))]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1")
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=out)


def fuzz_available() -> str | None:
    """Why schemathesis cannot run here, or None."""
    if not ST.exists():
        return f"{ST} is missing: scripts/install.sh makes the fuzz venv"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "the sandbox needs root and unshare (a private mount namespace)"
    return None
