"""migrateImage between two real agent processes (issue 12, items 2 and 4): verified at the
destination before it is listed, nothing visible there after a kill -9 mid-stream, nothing
lost at the source, a wrong token or an unreachable agent a clear job error."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest

from conftest import submit, wait_job
from storage_helpers import (fill, get, job, kill9_source_mid_stream, migration_pair, temporary_removed, uid,
                             visible_files, wait_streaming)

BS = "/v1/backup-storage"
MIB = 1 << 20


@pytest.fixture
def pair(agent_factory):
    return migration_pair(agent_factory)


async def stores(http, src, dst, tmp_path) -> tuple[str, str]:
    a, b = uid(), uid()
    for agent, u, d in ((src, a, "A"), (dst, b, "B")):
        status, body = await job(http, agent, "POST", f"{BS}/image-store",
                                 {"params": {"uuid": u, "url": str(tmp_path / d)}})
        assert status == 200, body
    return a, b


async def image(http, src, tmp_path, a: str, size: int) -> tuple[str, str]:
    """An image imported from a file:// source: data every other MiB, holes between."""
    srcdir = tmp_path / "files"
    srcdir.mkdir(exist_ok=True)
    f = srcdir / f"img{size}.raw"
    with open(f, "wb") as out:
        out.truncate(size)
    fill(f, size, 2 * MIB, MIB)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    im = uid()
    status, body = await job(http, src, "POST", f"{BS}/{a}/images",
                             {"params": {"imageUuid": im, "name": "big", "url": f"file://{f}",
                                         "sha256": digest}}, timeout=120)
    assert status == 200, body
    return im, digest


def body(dst, b: str, token: str | None = None, url: str | None = None) -> dict:
    return {"migrateImage": {"destination": {"url": url or dst.url, "token": token or dst.token,
                                             "backupStorageUuid": b}}}


async def test_migrate_image_verified_and_listed(pair, http, tmp_path):
    src, dst = pair
    a, b = await stores(http, src, dst, tmp_path)
    im, digest = await image(http, src, tmp_path, a, 64 * MIB)
    status, reply = await job(http, src, "PUT", f"{BS}/{a}/images/{im}/actions", body(dst, b), timeout=120)
    assert status == 200, reply
    assert reply["inventory"]["sha256"] == digest and reply["inventory"]["name"] == "big"
    blob = tmp_path / "B" / "blobs" / digest
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    # zero blocks stay holes: at the import and through the stream (half of it is data)
    for d in ("A", "B"):
        assert os.stat(tmp_path / d / "blobs" / digest).st_blocks * 512 <= 33 * MIB, d
    status, got = await get(http, dst, f"{BS}/{b}/images/{im}")
    assert status == 200 and got["inventory"]["size"] == 64 * MIB
    # the source keeps its image; a second migration of the same uuid is refused
    assert (await get(http, src, f"{BS}/{a}/images/{im}"))[0] == 200
    status, reply = await job(http, src, "PUT", f"{BS}/{a}/images/{im}/actions", body(dst, b))
    assert status != 200 and "already exists" in reply["error"]["description"], reply


async def test_migrate_image_wrong_token_unreachable_changes_nothing(pair, http, tmp_path):
    src, dst = pair
    a, b = await stores(http, src, dst, tmp_path)
    im, digest = await image(http, src, tmp_path, a, 4 * MIB)
    status, reply = await job(http, src, "PUT", f"{BS}/{a}/images/{im}/actions",
                              body(dst, b, token="wrong"))
    assert status == 503 and "refused the token" in reply["error"]["description"], reply
    status, reply = await job(http, src, "PUT", f"{BS}/{a}/images/{im}/actions",
                              body(dst, b, url="http://127.0.0.1:9"))
    assert status == 503 and "cannot be reached" in reply["error"]["description"], reply
    status, reply = await submit(http, src, "PUT", f"{BS}/{a}/images/{im}/actions",
                                 body(dst, b, url="file:///x"))
    assert status == 400, reply
    assert (await get(http, dst, f"{BS}/{b}/images"))[1]["inventories"] == []
    assert os.listdir(tmp_path / "B" / "blobs") == []
    assert (await get(http, src, f"{BS}/{a}/images/{im}"))[0] == 200


