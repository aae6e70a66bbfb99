"""Path confinement (issue 10 items 1 and 7): a token is not root.

Every path the agent mounts on, makes a storage of, or hands to QEMU must lie under
[storage] allowed_roots once symlinks are resolved, and never be over or inside a system
directory, the agent's state directory or its token.  Real agent processes: the storage
ones in a private mount namespace, with tests/services/fake_mount.py as the NFS mount
command (it records every argv it is given, so "no mount ran" is checked, not assumed);
the VM ones on libvirt's test driver (a define there is a real define).
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib

import pytest

from agentproc import AgentProcess
from storage_helpers import (FAKE_MOUNT, FAKE_UMOUNT, NS_WRAPPER, PS, add_storage, all_files,
                             fake_mount_log, fast_storage, get, job, nspath, wait_for)

EXPORT = "127.0.0.1:/export"
REFUSED = "SYS.1007"


async def wait_libvirt(http, agent, timeout: float = 15) -> None:
    async def up():
        async with http.get(agent.url + "/v1/health") as r:
            vm = next(p for p in (await r.json())["plugins"] if p["name"] == "vm")
        return vm["capabilities"].get("libvirt", {}).get("available")
    await wait_for(up, timeout, "libvirt available to the agent")


def fresh_name() -> str:
    return f"node-agent-confinement-{uuidlib.uuid4().hex[:12]}"


@pytest.fixture
def layout(tmp_path):
    """allowed/ (the only root), outside/ (next to it), and symlinks that leave the root."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("precious")
    (allowed / "to-etc").symlink_to("/etc")
    (allowed / "to-outside").symlink_to(outside)
    (allowed / "to-shadow").symlink_to("/etc/shadow")
    (allowed / "inside").mkdir()
    (allowed / "to-inside").symlink_to(allowed / "inside")
    return allowed, outside


@pytest.fixture
def sagent(agent_factory, tmp_path, layout):
    allowed, _ = layout
    conf = fast_storage(mount_command=[str(FAKE_MOUNT)], umount_command=[str(FAKE_UMOUNT)],
                        allowed_roots=[str(allowed)])
    env = {"FAKE_MOUNT_LOG": str(tmp_path / "mounts.log")}
    return agent_factory(conf, name="conf", wrapper=NS_WRAPPER, env=env).start()


def _refused(status: int, body: dict, *words: str) -> None:
    assert status == 400, (status, body)
    err = body["error"]
    assert err["code"] in (REFUSED, "STORAGE.1001", "SYS.1001", "VM.1001"), err
    text = json.dumps(err)
    for w in words:
        assert w in text, (w, err)


