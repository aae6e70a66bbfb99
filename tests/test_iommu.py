"""The IOMMU plugin: evidence and command-line edits as pure functions, then real
agent processes over HTTP whose [iommu] root is a generated tree.

Regeneration tools are real executables (shell scripts) put first on the
agent's PATH; they record their argv.  Nothing is patched.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from agent.cpuinfo import vendor_kind
from conftest import run_job, submit, wait_job
from plugins.iommu import bootconfig, status, system
from plugins.iommu.bootconfig import BootConfigError, GrubFile

AS_ROOT = os.geteuid() == 0

DEBIAN_GRUB = """\
# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.

GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=tty0 crashkernel=auto"   # serial console too

# Uncomment to disable graphical terminal
#GRUB_TERMINAL=console
"""


# --------------------------------------------------------------------------
# Generated roots
# --------------------------------------------------------------------------

def write(root: Path, rel: str, text: str = "") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cpuinfo(vendor: str, flags: str) -> str:
    return "".join(f"processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: test cpu\n"
                   f"flags\t\t: fpu vme de pse tsc msr {flags} lm\n\n" for n in range(2))


def make_host(root: Path, *, vendor: str = "GenuineIntel", active: bool = False,
              table: bool = True, cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet",
              grub: str | None = DEBIAN_GRUB, vm: bool = False) -> Path:
    """A node: /proc, /sys and /etc/default/grub as an Intel or AMD hypervisor has them."""
    intel = vendor == "GenuineIntel"
    write(root, "proc/cpuinfo", cpuinfo(vendor, ("vmx" if intel else "svm")
                                        + (" hypervisor" if vm else "")))
    write(root, "proc/cmdline", cmdline + "\n")
    write(root, "proc/sys/kernel/osrelease", "6.1.0-18-amd64\n")
    (root / "sys/kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
    (root / "sys/class/iommu").mkdir(parents=True, exist_ok=True)
    (root / "sys/firmware/acpi/tables").mkdir(parents=True, exist_ok=True)
    if table:
        write(root, f"sys/firmware/acpi/tables/{'DMAR' if intel else 'IVRS'}", "table")
    if active:
        for n in range(3):
            (root / f"sys/kernel/iommu_groups/{n}/devices").mkdir(parents=True)
        for name in (("dmar0", "dmar1") if intel else ("ivhd0",)):
            (root / "sys/class/iommu" / name).mkdir()
    if grub is not None:
        write(root, "etc/default/grub", grub)
    return root


def tool(bindir: Path, name: str, body: str) -> Path:
    """A real executable on the agent's PATH that records how it was called."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n" + body)
    path.chmod(0o755)
    return path


def files(*texts: str) -> list[GrubFile]:
    names = ["/etc/default/grub"] + [f"/etc/default/grub.d/{50 + i}.cfg" for i in range(len(texts) - 1)]
    return [GrubFile(n, t) for n, t in zip(names, texts)]


def edit(text: str, enable: bool = True, kind: str = "intel", *dropins: str) -> list[str]:
    """The new text of each file (unchanged ones as they were)."""
    fs = files(text, *dropins)
    p = bootconfig.plan(fs, enable, kind)
    return [p.changes.get(f.path, (f.text, f.text))[1] for f in fs]


# --------------------------------------------------------------------------
# Evidence (status.py)
# --------------------------------------------------------------------------

def test_status_intel_active(tmp_path):
    root = make_host(tmp_path, active=True,
                     cmdline="BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt quiet -- single")
    s = status.collect(root).model_dump(by_alias=True)
    assert s == {"status": "Active", "reason": None, "evidence": {
        "iommuClass": ["dmar0", "dmar1"], "iommuGroups": 3, "acpiTable": "DMAR",
        "cmdline": ["intel_iommu=on", "iommu=pt"], "cpuVendor": "GenuineIntel",
        "virtualization": "vmx", "virtualMachine": False}}