async def start_big(http, src, dst, a, b, im) -> str:
    status, reply = await submit(http, src, "PUT", f"{BS}/{a}/images/{im}/actions", body(dst, b))
    assert status == 202, reply
    await wait_streaming(http, src, reply["location"], 30)
    return reply["location"]


async def test_kill9_destination_mid_stream_leaves_nothing(pair, http, tmp_path):
    src, dst = pair
    a, b = await stores(http, src, dst, tmp_path)
    im, digest = await image(http, src, tmp_path, a, 1 << 30)
    before = visible_files(tmp_path / "B")
    location = await start_big(http, src, dst, a, b, im)
    os.kill(dst.proc.pid, signal.SIGSTOP)          # hold the stream mid-way
    dst.kill9()
    status, reply = await wait_job(http, src, location, timeout=60)
    assert status == 503 and "source is unchanged" in reply["error"]["description"], reply
    assert hashlib.sha256((tmp_path / "A" / "blobs" / digest).read_bytes()).hexdigest() == digest
    await temporary_removed(tmp_path / "B")
    assert visible_files(tmp_path / "B") == before
    dst.start()
    assert (await get(http, dst, f"{BS}/{b}/images"))[1]["inventories"] == []
    # and it migrates now
    status, reply = await job(http, src, "PUT", f"{BS}/{a}/images/{im}/actions", body(dst, b),
                              timeout=180)
    assert status == 200, reply


async def test_kill9_source_mid_stream_leaves_nothing(pair, http, tmp_path):
    src, dst = pair
    a, b = await stores(http, src, dst, tmp_path)
    im, digest = await image(http, src, tmp_path, a, 1 << 30)
    before = visible_files(tmp_path / "B")
    await start_big(http, src, dst, a, b, im)
    kill9_source_mid_stream(src, dst)
    await temporary_removed(tmp_path / "B")
    assert visible_files(tmp_path / "B") == before
    assert (await get(http, dst, f"{BS}/{b}/images"))[1]["inventories"] == []
    src.start()
    assert (await get(http, src, f"{BS}/{a}/images/{im}"))[0] == 200


async def test_image_stream_header_strings_are_checked(pair, http, tmp_path):
    """The receiving route is raw (its body is the image), so the server's check of request
    strings never sees X-Image-Meta: a control character there, a bad md5 or a path segment
    that is no uuid is a 400 of its own, and nothing is listed or kept."""
    _, dst = pair
    b = uid()
    status, reply = await job(http, dst, "POST", f"{BS}/image-store",
                              {"params": {"resourceUuid": b, "url": str(tmp_path / "B")}})
    assert status == 200, reply
    data = b"x" * 4096
    sha = hashlib.sha256(data).hexdigest()
    good = {"name": "n", "description": None, "url": None, "md5": None, "size": len(data)}
    for image_uuid, meta in ((uid(), {**good, "name": "evil\nname"}),
                             (uid(), {**good, "description": "a\u2028b"}),
                             (uid(), {**good, "md5": "zz"}),
                             (uid(), {**good, "bogus": 1}),
                             ("-" * 32, good)):
        headers = {**dst.headers, "X-Image-Sha256": sha, "X-Image-Format": "raw",
                   "X-Checksum-Algorithm": "sha256", "X-File-Size": str(len(data)),
                   "X-Image-Meta": json.dumps(meta)}
        async with http.put(f"{dst.url}{BS}/{b}/image-streams/{image_uuid}", data=data,
                            headers=headers) as r:
            got = await r.json()
            assert r.status == 400, (meta, got)
    assert (await get(http, dst, f"{BS}/{b}/images"))[1]["inventories"] == []
    assert os.listdir(tmp_path / "B" / "blobs") == []
