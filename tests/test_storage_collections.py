"""One primary and one backup storage collection across every kind (issue 12, item 1): a real
micro Ceph cluster's primary and backup storages beside a local storage and an image store,
listed, read, measured, acted on and deleted through /v1/{primary,backup}-storage/{uuid}."""

from __future__ import annotations

import os

import pytest

from ceph_fixture import ceph_cluster  # noqa: F401 (fixture)
from conftest import submit
from storage_helpers import add_storage, fast_storage, get, job, uid

TIMEOUTS = {"mount_timeout": 3, "mon_op_timeout": 3, "osd_op_timeout": 8, "health_interval": 1}


@pytest.fixture
def cagent(agent_factory, ceph_cluster):  # noqa: F811
    return agent_factory({"ceph": TIMEOUTS, **fast_storage()}, name="cagent").start()


async def add_ceph_backup_storage(http, agent, c, suffix: str) -> str:
    """Ceph backup storage "cbs<suffix>" on pool "coll-bs<suffix>" of the cluster; its uuid."""
    status, body = await job(http, agent, "POST", "/v1/backup-storage/ceph", {"params": {
        "name": f"cbs{suffix}", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key,
        "poolName": f"coll-bs{suffix}"}})
    assert status == 200, body
    return body["inventory"]["uuid"]


async def add_image_store(http, agent, root, uuid: str | None = None) -> str:
    uuid = uuid or uid()
    status, body = await job(http, agent, "POST", "/v1/backup-storage/image-store",
                             {"params": {"uuid": uuid, "url": str(root)}})
    assert status == 200, body
    return uuid


async def ceph_and_two_image_stores(http, agent, c, tmp_path, suffix: str) -> tuple[str, str, str]:
    """A Ceph backup storage and image stores at tmp_path/is1 and is2: their uuids."""
    return (await add_ceph_backup_storage(http, agent, c, suffix),
            await add_image_store(http, agent, tmp_path / "is1"),
            await add_image_store(http, agent, tmp_path / "is2"))


async def import_raw(http, agent, store: str, tmp_path, data: bytes, name: str) -> tuple[str, dict]:
    """data imported from tmp_path/files/img.raw into the image store: the image's uuid and inventory."""
    src = tmp_path / "files"
    src.mkdir()
    (src / "img.raw").write_bytes(data)
    im = uid()
    status, body = await job(http, agent, "POST", f"/v1/backup-storage/{store}/images",
                             {"params": {"imageUuid": im, "name": name, "url": f"file://{src}/img.raw"}})
    assert status == 200, body
    return im, body["inventory"]


