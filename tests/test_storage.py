"""Primary storage (issue 4): local storage, volumes, image cache, bad input, same-node
migration, against real agent processes over HTTP with real qemu-img."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess

import pytest
from aiohttp import web

from conftest import submit, wait_job
from storage_helpers import (PS, FileServer, add_storage, all_files, fake_mount_log, fast_storage, get, job, uid,
                             visible_files)


@pytest.fixture
def sagent(agent_factory, tmp_path):
    log = tmp_path / "mounts.log"
    a = agent_factory(fast_storage(mount_command=["/bin/false"]), name="sagent",
                      env={"FAKE_MOUNT_LOG": str(log)})
    a.start()
    return a


class ImageServer(FileServer):
    """Serves bytes by name; can stream slowly."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        for i in range(0, len(data), 1 << 18):
            await resp.write(data[i:i + (1 << 18)])
            if self.delay:
                await asyncio.sleep(self.delay)
        await resp.write_eof()
        return resp


def qcow2_image(path, size="64M", pattern_mb: int = 4, backing: str | None = None) -> bytes:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-b", backing, "-F", "raw"]
    subprocess.run([*argv, str(path), size], check=True)
    if pattern_mb:
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {pattern_mb}M", str(path)], check=True,
                       capture_output=True)
    return path.read_bytes()


async def test_local_storage_lifecycle_volumes_capacity_restart(sagent, http, tmp_path):
    root = tmp_path / "ps-local"
    ps = uid()
    status, body = await add_storage(http, sagent, "local", {"uuid": ps, "url": str(root), "name": "ps1"})
    assert status == 200, body
    inv = body["inventory"]
    assert inv["type"] == "LocalStorage" and inv["status"] == "Connected" and inv["state"] == "Enabled"
    vfs = os.statvfs(root)
    assert inv["totalCapacity"] == vfs.f_blocks * vfs.f_frsize
    assert abs(inv["availablePhysicalCapacity"] - vfs.f_bavail * vfs.f_frsize) < 256 << 20
    assert json.loads((root / ".node-agent-storage.json").read_text())["primaryStorageUuid"] == ps

    # same registration again: idempotent; another uuid on the same directory: 409
    assert (await add_storage(http, sagent, "local", {"uuid": ps, "url": str(root)}))[0] == 200
    status, body = await add_storage(http, sagent, "local", {"uuid": uid(), "url": str(root)})
    assert status == 409 and body["error"]["code"] == "STORAGE.1009"
    status, body = await add_storage(http, sagent, "local", {"url": str(root / "nested")})
    assert status == 409

    # query API
    status, body = await get(http, sagent, PS, [("q", "type=LocalStorage"), ("q", "status=Connected")])
    assert status == 200 and [i["uuid"] for i in body["inventories"]] == [ps]
    status, body = await get(http, sagent, PS, [("q", "name=nope"), ("count", "true")])
    assert body == {"total": 0}
    status, body = await get(http, sagent, PS, [("q", "bogus=1")])
    assert status == 400
    status, body = await get(http, sagent, f"{PS}/types")
    assert body == {"primaryStorageTypes": ["LocalStorage", "NFS", "SharedMountPoint"]}

    # volumes: qcow2 and raw, thin: availableCapacity drops by what they may still grow to
    gib = 1 << 30
    v1, v2 = uid(), uid()
    status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes",
                             {"params": {"uuid": v1, "size": gib, "name": "data1"}})
    assert status == 200, body
    vol = body["inventory"]
    assert vol["format"] == "qcow2" and vol["size"] == gib and vol["actualSize"] < 1 << 20
    assert vol["installPath"] == str(root / "volumes" / f"{v1}.qcow2") and os.path.exists(vol["installPath"])
    status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes",
                             {"params": {"uuid": v2, "size": 3 * gib, "format": "raw",
                                         "path": "data/disk2.raw"}})
    assert status == 200, body
    raw = root / "data" / "disk2.raw"
    assert raw.stat().st_size == 3 * gib and raw.stat().st_blocks * 512 <= 4096   # sparse
    status, cap = await get(http, sagent, f"{PS}/{ps}/capacity")
    assert status == 200
    assert cap["availablePhysicalCapacity"] - cap["availableCapacity"] >= 4 * gib - (2 << 20)

    # resize: grow only
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/volumes/{v1}/actions",
                             {"resizeVolume": {"size": 2 * gib}})
    assert status == 200 and body["inventory"]["size"] == 2 * gib
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/volumes/{v1}/actions",
                             {"resizeVolume": {"size": gib}})
    assert status == 400 and body["error"]["code"] == "STORAGE.1011"
    status, body = await get(http, sagent, f"{PS}/{ps}/volumes/{v1}")
    assert body["inventory"]["size"] == 2 * gib and body["inventory"]["backingChain"] == []

    # metrics
    async with http.get(sagent.url + "/metrics", headers=sagent.headers) as r:
        text = await r.text()
    assert f'node_agent_storage_status{{primary_storage_uuid="{ps}",status="Connected"}} 1.0' in text
    assert f'node_agent_storage_capacity_bytes{{kind="total",primary_storage_uuid="{ps}"' in text

    # disabled: no new volumes; enable again
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions",
                             {"changePrimaryStorageState": {"stateEvent": "disable"}})
    assert status == 200 and body["inventory"]["state"] == "Disabled"
    status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes", {"params": {"size": gib}})
    assert status == 409 and body["error"]["code"] == "STORAGE.1010"
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions",
                             {"changePrimaryStorageState": {"stateEvent": "enable"}})
    assert body["inventory"]["state"] == "Enabled"

    # restart: restored from the state database, connected again, volumes listed
    sagent.restart()
    async def connected():
        s, b = await get(http, sagent, f"{PS}/{ps}")
        return s == 200 and b["inventory"]["status"] == "Connected"
    for _ in range(100):
        if await connected():
            break
        await asyncio.sleep(0.05)
    status, body = await get(http, sagent, f"{PS}/{ps}/volumes")
    assert status == 200 and {v["uuid"] for v in body["inventories"]} == {v1, v2}
    sizes = {v["uuid"]: v["actualSize"] for v in body["inventories"]}
    assert sizes[v2] <= 4096 and sizes[v1] > 0
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions", {"syncPrimaryStorageCapacity": {}})
    assert status == 200 and body["inventory"]["totalCapacity"] > 0
    status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}})
    assert status == 200 and body["inventory"]["status"] == "Connected"

    # delete a volume, then the storage: the registration goes, the data stays
    status, _ = await job(http, sagent, "DELETE", f"{PS}/{ps}/volumes/{v2}")
    assert status == 200 and not raw.exists()
    status, _ = await job(http, sagent, "DELETE", f"{PS}/{ps}/volumes/{v2}")
    assert status == 404
    status, _ = await job(http, sagent, "DELETE", f"{PS}/{ps}")
    assert status == 200
    assert (root / "volumes" / f"{v1}.qcow2").exists()
    assert not (root / ".node-agent-storage.json").exists()
    assert (await get(http, sagent, f"{PS}/{ps}"))[0] == 404
    # the directory can be registered again (the data is still there)
    status, body = await add_storage(http, sagent, "local", {"url": str(root)})
    assert status == 200


