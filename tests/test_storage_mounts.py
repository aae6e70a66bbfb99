"""Mounted storage (issue 4 items 3, 4, 9): loop-mounted ext4 and xfs and tmpfs inside the
agent's private mount namespace; shared mount points; NFS by its argv and mountinfo (this
kernel has no NFS client: [storage] mount_command points at tests/services/fake_mount.py,
which records the argv and mounts a tmpfs, or the hanging FUSE fs, with the export as its
source), remount, lazy unmount of a hung export, restore at start.  The export is the
FUSE passthrough (hangfs.py) over a directory that outlives mounts, like an NFS server's
data."""

from __future__ import annotations

import asyncio
import os

import pytest

from storage_helpers import (FAKE_MOUNT, FAKE_UMOUNT, NS_WRAPPER, PS, abort_fuse, add_storage,
                             connect_events, fake_mount_log, fast_storage, fstype_source, get, job,
                             loop_mount, mount_entry, mountinfo, nspath, nsrun, status_events, uid,
                             wait_for, wait_status_event)

EXPORT = "127.0.0.1:/export/primary"


@pytest.fixture
def nfs_env(tmp_path):
    return {"FAKE_MOUNT_LOG": str(tmp_path / "mounts.log"), "FAKE_MOUNT_MODE_FILE": str(tmp_path / "mode"),
            "FAKE_MOUNT_BACKING": str(tmp_path / "nfs-backing"), "FAKE_MOUNT_CONTROL": str(tmp_path / "hang.ctl")}


@pytest.fixture
def ns_agent(agent_factory, nfs_env, tmp_path):
    a = agent_factory(fast_storage(mount_command=[str(FAKE_MOUNT)], umount_command=[str(FAKE_UMOUNT)],
                                   nfs_mount_root="/mnt/nfs"),
                      name="mounts", wrapper=NS_WRAPPER, env=nfs_env).start()
    yield a
    abort_fuse(a)
    kill_fake_servers(tmp_path)


def kill_fake_servers(tmp_path) -> None:
    """The fake NFS servers (hangfs.py) of this test only: their backing directories are
    under its tmp_path.  Those of an agent's earlier namespace (before a restart) too."""
    mark = str(tmp_path).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"tests/services/hangfs.py" in cmd and mark in cmd:
                os.kill(int(pid), 9)
        except (OSError, ProcessLookupError):
            pass