def test_status_inactive_reasons(tmp_path):
    # Firmware has VT-d (a DMAR table), the kernel was not asked to use it.
    s = status.collect(make_host(tmp_path / "a"))
    assert s.status == "Inactive" and s.evidence.iommu_groups == 0 and s.evidence.acpi_table == "DMAR"
    assert s.reason.startswith("no IOMMU groups: ") and "add intel_iommu=on" in s.reason
    assert "firmware" not in s.reason

    # Neither the firmware nor the kernel.
    s = status.collect(make_host(tmp_path / "b", table=False))
    assert s.evidence.acpi_table is None
    assert "enable VT-d in the firmware" in s.reason and "add intel_iommu=on" in s.reason

    # Asked for and published, yet nothing: look at the kernel log.
    s = status.collect(make_host(tmp_path / "c", cmdline="ro intel_iommu=on"))
    assert s.evidence.cmdline == ["intel_iommu=on"] and "dmesg" in s.reason

    # AMD: on by default, so only an explicit off (or no IVRS) explains it.
    s = status.collect(make_host(tmp_path / "d", vendor="AuthenticAMD", cmdline="ro amd_iommu=off"))
    assert s.evidence.virtualization == "svm" and s.evidence.acpi_table == "IVRS"
    assert "remove amd_iommu=off" in s.reason
    s = status.collect(make_host(tmp_path / "e", vendor="AuthenticAMD", table=False))
    assert "enable AMD-Vi (IOMMU) in the firmware" in s.reason and "amd_iommu=on" not in s.reason

    # A nested hypervisor needs a virtual IOMMU from its own host.
    s = status.collect(make_host(tmp_path / "f", vm=True, table=False))
    assert s.evidence.virtual_machine and "virtual IOMMU" in s.reason

    # An empty root: nothing to read is not an error.
    s = status.collect(tmp_path / "empty")
    assert s.status == "Inactive" and s.evidence.cpu_vendor is None and s.evidence.iommu_class == []


def test_effective_state_rules():
    eff = bootconfig.effective
    assert eff(["quiet"], "intel")[0] is False
    assert eff(["intel_iommu=on"], "intel")[0] is True
    assert eff(["intel_iommu=on", "intel_iommu=off"], "intel")[0] is False      # last wins
    assert eff(["intel_iommu=on,sm_on"], "intel")[0] is True
    assert eff(["intel_iommu=on", "iommu=off"], "intel")[0] is False
    assert eff(["quiet"], "intel", intel_default_on=True)[0] is True
    assert eff(["quiet"], "amd")[0] is True                                      # AMD default
    assert eff(["amd_iommu=off"], "amd")[0] is False
    assert eff(["intel_iommu=on"], "amd")[0] is True                             # ignored on AMD
    assert bootconfig.kernel_tokens("ro intel_iommu=on -- iommu=off") == ["ro", "intel_iommu=on"]
    assert vendor_kind("HygonGenuine") == "amd"


def test_intel_default_on_from_kernel_config(tmp_path):
    root = make_host(tmp_path)
    assert status.intel_default_on(root) is False
    write(root, "boot/config-6.1.0-18-amd64", "CONFIG_INTEL_IOMMU=y\nCONFIG_INTEL_IOMMU_DEFAULT_ON=y\n")
    assert status.intel_default_on(root) is True


# --------------------------------------------------------------------------
# Command-line edits (bootconfig.py)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("before, after", [
    ('GRUB_CMDLINE_LINUX="quiet splash"\n', 'GRUB_CMDLINE_LINUX="quiet splash intel_iommu=on iommu=pt"\n'),
    ("GRUB_CMDLINE_LINUX='quiet  splash'\n", "GRUB_CMDLINE_LINUX='quiet  splash intel_iommu=on iommu=pt'\n"),
    ("GRUB_CMDLINE_LINUX=quiet\n", 'GRUB_CMDLINE_LINUX="quiet intel_iommu=on iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX=""\n', 'GRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt"\n'),
    ("GRUB_CMDLINE_LINUX=''\n", "GRUB_CMDLINE_LINUX='intel_iommu=on iommu=pt'\n"),
    ("GRUB_CMDLINE_LINUX=\n", 'GRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX="intel_iommu=on quiet intel_iommu=on"\n',
     'GRUB_CMDLINE_LINUX="intel_iommu=on quiet iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX="quiet intel_iommu=off"\n', 'GRUB_CMDLINE_LINUX="quiet intel_iommu=on iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX="iommu=off quiet"\n', 'GRUB_CMDLINE_LINUX="quiet intel_iommu=on iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX="quiet" # keep me\n', 'GRUB_CMDLINE_LINUX="quiet intel_iommu=on iommu=pt" # keep me\n'),
    ('export GRUB_CMDLINE_LINUX="a"\n', 'export GRUB_CMDLINE_LINUX="a intel_iommu=on iommu=pt"\n'),
    ('GRUB_CMDLINE_LINUX="a"\r\n', 'GRUB_CMDLINE_LINUX="a intel_iommu=on iommu=pt"\r\n'),
    ('GRUB_CMDLINE_LINUX="a"', 'GRUB_CMDLINE_LINUX="a intel_iommu=on iommu=pt"'),
])
def test_enable_keeps_quoting_style(before, after):
    assert edit(before) == [after]


