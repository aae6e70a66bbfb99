"""What the benchmarks share: the machine's CPU, the code's commit, sparse test files, the
way a run's section reaches RESULTS.md."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
MIB = 1 << 20


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def git_head(*paths: str) -> tuple[str, list[str]]:
    """The short commit of HEAD, and the files under paths that differ from it
    or are new: what a figure was measured on."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True, timeout=10).stdout
    try:
        head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        dirty = git("status", "--porcelain", "--", *paths) if paths else ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    return head, sorted(line[3:] for line in dirty.splitlines())


def fill_half_holes(path: Path, size: int) -> None:
    """A sparse file of size bytes: 1 MiB of random data every 2 MiB, holes between."""
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * MIB):
            f.seek(off)
            f.write(block)


@contextlib.contextmanager
def own_tmpfs(prefix: str):
    """A tmpfs of the benchmark's own under /tmp (like /dev/shm, which is under /dev, where
    no allowed root may lie): mounted, yielded, emptied and unmounted."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", prefix.rstrip("-"), str(base)],
                   check=True)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["umount", "-l", str(base)], check=False)
        os.rmdir(base)


def append(section: str) -> None:
    """A run's section at the end of RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write("\n" + section.rstrip() + "\n")
    print(f"appended to {RESULTS}", file=sys.stderr)


def publish(lines: list[str], no_append: bool) -> int:
    """A run's section (its lines) printed, and appended to RESULTS.md unless no_append;
    0, the benchmark's exit code."""
    section = "\n".join(lines) + "\n"
    print(section)
    if not no_append:
        append(section)
    return 0
