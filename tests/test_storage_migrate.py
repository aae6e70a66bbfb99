"""Volume migration between two agents on loopback (issue 4 item 8): streamed over HTTP,
sparse-aware, checksum verified before the source goes, backing chains flattened or carried;
kill -9 of either agent mid-stream leaves the source intact and nothing visible at the
destination."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess

import pytest

from conftest import submit, wait_job
from storage_helpers import (PS, add_storage, all_files, fast_storage, fill, get, job, kill9_source_mid_stream,
                             migration_pair, temporary_removed, uid, visible_files, wait_for, wait_streaming)
from test_storage import ImageServer, qcow2_image

MIB = 1 << 20


@pytest.fixture
def pair(agent_factory):
    return migration_pair(agent_factory)


async def storages(http, src, dst, tmp_path):
    ps_a, ps_b = uid(), uid()
    assert (await add_storage(http, src, "local", {"uuid": ps_a, "url": str(tmp_path / "A")}))[0] == 200
    assert (await add_storage(http, dst, "local", {"uuid": ps_b, "url": str(tmp_path / "B")}))[0] == 200
    return ps_a, ps_b


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 * MIB):
            h.update(b)
    return h.hexdigest()


def migrate_body(dst, ps_b: str, token: str | None = None, **extra) -> dict:
    return {"migrateVolume": {"destination": {"primaryStorageUuid": ps_b, "url": dst.url,
                                              "token": token or dst.token}, **extra}}


async def test_migrate_between_agents_sparse_verified_chains(pair, http, tmp_path):
    src, dst = pair
    ps_a, ps_b = await storages(http, src, dst, tmp_path)
    # a raw volume, half holes
    v = uid()
    status, body = await job(http, src, "POST", f"{PS}/{ps_a}/volumes",
                             {"params": {"uuid": v, "size": 64 * MIB, "format": "raw", "name": "half"}})
    assert status == 200
    path = tmp_path / "A" / body["inventory"]["path"]
    fill(path, 64 * MIB, 2 * MIB, MIB)
    digest, allocated = sha(path), os.stat(path).st_blocks * 512

    # the wrong token: refused, nothing moves
    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions",
                             migrate_body(dst, ps_b, token="wrong"))
    assert status == 503 and "refused the token" in body["error"]["description"]
    assert dst.token not in str(body)
    # an unknown destination storage
    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions", migrate_body(dst, uid()))
    assert status == 503 and "404" in body["error"]["description"]

    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions", migrate_body(dst, ps_b))
    assert status == 200, body
    inv = body["inventory"]
    assert inv["primaryStorageUuid"] == ps_b and inv["uuid"] == v and inv["name"] == "half"
    moved = tmp_path / "B" / inv["path"]
    assert sha(moved) == digest and os.stat(moved).st_size == 64 * MIB
    assert os.stat(moved).st_blocks * 512 <= allocated + MIB        # holes stayed holes
    assert not path.exists()
    assert (await get(http, src, f"{PS}/{ps_a}/volumes"))[1]["inventories"] == []
    status, body = await get(http, dst, f"{PS}/{ps_b}/volumes/{v}")
    assert status == 200 and body["inventory"]["size"] == 64 * MIB
    assert not any(".part-" in f for f in all_files(tmp_path / "B"))

    # qcow2 volumes on a cached image: carried (image copied, chain kept) and flattened
    img = qcow2_image(tmp_path / "img.qcow2", "64M", pattern_mb=8)
    server = await ImageServer({"img": img}).start()
    try:
        i1 = uid()
        assert (await job(http, src, "POST", f"{PS}/{ps_a}/image-cache",
                          {"params": {"imageUuid": i1, "url": server.url("img")}}))[0] == 200
    finally:
        await server.runner.cleanup()
    vc, vf = uid(), uid()
    for x in (vc, vf):
        assert (await job(http, src, "POST", f"{PS}/{ps_a}/volumes", {"params": {"uuid": x, "imageUuid": i1}}))[0] == 200
        subprocess.run(["qemu-io", "-c", "write -P 0x44 4M 2M", str(tmp_path / "A" / "volumes" / f"{x}.qcow2")],
                       check=True, capture_output=True)
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "A" / "volumes" / f"{vc}.qcow2"), str(ref)],
                   check=True)
    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{vc}/actions",
                             migrate_body(dst, ps_b, backingChain="carry"))
    assert status == 200, body
    assert body["inventory"]["backingFile"] == f"../imagecache/{i1}.qcow2"
    status, imgs = await get(http, dst, f"{PS}/{ps_b}/image-cache")
    assert [i["uuid"] for i in imgs["inventories"]] == [i1]
    carried = tmp_path / "B" / "volumes" / f"{vc}.qcow2"
    assert subprocess.run(["qemu-img", "compare", "-F", "raw", str(carried), str(ref)],
                          capture_output=True).returncode == 0
    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{vf}/actions", migrate_body(dst, ps_b))
    assert status == 200, body
    assert body["inventory"]["backingFile"] is None
    flat = tmp_path / "B" / "volumes" / f"{vf}.qcow2"
    assert subprocess.run(["qemu-img", "compare", "-F", "raw", str(flat), str(ref)],
                          capture_output=True).returncode == 0
    # the source keeps only its image cache; no temporaries anywhere (the moved copies were
    # renamed away at once and are removed in the background)
    assert visible_files(tmp_path / "A") == {f"imagecache/{i1}.qcow2"}
    await wait_for(lambda: not any(".part-" in f for f in all_files(tmp_path / "A") | all_files(tmp_path / "B")),
                   10, "the moved copies removed")
    # migrating again: the destination already has it
    status, body = await job(http, dst, "PUT", f"{PS}/{ps_b}/volumes/{vf}/actions",
                             {"migrateVolume": {"destination": {"primaryStorageUuid": ps_b, "url": dst.url,
                                                                "token": dst.token}}})
    assert status == 503 and body["error"]["code"] == "STORAGE.1009", body


async def start_big_migration(http, src, dst, tmp_path, ps_a, ps_b) -> tuple[str, str, str, str]:
    v = uid()
    size = 1 << 30
    status, body = await job(http, src, "POST", f"{PS}/{ps_a}/volumes",
                             {"params": {"uuid": v, "size": size, "format": "raw"}})
    assert status == 200
    path = tmp_path / "A" / body["inventory"]["path"]
    fill(path, size, 2 * MIB, MIB)         # 512 MiB of data, 512 MiB of holes
    digest = sha(path)
    status, reply = await submit(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions", migrate_body(dst, ps_b))
    assert status == 202
    await wait_streaming(http, src, reply["location"], 20)
    return v, str(path), digest, reply["location"]


async def test_kill9_source_mid_stream(pair, http, tmp_path):
    src, dst = pair
    ps_a, ps_b = await storages(http, src, dst, tmp_path)
    before = visible_files(tmp_path / "B")
    v, path, digest, location = await start_big_migration(http, src, dst, tmp_path, ps_a, ps_b)
    kill9_source_mid_stream(src, dst)
    # the destination drops the half stream: nothing visible, its temporary removed
    await temporary_removed(tmp_path / "B")
    assert visible_files(tmp_path / "B") == before
    assert (await get(http, dst, f"{PS}/{ps_b}/volumes"))[1]["inventories"] == []
    # the source is intact; the job is reported interrupted after the restart
    assert sha(path) == digest
    src.start()
    status, body = await wait_job(http, src, location)
    assert status == 503 and body["error"]["code"] == "JOB.1001"
    status, body = await get(http, src, f"{PS}/{ps_a}/volumes")
    assert [i["uuid"] for i in body["inventories"]] == [v]
    # and it can be migrated now
    status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions", migrate_body(dst, ps_b),
                             timeout=120)
    assert status == 200, body
    assert sha(tmp_path / "B" / body["inventory"]["path"]) == digest and not os.path.exists(path)


async def test_kill9_destination_mid_stream(pair, http, tmp_path):
    src, dst = pair
    ps_a, ps_b = await storages(http, src, dst, tmp_path)
    before = visible_files(tmp_path / "B")
    v, path, digest, location = await start_big_migration(http, src, dst, tmp_path, ps_a, ps_b)
    os.kill(dst.proc.pid, signal.SIGSTOP)
    dst.kill9()
    status, body = await wait_job(http, src, location, timeout=60)
    assert status == 503 and body["error"]["code"] == "STORAGE.1540", body
    assert "source is unchanged" in body["error"]["description"]
    assert sha(path) == digest
    status, body = await get(http, src, f"{PS}/{ps_a}/volumes")
    assert [i["uuid"] for i in body["inventories"]] == [v]
    # The destination's writer dies with its agent (PR_SET_PDEATHSIG): either it saw its pipe
    # close first and removed the temporary, or the restarted agent sweeps it at connect.
    # Nothing is ever visible under a final name meanwhile.
    assert visible_files(tmp_path / "B") == before
    dst.start()
    await temporary_removed(tmp_path / "B", 20)
    assert visible_files(tmp_path / "B") == before
    assert (await get(http, dst, f"{PS}/{ps_b}/volumes"))[1]["inventories"] == []


def frames_body(chunks: list[tuple[int, bytes]], size: int, alg: str = "xxh3_128",
                digest: str | None = None) -> bytes:
    """A volume stream as the sender frames it: data frames, then the end frame with the digest
    of every frame (headers and data)."""
    import struct
    import xxhash
    frame = struct.Struct(">cQQ")
    h = getattr(xxhash, alg)() if alg.startswith("xxh") else hashlib.new(alg)
    out = []
    for off, data in chunks:
        head = frame.pack(b"D", off, len(data))
        h.update(head)
        h.update(data)
        out += [head, data]
    d = (digest or h.hexdigest()).encode()
    out += [frame.pack(b"E", size, len(d)), d]
    return b"".join(out)


async def put_stream(http, dst, ps_b: str, v: str, body: bytes, size: int, data_bytes: int,
                     alg: str = "xxh3_128") -> tuple[int, dict]:
    headers = dict(dst.headers, **{
        "X-Volume-Path": f"volumes/{v}.raw", "X-Volume-Format": "raw", "X-Volume-Meta": "{}",
        "X-File-Size": str(size), "X-Data-Bytes": str(data_bytes), "X-Checksum-Algorithm": alg,
        "Content-Type": "application/octet-stream", "Content-Length": str(len(body))})

    async def chunks():                  # in pieces, with pauses: the agent reads part of it first
        for i in range(0, len(body), 3 * MIB):
            yield body[i:i + 3 * MIB]
            await asyncio.sleep(0.01)
    async with http.put(f"{dst.url}{PS}/{ps_b}/volume-streams/{v}", data=chunks(), headers=headers) as r:
        return r.status, await r.json()


async def test_stream_taken_over_by_the_writer_checked_end_to_end(pair, http, tmp_path):
    """The destination hands the connection to its writer: a stream whose digest does not match
    is refused (1541) and leaves nothing; a good one lands with its holes; the connection is
    answered either way (no lingering on the unread body)."""
    src, dst = pair
    _, ps_b = await storages(http, src, dst, tmp_path)
    size = 32 * MIB
    chunks = [(off, os.urandom(MIB)) for off in range(0, size, 4 * MIB)]
    data_bytes = sum(len(d) for _, d in chunks)
    before = visible_files(tmp_path / "B")
    v = uid()
    bad = frames_body(chunks, size, digest="0" * 32)
    t0 = asyncio.get_running_loop().time()
    status, body = await put_stream(http, dst, ps_b, v, bad, size, data_bytes)
    assert status == 400 and body["error"]["code"] == "STORAGE.1541", body
    assert asyncio.get_running_loop().time() - t0 < 8
    await temporary_removed(tmp_path / "B", what="the refused stream's temporary removed")
    assert visible_files(tmp_path / "B") == before
    # frames that go past the file size are refused too
    status, body = await put_stream(http, dst, ps_b, v, frames_body(chunks, 8 * MIB), 8 * MIB, data_bytes)
    assert status == 400 and "past the file size" in body["error"]["description"], body
    # the good one
    status, body = await put_stream(http, dst, ps_b, v, frames_body(chunks, size), size, data_bytes)
    assert status == 200, body
    moved = tmp_path / "B" / "volumes" / f"{v}.raw"
    with open(moved, "rb") as f:
        for off, data in chunks:
            f.seek(off)
            assert f.read(len(data)) == data
    assert os.stat(moved).st_size == size and os.stat(moved).st_blocks * 512 <= data_bytes + MIB
    # the agent still answers on new connections
    assert (await get(http, dst, f"{PS}/{ps_b}/volumes/{v}"))[0] == 200


async def test_migrate_over_https_with_sha256(agent_factory, http, tmp_path):
    """An HTTPS destination: the body goes through the agent's TLS layer and is piped into the
    writer (no handover of the socket), the sender reads, hashes and sends (no sendfile)."""
    from test_ops import _openssl
    import ssl as ssl_mod
    import aiohttp
    pki = tmp_path / "pki"
    pki.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=node-agent test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server", cwd=pki)
    (pki / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                    "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=pki)
    conf = fast_storage(migration_stall_seconds=10, migration_checksum="sha256",
                        tls_ca_file=str(pki / "ca.pem"))
    src = agent_factory(conf, name="src").start()
    dst = agent_factory({**conf, "server": {"tls_cert": str(pki / "server.pem"),
                                            "tls_key": str(pki / "server.key")}}, name="dst").start()
    ctx = ssl_mod.create_default_context(cafile=str(pki / "ca.pem"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as hs:
        ps_a, ps_b = uid(), uid()
        assert (await add_storage(http, src, "local", {"uuid": ps_a, "url": str(tmp_path / "A")}))[0] == 200
        assert (await add_storage(hs, dst, "local", {"uuid": ps_b, "url": str(tmp_path / "B")}))[0] == 200
        v = uid()
        status, body = await job(http, src, "POST", f"{PS}/{ps_a}/volumes",
                                 {"params": {"uuid": v, "size": 24 * MIB, "format": "raw"}})
        assert status == 200
        path = tmp_path / "A" / body["inventory"]["path"]
        fill(path, 24 * MIB, 3 * MIB, MIB)
        digest = sha(path)
        status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions",
                                 migrate_body(dst, ps_b))
        assert status == 200, body
        moved = tmp_path / "B" / body["inventory"]["path"]
        assert sha(moved) == digest and not path.exists()
        assert os.stat(moved).st_blocks * 512 <= 9 * MIB
        assert (await get(hs, dst, f"{PS}/{ps_b}/volumes/{v}"))[0] == 200


async def test_destination_storage_hangs_mid_stream(agent_factory, http, tmp_path):
    """The destination's storage stops answering writes in the middle of a stream (a dead NFS
    server): the migration fails in time, the source stays, the destination agent keeps
    answering, and once the storage is back nothing is left of the stream."""
    from storage_helpers import NS_WRAPPER, FuseMount, abort_fuse
    conf = fast_storage(migration_stall_seconds=3)
    src = agent_factory(conf, name="src").start()
    dst = agent_factory(conf, name="dst", wrapper=NS_WRAPPER).start()
    fuse = FuseMount(dst, tmp_path / "backing", "/mnt/hang", tmp_path / "hang.ctl")
    try:
        ps_a, ps_b = uid(), uid()
        assert (await add_storage(http, src, "local", {"uuid": ps_a, "url": str(tmp_path / "A")}))[0] == 200
        assert (await add_storage(http, dst, "local", {"uuid": ps_b, "url": "/mnt/hang/ps"}))[0] == 200
        v = uid()
        status, body = await job(http, src, "POST", f"{PS}/{ps_a}/volumes",
                                 {"params": {"uuid": v, "size": 256 * MIB, "format": "raw"}})
        assert status == 200
        path = tmp_path / "A" / body["inventory"]["path"]
        fill(path, 256 * MIB, 2 * MIB, MIB)
        digest = sha(path)
        fuse.hang("write")
        t0 = asyncio.get_running_loop().time()
        status, body = await job(http, src, "PUT", f"{PS}/{ps_a}/volumes/{v}/actions", migrate_body(dst, ps_b),
                                 timeout=60)
        took = asyncio.get_running_loop().time() - t0
        assert status == 503 and body["error"]["code"] == "STORAGE.1540", body
        assert took < 20, (took, body)
        assert sha(path) == digest
        # the destination agent answers meanwhile (its writer is stuck, not the agent)
        for _ in range(5):
            t1 = asyncio.get_running_loop().time()
            assert (await get(http, dst, "/v1/host/ping"))[0] == 200
            assert asyncio.get_running_loop().time() - t1 < 1.0
        fuse.release()
        # the writer, unstuck, finds the stream gone and removes its temporary
        await temporary_removed(tmp_path / "backing", 20, "the stream's temporary removed")
        assert visible_files(tmp_path / "backing" / "ps") == set() or \
            visible_files(tmp_path / "backing" / "ps") <= {".node-agent-storage.json"}
        assert (await get(http, dst, f"{PS}/{ps_b}/volumes"))[1]["inventories"] == []
        assert [i["uuid"] for i in (await get(http, src, f"{PS}/{ps_a}/volumes"))[1]["inventories"]] == [v]
    finally:
        abort_fuse(dst)
        fuse.stop()