def test_enable_whole_file_only_touches_one_line_and_is_idempotent():
    (new,) = edit(DEBIAN_GRUB)
    expected = DEBIAN_GRUB.replace('"console=tty0 crashkernel=auto"',
                                   '"console=tty0 crashkernel=auto intel_iommu=on iommu=pt"')
    assert new == expected
    assert bootconfig.plan(files(new), True, "intel").changes == {}      # a second call: nothing
    # Disabling gives back the file as it was, byte for byte.
    assert edit(new, False) == [DEBIAN_GRUB]
    assert bootconfig.plan(files(DEBIAN_GRUB), False, "intel").changes == {}


def test_enable_without_the_variable_adds_a_line_after_the_others():
    text = '# comment\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n# tail\n'
    assert edit(text) == ['# comment\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
                          'GRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt"\n# tail\n']
    assert edit("GRUB_TIMEOUT=5") == ['GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="intel_iommu=on iommu=pt"\n']


def test_enable_amd_and_flags_already_in_default():
    assert edit('GRUB_CMDLINE_LINUX="amd_iommu=off"\n', True, "amd") == \
        ['GRUB_CMDLINE_LINUX="amd_iommu=on iommu=pt"\n']
    # The vendor flag in _DEFAULT counts; an off flag there is taken out.
    text = 'GRUB_CMDLINE_LINUX_DEFAULT="quiet intel_iommu=on"\nGRUB_CMDLINE_LINUX=""\n'
    assert edit(text) == ['GRUB_CMDLINE_LINUX_DEFAULT="quiet intel_iommu=on"\nGRUB_CMDLINE_LINUX="iommu=pt"\n']
    text = 'GRUB_CMDLINE_LINUX_DEFAULT="quiet intel_iommu=off"\nGRUB_CMDLINE_LINUX="x"\n'
    assert edit(text) == ['GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX="x intel_iommu=on iommu=pt"\n']
    # A variant of the on flag is kept as the operator wrote it.
    assert bootconfig.plan(files('GRUB_CMDLINE_LINUX="intel_iommu=on,sm_on iommu=pt"\n'),
                           True, "intel").changes == {}


def test_disable_removes_flags_everywhere_and_amd_needs_off():
    text = ('GRUB_CMDLINE_LINUX_DEFAULT="intel_iommu=on quiet"\n'
            "GRUB_CMDLINE_LINUX='  intel_iommu=on,sm_on console=ttyS0 iommu=pt intel_iommu=on'\n")
    assert edit(text, False) == ['GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
                                 "GRUB_CMDLINE_LINUX='  console=ttyS0'\n"]
    assert edit("GRUB_CMDLINE_LINUX=intel_iommu=on\n", False) == ["GRUB_CMDLINE_LINUX=\n"]
    # AMD's IOMMU is on without a flag: off must be said.
    assert edit('GRUB_CMDLINE_LINUX="amd_iommu=on iommu=pt quiet"\n', False, "amd") == \
        ['GRUB_CMDLINE_LINUX="quiet amd_iommu=off"\n']
    p = bootconfig.plan(files('GRUB_CMDLINE_LINUX="quiet"\n'), False, "intel", intel_default_on=True)
    assert p.tokens == ["quiet", "intel_iommu=off"] and not p.enabled