async def test_ceph_and_local_kinds_in_one_collection(cagent, ceph_cluster, http, tmp_path):  # noqa: F811
    c = ceph_cluster
    status, body = await job(http, cagent, "POST", "/v1/primary-storage/ceph", {"params": {
        "name": "cps", "monUrls": [f"127.0.0.1:{c.port}"], "key": c.key,
        "rootVolumePoolName": "coll-root", "dataVolumePoolName": "coll-data",
        "imageCachePoolName": "coll-cache"}})
    assert status == 200, body
    cps = body["inventory"]["uuid"]
    cbs = await add_ceph_backup_storage(http, cagent, c, "")
    lps, ibs = uid(), uid()
    assert (await add_storage(http, cagent, "local", {"uuid": lps, "url": str(tmp_path / "ps")}))[0] == 200
    await add_image_store(http, cagent, tmp_path / "is", ibs)

    status, body = await get(http, cagent, "/v1/primary-storage")
    assert status == 200 and {i["uuid"]: i["type"] for i in body["inventories"]} == \
        {cps: "Ceph", lps: "LocalStorage"}
    status, body = await get(http, cagent, "/v1/primary-storage", {"q": "type=Ceph"})
    assert [i["uuid"] for i in body["inventories"]] == [cps]
    ceph_row = body["inventories"][0]
    assert ceph_row["url"].startswith("ceph://") and "fsid" in ceph_row and "mons" in ceph_row
    status, body = await get(http, cagent, "/v1/backup-storage", {"q": "type=Ceph", "fields": "uuid,type"})
    assert body["inventories"] == [{"uuid": cbs, "type": "Ceph"}]
    status, body = await get(http, cagent, "/v1/backup-storage", {"count": "true"})
    assert body == {"total": 2}

    # one uuid names one storage of this node, whatever the kind: each create given another
    # kind's uuid is the core's 409 SYS.1009, and nothing is registered
    ceph_mon = {"monUrls": [f"127.0.0.1:{c.port}"], "key": c.key}
    for path, params in (
            ("/v1/primary-storage/ceph", {**ceph_mon, "resourceUuid": lps, "rootVolumePoolName": "x-r",
                                          "dataVolumePoolName": "x-d", "imageCachePoolName": "x-c"}),
            ("/v1/backup-storage/ceph", {**ceph_mon, "resourceUuid": ibs, "poolName": "x-bs"}),
            ("/v1/backup-storage/ceph", {**ceph_mon, "resourceUuid": cps, "poolName": "x-bs"}),
            ("/v1/primary-storage/local", {"uuid": cbs, "url": str(tmp_path / "ps2")}),
            ("/v1/backup-storage/image-store", {"uuid": cps, "url": str(tmp_path / "is2")})):
        status, body = await submit(http, cagent, "POST", path, {"params": params})
        assert status == 409 and body["error"]["code"] == "SYS.1009", (path, params, body)
    status, body = await get(http, cagent, "/v1/primary-storage", {"count": "true"})
    assert body == {"total": 2}
    assert "x-bs" not in c.ceph("osd", "pool", "ls") and not (tmp_path / "ps2").exists()

    # per-uuid reads and actions reach the Ceph plugin through the shared paths
    status, body = await get(http, cagent, f"/v1/primary-storage/{cps}")
    assert status == 200 and body["inventory"]["type"] == "Ceph"
    status, cap = await get(http, cagent, f"/v1/primary-storage/{cps}/capacity")
    assert status == 200 and cap["totalCapacity"] > 0, cap
    status, cap = await get(http, cagent, f"/v1/backup-storage/{cbs}/capacity")
    assert status == 200 and cap["totalCapacity"] > 0, cap
    status, body = await job(http, cagent, "PUT", f"/v1/primary-storage/{cps}/actions",
                             {"reconnectPrimaryStorage": {}})
    assert status == 200 and body["inventory"]["uuid"] == cps, body
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{cbs}/actions",
                             {"reconnectBackupStorage": {}})
    assert status == 200, body
    # an action Ceph does not have: 400 naming what it has
    status, body = await submit(http, cagent, "PUT", f"/v1/backup-storage/{cbs}/actions",
                                {"reclaimSpaceFromImageStore": {}})
    assert status == 400 and "reconnectBackupStorage" in body["error"]["description"], body
    # the kind-specific paths still work
    assert (await get(http, cagent, f"/v1/primary-storage/ceph/{cps}"))[0] == 200
    # delete through the shared path (the cluster's pools stay)
    status, body = await job(http, cagent, "DELETE", f"/v1/backup-storage/{cbs}")
    assert status == 200, body
    status, body = await job(http, cagent, "DELETE", f"/v1/primary-storage/{cps}")
    assert status == 200, body
    assert (await get(http, cagent, f"/v1/primary-storage/ceph/{cps}"))[0] == 404
    status, body = await get(http, cagent, "/v1/primary-storage")
    assert [i["uuid"] for i in body["inventories"]] == [lps]
    assert "coll-data" in c.ceph("osd", "pool", "ls")


async def test_image_store_to_ceph_and_image_store_on_the_same_node(cagent, ceph_cluster, http, tmp_path):  # noqa: F811
    import hashlib
    c = ceph_cluster
    cbs, s1, s2 = await ceph_and_two_image_stores(http, cagent, c, tmp_path, "2")
    data = bytes(range(256)) * 4096 * 4          # 4 MiB
    sha = hashlib.sha256(data).hexdigest()
    im, _ = await import_raw(http, cagent, s1, tmp_path, data, "x")
    # to Ceph backup storage: read from a one-off export of this agent, sha256 checked by Ceph
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                             {"migrateImage": {"destination": {"backupStorageUuid": cbs}}}, timeout=120)
    assert status == 200, body
    status, body = await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}")
    assert status == 200 and body["inventory"]["size"] == len(data), body
    # to another image store of this node
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                             {"migrateImage": {"destination": {"backupStorageUuid": s2}}})
    assert status == 200 and body["inventory"]["sha256"] == sha, body
    assert (tmp_path / "is2" / "blobs" / sha).read_bytes() == data
    # again: the image is there, the create's resourceUuid rule holds (a job error, nothing new)
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                             {"migrateImage": {"destination": {"backupStorageUuid": s2}}})
    assert status != 200 and body["error"]["code"] == "SYS.1009", body
    assert sorted(os.listdir(tmp_path / "is2" / "blobs")) == [sha]
    # the one-off exports are gone; the source keeps its image
    assert (await get(http, cagent, f"/v1/backup-storage/{s1}/images/{im}"))[0] == 200
    # refused before anything runs: itself, an unknown storage, no token with a url
    for dest in ({"backupStorageUuid": s1}, {"backupStorageUuid": uid()},
                 {"backupStorageUuid": s2, "url": "http://127.0.0.1:1"}):
        status, body = await submit(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                                    {"migrateImage": {"destination": dest}})
        assert status in (400, 404), (dest, body)