async def test_bad_input_is_4xx_and_changes_nothing(sagent, http, tmp_path):
    root = tmp_path / "ps"
    outside = tmp_path / "outside"
    outside.mkdir()
    ps = uid()
    assert (await add_storage(http, sagent, "local", {"uuid": ps, "url": str(root)}))[0] == 200
    v = uid()
    assert (await job(http, sagent, "POST", f"{PS}/{ps}/volumes", {"params": {"uuid": v, "size": 1 << 20}}))[0] == 200
    (root / "escape").symlink_to(outside)
    (root / "vols").mkdir()
    (root / "vols" / "victim.qcow2").symlink_to(outside / "victim.qcow2")
    (outside / "victim.qcow2").write_bytes(b"precious")
    before_root, before_out = all_files(root), all_files(outside)
    mount_log = tmp_path / "mounts.log"

    cases = [
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": "../evil.qcow2"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": "a/../../evil.qcow2"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": str(outside / "x.qcow2")}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": "escape/x.qcow2"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": "vols/victim.qcow2"}}, 409),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": ".hidden.qcow2"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "path": "a//b"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": -1}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 0}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 62}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": "10G"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "format": "vmdk"}}, 400),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "uuid": v}}, 409),
        ("POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20, "imageUuid": uid()}}, 404),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions", {"resizeVolume": {"size": 1 << 19}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions", {"resizeVolume": {"size": -5}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions", {"resizeVolume": {"size": 1 << 62}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{uid()}/actions", {"resizeVolume": {"size": 1 << 30}}, 404),
        ("DELETE", f"{PS}/{ps}/volumes/{uid()}", None, 404),
        ("POST", f"{PS}/{uid()}/volumes", {"params": {"size": 1 << 20}}, 404),
        ("PUT", f"{PS}/{uid()}/actions", {"reconnectPrimaryStorage": {}}, 404),
        ("DELETE", f"{PS}/{uid()}", None, 404),
        ("PUT", f"{PS}/{ps}/actions", {"changePrimaryStorageState": {"stateEvent": "explode"}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions", {"migrateVolume": {}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions",
         {"migrateVolume": {"destination": {"primaryStorageUuid": ps}}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions",
         {"migrateVolume": {"destination": {"primaryStorageUuid": uid(), "url": "ftp://x", "token": "t"}}}, 400),
        ("PUT", f"{PS}/{ps}/volumes/{v}/actions",
         {"migrateVolume": {"destination": {"primaryStorageUuid": uid(), "url": "http://127.0.0.1:1"}}}, 400),
        ("POST", f"{PS}/{ps}/image-cache", {"params": {"imageUuid": uid(), "url": "file:///etc/passwd"}}, 400),
        ("POST", f"{PS}/{ps}/image-cache", {"params": {"imageUuid": uid(), "url": "http://u:secret@x/i"}}, 400),
        ("POST", f"{PS}/{ps}/image-cache", {"params": {"imageUuid": uid(), "url": "http://x/i",
                                                       "checksum": "abc"}}, 400),
        ("POST", f"{PS}/{ps}/image-cache", {"params": {"imageUuid": uid(), "url": "http://x/i",
                                                       "checksum": "a" * 32, "checksumType": "sha256"}}, 400),
        ("POST", f"{PS}/local", {"params": {"url": "relative/dir"}}, 400),
        ("POST", f"{PS}/local", {"params": {"url": "/"}}, 400),
        ("POST", f"{PS}/local", {"params": {"url": f"{tmp_path}/../etc"}}, 400),
        ("POST", f"{PS}/local", {"params": {"url": f"{tmp_path}/a;rm -rf /"}}, 400),
        ("POST", f"{PS}/local", {"params": {"url": str(root / "inner")}}, 409),
        ("POST", f"{PS}/smp", {"params": {"url": str(tmp_path / "missing")}}, 400),
    ]
    for bad_url in ["127.0.0.1:/x;reboot", "$(reboot):/x", "host:/x y", "`id`:/x", "host:/x|cat",
                    "host:/x&&id", "-o:/x", "host:relative", "host:/x/../etc", "host:/x\nid", "http://h/x",
                    "host:/x'", 'host:/x"', "host:/$HOME", "host:/x>y"]:
        cases.append(("POST", f"{PS}/nfs", {"params": {"url": bad_url}}, 400))
    for bad_opts in ["soft;reboot", "vers=4 ,x", "remount", "bind", "a=$(id)", "x=`id`", "ro,rw=a b"]:
        cases.append(("POST", f"{PS}/nfs", {"params": {"url": "127.0.0.1:/export", "mountOptions": bad_opts}}, 400))
    cases.append(("POST", f"{PS}/nfs", {"params": {"url": "127.0.0.1:/export", "mountPath": "rel/path"}}, 400))
    cases.append(("POST", f"{PS}/nfs", {"params": {"url": "127.0.0.1:/export", "mountPath": "/a/../b"}}, 400))

    for method, path, body, want in cases:
        status, reply = await job(http, sagent, method, path, body)
        assert status == want, (method, path, body, status, reply)
        assert "error" in reply and reply["error"]["description"], reply
    assert all_files(root) == before_root
    assert all_files(outside) == before_out and (outside / "victim.qcow2").read_bytes() == b"precious"
    assert fake_mount_log(mount_log) == []          # no mount was ever attempted
    status, body = await get(http, sagent, PS)
    assert [i["uuid"] for i in body["inventories"]] == [ps]
    status, body = await get(http, sagent, f"{PS}/{ps}/volumes")
    assert [i["uuid"] for i in body["inventories"]] == [v]


async def test_image_cache_download_checksum_cleanup(sagent, http, tmp_path):
    root = tmp_path / "ps"
    ps = uid()
    assert (await add_storage(http, sagent, "local", {"uuid": ps, "url": str(root)}))[0] == 200
    img = qcow2_image(tmp_path / "img.qcow2", "128M", pattern_mb=24)
    img2 = qcow2_image(tmp_path / "img2.qcow2", "64M", pattern_mb=1)
    with_backing = qcow2_image(tmp_path / "bk.qcow2", "64M", pattern_mb=0, backing="/etc/hostname")
    server = await ImageServer({"img": img, "img2": img2, "bk": with_backing, "raw": b"\0" * (1 << 20)}).start()
    try:
        i1, i2, i3, i4 = uid(), uid(), uid(), uid()
        # a slow download shows its progress while it runs
        server.delay = 0.02
        status, reply = await submit(http, sagent, "POST", f"{PS}/{ps}/image-cache",
                                     {"params": {"imageUuid": i1, "url": server.url("img"),
                                                 "checksum": hashlib.sha256(img).hexdigest()}})
        assert status == 202
        seen = None
        for _ in range(200):
            async with http.get(reply["location"], headers=sagent.headers) as r:
                b = await r.json()
                if r.status == 202 and b.get("progress", {}).get("downloadedBytes"):
                    seen = b["progress"]
                    break
                if r.status != 202:
                    break
            await asyncio.sleep(0.02)
        assert seen and 0 < seen["percent"] < 100 and seen["totalBytes"] == len(img), seen
        # nothing under the final name while it runs
        assert not any(n.startswith(i1) for n in os.listdir(root / "imagecache"))
        status, body = await wait_job(http, sagent, reply["location"])
        server.delay = 0
        assert status == 200, body
        inv = body["inventory"]
        assert inv["format"] == "qcow2" and inv["size"] == 128 << 20 and inv["checksumType"] == "sha256"
        assert (root / inv["path"]).read_bytes() == img

        # md5, the manual's md5sum field
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/image-cache",
                                 {"params": {"imageUuid": i2, "url": server.url("img2"),
                                             "md5sum": hashlib.md5(img2).hexdigest()}})
        assert status == 200 and body["inventory"]["md5sum"] == hashlib.md5(img2).hexdigest()
        # a wrong checksum: 503, nothing visible, no temporary left
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/image-cache",
                                 {"params": {"imageUuid": i3, "url": server.url("img"),
                                             "checksum": "0" * 64}})
        assert status == 503 and body["error"]["code"] == "STORAGE.1531"
        # an image with a backing file of its own is refused (it would read /etc/hostname)
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/image-cache",
                                 {"params": {"imageUuid": i4, "url": server.url("bk")}})
        assert status == 503 and body["error"]["code"] == "STORAGE.1532"
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/image-cache",
                                 {"params": {"imageUuid": i4, "url": server.url("missing")}})
        assert status == 503 and "404" in body["error"]["description"]
        assert sorted(os.listdir(root / "imagecache")) == sorted([f"{i1}.qcow2", f"{i2}.qcow2"])

        # volumes from the cache: qcow2 on a relative backing file; raw as a full copy
        va, vb = uid(), uid()
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes",
                                 {"params": {"uuid": va, "imageUuid": i1, "type": "Root"}})
        assert status == 200, body
        vol = body["inventory"]
        assert vol["backingFile"] == f"../imagecache/{i1}.qcow2" and vol["size"] == 128 << 20
        assert vol["backingChain"][0]["filename"].endswith(f"imagecache/{i1}.qcow2")
        assert vol["rootImageUuid"] == i1
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes",
                                 {"params": {"uuid": vb, "imageUuid": i2, "format": "raw", "size": 96 << 20}})
        assert status == 200 and body["inventory"]["backingFile"] is None
        assert body["inventory"]["size"] == 96 << 20
        assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "img2.qcow2"),
                               str(root / body["inventory"]["path"])], capture_output=True).returncode in (0, 1)
        status, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes",
                                 {"params": {"imageUuid": i1, "size": 1 << 20}})
        assert status == 400 and body["error"]["code"] == "STORAGE.1011"
        # an image backing a volume cannot be deleted
        status, body = await job(http, sagent, "DELETE", f"{PS}/{ps}/image-cache/{i1}")
        assert status == 409

        # another host's volume on a shared storage (not in this agent's rows) also holds i2
        other = root / "otherhost" / "v.qcow2"
        other.parent.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"../imagecache/{i2}.qcow2",
                        "-F", "qcow2", str(other)], check=True)
        status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions",
                                 {"cleanUpImageCacheOnPrimaryStorage": {}})
        assert status == 200 and body["removedImageUuids"] == [], body
        other.unlink()
        status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions",
                                 {"cleanUpImageCacheOnPrimaryStorage": {}})
        assert status == 200 and body["removedImageUuids"] == [i2] and i1 in body["keptImageUuids"]
        assert not (root / "imagecache" / f"{i2}.qcow2").exists()
        assert (await job(http, sagent, "DELETE", f"{PS}/{ps}/volumes/{va}"))[0] == 200
        status, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions",
                                 {"cleanUpImageCacheOnPrimaryStorage": {}})
        assert body["removedImageUuids"] == [i1]
        status, body = await get(http, sagent, f"{PS}/{ps}/image-cache")
        assert body["inventories"] == []
        assert visible_files(root / "imagecache") == set()
        assert not any(".part-" in f for f in all_files(root))
    finally:
        await server.runner.cleanup()