def test_dropins_override_and_append():
    main = 'GRUB_CMDLINE_LINUX="quiet"\n'
    # A drop-in that replaces the value is the one to edit: editing the main file would be lost.
    override = '# cloud image\nGRUB_CMDLINE_LINUX="console=ttyS0"\n'
    assert edit(main, True, "intel", override) == \
        [main, '# cloud image\nGRUB_CMDLINE_LINUX="console=ttyS0 intel_iommu=on iommu=pt"\n']
    # One that appends: its off flag goes, the on flags land in the last assignment.
    append = 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX intel_iommu=off"\n'
    new = edit(main, True, "intel", append)
    assert new == [main, 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX intel_iommu=on iommu=pt"\n']
    assert bootconfig.cmdline_tokens(files(*new)) == ["quiet", "intel_iommu=on", "iommu=pt"]
    # State reads the drop-ins after the main file.
    assert bootconfig.cmdline_tokens(files('GRUB_CMDLINE_LINUX="intel_iommu=on"\n',
                                           "GRUB_CMDLINE_LINUX=''\n")) == []
    # Disabled cleans every file.
    both = ['GRUB_CMDLINE_LINUX="a intel_iommu=on"\n', 'GRUB_CMDLINE_LINUX="${GRUB_CMDLINE_LINUX} iommu=pt b"\n']
    assert edit(both[0], False, "intel", both[1]) == \
        ['GRUB_CMDLINE_LINUX="a"\n', 'GRUB_CMDLINE_LINUX="${GRUB_CMDLINE_LINUX} b"\n']


def test_values_it_cannot_edit_are_refused():
    with pytest.raises(BootConfigError, match="not a simple quoted string"):
        bootconfig.plan(files('GRUB_CMDLINE_LINUX="a\nb"\n'), True, "intel")
    with pytest.raises(BootConfigError, match="not a simple quoted string"):
        bootconfig.plan(files('GRUB_CMDLINE_LINUX=$(cat /etc/cmdline)\n'), True, "intel")
    with pytest.raises(BootConfigError, match="neither Intel nor AMD"):
        bootconfig.plan(files('GRUB_CMDLINE_LINUX=""\n'), True, None)


def test_grubby_info_and_edit():
    out = ('index=0\nkernel="/boot/vmlinuz-5.14.0-362.el9.x86_64"\n'
           'args="ro crashkernel=1G-4G:192M rhgb quiet intel_iommu=off"\nroot="UUID=ab-cd"\n'
           'initrd="/boot/initramfs-5.14.0-362.el9.x86_64.img"\ntitle="Rocky Linux (5.14.0)"\n'
           'index=1\nkernel="/boot/vmlinuz-0-rescue"\nargs="ro intel_iommu=on iommu=pt"\n')
    entries = bootconfig.parse_grubby_info(out)
    assert [e["args"] for e in entries] == ["ro crashkernel=1G-4G:192M rhgb quiet intel_iommu=off",
                                            "ro intel_iommu=on iommu=pt"]
    assert entries[0]["root"] == "UUID=ab-cd"
    assert bootconfig.grubby_edit(entries, True, "intel") == (["intel_iommu=on", "iommu=pt"],
                                                              ["intel_iommu=off"])
    assert bootconfig.grubby_edit(entries, False, "intel") == ([], ["intel_iommu=on", "iommu=pt"])
    assert bootconfig.grubby_edit(entries[1:], True, "intel") == ([], [])


# --------------------------------------------------------------------------
# Safe writes (system.py)
# --------------------------------------------------------------------------

def test_write_changes_backup_mode_owner_and_lost_race(tmp_path):
    path = write(tmp_path, "etc/default/grub", "old\n")
    path.chmod(0o640)
    if AS_ROOT:
        os.chown(path, 1234, 2345)
    [w] = system.write_changes({str(path): ("old\n", "new\n")})
    assert path.read_text() == "new\n" and Path(w.backup).read_text() == "old\n"
    assert Path(w.backup).name.startswith("grub.node-agent.bak-")
    for p in (path, Path(w.backup)):
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        if AS_ROOT:
            assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert sorted(os.listdir(path.parent)) == sorted(["grub", Path(w.backup).name])  # no temp left
    with pytest.raises(system.ChangedUnderUs):
        system.write_changes({str(path): ("old\n", "newer\n")})
    assert path.read_text() == "new\n"
    system.restore([w])
    assert path.read_text() == "old\n"


def test_tools_and_grub_cfg(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    tool(bindir, "grub2-mkconfig", "exit 0\n")
    monkeypatch.setenv("PATH", str(bindir))
    root = make_host(tmp_path / "root")
    assert system.find_tools(str(root)) == {"grub2-mkconfig": str(bindir / "grub2-mkconfig")}
    write(root, "boot/grub2/grub.cfg", "### BEGIN /etc/grub.d/00_header ###\n")
    assert system.grub_cfg(str(root)) == str(root / "boot/grub2/grub.cfg")
    # UEFI: an EFI grub.cfg that is a stub loading /boot/grub2/grub.cfg is not the one...
    (root / "sys/firmware/efi").mkdir(parents=True)
    write(root, "boot/efi/EFI/rocky/grub.cfg", "search --no-floppy --fs-uuid --set=dev x\n"
                                               "configfile ($dev)/grub2/grub.cfg\n")
    assert system.grub_cfg(str(root)) == str(root / "boot/grub2/grub.cfg")
    # ...a complete one (RHEL 7/8 on UEFI) is.
    write(root, "boot/efi/EFI/redhat/grub.cfg", "### BEGIN /etc/grub.d/00_header ###\n")
    assert system.grub_cfg(str(root)) == str(root / "boot/efi/EFI/redhat/grub.cfg")


# --------------------------------------------------------------------------
# Over HTTP, against real agents
# --------------------------------------------------------------------------

async def get_json(http, agent, path):
    async with http.get(agent.url + path, headers=agent.headers) as r:
        return r.status, await r.json()


def recorder(bindir: Path, name: str, log: Path, root: Path, control: Path) -> Path:
    """A tool that logs its argv and the GRUB defaults it saw; blocks while
    <control>/slow exists; fails while <control>/fail exists."""
    return tool(bindir, name, f"""\
printf '%s\\n' "$0 $*" >> '{log}'
cat '{root}/etc/default/grub' > '{log}.seen'
if [ -e '{control}/slow' ]; then
    : > '{control}/started'
    while [ -e '{control}/slow' ]; do sleep 0.05; done
fi
if [ -e '{control}/fail' ]; then echo "grub-mkconfig: error: disk full" >&2; exit 3; fi
exit 0
""")


@pytest.fixture
def intel_node(tmp_path, agent_factory):
    """An Intel node without an active IOMMU, update-grub on the agent's PATH."""
    root = make_host(tmp_path / "root")
    grub = root / "etc/default/grub"
    grub.chmod(0o640)
    if AS_ROOT:
        os.chown(grub, 1234, 2345)
    bindir, control = tmp_path / "bin", tmp_path / "control"
    control.mkdir()
    log = tmp_path / "update-grub.log"
    recorder(bindir, "update-grub", log, root, control)
    agent = agent_factory({"iommu": {"root": str(root)}}, env={"PATH": str(bindir)}).start()
    return agent, root, grub, log, control


async def test_status_over_http_active_then_not(intel_node, http):
    agent, root, *_ = intel_node
    status_code, body = await get_json(http, agent, "/v1/iommu/status")
    assert status_code == 200
    assert body["status"] == "Inactive" and "add intel_iommu=on" in body["reason"]
    assert body["evidence"]["acpiTable"] == "DMAR" and body["evidence"]["virtualization"] == "vmx"
    # The same node after a reboot with VT-d on: read afresh on every call.
    make_host(root, active=True, cmdline="ro intel_iommu=on iommu=pt")
    status_code, body = await get_json(http, agent, "/v1/iommu/status")
    assert body["status"] == "Active" and body["reason"] is None
    assert body["evidence"]["iommuGroups"] == 3 and body["evidence"]["iommuClass"] == ["dmar0", "dmar1"]
    assert body["evidence"]["cmdline"] == ["intel_iommu=on", "iommu=pt"]


async def test_update_enable_then_again_then_disable(intel_node, http):
    agent, root, grub, log, _ = intel_node
    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert code == 200, state
    assert state == {"state": "Disabled", "source": str(grub), "flags": [], "cpuVendor": "GenuineIntel",
                     "vendorFlag": "intel_iommu=on", "note": state["note"], "runningState": "Disabled",
                     "runningFlags": [], "rebootRequired": False}

    code, r = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                            {"updateHostIommuState": {"state": "Enabled"}, "systemTags": []})
    assert code == 200, r
    expected = DEBIAN_GRUB.replace('"console=tty0 crashkernel=auto"',
                                   '"console=tty0 crashkernel=auto intel_iommu=on iommu=pt"')
    assert grub.read_text() == expected
    assert r["state"] == "Enabled" and r["changed"] is True and r["rebootRequired"] is True
    assert r["regenerated"] == "update-grub" and r["files"] == [str(grub)]
    assert r["flags"] == ["intel_iommu=on", "iommu=pt"]
    backup = Path(r["backup"])
    assert backup.parent == grub.parent and backup.name.startswith("grub.node-agent.bak-")
    assert backup.read_text() == DEBIAN_GRUB
    st = grub.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if AS_ROOT:
        assert (st.st_uid, st.st_gid) == (1234, 2345)
    # update-grub ran once, as an argv list, after the file was written.
    assert log.read_text().splitlines() == [f"{root.parent / 'bin' / 'update-grub'} "]
    assert Path(f"{log}.seen").read_text() == expected

    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert state["state"] == "Enabled" and state["flags"] == ["intel_iommu=on", "iommu=pt"]
    assert state["runningState"] == "Disabled" and state["rebootRequired"] is True

    # A second call changes nothing, runs nothing, and says so.
    code, again = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                                {"updateHostIommuState": {"state": "Enabled"}})
    assert code == 200, again
    assert again["changed"] is False and again["backup"] is None and again["regenerated"] is None
    assert "nothing changed" in again["message"]
    assert grub.read_text() == expected and len(log.read_text().splitlines()) == 1
    assert len(list(grub.parent.glob("grub.node-agent.bak-*"))) == 1

    code, off = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                              {"updateHostIommuState": {"state": "Disabled"}})
    assert code == 200, off
    assert off["changed"] is True and off["rebootRequired"] is False and off["flags"] == []
    assert sorted(off["removed"]) == ["intel_iommu=on", "iommu=pt"]
    assert grub.read_text() == DEBIAN_GRUB and len(log.read_text().splitlines()) == 2
    assert Path(off["backup"]).read_text() == expected


