"""updatePrimaryStorage (issue 12, item 3): name; an NFS export's mount options and url
remounted (fake mount(8) over the FUSE "server" of test_storage_mounts), put back when the new
export is not this storage's; a shared mount point's url refused while a running VM (real
libvirtd + QEMU) has a disk on it, moved once it is stopped."""

from __future__ import annotations

import libvirt
import pytest

from libvirt_fixture import libvirtd  # noqa: F401 (fixture)
from storage_helpers import PS, add_storage, fake_mount_log, fast_storage, get, job, uid
from test_storage_mounts import EXPORT, kill_fake_servers, nfs_env, ns_agent  # noqa: F401

libvirt.registerErrorHandler(lambda *_: None, None)


async def test_nfs_update_remounts_and_puts_back(ns_agent, http, tmp_path):  # noqa: F811
    a = ns_agent
    log = tmp_path / "mounts.log"
    (tmp_path / "mode").write_text("fuse")
    ps = uid()
    status, body = await add_storage(http, a, "nfs", {"uuid": ps, "url": EXPORT, "mountOptions": "vers=4.1"})
    assert status == 200, body
    mp = body["inventory"]["mountPath"]
    # new mount options: unmounted and mounted again with them (same export, same claim)
    status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions",
                             {"updatePrimaryStorage": {"mountOptions": "vers=4.2,hard", "name": "n2"}})
    assert status == 200, body
    inv = body["inventory"]
    assert (inv["mountOptions"], inv["name"], inv["status"]) == ("vers=4.2,hard", "n2", "Connected")
    assert fake_mount_log(log)[-1] == ["-t", "nfs", "-o", "vers=4.2,hard,timeo=100,retrans=3,nosuid,nodev",
                                       EXPORT, mp]
    # another export that is not this storage's (no claim file): refused, the old one is back
    status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions",
                             {"updatePrimaryStorage": {"url": "127.0.0.1:/export/elsewhere"}})
    assert status != 200 and ".node-agent-storage.json" in body["error"]["description"], body
    assert fake_mount_log(log)[-1][-2:] == [EXPORT, mp]
    status, body = await get(http, a, f"{PS}/{ps}")
    assert (body["inventory"]["url"], body["inventory"]["status"]) == (EXPORT, "Connected"), body
    # bad input: 400, nothing run
    for params in ({"url": "not-an-export"}, {"mountOptions": "vers=4.1,bad opt"},
                   {"name": "a\nb"}):
        status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions", {"updatePrimaryStorage": params})
        assert status == 400, (params, body)


DOMAIN = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""


@pytest.fixture
def lv_agent(agent_factory, libvirtd):  # noqa: F811
    return agent_factory({"libvirt": {"uri": libvirtd.uri}, "vm": {"domain_type": "qemu"},
                          **fast_storage()}, name="lv").start(timeout=60)


async def test_smp_url_refused_while_a_running_vm_uses_it(lv_agent, libvirtd, http, tmp_path):  # noqa: F811
    a = lv_agent
    old, new = tmp_path / "smp-old", tmp_path / "smp-new"
    old.mkdir()
    ps = uid()
    status, body = await add_storage(http, a, "smp", {"uuid": ps, "url": str(old), "allowLocalFilesystem": True})
    assert status == 200, body
    status, body = await job(http, a, "POST", f"{PS}/{ps}/volumes", {"params": {"size": 64 << 20}})
    assert status == 200, body
    vol_path = body["inventory"]["installPath"]
    conn = libvirt.open(libvirtd.uri)
    dom = conn.createXML(DOMAIN.format(name=f"upd-{ps[:8]}", path=vol_path), 0)
    try:
        status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions",
                                 {"updatePrimaryStorage": {"url": str(new)}})
        assert status == 409 and dom.UUIDString() in body["error"]["description"], body
    finally:
        dom.destroy()
        conn.close()
    # stopped: the directory moved (same data, its claim file with it), the url follows
    old.rename(new)
    status, body = await job(http, a, "PUT", f"{PS}/{ps}/actions", {"updatePrimaryStorage": {"url": str(new)}})
    assert status == 200, body
    assert (body["inventory"]["url"], body["inventory"]["status"]) == (str(new), "Connected")
    status, body = await get(http, a, f"{PS}/{ps}/volumes")
    assert body["inventories"][0]["installPath"].startswith(str(new) + "/")
    # the new url is what comes back after a restart
    a.kill9()
    a.start(timeout=60)
    status, body = await get(http, a, f"{PS}/{ps}")
    assert body["inventory"]["url"] == str(new) and body["inventory"]["mountPath"] == str(new)
    # a local storage's url never changes
    lps = uid()
    assert (await add_storage(http, a, "local", {"uuid": lps, "url": str(tmp_path / "loc")}))[0] == 200
    status, body = await job(http, a, "PUT", f"{PS}/{lps}/actions",
                             {"updatePrimaryStorage": {"url": str(tmp_path / "x")}})
    assert status == 400, body