def snapshot(tmp_path, *skip: str) -> set[str]:
    """Every file and directory under tmp_path but the agents' own (state, logs)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        rel = os.path.relpath(dirpath, tmp_path)
        if rel.split(os.sep)[0] in skip:
            continue
        out |= {os.path.join(rel, n) for n in dirnames + filenames}
    return out


# --- the reproductions of issue 10.1 -------------------------------------------------------------

async def test_nfs_mount_path_confined_and_no_mount_runs(sagent, http, tmp_path, layout):
    allowed, outside = layout
    a, log = sagent, tmp_path / "mounts.log"
    new_etc = fresh_name()
    # Harmless cases first: code without the rule fails there, before it touches /etc.
    bad = [str(outside), str(allowed / "to-outside"), f"{allowed}/../outside",
           f"{allowed}/inside/../../outside", "/etc", f"/etc/{new_etc}", "/", "/usr/lib", "/var",
           "/var/lib/dpkg", "/proc/self", "/run/x", "/root", "/boot", str(a.state_dir),
           str(a.state_dir / "sub"), str(allowed / "to-etc"), str(allowed / "to-etc" / new_etc)]
    for mp in bad:
        status, body = await add_storage(http, a, "nfs", {"url": EXPORT, "mountPath": mp})
        assert status == 400, (mp, body)
        assert body["error"]["description"], body
    assert fake_mount_log(log) == []                     # not one mount argv ran
    assert not os.path.exists(f"/etc/{new_etc}") and not nspath(a, f"/etc/{new_etc}").exists()
    assert (await get(http, a, PS))[1]["inventories"] == []
    # the error names the rule and the allowed roots
    status, body = await add_storage(http, a, "nfs", {"url": EXPORT, "mountPath": "/etc"})
    _refused(status, body, "/etc", str(allowed), "protects")
    assert body["error"]["code"] == REFUSED
    status, body = await add_storage(http, a, "nfs", {"url": EXPORT, "mountPath": str(outside)})
    _refused(status, body, "allowed roots", str(allowed))

    # allowed: a mount path in the root (a symlink to a place in the root mounts the real path),
    # and the default one under the state dir's own mnt/
    status, body = await add_storage(http, a, "nfs", {"url": EXPORT, "mountPath": str(allowed / "nfs1")})
    assert status == 200, body
    status, body2 = await add_storage(http, a, "nfs", {"url": "127.0.0.1:/export2",
                                                        "mountPath": str(allowed / "to-inside")})
    assert status == 200 and body2["inventory"]["mountPath"] == str(allowed / "inside"), body2
    status, body3 = await add_storage(http, a, "nfs", {"url": "127.0.0.1:/export3"})
    assert status == 200 and body3["inventory"]["mountPath"].startswith(str(a.state_dir / "mnt") + "/")
    assert [argv[-1] for argv in fake_mount_log(log)] == [
        str(allowed / "nfs1"), str(allowed / "inside"), body3["inventory"]["mountPath"]]


async def test_local_and_smp_url_confined(sagent, http, tmp_path, layout):
    allowed, outside = layout
    a = sagent
    new_etc = fresh_name()
    before = snapshot(tmp_path, "conf")
    # Harmless cases first: code without the rule fails there, before it touches /etc.
    bad = [str(outside / "new"), str(outside), str(allowed / "to-outside"),
           str(allowed / "to-outside" / "new"), f"{allowed}/../outside", str(tmp_path),
           str(a.state_dir), str(a.state_dir / "vols"), "/etc", f"/etc/{new_etc}",
           f"/etc/{new_etc}/deeper", "/usr/share", "/var/lib/dpkg", "/var/lib", "/dev/shm",
           "/sys/fs", str(allowed / "to-etc"), str(allowed / "to-etc" / new_etc)]
    for kind in ("local", "smp"):
        for url in bad:
            params = {"url": url, **({"allowLocalFilesystem": True} if kind == "smp" else {})}
            status, body = await add_storage(http, a, kind, params)
            assert status == 400, (kind, url, body)
    assert not os.path.exists(f"/etc/{new_etc}")
    assert not (outside / "new").exists() and not (outside / ".node-agent-storage.json").exists()
    assert snapshot(tmp_path, "conf") == before          # nothing made or claimed anywhere
    assert (await get(http, a, PS))[1]["inventories"] == []
    status, body = await add_storage(http, a, "local", {"url": str(allowed / "to-etc")})
    _refused(status, body, "/etc", "protects", str(allowed))
    status, body = await add_storage(http, a, "local", {"url": str(outside / "new")})
    _refused(status, body, "outside the allowed roots", str(allowed))

    # allowed: a new directory in the root, the root itself as a shared mount point
    status, body = await add_storage(http, a, "local", {"url": str(allowed / "ps" / "local1")})
    assert status == 200, body
    assert (allowed / "ps" / "local1" / ".node-agent-storage.json").exists()
    status, body = await add_storage(http, a, "smp", {"url": str(allowed / "to-inside"),
                                                      "allowLocalFilesystem": True})
    assert status == 200, body
    inv = body["inventory"]
    assert inv["url"] == str(allowed / "to-inside") and inv["mountPath"] == str(allowed / "inside")


async def test_vm_disk_and_iso_confined(agent_factory, http, tmp_path, layout):
    allowed, outside = layout
    a = agent_factory({"libvirt": {"uri": "test:///default"}, "vm": {"stats_interval_seconds": 5},
                       "storage": {"allowed_roots": [str(allowed)]}}, name="vm").start()
    await wait_libvirt(http, a)
    disk = allowed / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    (allowed / "to-disk").symlink_to(disk)
    (outside / "disk.raw").write_bytes(b"\0" * 4096)

    def spec(disks):
        return {"params": {"name": fresh_name(), "cpuNum": 1, "memorySize": 64 << 20, "disks": disks}}

    bad = [
        [{"path": str(outside / "disk.raw"), "format": "raw"}],
        [{"path": "/etc/shadow", "format": "raw"}],
        [{"path": str(allowed / "to-shadow"), "format": "raw"}],
        [{"path": str(allowed / "to-outside" / "disk.raw"), "format": "raw"}],
        [{"path": f"{allowed}/../outside/disk.raw", "format": "raw"}],
        [{"path": str(a.state_dir / "state.db"), "format": "raw"}],
        [{"path": str(a.state_dir / "token"), "format": "raw"}],
        [{"path": "/dev/sda", "format": "raw"}],
        [{"path": str(disk), "format": "raw"}, {"device": "cdrom", "path": "/etc/passwd"}],
        [{"device": "cdrom", "path": str(allowed / "to-etc" / "os.iso")}],
    ]
    for disks in bad:
        status, body = await job(http, a, "POST", "/v1/vm-instances", spec(disks))
        assert status == 400, (disks, body)
    status, body = await job(http, a, "POST", "/v1/vm-instances", spec(bad[1]))
    _refused(status, body, "/etc/shadow", "protects", str(allowed))
    assert body["error"]["code"] == REFUSED
    status, body = await get(http, a, "/v1/vm-instances", {"q": "name~=node-agent-confinement%",
                                                           "count": "true"})
    assert body == {"total": 0}                           # nothing was defined

    # allowed: a disk in the root, reached through a symlink: QEMU gets the real path
    status, body = await job(http, a, "POST", "/v1/vm-instances",
                             spec([{"path": str(allowed / "to-disk"), "format": "raw"},
                                   {"device": "cdrom", "path": str(allowed / "later.iso")}]))
    assert status == 200, body
    assert [d["path"] for d in body["inventory"]["disks"]] == [str(disk), str(allowed / "later.iso")]


# --- issue 10.7: the injection corpus for every path parameter ----------------------------------

def corpus(allowed, outside, tmp_path) -> list[str]:
    pwn = tmp_path / "pwned"
    return [  # outside first: code without the rule fails there, before it touches /etc
        str(outside / "x"), str(outside), str(allowed / "to-outside" / "x"),
        f"{allowed}/a;touch {pwn}", f"{allowed}/$(touch {pwn})", f"{allowed}/`touch {pwn}`",
        f"{allowed}/a\ntouch {pwn}", f"{allowed}/a\rb", f"{allowed}/a\0b", f"{allowed}/a\tb",
        f"{allowed}/a|touch {pwn}", f"{allowed}/a&&touch {pwn}", f"{allowed}/..", f"{allowed}/./x",
        f"{allowed}/x/../../outside", "../outside", "relative/dir", "", "/", "/etc/cron.d/x",
        "/etc/sudoers.d/x", str(allowed / "to-etc"), "/proc/self/root/etc", f"{allowed}/\u202e/x",
    ]


async def test_injection_corpus_for_path_parameters(agent_factory, http, tmp_path, layout):
    allowed, outside = layout
    log = tmp_path / "mounts.log"
    conf = fast_storage(mount_command=[str(FAKE_MOUNT)], umount_command=[str(FAKE_UMOUNT)],
                        allowed_roots=[str(allowed)])
    conf["libvirt"] = {"uri": "test:///default"}
    a = agent_factory(conf, name="corpus", wrapper=NS_WRAPPER, env={"FAKE_MOUNT_LOG": str(log)}).start()
    await wait_libvirt(http, a)
    before = snapshot(tmp_path, "corpus")
    etc_before = set(os.listdir("/etc"))
    vm = {"name": "corpus", "cpuNum": 1, "memorySize": 64 << 20}
    cases = []
    for p in corpus(allowed, outside, tmp_path):
        cases += [
            (f"{PS}/local", {"url": p}),
            (f"{PS}/local-storage", {"url": p}),
            (f"{PS}/smp", {"url": p, "allowLocalFilesystem": True}),
            *([(f"{PS}/nfs", {"url": EXPORT, "mountPath": p})] if p else []),  # "": the default
            ("/v1/vm-instances", {**vm, "disks": [{"path": p, "format": "raw"}]}),
            ("/v1/vm-instances", {**vm, "disks": [{"device": "cdrom", "path": p}]}),
        ]
    for path, params in cases:
        status, body = await job(http, a, "POST", path, {"params": params})
        assert 400 <= status < 500, (path, params, status, body)
        assert "Traceback" not in json.dumps(body)
    assert fake_mount_log(log) == []
    assert not (tmp_path / "pwned").exists()
    assert snapshot(tmp_path, "corpus") == before
    assert all_files(outside) == {"secret"}
    assert set(os.listdir("/etc")) == etc_before
    assert (await get(http, a, PS))[1]["inventories"] == []
    status, body = await get(http, a, "/v1/vm-instances", {"q": "name=corpus", "count": "true"})
    assert body == {"total": 0}


# --- the rule itself, at start ---------------------------------------------------------------

@pytest.mark.parametrize("root", ["/etc", "/etc/node-agent", "/", "/var", "/var/lib", "/usr/local",
                                  "/dev/shm", "relative", "STATE", "STATE/sub"])
def test_unsafe_allowed_root_refused_at_start(tmp_path, root):
    a = AgentProcess(tmp_path / "agent")
    (tmp_path / "agent").mkdir()
    root = root.replace("STATE", str(a.state_dir))
    a.config["storage"] = {"allowed_roots": [str(tmp_path), root]}
    with pytest.raises(RuntimeError) as e:
        a.start(timeout=60)             # it exits at once; a loaded machine starts Python slowly
    assert a.proc.returncode == 2
    assert "allowed_roots" in str(e.value) and repr(root) in str(e.value)


async def test_default_roots_and_state_mount_dir(tmp_path, http):
    """Without allowed_roots the documented defaults apply; <state>/mnt is always allowed."""
    a = AgentProcess(tmp_path / "agent")
    (tmp_path / "agent").mkdir()
    del a.config["storage"]
    a.config["storage"] = fast_storage(mount_command=[str(FAKE_MOUNT)])["storage"]
    a.env = {"FAKE_MOUNT_LOG": str(tmp_path / "mounts.log")}
    a.wrapper = NS_WRAPPER
    a.start()
    try:
        status, body = await add_storage(http, a, "local", {"url": str(tmp_path / "ps")})
        _refused(status, body, "/var/lib/libvirt/images", "/mnt", "/srv", "/data", "/zstack_ps")
        status, body = await add_storage(http, a, "nfs", {"url": EXPORT})
        assert status == 200 and body["inventory"]["mountPath"].startswith(str(a.state_dir / "mnt"))
        status, body = await add_storage(http, a, "local", {"url": str(a.state_dir / "mnt" / "x")})
        assert status in (200, 409), body                 # inside the exempt dir (overlap aside)
    finally:
        a.stop()
    assert len(fake_mount_log(tmp_path / "mounts.log")) == 1


async def test_storage_outside_a_narrowed_rule_is_kept_with_a_warning(agent_factory, http, tmp_path):
    """A root taken out of the list later: the storage keeps working, the log says so."""
    old, new = tmp_path / "old", tmp_path / "new"
    a = agent_factory({"storage": {"allowed_roots": [str(old), str(new)]}}, name="narrow").start()
    status, body = await add_storage(http, a, "local", {"url": str(old / "ps")})
    assert status == 200, body
    ps = body["inventory"]["uuid"]
    a.stop()
    a.config["storage"]["allowed_roots"] = [str(new)]
    a.start()
    status, body = await get(http, a, f"{PS}/{ps}")
    assert status == 200 and body["inventory"]["mountPath"] == str(old / "ps")
    assert f"primary storage {ps} is kept, but a new registration would be refused" in a.log()
    status, body = await add_storage(http, a, "local", {"url": str(old / "ps2")})
    _refused(status, body, "outside the allowed roots", str(new))