async def test_update_refusals_conflict_and_failed_regeneration(intel_node, http):
    agent, root, grub, log, control = intel_node
    path = "/v1/iommu/actions"
    for body in ({"updateHostIommuState": {"state": "enabled"}},
                 {"updateHostIommuState": {"state": "On"}},
                 {"updateHostIommuState": {}},
                 {"updateHostIommuState": {"state": "Enabled", "force": True}}):
        code, err = await submit(http, agent, "PUT", path, body)
        assert code == 400, (body, err)
        assert err["error"]["code"] == "SYS.1002"
        assert "'state'" in err["error"]["description"] or "'force'" in err["error"]["description"]

    # No /etc/default/grub and no grubby: 503 at submission, nothing written.
    hidden = grub.rename(root / "grub.hidden")
    before = sorted(p.name for p in (root / "etc/default").iterdir())
    code, err = await submit(http, agent, "PUT", path, {"updateHostIommuState": {"state": "Enabled"}})
    assert code == 503 and err["error"]["code"] == "IOMMU.1503"
    assert "etc/default/grub does not exist" in err["error"]["description"]
    assert sorted(p.name for p in (root / "etc/default").iterdir()) == before
    code, err = await get_json(http, agent, "/v1/iommu/state")
    assert code == 503 and err["error"]["code"] == "IOMMU.1503"
    hidden.rename(grub)

    # A second update while the first is still running: 409.
    (control / "slow").touch()
    code, first = await submit(http, agent, "PUT", path, {"updateHostIommuState": {"state": "Enabled"}})
    assert code == 202
    for _ in range(200):
        if (control / "started").exists():
            break
        await asyncio.sleep(0.05)
    code, err = await submit(http, agent, "PUT", path, {"updateHostIommuState": {"state": "Disabled"}})
    assert code == 409 and err["error"]["code"] == "IOMMU.1409"
    (control / "slow").unlink()
    code, r = await wait_job(http, agent, first["location"])
    assert code == 200 and r["changed"] is True
    enabled_text = grub.read_text()

    # update-grub fails: the job fails with its stderr and the file is put back.
    (control / "fail").touch()
    code, err = await run_job(http, agent, "PUT", path, {"updateHostIommuState": {"state": "Disabled"}})
    assert code == 503 and err["error"]["code"] == "IOMMU.1510"
    assert "exit code 3" in err["error"]["description"] and "undone" in err["error"]["description"]
    assert "disk full" in err["error"]["details"]
    assert grub.read_text() == enabled_text
    assert stat.S_IMODE(grub.stat().st_mode) == 0o640
    # The seen copy proves update-grub ran on the edited file before it was put back.
    assert "intel_iommu" not in Path(f"{log}.seen").read_text()


