"""Moving a volume: to another node's agent (streamed over HTTP(S)) or to another storage here.

Between agents: the source runs ``streamio.py send`` (a process: it reads the
storage), which PUTs the file's data extents to the destination's
``/v1/primary-storage/{uuid}/volume-streams/{volumeUuid}``.  The destination
hands the request's connection to its writer (``fsworker.py write``), which
reads the body itself (over HTTPS the agent pipes it instead): a hidden
temporary file, hashed as it is written; the end frame's digest must match,
qemu-img must read a qcow2 image, and only then does it get its final name and
a row.  The source gives up its copy only after the destination's 200 (renamed
away at once, removed in the background, both by the sender: remove_by_sender).  An interrupted stream (either agent
killed) leaves the source as it was and, at the destination, at most a hidden
temporary that the writer removes (EOF on its pipe from the agent) or the next
start sweeps.  Sender and writer are started ahead (spares.py).

Backing chains: ``flatten`` converts the volume into one self-contained image
first (a hidden temporary on the source); ``carry`` sends the cached backing
image too when the destination lacks it, and the volume keeps its relative
backing path (``../imagecache/<uuid>.<fmt>``), valid on the destination.

On the same node, ``qemu-img convert`` does the copy into a hidden temporary
on the destination storage, which is then renamed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

from agent import errors
from agent.runner import kill_tree

from . import volumes
from .fsclient import FsError, helper_pypath
from .imagecache import ssl_context
from .registry import ImageRow, VolumeRow
from .spares import Spawned
from .writer import Writer, temp_name

if TYPE_CHECKING:
    from . import Storage, StoragePlugin

log = logging.getLogger("node_agent.storage")
STREAMIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "streamio.py")
ALGS = ("xxh3_128", "sha256", "sha1", "sha512", "blake2b", "md5")


def check_agent_url(url: str) -> str:
    try:
        u = URL(url)
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host or u.user or u.query_string \
            or any(c in url for c in "\r\n\0 "):
        raise errors.BadRequest(f"destination url {url!r} must be http(s)://host:port of the "
                                "destination agent", code="STORAGE.1001")
    return str(u.with_path("")).rstrip("/")


# --- the source side ------------------------------------------------------------------------------

class Remote:
    """The destination agent, for the pre-flight reads."""

    def __init__(self, base: str, token: str, verify: bool, ca_file: str | None) -> None:
        self.base, self.token = base, token
        ctx: Any = ssl_context(ca_file) if verify else False
        if verify and ctx is None:
            ctx = True
        self.ssl = ctx

    async def get(self, path: str, params: dict | None = None) -> tuple[int, Any]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                async with s.get(self.base + path, params=params, ssl=self.ssl,
                                 headers={"Authorization": f"OAuth {self.token}"}) as r:
                    try:
                        return r.status, await r.json(content_type=None)
                    except ValueError:
                        return r.status, None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise errors.OperationFailed(f"the destination agent {self.base} cannot be reached: "
                                         f"{type(e).__name__}: {e}", code="STORAGE.1540") from None


def _remote_error(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"HTTP {status} {body['error'].get('code')}: {body['error'].get('description')}"
    return f"HTTP {status}"


async def destination_inventory(remote: Remote, kind: str, dst_uuid: str) -> dict[str, Any]:
    """The destination storage's inventory from its agent (kind: "primary storage" or
    "backup storage", also its path); a refused token or any other answer than 200 fails."""
    status, body = await remote.get(f"/v1/{kind.replace(' ', '-')}/{dst_uuid}")
    if status == 401:
        raise errors.OperationFailed(f"the destination agent {remote.base} refused the token",
                                     code="STORAGE.1540")
    if status != 200:
        raise errors.OperationFailed(f"destination {kind} {dst_uuid} on {remote.base}: "
                                     f"{_remote_error(status, body)}", code="STORAGE.1540")
    return body["inventory"]


def require_usable(inv: dict[str, Any], what: str, takes: str) -> None:
    """what (e.g. "destination image store <uuid>") must be Enabled and Connected to take
    takes (volumes, images)."""
    if inv.get("state") != "Enabled" or inv.get("status") != "Connected":
        raise errors.OperationFailed(f"{what} is {inv.get('state')}/{inv.get('status')}: it takes "
                                     f"no {takes} now", code="STORAGE.1540")


async def preflight(remote: Remote, dst_uuid: str, volume_uuid: str) -> None:
    inv = await destination_inventory(remote, "primary storage", dst_uuid)
    require_usable(inv, f"destination primary storage {dst_uuid}", "volumes")
    status, body = await remote.get(f"/v1/primary-storage/{dst_uuid}/volumes",
                                    {"q": f"uuid={volume_uuid}", "count": "true"})
    if status == 200 and body.get("total"):
        raise errors.Conflict(f"volume {volume_uuid} already exists on the destination",
                              code="STORAGE.1009")


async def spawn_sender() -> Spawned:
    """``streamio.py send``, idle until its settings arrive on stdin (see spares.py)."""
    return Spawned(await asyncio.create_subprocess_exec(
        sys.executable, "-S", STREAMIO, "send", *helper_pypath(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
        start_new_session=True, limit=16 << 20))


async def run_sender(plugin: "StoragePlugin", job, st: "Storage", rel: str, url: str, token: str,
                     verify: bool, headers: dict[str, str], label: str,
                     then_remove: bool = False) -> dict[str, Any]:
    """Stream ``rel`` to the destination; its reply's body.  With ``then_remove`` the sender
    is left waiting after a 200 and returned as ``body["_sender"]``: ``remove_by_sender``
    then has it remove the source (no process started for that)."""
    conf = plugin.conf
    alg = conf.migration_checksum
    if alg.startswith("xxh3_") and not helper_pypath():
        alg = "sha256"                 # xxhash is not installed here: the slower standard one
    cfg = {"root": st.root, "path": rel, "url": url, "token": token, "verify": verify,
           "cafile": conf.tls_ca_file, "headers": headers, "alg": alg,
           "timeout": conf.migration_stall_seconds, "parent": os.getpid(),
           "pypath": list(helper_pypath()), "then_remove": then_remove}
    proc = (await plugin.sender_spare.take()).proc
    err_task = asyncio.ensure_future(proc.stderr.read(64 << 10))
    final: dict[str, Any] | None = None
    kept = False
    try:
        proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        await proc.stdin.drain()
        if not then_remove:
            proc.stdin.close()
        async with asyncio.timeout(conf.migration_timeout_seconds):
            while True:
                try:
                    async with asyncio.timeout(conf.migration_stall_seconds):
                        line = await proc.stdout.readline()
                except TimeoutError:
                    raise errors.OperationFailed(
                        f"sending {label} made no progress for {conf.migration_stall_seconds:g} s "
                        "(a hung storage or network?); stopped", code="STORAGE.1540") from None
                if not line:
                    break
                msg = json.loads(line)
                if msg.get("done"):
                    final = msg
                    if then_remove and msg.get("status") == 200:
                        kept = True            # it waits for REMOVE (remove_by_sender)
                        break
                elif msg.get("total"):
                    job.progress(100.0 * msg["sent"] / msg["total"], f"sending {label}",
                                 sentBytes=msg["sent"], totalBytes=msg["total"])
            if not kept:
                await proc.wait()
    except TimeoutError:
        kill_tree(proc.pid)
        raise errors.OperationFailed(f"sending {label} did not finish within "
                                     f"{conf.migration_timeout_seconds:g} s", code="STORAGE.1540") from None
    except BaseException:
        kill_tree(proc.pid)
        raise
    finally:
        if proc.returncode is None and not kept:
            kill_tree(proc.pid)
    if kept:
        err_task.cancel()
        return {**final["body"], "_sender": proc}
    stderr = (await err_task).decode(errors="replace")
    if final is None:
        raise errors.OperationFailed(f"the sender of {label} stopped without a result",
                                     code="STORAGE.1540", details=stderr[-2000:] or None)
    if final.get("status") != 200:
        why = final.get("error") or _remote_error(final.get("status", 0), final.get("body"))
        raise errors.OperationFailed(f"sending {label} to the destination failed: {why}; the "
                                     "source is unchanged", code="STORAGE.1540",
                                     details=stderr[-2000:] or None)
    return final["body"]


async def migrate_remote(plugin: "StoragePlugin", job, st: "Storage", vol: VolumeRow, dest,
                         mode: str) -> dict[str, Any]:
    base = check_agent_url(dest.url)
    remote = Remote(base, dest.token or "", dest.tls_verify, plugin.conf.tls_ca_file)
    dst_uuid = dest.primary_storage_uuid.replace("-", "").lower()
    job.progress(0, "checking the destination")
    plugin.sender_spare.prime()        # starts meanwhile, if none is waiting yet
    await preflight(remote, dst_uuid, vol.uuid)
    send_rel, temp = vol.path, None
    meta = {"name": vol.name, "description": vol.description, "type": vol.type}
    try:
        if vol.backing and mode == "flatten":
            temp = temp_name(vol.path, plugin.tag)
            job.progress(0, "flattening the backing chain")
            await volumes.convert(plugin.runner, st.abs(vol.path), vol.format, st.abs(temp), vol.format,
                                  plugin.conf.qemu_img_timeout_seconds)
            send_rel = temp
        elif vol.backing:
            meta["imageUuid"] = vol.image_uuid
            await carry_image(plugin, job, st, vol, remote, dst_uuid)
        headers = {"X-Volume-Path": vol.path, "X-Volume-Format": vol.format,
                   "X-Volume-Meta": json.dumps(meta)}
        url = f"{base}/v1/primary-storage/{dst_uuid}/volume-streams/{vol.uuid}"
        body = await run_sender(plugin, job, st, send_rel, url, dest.token or "", dest.tls_verify,
                                headers, f"volume {vol.uuid}", then_remove=temp is None)
        sender = body.pop("_sender", None)
        job.progress(100, "removing the source")
        # The destination has the verified copy under its final name: now the source goes.
        # The row first: from here on the destination's copy is the volume, even if the
        # source's file cannot be removed right now (it is then only logged).
        try:
            await plugin.registry.delete_volume(vol.uuid)
        except BaseException:
            if sender is not None:
                kill_tree(sender.pid)        # EOF would do too: the source stays
            raise
        if sender is None or not await remove_by_sender(plugin, st, sender, vol.path):
            await plugin.remove_moved(st, vol.path)
        return body
    finally:
        if temp:
            plugin.remove_later(st, temp)
        plugin.sender_spare.prime_soon()


async def remove_by_sender(plugin: "StoragePlugin", st: "Storage", proc, rel: str) -> bool:
    """The sender that streamed ``rel`` renames it away to a hidden temporary and frees its
    blocks (what remove_moved does, without starting a process for it).  True once it is
    out of view; the freeing goes on in the background.  False (the sender killed): the
    caller falls back to remove_moved."""
    hidden = os.path.basename(temp_name(rel, plugin.tag))
    try:
        proc.stdin.write(f"REMOVE {hidden}\n".encode())
        proc.stdin.close()
        async with asyncio.timeout(plugin.conf.call_timeout_seconds):
            line = await proc.stdout.readline()
        if json.loads(line or b"{}").get("renamed") != hidden:
            raise OSError("the sender did not rename the source away")
    except Exception as e:                 # a hung storage, a dead sender: the usual way
        kill_tree(proc.pid)                # not waited for: it may be stuck in the kernel
        log.info("storage %s: the sender did not remove %s (%s); removing it apart", st.uuid,
                 rel, e)
        return False

    async def freeing() -> None:           # its blocks: like remove_later's process
        try:
            async with asyncio.timeout(3600):
                await proc.wait()
        except TimeoutError:
            log.warning("storage %s: removing %s did not finish; the next sweep does it",
                        st.uuid, os.path.join(os.path.dirname(rel), hidden))
        finally:
            if proc.returncode is None:
                kill_tree(proc.pid)
    task = asyncio.create_task(freeing())
    plugin._background.add(task)
    task.add_done_callback(plugin._background.discard)
    return True


async def carry_image(plugin: "StoragePlugin", job, st: "Storage", vol: VolumeRow, remote: Remote,
                      dst_uuid: str) -> None:
    img = await plugin.registry.image(st.uuid, vol.image_uuid) if vol.image_uuid else None
    if img is None:
        raise errors.Conflict(f"the backing file of volume {vol.uuid} is not an image of this "
                              "storage's cache: migrate with backingChain=flatten", code="STORAGE.1009")
    status, body = await remote.get(f"/v1/primary-storage/{dst_uuid}/image-cache",
                                    {"q": f"uuid={img.uuid}"})
    if status == 200 and body.get("inventories"):
        theirs = body["inventories"][0]
        if theirs.get("path") != img.path:
            raise errors.Conflict(f"image {img.uuid} is cached at {theirs.get('path')} on the "
                                  f"destination, not {img.path}: migrate with backingChain=flatten",
                                  code="STORAGE.1009")
        return
    headers = {"X-Image-Path": img.path, "X-Image-Format": img.format,
               "X-Image-Meta": json.dumps({"url": img.url, "checksum": img.checksum,
                                           "checksumType": img.checksum_type})}
    url = f"{remote.base}/v1/primary-storage/{dst_uuid}/image-streams/{img.uuid}"
    await run_sender(plugin, job, st, img.path, url, remote.token, remote.ssl is not False,
                     headers, f"image {img.uuid}")


async def migrate_local(plugin: "StoragePlugin", job, src: "Storage", vol: VolumeRow, dst: "Storage",
                        mode: str) -> dict[str, Any]:
    conf = plugin.conf
    path = vol.path
    tmp = temp_name(path, plugin.tag)
    image_uuid, backing = None, None
    if vol.backing and mode == "carry":
        img = await plugin.registry.image(src.uuid, vol.image_uuid) if vol.image_uuid else None
        if img is None:
            raise errors.Conflict(f"the backing file of volume {vol.uuid} is not in this storage's "
                                  "cache: use backingChain=flatten", code="STORAGE.1009")
        theirs = await plugin.registry.image(dst.uuid, img.uuid)
        if theirs is None:
            job.progress(0, f"copying image {img.uuid}")
            itmp = temp_name(img.path, plugin.tag)
            await dst.helper.call("mkdirs", path=img.path)
            try:
                await volumes.convert(plugin.runner, src.abs(img.path), img.format, dst.abs(itmp),
                                      img.format, conf.qemu_img_timeout_seconds)
                await dst.helper.call("rename", src=itmp, dst=img.path)
            except BaseException:
                await plugin.remove_quietly(dst, itmp)
                raise
            theirs = ImageRow(ps_uuid=dst.uuid, uuid=img.uuid, path=img.path, format=img.format,
                              size=img.size, actual_size=img.actual_size, url=img.url,
                              checksum=img.checksum, checksum_type=img.checksum_type)
            await plugin.registry.save_image(theirs)
        image_uuid, backing = img.uuid, volumes.relative_backing(path, theirs.path)
        backing_fmt = theirs.format
    job.progress(10, "copying the volume")
    await dst.helper.call("mkdirs", path=path)
    try:
        await volumes.convert(plugin.runner, src.abs(path), vol.format, dst.abs(tmp), vol.format,
                              conf.qemu_img_timeout_seconds, backing=backing,
                              backing_fmt=backing_fmt if backing else None)
        await dst.helper.call("rename", src=tmp, dst=path)
    except FsError as e:
        await plugin.remove_quietly(dst, tmp)
        if e.errno == 17:
            raise errors.Conflict(f"{path} already exists on primary storage {dst.uuid}",
                                  code="STORAGE.1009") from None
        raise plugin.fs_error(dst, e, "copying the volume") from None
    except BaseException:
        await plugin.remove_quietly(dst, tmp)
        raise
    moved = VolumeRow(**{**vol.__dict__, "ps_uuid": dst.uuid, "backing": backing,
                         "image_uuid": image_uuid if backing else None})
    await plugin.registry.save_volume(moved)
    job.progress(95, "removing the source")
    await plugin.remove_moved(src, path)
    return {"inventory": await plugin.volume_inventory(dst, moved, live=True)}


# --- the destination side -------------------------------------------------------------------------

def _header(request: web.Request, name: str, required: bool = True) -> str | None:
    v = request.headers.get(name)
    if v is None and required:
        raise errors.BadRequest(f"header {name} is missing", code="STORAGE.1001")
    return v


async def receive(plugin: "StoragePlugin", request: web.Request, kind: str) -> web.Response:
    """The body of PUT .../volume-streams/{volumeUuid} or .../image-streams/{imageUuid}."""
    st = plugin.get_storage(request.match_info["uuid"])
    obj = request.match_info["volumeUuid" if kind == "volume" else "imageUuid"].replace("-", "").lower()
    if len(obj) != 32 or any(c not in "0123456789abcdef" for c in obj):
        raise errors.BadRequest(f"{obj!r} is not a uuid", code="STORAGE.1001")
    plugin.check_usable(st)
    path = _header(request, f"X-{kind.capitalize()}-Path")
    fmt = _header(request, f"X-{kind.capitalize()}-Format")
    alg = _header(request, "X-Checksum-Algorithm")
    try:
        meta = json.loads(_header(request, f"X-{kind.capitalize()}-Meta", False) or "{}")
        file_size = int(_header(request, "X-File-Size"))
    except ValueError:
        raise errors.BadRequest("bad X-*-Meta or X-File-Size header", code="STORAGE.1001") from None
    if fmt not in volumes.FORMATS or alg not in ALGS or not isinstance(meta, dict):
        raise errors.BadRequest("bad format, checksum algorithm or metadata", code="STORAGE.1001")
    if alg.startswith("xxh3_") and not helper_pypath():
        raise errors.BadRequest(f"checksum {alg} needs the xxhash package, which this agent lacks: "
                                "set migration_checksum = \"sha256\" on the source", code="STORAGE.1001")
    plugin.check_rel(path)
    if request.content_length is None:
        raise errors.BadRequest("Content-Length is required", code="STORAGE.1001")
    if kind == "volume":
        if await plugin.registry.volume(obj) is not None:
            raise errors.Conflict(f"volume {obj} already exists on this node", code="STORAGE.1009")
    elif await plugin.registry.image(st.uuid, obj) is not None:
        raise errors.Conflict(f"image {obj} is already cached here", code="STORAGE.1009")
    data_bytes = int(request.headers.get("X-Data-Bytes", "0") or 0)
    cap = st.row.capacity.get("availablePhysicalCapacity")
    if cap is not None and data_bytes > cap:
        raise errors.Conflict(f"primary storage {st.uuid} has {cap} bytes free, the {kind} needs "
                              f"{data_bytes}", code="STORAGE.1012")
    sock_fd = _socket_fd(request)
    try:
        return await _receive(plugin, request, kind, st, obj, path, fmt, alg, meta, file_size, sock_fd)
    finally:
        plugin.writer_spare.prime_soon()


async def _receive(plugin: "StoragePlugin", request: web.Request, kind: str, st: "Storage", obj: str,
                   path: str, fmt: str, alg: str, meta: dict, file_size: int,
                   sock_fd: int | None) -> web.StreamResponse:
    with plugin.busy(st, obj):
        writer = Writer(st.uuid, st.root, temp_name(path, plugin.tag), alg, "stream",
                        plugin.conf.migration_stall_seconds, sock_fd=sock_fd)
        starting = asyncio.ensure_future(writer.start(plugin.writer_spare))   # meanwhile, the checks
        try:
            found = await plugin.fs(st, "lookup", path=path)
            if found.get("exists"):
                raise errors.Conflict(f"{path} already exists on primary storage {st.uuid}",
                                      code="STORAGE.1009")
            await plugin.fs(st, "mkdirs", path=path)
            await starting
        except BaseException:
            await asyncio.gather(starting, return_exceptions=True)   # a spawn at most: quick
            await writer.abort()
            raise
        try:
            report = await stream_body(writer, request, file_size)
            if fmt == "raw":
                # what qemu-img info -f raw would say (a raw file has nothing more to read)
                infos = [{"virtual-size": report["size"], "actual-size": report.get("allocated")}]
            else:
                infos = await volumes.info(plugin.runner, writer.tmp_path, fmt,
                                           plugin.conf.qemu_img_timeout_seconds, chain=False)
            backing = volumes.backing_of(infos)
            image_uuid = None
            if backing:
                image_uuid = await plugin.check_backing(st, path, backing, meta.get("imageUuid"), kind)
            await volumes.check(plugin.runner, writer.tmp_path, fmt, plugin.conf.qemu_img_timeout_seconds)
            await writer.commit(path)
        except errors.ApiError as e:
            return await refused(plugin, st, writer, e)
        except BaseException:
            await writer.abort()
            raise
        virtual = int(infos[0].get("virtual-size") or 0)
        if kind == "volume":
            row = VolumeRow(uuid=obj, ps_uuid=st.uuid, name=str(meta.get("name") or ""), path=path,
                            format=fmt, size=virtual, type=str(meta.get("type") or "Data"),
                            description=meta.get("description"), image_uuid=image_uuid,
                            backing=backing)
            await plugin.registry.save_volume(row)
            inv = await plugin.volume_inventory(st, row, live=False)
            inv["actualSize"] = infos[0].get("actual-size")
        else:
            row = ImageRow(ps_uuid=st.uuid, uuid=obj, path=path, format=fmt, size=virtual,
                           actual_size=int(infos[0].get("actual-size") or 0), url=meta.get("url"),
                           checksum=meta.get("checksum"), checksum_type=meta.get("checksumType"))
            await plugin.registry.save_image(row)
            inv = plugin.image_inventory(st, row)
    resp = web.json_response({"inventory": inv})
    return _closing(resp) if sock_fd is not None else resp


async def stream_body(writer: Writer, request: web.Request, file_size: int) -> dict[str, Any]:
    """The request's body through the started writer, and its report once checked against
    the sender's stream digest and X-File-Size.  Given the connection (``sock_fd``), the
    writer reads the body from it itself (``writer.took_connection``: the answer must then
    close the connection); otherwise aiohttp's reading is fed to it."""
    if writer.sock_fd is not None:
        prefix = _take_over(request)
        writer.took_connection = True
        await writer.begin(prefix, request.content_length)
    else:
        await writer.begin()
        got = 0
        while chunk := await request.content.readany():
            await writer.feed(chunk)
            got += len(chunk)
        if got != request.content_length:
            raise errors.BadRequest(f"the stream ended after {got} of {request.content_length} "
                                    "bytes", code="STORAGE.1001")
    report = await writer.report()       # with the connection: it read exactly Content-Length
    if not report.get("claimed") or report["digest"] != report["claimed"]:
        raise errors.BadRequest(f"checksum mismatch: the sender says {report.get('claimed')}, "
                                f"the data received is {report['digest']}", code="STORAGE.1541")
    if report["size"] != file_size:
        raise errors.BadRequest("the stream's file size disagrees with X-File-Size",
                                code="STORAGE.1001")
    return report