async def test_ext4_xfs_tmpfs_and_shared_mount_points(ns_agent, http, tmp_path):
    a = ns_agent
    loop_mount(a, tmp_path / "ext4.img", "/mnt/ext4", "ext4", 200)
    loop_mount(a, tmp_path / "xfs.img", "/mnt/xfs", "xfs", 320)
    nsrun(a, "mkdir", "-p", "/mnt/tmpfs")
    nsrun(a, "mount", "-t", "tmpfs", "-o", "size=64m", "lab_tmpfs", "/mnt/tmpfs")
    p_ext4, p_xfs, p_tmpfs = uid(), uid(), uid()
    for ps, url in ((p_ext4, "/mnt/ext4/ps"), (p_tmpfs, "/mnt/tmpfs")):
        status, body = await add_storage(http, a, "local", {"uuid": ps, "url": url})
        assert status == 200, body
    # capacity is that of each filesystem, as statvfs sees it in the agent's namespace
    for ps, mp in ((p_ext4, "/mnt/ext4"), (p_tmpfs, "/mnt/tmpfs")):
        out = nsrun(a, "stat", "-f", "-c", "%S %b %a", mp).stdout.split()
        bsize, blocks, avail = map(int, out)
        status, cap = await get(http, a, f"{PS}/{ps}/capacity")
        assert cap["totalPhysicalCapacity"] == bsize * blocks, (ps, cap)
        assert abs(cap["availablePhysicalCapacity"] - bsize * avail) <= 1 << 20
    assert (await get(http, a, f"{PS}/{p_tmpfs}/capacity"))[1]["totalCapacity"] == 64 << 20

    # xfs is local: refused as a shared mount point unless asked for explicitly
    status, body = await add_storage(http, a, "smp", {"uuid": p_xfs, "url": "/mnt/xfs"})
    assert status == 400 and body["error"]["code"] == "STORAGE.1003" and "xfs" in body["error"]["description"]
    status, body = await add_storage(http, a, "smp", {"uuid": p_xfs, "url": "/mnt/xfs",
                                                      "allowLocalFilesystem": True})
    assert status == 200 and body["inventory"]["type"] == "SharedMountPoint", body
    # an smp directory must exist (it is not made), and is claimed
    status, body = await add_storage(http, a, "smp", {"url": "/mnt/xfs-nothere", "allowLocalFilesystem": True})
    assert status == 400
    assert '"primaryStorageUuid": "%s"' % p_xfs in nspath(a, "/mnt/xfs/.node-agent-storage.json").read_text()

    # a raw volume on xfs is sparse; a qcow2 on ext4
    status, body = await job(http, a, "POST", f"{PS}/{p_xfs}/volumes", {"params": {"size": 10 << 30, "format": "raw"}})
    assert status == 200 and body["inventory"]["actualSize"] <= 1 << 20, body
    status, body = await job(http, a, "POST", f"{PS}/{p_ext4}/volumes", {"params": {"size": 10 << 30}})
    assert status == 200, body
    status, cap = await get(http, a, f"{PS}/{p_ext4}/capacity")
    assert cap["availableCapacity"] == 0        # a 10 GiB thin volume may outgrow 200 MB

    # the id file keeps a directory to one storage: a second agent state (new uuid) is refused
    nsrun(a, "umount", "/mnt/tmpfs")
    nsrun(a, "mount", "-t", "tmpfs", "-o", "size=64m", "lab_tmpfs2", "/mnt/tmpfs")
    nsrun(a, "sh", "-c", 'echo \'{"primaryStorageUuid": "ffffffffffffffffffffffffffffffff"}\' > /mnt/tmpfs/.node-agent-storage.json')
    status, body = await add_storage(http, a, "smp", {"url": "/mnt/tmpfs", "allowLocalFilesystem": True})
    assert status == 409  # overlaps the registered tmpfs storage
    nsrun(a, "mkdir", "-p", "/mnt/ext4/other")
    nsrun(a, "sh", "-c", 'echo \'{"primaryStorageUuid": "ffffffffffffffffffffffffffffffff"}\' > /mnt/ext4/other/.node-agent-storage.json')
    status, body = await add_storage(http, a, "local", {"url": "/mnt/ext4/other"})
    assert status == 409 and "ffffffffffffffffffffffffffffffff" in body["error"]["description"]
    # the tmpfs storage lost its claim file with the remount: reconnect refuses to adopt a foreign one
    status, body = await job(http, a, "PUT", f"{PS}/{p_tmpfs}/actions", {"reconnectPrimaryStorage": {}})
    assert status in (409, 503) and "ffffffffffffffffffffffffffffffff" in body["error"]["description"]