async def test_no_regenerate_and_dropins(tmp_path, agent_factory, http):
    root = make_host(tmp_path / "root")
    write(root, "etc/default/grub.d/50-cloudimg.cfg", 'GRUB_CMDLINE_LINUX="console=ttyS0"\n')
    bindir = tmp_path / "bin"
    log = tmp_path / "update-grub.log"
    recorder(bindir, "update-grub", log, root, tmp_path)
    agent = agent_factory({"iommu": {"root": str(root), "regenerate": False}},
                          env={"PATH": str(bindir)}).start()
    code, r = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                            {"updateHostIommuState": {"state": "Enabled"}})
    assert code == 200, r
    assert r["regenerated"] is None and r["command"] is None and "regenerate = false" in r["message"]
    assert not log.exists()
    # The drop-in overrides GRUB_CMDLINE_LINUX, so it is the file edited; the main file is untouched.
    dropin = root / "etc/default/grub.d/50-cloudimg.cfg"
    assert r["files"] == [str(dropin)]
    assert dropin.read_text() == 'GRUB_CMDLINE_LINUX="console=ttyS0 intel_iommu=on iommu=pt"\n'
    assert (root / "etc/default/grub").read_text() == DEBIAN_GRUB
    # The backup sits beside it but does not end in .cfg, so grub-mkconfig never sources it.
    assert Path(r["backup"]).parent == dropin.parent
    assert [p.name for p in dropin.parent.glob("*.cfg")] == ["50-cloudimg.cfg"]
    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert state["state"] == "Enabled" and str(dropin) in state["source"]