async def refused(plugin: "StoragePlugin", st: "Storage", writer: Writer,
                  e: errors.ApiError) -> web.StreamResponse:
    """A receive that failed with e: nothing kept; e raised, or, when the writer had the
    connection (the body not read through aiohttp), answered here on a closing connection
    (it would otherwise wait for the body's remaining bytes)."""
    await writer.abort()
    if writer.left_temp:          # killed (OOM, an operator): its file goes now
        plugin.remove_later(st, writer.tmp_rel)
    if not writer.took_connection:
        raise e
    return _closing(web.json_response(e.body(), status=e.status))


def _socket_fd(request: web.Request) -> int | None:
    """The descriptor of the request's connection when the writer can read the body from it
    itself: plain TCP (or a unix socket), not TLS, an identity-encoded Content-Length body."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None \
            or transport.get_extra_info("ssl_object") is not None:
        return None
    if request.headers.get("Content-Encoding", "identity") != "identity" \
            or request.headers.get("Transfer-Encoding") or request.headers.get("Expect") \
            or request.content_length is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM \
            or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    return sock.fileno()


def _take_over(request: web.Request) -> bytes:
    """Stop aiohttp reading the connection; return the body bytes it had read already.

    No await in here: the event loop cannot read from the socket between the last
    drain and the pause.  Draining the buffer can make aiohttp feed its parser's
    held-back bytes into it (resume_reading), so it loops until nothing is left.
    The body is then marked complete for aiohttp (no lingering read of it after the
    answer) and reading stays paused; the answer closes the connection."""
    content = request.content
    chunks = []
    while data := content.read_nowait(-1):
        chunks.append(data)
    protocol = request.protocol
    if protocol.transport is None:
        raise errors.BadRequest("the sender closed the connection", code="STORAGE.1001")
    content.feed_eof()            # resumes reading, which the next line undoes before any read
    protocol.pause_reading()
    return b"".join(chunks)


def _closing(resp: web.StreamResponse) -> web.StreamResponse:
    resp.force_close()
    return resp