async def test_ceph_to_image_store_on_the_same_node(cagent, ceph_cluster, http, tmp_path):  # noqa: F811
    """Issue 12 item 2: a Ceph backup storage's image to an image store of this node in one
    migrateImage call, verified by its sha256 there; refusals change nothing."""
    import hashlib
    c = ceph_cluster
    cbs, s1, s2 = await ceph_and_two_image_stores(http, cagent, c, tmp_path, "3")
    data = bytes(range(255, -1, -1)) * 4096 * 5 + b"tail"      # 5 MiB + 4 bytes: a partial block
    sha = hashlib.sha256(data).hexdigest()
    # into Ceph (by the image store's same-node migration), then the image store copy goes
    im, first = await import_raw(http, cagent, s1, tmp_path, data, "rev")  # first: what an image store lists
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                             {"migrateImage": {"destination": {"backupStorageUuid": cbs}}}, timeout=120)
    assert status == 200, body
    status, body = await job(http, cagent, "DELETE", f"/v1/backup-storage/{s1}/images/{im}")
    assert status == 200, body
    status, body = await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}")
    assert status == 200 and body["inventory"]["checksum"] == f"sha256:{sha}", body

    # refused before anything runs: an unknown uuid, the image's own storage: nothing changes
    for dest in (uid(), cbs):
        status, body = await submit(http, cagent, "PUT", f"/v1/backup-storage/ceph/{cbs}/images/{im}/actions",
                                    {"migrateImage": {"backupStorageUuid": dest}})
        assert status in (400, 404, 409), (dest, body)
    assert (await get(http, cagent, f"/v1/backup-storage/{s2}/images"))[1]["inventories"] == []
    assert not os.listdir(tmp_path / "is2" / "blobs")

    # Ceph -> image store in one call, by the image store's uuid
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/ceph/{cbs}/images/{im}/actions",
                             {"migrateImage": {"backupStorageUuid": s2}}, timeout=120)
    assert status == 200, body
    inv = body["inventory"]
    assert inv["uuid"] == im and inv["sha256"] == sha == first["sha256"], inv
    assert inv["size"] == first["size"] and inv["format"] == "raw", (inv, first)
    status, body = await get(http, cagent, f"/v1/backup-storage/{s2}/images/{im}")
    assert status == 200 and body["inventory"]["sha256"] == sha and body["inventory"]["size"] == first["size"]
    assert (tmp_path / "is2" / "blobs" / sha).read_bytes() == data
    # the source keeps its image; the one-off export is revoked
    status, body = await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}")
    assert status == 200 and body["inventory"]["status"] == "Ready", body
    # again: the image is at the destination already: an error, nothing new, nothing lost
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/ceph/{cbs}/images/{im}/actions",
                             {"migrateImage": {"backupStorageUuid": s2, "deleteSource": True}})
    assert status != 200 and body["error"]["code"] == "SYS.1009", body
    assert sorted(os.listdir(tmp_path / "is2" / "blobs")) == [sha]
    assert (await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}"))[0] == 200

    # the Ceph image no longer has the content its checksum says (written behind the agent's
    # back): the image store refuses it; nothing is listed or left there, the source stays
    s3 = await add_image_store(http, cagent, tmp_path / "is3")
    c.rbd("bench", "--io-type", "write", "--io-size", "4096", "--io-total", "4096",
          "--io-pattern", "seq", f"coll-bs3/{im}")
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/ceph/{cbs}/images/{im}/actions",
                             {"migrateImage": {"backupStorageUuid": s3, "deleteSource": True}}, timeout=120)
    assert status != 200 and "checksum" in body["error"]["description"], body
    assert (await get(http, cagent, f"/v1/backup-storage/{s3}/images"))[1]["inventories"] == []
    assert not os.listdir(tmp_path / "is3" / "blobs")
    assert (await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}"))[0] == 200


async def test_ceph_qcow2_import_to_image_store_is_refused(cagent, ceph_cluster, http, tmp_path):  # noqa: F811
    """An image that came into Ceph as qcow2 has no checksum of its raw content: nothing to
    verify at the image store, so the migration is a 400 before anything runs."""
    import subprocess
    c = ceph_cluster
    cbs, s1, s2 = await ceph_and_two_image_stores(http, cagent, c, tmp_path, "4")
    (tmp_path / "files").mkdir()
    qcow = tmp_path / "files" / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(qcow), "8M"], check=True,
                   capture_output=True)
    im = uid()
    status, body = await job(http, cagent, "POST", f"/v1/backup-storage/{s1}/images",
                             {"params": {"imageUuid": im, "url": f"file://{qcow}"}})
    assert status == 200 and body["inventory"]["format"] == "qcow2", body
    status, body = await job(http, cagent, "PUT", f"/v1/backup-storage/{s1}/images/{im}/actions",
                             {"migrateImage": {"destination": {"backupStorageUuid": cbs}}}, timeout=120)
    assert status == 200 and body["inventory"]["originalFormat"] == "qcow2", body
    status, body = await submit(http, cagent, "PUT", f"/v1/backup-storage/ceph/{cbs}/images/{im}/actions",
                                {"migrateImage": {"backupStorageUuid": s2}})
    assert status == 400 and "qcow2" in body["error"]["description"], body
    assert (await get(http, cagent, f"/v1/backup-storage/{s2}/images"))[1]["inventories"] == []
    assert (await get(http, cagent, f"/v1/backup-storage/ceph/{cbs}/images/{im}"))[0] == 200