async def test_grubby_node_amd(tmp_path, agent_factory, http):
    """RHEL family: grubby reads and updates the boot entries; AMD is on by default."""
    root = make_host(tmp_path / "root", vendor="AuthenticAMD", active=True,
                     grub='GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="crashkernel=auto rhgb quiet"\n'
                          'GRUB_ENABLE_BLSCFG=true\n')
    args = tmp_path / "args"
    args.write_text("ro crashkernel=auto rhgb quiet\n")
    log = tmp_path / "grubby.log"
    bindir = tmp_path / "bin"
    # A grubby with one boot entry whose args live in a file.
    tool(bindir, "grubby", f"""\
printf '%s\\n' "$*" >> '{log}'
case "$1" in
--info=*) printf 'index=0\\nkernel="/boot/vmlinuz-5.14"\\nargs="%s"\\n' "$(cat '{args}')"; exit 0;;
--update-kernel=ALL) ;;
*) exit 1;;
esac
shift
new=" $(cat '{args}') "
for a in "$@"; do
  case "$a" in
  --args=*) for t in ${{a#--args=}}; do new="$new$t "; done;;
  --remove-args=*) for t in ${{a#--remove-args=}}; do new=$(printf '%s' "$new" | sed "s/ $t / /g"); done;;
  esac
done
echo $new > '{args}'
""")
    agent = agent_factory({"iommu": {"root": str(root)}}, env={"PATH": str(bindir)}).start()
    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert code == 200, state
    assert state["source"] == "grubby --info=DEFAULT" and state["state"] == "Enabled"
    assert "on by default" in state["note"] and state["vendorFlag"] == "amd_iommu=on"

    code, r = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                            {"updateHostIommuState": {"state": "Disabled"}})
    assert code == 200, r
    assert r["regenerated"] == "grubby" and r["rebootRequired"] is True
    assert r["command"] == [str(bindir / "grubby"), "--update-kernel=ALL", "--args=amd_iommu=off"]
    assert args.read_text().split() == ["ro", "crashkernel=auto", "rhgb", "quiet", "amd_iommu=off"]
    assert 'GRUB_CMDLINE_LINUX="crashkernel=auto rhgb quiet amd_iommu=off"' in \
        (root / "etc/default/grub").read_text()
    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert state["state"] == "Disabled" and state["flags"] == ["amd_iommu=off"]

    code, r = await run_job(http, agent, "PUT", "/v1/iommu/actions",
                            {"updateHostIommuState": {"state": "Enabled"}})
    assert code == 200, r
    assert r["command"] == [str(bindir / "grubby"), "--update-kernel=ALL",
                            "--args=amd_iommu=on iommu=pt", "--remove-args=amd_iommu=off"]
    assert args.read_text().split() == ["ro", "crashkernel=auto", "rhgb", "quiet", "amd_iommu=on", "iommu=pt"]
    code, state = await get_json(http, agent, "/v1/iommu/state")
    assert state["state"] == "Enabled" and state["rebootRequired"] is False
