"""Image store backup storage (issue 12, item 2) and the shared storage collections (item 1),
against real agent processes, a real HTTP server (with Range) and real qemu-img."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time

import pytest
from aiohttp import web

from agent import errors
from conftest import submit
from plugins.storage.imagecache import Fetcher
from storage_helpers import FileServer, add_storage, fast_storage, get, job, uid

BS = "/v1/backup-storage"


class RangeServer(FileServer):
    """Serves files from a directory (aiohttp's FileResponse: Range requests too)."""

    def __init__(self, root) -> None:
        self.root = root
        self.hits = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        path = os.path.join(self.root, request.match_info["name"])
        if not os.path.isfile(path):
            return web.Response(status=404)
        return web.FileResponse(path)


@pytest.fixture
async def server(tmp_path):
    d = tmp_path / "served"
    d.mkdir()
    s = await RangeServer(str(d)).start()
    yield s
    await s.runner.cleanup()


@pytest.fixture
def bagent(agent_factory):
    a = agent_factory(fast_storage(mount_command=["/bin/false"]), name="bagent")
    a.start()
    return a


def qcow2(path, size="32M", pattern: int = 0x5a) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P {pattern} 0 2M", str(path)], check=True,
                   capture_output=True)
    return path.read_bytes()


async def add_store(http, agent, url, **extra) -> tuple[int, dict]:
    return await job(http, agent, "POST", f"{BS}/image-store", {"params": {"url": str(url), **extra}})


def blobs(root) -> list[str]:
    d = os.path.join(root, "blobs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


async def test_image_store_lifecycle_dedup_reclaim_restart(bagent, http, tmp_path, server):
    root = tmp_path / "store"
    bs = uid()
    status, body = await add_store(http, bagent, root, uuid=bs, name="is1", hostname="h1",
                                   username="root", password="secret")
    assert status == 200, body
    inv = body["inventory"]
    assert inv["type"] == "ImageStoreBackupStorage" and inv["status"] == "Connected"
    assert inv["hostname"] == "h1" and "password" not in inv
    assert (root / ".node-agent-storage.json").exists()

    data = qcow2(tmp_path / "served" / "a.qcow2")
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    # first import, verified by md5: stored as blobs/<sha256>; qemu-img says qcow2
    img1 = uid()
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"imageUuid": img1, "name": "a", "url": server.url("a.qcow2"),
                                         "md5sum": md5}})
    assert status == 200, body
    i = body["inventory"]
    assert (i["format"], i["size"], i["sha256"], i["md5sum"]) == ("qcow2", 32 << 20, sha, md5)
    assert blobs(root) == [sha]
    # second import given only the md5: downloaded, but no new blob
    hits = server.hits
    img2 = uid()
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"imageUuid": img2, "url": server.url("a.qcow2"),
                                         "checksum": md5}})
    assert status == 200, body
    assert server.hits == hits + 1 and blobs(root) == [sha]
    # third given the sha256: answered without a download
    img3 = uid()
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"imageUuid": img3, "url": server.url("a.qcow2"),
                                         "sha256": sha}})
    assert status == 200, body
    assert server.hits == hits + 1 and body["inventory"]["sha256"] == sha
    # list with the query API
    status, body = await get(http, bagent, f"{BS}/{bs}/images", {"q": "sha256=" + sha, "count": "true"})
    assert (status, body) == (200, {"total": 3})
    # restart: everything comes back
    bagent.kill9()
    bagent.start()
    status, body = await get(http, bagent, f"{BS}/{bs}")
    assert status == 200 and body["inventory"]["url"] == str(root), body
    status, body = await get(http, bagent, f"{BS}/{bs}/images/{img1}")
    assert status == 200 and body["inventory"]["sha256"] == sha
    # delete every image: the blob stays until reclaim, which frees it and says how much
    for im in (img1, img2, img3):
        status, body = await job(http, bagent, "DELETE", f"{BS}/{bs}/images/{im}")
        assert status == 200, body
    assert blobs(root) == [sha]
    status, body = await job(http, bagent, "PUT", f"{BS}/{bs}/actions",
                             {"reclaimSpaceFromImageStore": {}})
    assert status == 200, body
    assert body["removedBlobs"] == [sha] and body["reclaimedBytes"] > 0
    assert blobs(root) == []
    # capacity and delete (data kept unless asked)
    status, cap = await get(http, bagent, f"{BS}/{bs}/capacity")
    assert status == 200 and cap["totalCapacity"] > 0, cap
    status, body = await job(http, bagent, "DELETE", f"{BS}/{bs}")
    assert status == 200, body
    assert root.is_dir() and not (root / ".node-agent-storage.json").exists()
    status, body = await get(http, bagent, f"{BS}/{bs}")
    assert status == 404


