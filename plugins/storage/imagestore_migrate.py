"""migrateImage: an image store's image to another agent's image store, streamed.

The machinery of volume migration (migrate.py): the source's ``streamio.py send``
PUTs the blob's data extents to the destination's
``/v1/backup-storage/{uuid}/image-streams/{imageUuid}``; the destination's writer
(``fsworker.py write``) puts them in a hidden temporary of its ``blobs/``, hashing
as it writes.  Only when the stream's checksum and size match does the blob get its
name ``blobs/<sha256>`` (or is dropped when that content is there already) and the
image its row: an interrupted migration (either agent killed) leaves nothing listed
at the destination and at most a hidden temporary that the writer removes or the
next connect sweeps.  The source keeps its image (a copy: delete it there when
wanted).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import Field, ValidationError

from agent import errors
from agent.models import WireModel
from agent.validation import ControlCharError, normalize_uuid, refuse_control_chars
from agent.storage_kinds import BACKUP

from . import migrate
from .imagestore_db import StoreImage, blob_path
from .imagestore_models import IMAGE_STORE
from .models import UUID_RE
from .writer import Writer, temp_name

if TYPE_CHECKING:
    from . import Storage, StoragePlugin

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ImageDestination(WireModel):
    url: str | None = Field(None, max_length=2048, description="the destination agent, e.g. "
                            "https://node2:7070; absent: a backup storage of this node (an image "
                            "store or Ceph)")
    token: str | None = Field(None, min_length=1, max_length=4096,
                              description="the destination agent's API token (with url)")
    backup_storage_uuid: str = Field(pattern=UUID_RE)
    tls_verify: bool = True


class MigrateImage(WireModel):
    destination: ImageDestination
    backup_storage_uuid: str | None = Field(None, pattern=UUID_RE,
                                            description="same as destination.backupStorageUuid")


class StreamMeta(WireModel):
    """X-Image-Meta of an image stream: the source's row (a raw route: the server's checks
    of request strings do not see a header, so this model and refuse_control_chars do)."""
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    url: str | None = Field(None, max_length=4096)
    md5: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    size: int | None = Field(None, ge=0)


async def preflight(remote: migrate.Remote, dst: str, image_uuid: str) -> None:
    inv = await migrate.destination_inventory(remote, "backup storage", dst)
    if inv.get("type") != IMAGE_STORE:
        raise errors.OperationFailed(f"destination backup storage {dst} is a {inv.get('type')} "
                                     "storage; images migrate to an image store", code="STORAGE.1540")
    migrate.require_usable(inv, f"destination image store {dst}", "images")
    status, body = await remote.get(f"/v1/backup-storage/{dst}/images/{image_uuid}")
    if status == 200:
        raise errors.Conflict(f"image {image_uuid} already exists on the destination",
                              code="STORAGE.1009")


async def send(plugin: "StoragePlugin", job, st: "Storage", img: StoreImage,
               params: MigrateImage) -> dict[str, Any]:
    dest = params.destination
    base = migrate.check_agent_url(dest.url)
    remote = migrate.Remote(base, dest.token, dest.tls_verify, plugin.conf.tls_ca_file)
    dst = dest.backup_storage_uuid.replace("-", "").lower()
    job.progress(0, "checking the destination")
    plugin.sender_spare.prime()
    await preflight(remote, dst, img.uuid)
    meta = {"name": img.name, "description": img.description, "url": img.url, "md5": img.md5,
            "size": img.size}
    headers = {"X-Image-Sha256": img.sha256, "X-Image-Format": img.format,
               "X-Image-Meta": json.dumps(meta)}
    try:
        return await migrate.run_sender(plugin, job, st, img.blob,
                                        f"{base}/v1/backup-storage/{dst}/image-streams/{img.uuid}",
                                        dest.token, dest.tls_verify, headers, f"image {img.uuid}")
    finally:
        plugin.sender_spare.prime_soon()


async def send_local(plugin: "StoragePlugin", job, st: "Storage", img: StoreImage,
                     dst: str) -> Any:
    """To another backup storage of this node (any kind that imports from a URL, Ceph
    included, found in the core's registry): it reads the image from a one-off export URL
    of this agent, checks the sha256, and the export is revoked at the end."""
    kind = plugin.agent.storage_kinds.owner(BACKUP, dst)
    if kind.import_image is None:
        raise errors.BadRequest(f"{kind.type} backup storage {dst} takes no images from another "
                                "storage", code="STORAGE.1001")
    token = secrets.token_urlsafe(32)
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    await plugin.isdb.add_export(token_hash, st.uuid, img.uuid, time.time() + 24 * 3600)
    try:
        job.progress(0, f"copying into {kind.type} backup storage {dst}")
        return await kind.import_image(job, dst, {
            "url": f"{plugin._export_base(local=True)}/v1/backup-storage/exports/{token}",
            "imageUuid": img.uuid, "name": img.name, "sha256": img.sha256, "md5": img.md5})
    finally:
        await plugin.isdb.delete_export(token_hash)


async def receive(plugin: "StoragePlugin", request: web.Request) -> web.StreamResponse:
    """PUT /v1/backup-storage/{uuid}/image-streams/{imageUuid}: the body of a migrating image."""
    st = plugin.get_store(request.match_info["uuid"])
    try:
        obj = normalize_uuid(request.match_info["imageUuid"])
    except ValueError as e:
        raise errors.BadRequest(f"imageUuid: {e}", code="STORAGE.1001") from None
    plugin.store_usable(st)
    sha = request.headers.get("X-Image-Sha256", "")
    fmt = request.headers.get("X-Image-Format", "")
    alg = request.headers.get("X-Checksum-Algorithm", "")
    try:
        raw_meta = json.loads(request.headers.get("X-Image-Meta") or "{}")
        refuse_control_chars(StreamMeta, raw_meta)
        meta = StreamMeta.model_validate(raw_meta)
        file_size = int(request.headers.get("X-File-Size", ""))
    except (ValueError, ControlCharError, ValidationError) as e:
        why = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()) \
            if isinstance(e, ValidationError) else str(e)
        raise errors.BadRequest(f"bad X-Image-Meta or X-File-Size header: {why}",
                                code="STORAGE.1001") from None
    if not SHA256_RE.match(sha) or not re.fullmatch(r"[a-z0-9]{1,16}", fmt) or \
            alg not in migrate.ALGS:
        raise errors.BadRequest("bad X-Image-Sha256, X-Image-Format, X-Checksum-Algorithm or "
                                "X-Image-Meta", code="STORAGE.1001")
    if alg.startswith("xxh3_") and not migrate.helper_pypath():
        raise errors.BadRequest(f"checksum {alg} needs the xxhash package, which this agent lacks",
                                code="STORAGE.1001")
    if request.content_length is None:
        raise errors.BadRequest("Content-Length is required", code="STORAGE.1001")
    if await plugin.isdb.image(st.uuid, obj) is not None:
        raise errors.Conflict(f"image {obj} already exists here", code="STORAGE.1009")
    if f"img:{obj}" in st.busy:
        raise errors.Conflict(f"image {obj} is being received", code="STORAGE.1009")
    sock_fd = migrate._socket_fd(request)
    try:
        with plugin.busy(st, f"img:{obj}"):
            return await _receive(plugin, request, st, obj, sha, fmt, alg, meta, file_size, sock_fd)
    finally:
        plugin.writer_spare.prime_soon()


async def _receive(plugin: "StoragePlugin", request: web.Request, st: "Storage", obj: str, sha: str,
                   fmt: str, alg: str, meta: StreamMeta, file_size: int,
                   sock_fd: int | None) -> web.StreamResponse:
    writer = Writer(st.uuid, st.root, temp_name(f"blobs/{obj}", plugin.tag), alg, "stream",
                    plugin.conf.migration_stall_seconds, sock_fd=sock_fd)
    await writer.start(plugin.writer_spare)
    try:
        await migrate.stream_body(writer, request, file_size)
        async with st.commit_lock:
            if (await plugin.fs(st, "lookup", path=blob_path(sha)))["exists"]:
                await writer.abort()             # that content is here already
            else:
                await writer.commit(blob_path(sha))
            row = StoreImage(bs_uuid=st.uuid, uuid=obj, name=meta.name, sha256=sha, format=fmt,
                             size=meta.size or file_size, actual_size=file_size, url=meta.url,
                             md5=meta.md5, description=meta.description)
            await plugin.isdb.save_image(row)
    except errors.ApiError as e:
        return await migrate.refused(plugin, st, writer, e)
    except BaseException:
        await writer.abort()
        raise
    resp = web.json_response({"inventory": plugin.store_image_inventory(st, row)})
    return migrate._closing(resp) if sock_fd is not None else resp