async def test_same_node_migration_flatten_and_carry(sagent, http, tmp_path):
    a, b = uid(), uid()
    ra, rb = tmp_path / "a", tmp_path / "b"
    assert (await add_storage(http, sagent, "local", {"uuid": a, "url": str(ra)}))[0] == 200
    assert (await add_storage(http, sagent, "local", {"uuid": b, "url": str(rb)}))[0] == 200
    img = qcow2_image(tmp_path / "img.qcow2", "64M", pattern_mb=8)
    server = await ImageServer({"img": img}).start()
    try:
        i1 = uid()
        assert (await job(http, sagent, "POST", f"{PS}/{a}/image-cache",
                          {"params": {"imageUuid": i1, "url": server.url("img")}}))[0] == 200
    finally:
        await server.runner.cleanup()
    vf, vc = uid(), uid()
    for v in (vf, vc):
        status, body = await job(http, sagent, "POST", f"{PS}/{a}/volumes", {"params": {"uuid": v, "imageUuid": i1}})
        assert status == 200
        subprocess.run(["qemu-io", "-c", "write -P 0x33 1M 1M", str(ra / "volumes" / f"{v}.qcow2")],
                       check=True, capture_output=True)
    reference = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(ra / "volumes" / f"{vf}.qcow2"), str(reference)],
                   check=True)
    status, body = await job(http, sagent, "PUT", f"{PS}/{a}/volumes/{vf}/actions",
                             {"migrateVolume": {"dstPrimaryStorageUuid": b}})
    assert status == 200, body
    inv = body["inventory"]
    assert inv["primaryStorageUuid"] == b and inv["backingFile"] is None and inv["backingChain"] == []
    assert not (ra / "volumes" / f"{vf}.qcow2").exists()
    assert subprocess.run(["qemu-img", "compare", "-F", "raw", inv["installPath"], str(reference)],
                          capture_output=True).returncode == 0
    status, body = await job(http, sagent, "PUT", f"{PS}/{a}/volumes/{vc}/actions",
                             {"migrateVolume": {"destination": {"primaryStorageUuid": b},
                                                "backingChain": "carry"}})
    assert status == 200, body
    inv = body["inventory"]
    assert inv["backingFile"] == f"../imagecache/{i1}.qcow2"
    assert (rb / "imagecache" / f"{i1}.qcow2").exists()
    assert subprocess.run(["qemu-img", "compare", "-F", "raw", inv["installPath"], str(reference)],
                          capture_output=True).returncode == 0
    status, body = await get(http, sagent, f"{PS}/{b}/volumes")
    assert {v["uuid"] for v in body["inventories"]} == {vf, vc}
    status, body = await get(http, sagent, f"{PS}/{a}/volumes")
    assert body["inventories"] == []
    status, body = await get(http, sagent, f"{PS}/{b}/image-cache")
    assert [i["uuid"] for i in body["inventories"]] == [i1]