async def test_image_store_bad_input_changes_nothing(bagent, http, tmp_path, server):
    root = tmp_path / "store"
    bs = uid()
    # url refusals: system dirs, '..', a symlink on the way, control characters
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    for url in ("/etc/images", "/usr", str(tmp_path / "a/../b"), str(tmp_path / "link" / "s"),
                str(tmp_path / "bad\nname"), "relative/dir", "/"):
        status, body = await submit(http, bagent, "POST", f"{BS}/image-store",
                                    {"params": {"url": url}})
        assert status == 400, (url, body)
    assert not (real / "s").exists()
    status, body = await add_store(http, bagent, root, uuid=bs)
    assert status == 200, body
    # an unknown uuid
    status, body = await get(http, bagent, f"{BS}/{uid()}")
    assert status == 404
    status, body = await submit(http, bagent, "PUT", f"{BS}/{uid()}/actions",
                                {"reconnectBackupStorage": {}})
    assert status == 404
    # a name with '..', a bad file:// path, a file:// through a symlink
    data = qcow2(tmp_path / "served" / "b.qcow2")
    for params in ({"name": "../x", "url": server.url("b.qcow2")},
                   {"url": "file:///etc/passwd"},
                   {"url": f"file://{tmp_path}/link/x.qcow2"},
                   {"url": "ftp://example.com/x"},
                   {"url": server.url("b.qcow2"), "checksum": "abc"}):
        status, body = await submit(http, bagent, "POST", f"{BS}/{bs}/images", {"params": params})
        assert status == 400, (params, body)
    # a checksum mismatch: the job fails, nothing is kept (no blob, no temporary, no row)
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"url": server.url("b.qcow2"), "sha256": "0" * 64}})
    assert status != 200 and "checksum mismatch" in body["error"]["description"], body
    assert os.listdir(root / "blobs") == []
    status, body = await get(http, bagent, f"{BS}/{bs}/images")
    assert body["inventories"] == []
    # file:// whose last component leaves the allowed roots (a symlink to a file outside,
    # readable by the agent's root), or is no regular file (a FIFO would hold the reader):
    # a 400 at submission, nothing read or kept
    outside = tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="node-agent-secret-")
    outside.write(b"not for the store " + os.urandom(64))
    outside.flush()
    src = tmp_path / "src"
    src.mkdir()
    (src / "shadow.raw").symlink_to(outside.name)
    (src / "passwd.raw").symlink_to("/etc/passwd")
    (src / "dir.raw").mkdir()
    os.mkfifo(src / "fifo.raw")
    with outside:
        for name in ("shadow.raw", "passwd.raw", "dir.raw", "fifo.raw", "missing.raw"):
            status, body = await submit(http, bagent, "POST", f"{BS}/{bs}/images",
                                        {"params": {"url": f"file://{src}/{name}"}})
            assert status == 400 and "url" in body["error"]["description"], (name, body)
        assert os.listdir(root / "blobs") == []
        status, body = await get(http, bagent, f"{BS}/{bs}/images")
        assert body["inventories"] == []
    # file:// from a confined place works, verified
    (src / "b.qcow2").write_bytes(data)
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"url": f"file://{src}/b.qcow2",
                                         "sha256": hashlib.sha256(data).hexdigest()}})
    assert status == 200 and body["inventory"]["format"] == "qcow2", body


