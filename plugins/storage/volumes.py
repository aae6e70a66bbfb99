"""qemu-img, always as an argv with an absolute path and an explicit format.

qemu-img runs as a subprocess through the plugin's Runner (a timeout kills its
process tree), so a hung storage blocks qemu-img, never the agent.  Formats
are always given (``-f``, ``-F``): probing a guest-written raw image as qcow2
is the classic way to make qemu open a file it should not.
"""

from __future__ import annotations

import json
import os
from typing import Any

from agent import errors
from agent.runner import Runner

QEMU_IMG = "qemu-img"
FORMATS = ("qcow2", "raw")


def _fail(what: str, result) -> errors.OperationFailed:
    err = result.stderr.decode(errors="replace").strip()
    return errors.OperationFailed(f"qemu-img {what} failed: {err.splitlines()[-1] if err else 'exit ' + str(result.returncode)}",
                                  code="STORAGE.1520", details=err[-2000:] or None)


async def _run(runner: Runner, argv: list[str], timeout: float, what: str):
    try:
        result = await runner.run(argv, timeout=timeout, max_output=8 << 20)
    except errors.Timeout:
        raise errors.OperationFailed(
            f"qemu-img {what} did not finish within {timeout:g} s (is the storage hung?); "
            "it was killed", code="STORAGE.1408") from None
    if result.returncode != 0:
        raise _fail(what, result)
    return result


async def info(runner: Runner, path: str, fmt: str | None, timeout: float,
               chain: bool = True) -> list[dict[str, Any]]:
    """qemu-img info --output=json [--backing-chain]: a list, the image first."""
    argv = [QEMU_IMG, "info", "--output=json", "-U"]
    if chain:
        argv.append("--backing-chain")
    if fmt:
        argv += ["-f", fmt]
    argv.append(path)
    out = json.loads((await _run(runner, argv, timeout, "info")).stdout or b"null")
    return out if isinstance(out, list) else [out]


async def create(runner: Runner, path: str, fmt: str, size: int | None, timeout: float,
                 backing: str | None = None, backing_fmt: str | None = None) -> None:
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    await _run(runner, argv, timeout, "create")


async def convert(runner: Runner, src: str, src_fmt: str, dst: str, dst_fmt: str, timeout: float,
                  backing: str | None = None, backing_fmt: str | None = None) -> None:
    argv = [QEMU_IMG, "convert", "-q", "-f", src_fmt, "-O", dst_fmt]
    if backing:
        argv += ["-B", backing, "-F", backing_fmt or "qcow2"]
    argv += [src, dst]
    await _run(runner, argv, timeout, "convert")


async def resize(runner: Runner, path: str, fmt: str, size: int, timeout: float) -> None:
    await _run(runner, [QEMU_IMG, "resize", "-q", "-f", fmt, path, str(size)], timeout, "resize")


async def check(runner: Runner, path: str, fmt: str, timeout: float) -> None:
    if fmt == "qcow2":
        await _run(runner, [QEMU_IMG, "check", "-q", "-f", fmt, path], timeout, "check")


def chain_of(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The backing files of an image (without the image itself), nearest first."""
    return [{"filename": i.get("filename"), "format": i.get("format"),
             "virtualSize": i.get("virtual-size"), "actualSize": i.get("actual-size")}
            for i in infos[1:]]


def backing_of(infos: list[dict[str, Any]]) -> str | None:
    return infos[0].get("backing-filename") if infos else None


def relative_backing(volume_rel: str, image_rel: str) -> str:
    """The backing path to write into a volume: relative to the volume's directory, so the
    chain stays valid wherever the storage is mounted, and after a migration."""
    return os.path.relpath(image_rel, os.path.dirname(volume_rel) or ".")