async def test_nfs_argv_mountinfo_idempotent_remount_restart_delete(ns_agent, http, receiver, tmp_path, nfs_env):
    a = ns_agent
    await connect_events(http, a, receiver)
    log = tmp_path / "mounts.log"
    ps = uid()
    # a refused mount: 503, nothing registered, nothing left mounted
    (tmp_path / "mode").write_text("fail")
    status, body = await add_storage(http, a, "nfs", {"uuid": ps, "url": EXPORT, "mountOptions": "vers=4.1,hard"})
    assert status == 503 and body["error"]["code"] == "STORAGE.1510" and "access denied" in body["error"]["description"]
    assert (await get(http, a, PS))[1]["inventories"] == []
    (tmp_path / "mode").write_text("fuse")

    status, body = await add_storage(http, a, "nfs", {"uuid": ps, "url": EXPORT, "mountOptions": "vers=4.1,hard"})
    assert status == 200, body
    inv = body["inventory"]
    mp = f"/mnt/nfs/{ps}"
    assert inv["type"] == "NFS" and inv["mountPath"] == mp and inv["status"] == "Connected"
    argv = fake_mount_log(log)[-1]
    assert argv == ["-t", "nfs", "-o", "vers=4.1,hard,timeo=100,retrans=3,nosuid,nodev", EXPORT, mp], argv
    entry = mount_entry(a, mp)
    assert fstype_source(entry) == ("fuse", EXPORT)
    # registering again (same uuid): no second mount
    n = len(fake_mount_log(log))
    assert (await add_storage(http, a, "nfs", {"uuid": ps, "url": EXPORT}))[0] == 200
    assert (await job(http, a, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}}))[0] == 200
    assert len(fake_mount_log(log)) == n
    v = uid()
    assert (await job(http, a, "POST", f"{PS}/{ps}/volumes", {"params": {"uuid": v, "size": 1 << 30}}))[0] == 200

    # unmounted behind the agent's back: Disconnected; reconnect mounts again: Connected
    nsrun(a, "umount", mp)
    gone = await wait_status_event(receiver, ps, "Disconnected")
    assert "not mounted" in gone["reason"]
    status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}})
    assert status == 200 and body["inventory"]["status"] == "Connected"
    assert fake_mount_log(log)[-1][-2:] == [EXPORT, mp]
    await wait_status_event(receiver, ps, "Connected", after=1)

    # an export already mounted where the agent wants it is taken as it is (mountinfo)
    ps2 = uid()
    mp2 = "/mnt/premounted"
    nsrun(a, "mkdir", "-p", mp2)
    nsrun(a, "mount", "-t", "tmpfs", "127.0.0.1:/export/two", mp2)
    n = len(fake_mount_log(log))
    status, body = await add_storage(http, a, "nfs", {"uuid": ps2, "url": "127.0.0.1:/export/two", "mountPath": mp2})
    assert status == 200, body
    assert len(fake_mount_log(log)) == n
    # ...but not when something else is mounted there
    nsrun(a, "mkdir", "-p", "/mnt/busy")
    nsrun(a, "mount", "-t", "tmpfs", "other:/thing", "/mnt/busy")
    status, body = await add_storage(http, a, "nfs", {"url": "127.0.0.1:/export/three", "mountPath": "/mnt/busy"})
    assert status == 409 and "other:/thing" in body["error"]["description"]

    # restart in a fresh namespace: nothing is mounted there; the agent mounts its exports again
    a.restart()
    await wait_for(lambda: mount_entry(a, mp) is not None and mount_entry(a, mp2) is not None, 10,
                   "the exports mounted again at start")
    assert fstype_source(mount_entry(a, mp)) == ("fuse", EXPORT)
    status, body = await get(http, a, f"{PS}/{ps}")
    for _ in range(100):
        if body["inventory"]["status"] == "Connected":
            break
        await asyncio.sleep(0.05)
        status, body = await get(http, a, f"{PS}/{ps}")
    assert body["inventory"]["status"] == "Connected", body
    status, body = await get(http, a, f"{PS}/{ps}/volumes")
    assert [i["uuid"] for i in body["inventories"]] == [v]

    # DELETE unmounts (the data on the export is not deleted: nothing is removed first)
    status, _ = await job(http, a, "DELETE", f"{PS}/{ps}")
    assert status == 200 and mount_entry(a, mp) is None
    assert any(x[0] == "umount" and x[-1] == mp for x in fake_mount_log(log))
    assert (await get(http, a, f"{PS}/{ps}"))[0] == 404


async def test_hung_nfs_lazy_unmount_and_remount(ns_agent, http, receiver, tmp_path):
    a = ns_agent
    await connect_events(http, a, receiver)
    log = tmp_path / "mounts.log"
    (tmp_path / "mode").write_text("fuse")           # the export is the hanging FUSE fs
    (tmp_path / "nfs-backing").mkdir()
    ps = uid()
    mp = f"/mnt/nfs/{ps}"
    status, body = await add_storage(http, a, "nfs", {"uuid": ps, "url": EXPORT})
    assert status == 200, body
    assert fstype_source(mount_entry(a, mp)) == ("fuse", EXPORT)
    (tmp_path / "hang.ctl").write_text("all")         # the NFS server dies
    await wait_status_event(receiver, ps, "Hung")
    # the server comes back; reconnect detaches the hung mount lazily first, then mounts again
    (tmp_path / "mode").write_text(f"fuse:{tmp_path / 'hang2.ctl'}")
    status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}})
    assert status == 200 and body["inventory"]["status"] == "Connected", body
    assert ["umount", "-f", "-l", mp] in fake_mount_log(log)
    assert fstype_source(mount_entry(a, mp)) == ("fuse", EXPORT)
    assert len([e for e in mountinfo(a) if e[4] == mp]) == 1      # the hung one is detached
    back = await wait_status_event(receiver, ps, "Connected", after=2)
    assert back["oldStatus"] == "Hung"
    (tmp_path / "hang.ctl").unlink()