async def test_file_source_reader_opens_only_the_checked_path(tmp_path):
    """The fetcher process (streamio.py fetch) reads a file:// source at the path the agent
    checked and nowhere else, whatever changed there since the check: a symlink put as the
    last component, a directory on the way swapped for a symlink, a FIFO (refused at once,
    not held until the stall timeout). Nothing of the target is kept."""
    store = tmp_path / "store"
    (store / "blobs").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.raw").write_bytes(b"fine " * 1000)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="node-agent-outside-") as out:
        secret = b"not for the store " + os.urandom(64)
        with open(os.path.join(out, "img.raw"), "wb") as f:
            f.write(secret)
        (src / "link.raw").symlink_to(os.path.join(out, "img.raw"))
        (tmp_path / "swapped").symlink_to(out)         # was a directory when checked
        os.mkfifo(src / "fifo.raw")
        for path in (src / "link.raw", tmp_path / "swapped" / "img.raw", src / "fifo.raw"):
            f = Fetcher(str(store), "blobs/.x.part-test", f"file://{path}", "sha256", stall=10,
                        ca_file=None, local_file=str(path))
            t0 = time.monotonic()
            try:
                with pytest.raises(errors.OperationFailed) as e:
                    await f.run(lambda done, total: None, 20)
            finally:
                await f.abort()
            assert time.monotonic() - t0 < 5, (path, e.value)
            assert "stall" not in str(e.value) and "progress" not in str(e.value), e.value
            assert os.listdir(store / "blobs") == [], path
        f = Fetcher(str(store), "blobs/.x.part-test", f"file://{src}/ok.raw", "sha256", stall=10,
                    ca_file=None, local_file=str(src / "ok.raw"))
        try:
            report = await f.run(lambda done, total: None, 20)
        finally:
            await f.abort()
        assert report["digest"] == hashlib.sha256(b"fine " * 1000).hexdigest()


