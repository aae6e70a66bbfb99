"""Host config -> the files an installing machine fetches.

Kickstart (RHEL family) and preseed (Debian family) are Jinja2 templates with
autoescape off (they are not HTML); every value they receive was validated by
pxe_models to a narrow character set, so none needs quoting.  The Debian
network script travels base64-encoded inside the preseed for the same reason.

The root password is hashed with ``openssl passwd -6`` (SHA-512 crypt), the
password going in on stdin: never in argv, where ``ps`` would show it.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import errors
from agent.validation import full_match

from .pxe_models import BOND_MODES

TEMPLATES = Path(__file__).with_name("templates")
SHA512_CRYPT_RE = re.compile(r"^\$6\$(rounds=\d{4,9}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$")

_env = None


def render(name: str, **values: Any) -> str:
    global _env
    if _env is None:        # imported on first use: jinja2 costs ~35 ms of agent start-up
        import jinja2
        _env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True,
                                  lstrip_blocks=True, keep_trailing_newline=True)
    return _env.get_template(name).render(**values)


async def hash_password(runner, password: str, openssl: str = "openssl") -> str:
    """SHA-512 crypt of password; the password goes to openssl on stdin."""
    try:
        res = await runner.run([openssl, "passwd", "-6", "-stdin"], input=password.encode() + b"\n",
                               timeout=20)
    except FileNotFoundError:
        raise errors.Unavailable(f"'{openssl}' is not installed; it hashes the root password",
                                 code="BM.2008") from None
    out = res.stdout.decode(errors="replace").strip()
    if res.returncode != 0 or not full_match(SHA512_CRYPT_RE, out):
        # stderr of openssl never echoes the password it read from stdin
        raise errors.OperationFailed("openssl could not hash the root password: "
                                     + res.stderr.decode(errors="replace").strip()[:300],
                                     code="BM.2008")
    return out


def _bond_view(b: dict[str, Any]) -> dict[str, Any]:
    return dict(b, mode_name=BOND_MODES[b["mode"]])


def _host_names(spec: dict[str, Any]) -> tuple[str, str, str]:
    hostname = spec["hostname"]
    short, _, domain = hostname.partition(".")
    return hostname, short, domain


def template_values(spec: dict[str, Any], *, uuid: str, password_hash: str | None, base: str,
                    token: str, conf) -> dict[str, Any]:
    """What every template of one host config gets."""
    hostname, short, domain = _host_names(spec)
    slaves = {m for b in spec["bondings"] for m in b["slaves"]}
    nics = [n for n in spec["nicCfgs"] if n["mac"] not in slaves]
    return {
        "uuid": uuid, "chassis_uuid": spec["chassisUuid"], "hostname": hostname,
        "short_hostname": short, "domain": domain, "os_family": spec["osFamily"],
        "unattended": spec["unattended"], "vnc": spec["vnc"], "password_hash": password_hash,
        "nics": nics, "bonds": [_bond_view(b) for b in spec["bondings"]],
        "base": base, "install_url": f"{base}/v1/baremetal/install/{token}",
        "done_url": f"{base}/v1/baremetal/install/{token}/done",
        "repo_url": conf.rhel_repo_url, "timezone": conf.timezone, "suite": conf.debian_suite,
        "mirror_url": conf.debian_mirror,
    }


def render_install_file(values: dict[str, Any]) -> str:
    if values["os_family"] == "rhel":
        return render("kickstart.ks.j2", **values)
    script = render("debian-network.sh.j2", **values)
    mirror = urlsplit(values["mirror_url"])
    return render("preseed.cfg.j2", **values,
                  network_script_b64=base64.b64encode(script.encode()).decode(),
                  mirror_scheme=mirror.scheme, mirror_host=mirror.netloc,
                  mirror_dir=mirror.path or "/")


def kernel_args(values: dict[str, Any], serial_console: str | None) -> str:
    """The installer's kernel command line (iPXE expands ${netX/...})."""
    args: list[str] = []
    if values["os_family"] == "rhel":
        args += [f"inst.ks={values['install_url']}", f"inst.repo={values['repo_url']}",
                 "ip=dhcp", "BOOTIF=01-${netX/mac:hexhyp}"]
        if values["vnc"]:
            args.append("inst.vnc")
        elif values["unattended"]:
            args.append("inst.text")
    else:
        if values["unattended"]:
            args += ["auto=true", "priority=critical"]
        # The preseed is fetched only once the network is up, and netcfg asks (at
        # critical priority) "Continue without a default route?" when DHCP offers no
        # router, and for name servers when it offers none: answer both here.  A DHCP
        # offer with a router or DNS servers (the PXE server's router, dnsServers) is
        # used as offered.
        args += [f"url={values['install_url']}", "locale=en_US.UTF-8", "keymap=us",
                 "netcfg/choose_interface=auto", "netcfg/no_default_route=true",
                 "netcfg/get_nameservers=",
                 f"hostname={values['short_hostname']}",
                 f"domain={values['domain']}", "BOOTIF=01-${netX/mac:hexhyp}"]
    if serial_console:
        args += ["console=tty0", f"console={serial_console}"]
    return " ".join(args)


def render_host_ipxe(values: dict[str, Any], serial_console: str | None) -> str:
    return render("host.ipxe.j2", **values, kernel_args=kernel_args(values, serial_console))


def render_exit_ipxe(reason: str) -> str:
    return render("exit.ipxe.j2", reason=re.sub(r"[^A-Za-z0-9 .,:;()/_-]", "", reason))
