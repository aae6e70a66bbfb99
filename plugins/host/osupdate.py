"""updateHostOS: upgrade the node's packages with its own package manager.

apt (Debian family) or dnf/yum (RHEL family), found on PATH.  Excluded
packages are held for the duration of an apt upgrade and released after,
whatever happens.  ``dryRun`` asks the package manager what it would do.
"""

from __future__ import annotations

import os
import re
import shutil

from pydantic import Field

from agent import errors
from agent.models import WireModel
from agent.validation import full_match

PACKAGE = r"^[A-Za-z0-9][A-Za-z0-9+._:*-]{0,127}$"   # names (and globs for dnf), never options
REPO = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
APT_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+)")
APT_SETUP = re.compile(r"^Setting up (\S+?)(?::\S+)? \((\S+)\)")
DNF_LINE = re.compile(r"^\s*(?:Upgrading|Installing)\s*:\s*(\S+)")


class UpdateHostOS(WireModel):
    exclude_packages: list[str] = Field([], max_length=1000)
    enable_repos: list[str] = Field([], max_length=100)
    dry_run: bool = False
    timeout: int = Field(3600, ge=10, le=6 * 3600)

    def model_post_init(self, _ctx) -> None:
        for name in self.exclude_packages:
            if not full_match(PACKAGE, name):
                raise ValueError(f"not a package name: {name!r}")
        for repo in self.enable_repos:
            if not full_match(REPO, repo):
                raise ValueError(f"not a repository id: {repo!r}")


class Package(WireModel):
    name: str
    version: str | None = None


class UpdateHostOSResult(WireModel):
    package_manager: str
    dry_run: bool
    upgraded: list[Package]
    excluded: list[str]


def package_manager() -> str | None:
    for name in ("apt-get", "dnf", "yum"):
        if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"):
            return name
    return None


def check(params: UpdateHostOS) -> None:
    pm = package_manager()
    if pm is None:
        raise errors.Unavailable("no supported package manager (apt-get, dnf, yum) on this node",
                                 code="HOST.1101")
    if pm == "apt-get" and params.enable_repos:
        raise errors.BadRequest("enableRepos applies to dnf/yum only; this node uses apt",
                                code="HOST.1102")


async def update(job, params: UpdateHostOS) -> UpdateHostOSResult:
    pm = package_manager()
    if pm == "apt-get":
        upgraded = await _apt(job, params)
    else:
        upgraded = await _dnf(job, pm, params)
    job.progress(100, "done")
    return UpdateHostOSResult(package_manager=pm, dry_run=params.dry_run, upgraded=upgraded,
                              excluded=params.exclude_packages)


APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C"}


async def _apt(job, params: UpdateHostOS) -> list[Package]:
    run = job.runner.run
    if params.dry_run:
        job.progress(20, "simulating the upgrade")
        out = await run(["apt-get", "-s", "upgrade"], timeout=params.timeout, env=APT_ENV, check=True)
        found = [Package(name=m[1], version=m[2]) for m in map(APT_INST.match, _lines(out)) if m]
        return [p for p in found if p.name not in params.exclude_packages]
    job.progress(5, "refreshing the package lists")
    await run(["apt-get", "update", "-q"], timeout=params.timeout, env=APT_ENV, check=True)
    held = await run(["apt-mark", "showhold"], timeout=60, env=APT_ENV, check=True)
    already = set(_lines(held))
    to_hold = [p for p in params.exclude_packages if p not in already]
    try:
        if to_hold:
            job.progress(15, f"holding {len(to_hold)} excluded package(s)")
            await run(["apt-mark", "hold", "--", *to_hold], timeout=60, env=APT_ENV, check=True)
        job.progress(25, "upgrading packages")
        out = await run(["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", "upgrade"],
                        timeout=params.timeout, env=APT_ENV, check=True)
    finally:
        if to_hold:
            await run(["apt-mark", "unhold", "--", *to_hold], timeout=60, env=APT_ENV)
    return [Package(name=m[1], version=m[2]) for m in map(APT_SETUP.match, _lines(out)) if m]


async def _dnf(job, pm: str, params: UpdateHostOS) -> list[Package]:
    argv = [pm, "-y", "upgrade"] + [f"--exclude={p}" for p in params.exclude_packages] \
        + [f"--enablerepo={r}" for r in params.enable_repos]
    if params.dry_run:
        argv[1] = "--assumeno"
    job.progress(10, "upgrading packages" if not params.dry_run else "simulating the upgrade")
    out = await job.runner.run(argv, timeout=params.timeout, env={"PATH": APT_ENV["PATH"], "LC_ALL": "C"})
    if out.returncode != 0 and not params.dry_run:   # --assumeno exits 1 by design
        raise errors.OperationFailed(f"{pm} upgrade failed with exit code {out.returncode}",
                                     code="HOST.1103", details=out.stderr[-2000:].decode(errors="replace"))
    return [Package(name=m[1]) for m in map(DNF_LINE.match, _lines(out)) if m]


def _lines(result) -> list[str]:
    return result.stdout.decode(errors="replace").splitlines()