async def test_fetch_writes_every_byte_holes_for_zeros_and_both_digests(tmp_path, server):
    """The fetcher's pipeline (socket read, hash and write in three threads, huge-page
    buffers): the blob is byte for byte the source, zero MiB blocks are holes, the
    sha256 and the md5 are those of every byte, over HTTP and from a file alike; a size
    that is no multiple of the buffer or of a block is no problem. A write that fails
    (the file system full) fails the fetch and keeps nothing."""
    mib = 1 << 20
    data = b"".join([os.urandom(mib), bytes(8 * mib), os.urandom(3 * mib + 123),
                     bytes(5 * mib), b"\x01" + bytes(mib - 2) + b"\x01", bytes(mib), b"tail"])
    src = tmp_path / "served" / "holes.raw"
    src.write_bytes(data)
    store = tmp_path / "store"
    (store / "blobs").mkdir(parents=True)
    for name, url, local in (("http", server.url("holes.raw"), None),
                             ("file", f"file://{src}", str(src))):
        f = Fetcher(str(store), f"blobs/.{name}.part", url, "sha256", stall=10, ca_file=None,
                    extra_algs=("md5",), local_file=local, sparse=True)
        try:
            report = await f.run(lambda done, total: None, 60)
            await f.commit(f"blobs/{name}")
        finally:
            await f.abort()
        assert report["digest"] == hashlib.sha256(data).hexdigest(), name
        assert report["digests"]["md5"] == hashlib.md5(data).hexdigest(), name
        out = store / "blobs" / name
        assert out.read_bytes() == data, name
        # the 12 zero MiB blocks at MiB offsets take no space (the zeros off those
        # boundaries, and the MiB with a byte at each end, do)
        assert out.stat().st_blocks * 512 <= len(data) - 12 * mib + (64 << 10), (name, out.stat().st_blocks)
    # a file system that fills up mid-download: the fetch fails, nothing is left behind
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fetch-test", str(small)], check=True)
    try:
        (small / "blobs").mkdir()
        f = Fetcher(str(small), "blobs/.full.part", server.url("holes.raw"), "sha256", stall=10,
                    ca_file=None, sparse=False)
        try:
            with pytest.raises(errors.OperationFailed) as e:
                await f.run(lambda done, total: None, 60)
        finally:
            await f.abort()
        assert "No space left" in str(e.value), e.value
        assert os.listdir(small / "blobs") == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_export_serves_ranges_and_revokes(bagent, http, tmp_path, server):
    root = tmp_path / "store"
    bs, im = uid(), uid()
    status, body = await add_store(http, bagent, root, uuid=bs)
    assert status == 200, body
    data = os.urandom(3 << 20)
    (tmp_path / "served" / "r.raw").write_bytes(data)
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"imageUuid": im, "url": server.url("r.raw")}})
    assert status == 200 and body["inventory"]["format"] == "raw", body
    status, body = await job(http, bagent, "PUT", f"{BS}/{bs}/images/{im}/actions",
                             {"exportImageFromBackupStorage": {}})
    assert status == 200, body
    url = body["imageUrl"]
    # no token needed (the URL is the credential); a range resumes like curl -C -
    out = tmp_path / "dl"
    out.write_bytes(data[:1000])
    subprocess.run(["curl", "-sf", "-C", "-", "-o", str(out), url], check=True)
    assert out.read_bytes() == data
    async with http.get(url, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206 and await r.read() == data[10:20]
    async with http.get(url[:-4] + "AAAA") as r:
        assert r.status == 404
    status, body = await job(http, bagent, "PUT", f"{BS}/{bs}/images/{im}/actions",
                             {"deleteExportedImageFromBackupStorage": {}})
    assert status == 200, body
    async with http.get(url) as r:
        assert r.status == 404


async def test_collections_list_every_kind_and_dispatch(bagent, http, tmp_path):
    ps, bs = uid(), uid()
    status, body = await add_storage(http, bagent, "local", {"uuid": ps, "url": str(tmp_path / "ps")})
    assert status == 200, body
    status, body = await add_store(http, bagent, tmp_path / "bs", uuid=bs, name="n1")
    assert status == 200, body
    status, body = await get(http, bagent, "/v1/primary-storage", {"q": "type=LocalStorage"})
    assert status == 200 and [i["uuid"] for i in body["inventories"]] == [ps]
    inv = body["inventories"][0]
    for k in ("uuid", "name", "type", "url", "state", "status", "totalCapacity",
              "availableCapacity", "totalPhysicalCapacity", "availablePhysicalCapacity",
              "createDate", "lastOpDate", "mountPath"):
        assert k in inv, k
    status, body = await get(http, bagent, "/v1/backup-storage", {"q": "type=ImageStoreBackupStorage"})
    assert status == 200 and [i["uuid"] for i in body["inventories"]] == [bs]
    status, body = await get(http, bagent, "/v1/backup-storage", {"q": "type=Ceph"})
    assert status == 200 and body["inventories"] == []
    # per-uuid calls dispatched to the owner; the other category does not know the uuid
    assert (await get(http, bagent, f"/v1/primary-storage/{bs}"))[0] == 404
    assert (await get(http, bagent, f"/v1/backup-storage/{ps}"))[0] == 404
    status, body = await job(http, bagent, "PUT", f"/v1/backup-storage/{bs}/actions",
                             {"updateBackupStorage": {"name": "n2"}})
    assert status == 200 and body["inventory"]["name"] == "n2", body
    status, body = await job(http, bagent, "PUT", f"/v1/backup-storage/{bs}/actions",
                             {"changeBackupStorageState": {"stateEvent": "disable"}})
    assert status == 200 and body["inventory"]["state"] == "Disabled", body
    status, body = await job(http, bagent, "PUT", f"/v1/primary-storage/{ps}/actions",
                             {"updatePrimaryStorage": {"name": "p2"}})
    assert status == 200 and body["inventory"]["name"] == "p2", body
    # an action the kind does not have, parameters the kind refuses: 400, nothing run
    status, body = await submit(http, bagent, "PUT", f"/v1/primary-storage/{ps}/actions",
                                {"reclaimSpaceFromImageStore": {}})
    assert status == 400
    status, body = await submit(http, bagent, "PUT", f"/v1/backup-storage/{bs}/actions",
                                {"reconnectBackupStorage": {"bogus": 1}})
    assert status == 400, body
    status, body = await submit(http, bagent, "PUT", f"/v1/backup-storage/{bs}/actions",
                                {"updateBackupStorage": {"name": "x\ny"}})
    assert status == 400, body
    status, body = await submit(http, bagent, "DELETE", f"/v1/primary-storage/{ps}?deleteData=true")
    assert status == 400, body
    status, cap = await get(http, bagent, f"/v1/primary-storage/{ps}/capacity")
    assert status == 200 and cap["totalCapacity"] > 0
    status, body = await job(http, bagent, "DELETE", f"/v1/primary-storage/{ps}")
    assert status == 200, body
    status, body = await get(http, bagent, "/v1/primary-storage")
    assert body["inventories"] == []


async def test_image_store_creates_follow_the_resource_uuid_rule(bagent, http, tmp_path, server):
    """Issue 13.3 for the image store's two creates: resourceUuid (or uuid / imageUuid) kept
    normalised, a used one the core's 409 SYS.1009 at submission (a uuid of any storage of
    the node for a store), none a new random one; control characters refused by the core."""
    import uuid as uuidlib
    ps = uid()
    status, body = await add_storage(http, bagent, "local", {"uuid": ps, "url": str(tmp_path / "ps")})
    assert status == 200, body
    want = uuidlib.uuid4()
    status, body = await add_store(http, bagent, tmp_path / "s1", resourceUuid=str(want).upper())
    assert status == 200 and body["inventory"]["uuid"] == want.hex, body
    bs = want.hex
    for params in ({"resourceUuid": bs, "url": str(tmp_path / "s2")},
                   {"uuid": str(want), "url": str(tmp_path / "s2")},
                   {"resourceUuid": bs, "url": str(tmp_path / "s1")},     # the same again
                   {"resourceUuid": ps, "url": str(tmp_path / "s2")}):    # a primary storage's
        status, body = await submit(http, bagent, "POST", f"{BS}/image-store", {"params": params})
        assert status == 409 and body["error"]["code"] == "SYS.1009", (params, body)
    for params in ({"resourceUuid": bs, "uuid": bs, "url": str(tmp_path / "s2")},
                   {"resourceUuid": "x" * 32, "url": str(tmp_path / "s2")},
                   {"url": str(tmp_path / "s2"), "name": "a\nb"},
                   {"url": str(tmp_path / "s2"), "hostname": "h\x00"}):
        status, body = await submit(http, bagent, "POST", f"{BS}/image-store", {"params": params})
        assert status == 400, (params, body)
    assert not (tmp_path / "s2").exists()
    status, body = await add_store(http, bagent, tmp_path / "s3")
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", body["inventory"]["uuid"]), body

    (tmp_path / "served" / "i.raw").write_bytes(os.urandom(1 << 20))
    im = uuidlib.uuid4()
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"resourceUuid": str(im), "url": server.url("i.raw")}})
    assert status == 200 and body["inventory"]["uuid"] == im.hex, body
    for params in ({"resourceUuid": im.hex}, {"imageUuid": str(im).upper()}, {"uuid": im.hex}):
        status, body = await submit(http, bagent, "POST", f"{BS}/{bs}/images",
                                    {"params": {**params, "url": server.url("i.raw")}})
        assert status == 409 and body["error"]["code"] == "SYS.1009", (params, body)
    for params in ({"imageUuid": im.hex, "uuid": im.hex}, {"imageUuid": "0" * 32},
                   {"name": "x\ty"}, {"description": "\x7f"}):
        status, body = await submit(http, bagent, "POST", f"{BS}/{bs}/images",
                                    {"params": {**params, "url": server.url("i.raw")}})
        assert status == 400, (params, body)
    status, body = await job(http, bagent, "POST", f"{BS}/{bs}/images",
                             {"params": {"url": server.url("i.raw")}})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", body["inventory"]["uuid"]), body
    status, body = await get(http, bagent, f"{BS}/{bs}/images", {"count": "true"})
    assert body == {"total": 2}