async def test_missing_root_at_start_is_disconnected_not_recreated(sagent, http, receiver, tmp_path):
    root = tmp_path / "disk" / "ps"
    ps = uid()
    assert (await add_storage(http, sagent, "local", {"uuid": ps, "url": str(root)}))[0] == 200
    sagent.stop()
    (tmp_path / "disk").rename(tmp_path / "disk-unmounted")      # its disk is not there at boot
    sagent.start()

    async def status():
        return (await get(http, sagent, f"{PS}/{ps}"))[1]["inventory"]["status"]
    for _ in range(100):
        if await status() == "Disconnected":
            break
        await asyncio.sleep(0.05)
    status_, body = await get(http, sagent, f"{PS}/{ps}")
    assert body["inventory"]["status"] == "Disconnected", body
    assert not root.exists()                     # not silently made again on the wrong disk
    status_, body = await job(http, sagent, "POST", f"{PS}/{ps}/volumes", {"params": {"size": 1 << 20}})
    assert status_ == 503 and body["error"]["code"] == "STORAGE.1504"
    # an empty directory appears there (no id file): still not adopted
    root.mkdir(parents=True)
    status_, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}})
    assert status_ == 503 and "node-agent-storage.json" in body["error"]["description"]
    root.rmdir()
    (tmp_path / "disk").rmdir()
    (tmp_path / "disk-unmounted").rename(tmp_path / "disk")
    status_, body = await job(http, sagent, "PUT", f"{PS}/{ps}/actions", {"reconnectPrimaryStorage": {}})
    assert status_ == 200 and body["inventory"]["status"] == "Connected"
