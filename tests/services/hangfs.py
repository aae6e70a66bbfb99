"""A FUSE filesystem that can hang on demand: the dead-NFS server of the storage tests.

After ../shared/recipes/storage/hangfs.py (whose statfs always sleeps), grown
into a passthrough of a backing directory so a storage can be registered on
it while it is healthy and made to hang later:

    python hangfs.py BACKING_DIR MOUNTPOINT CONTROL_FILE [--fsname NAME]

While CONTROL_FILE exists, the operations it names (one per line or comma
separated: statfs, getattr, readdir, open, create, read, write, unlink,
mkdir, rename, or "all") block until it is removed (the sleeping FUSE thread
then answers normally).  Abort the connection through
/sys/fs/fuse/connections/<minor of st_dev>/abort to free every waiter at
once, as ``umount -f`` does for a dead NFS server.  Runs in the foreground.
"""

from __future__ import annotations

import argparse
import errno
import os
import time

try:
    from fuse import FUSE, FuseOSError, Operations
except ImportError:          # Debian's python3-fusepy names the module fusepy
    from fusepy import FUSE, FuseOSError, Operations


class HangFS(Operations):
    def __init__(self, backing: str, control: str) -> None:
        self.backing = os.path.realpath(backing)
        self.control = control

    # -- the switch -------------------------------------------------------------------
    def _hung(self, op: str) -> bool:
        try:
            with open(self.control) as f:
                words = {w.strip() for w in f.read().replace(",", "\n").split()}
        except FileNotFoundError:
            return False
        return not words or "all" in words or op in words

    def _gate(self, op: str) -> None:
        while self._hung(op):
            time.sleep(0.05)

    def _p(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _call(self, op: str, fn, *args):
        self._gate(op)
        try:
            return fn(*args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO) from None

    # -- passthrough -----------------------------------------------------------------------
    def getattr(self, path, fh=None):
        st = self._call("getattr", os.lstat, self._p(path))
        return {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                            "st_nlink", "st_size", "st_uid", "st_blocks")}

    def readdir(self, path, fh):
        return [".", ".."] + self._call("readdir", os.listdir, self._p(path))

    def statfs(self, path):
        s = self._call("statfs", os.statvfs, self._p(path))
        return {k: getattr(s, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                           "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def access(self, path, mode):
        self._call("getattr", os.access, self._p(path), mode) or None

    def readlink(self, path):
        return self._call("getattr", os.readlink, self._p(path))

    def mkdir(self, path, mode):
        return self._call("mkdir", os.mkdir, self._p(path), mode)

    def rmdir(self, path):
        return self._call("unlink", os.rmdir, self._p(path))

    def unlink(self, path):
        return self._call("unlink", os.unlink, self._p(path))

    def symlink(self, target, source):
        return self._call("create", os.symlink, source, self._p(target))

    def rename(self, old, new):
        return self._call("rename", os.rename, self._p(old), self._p(new))

    def link(self, target, source):
        return self._call("rename", os.link, self._p(source), self._p(target))

    def chmod(self, path, mode):
        return self._call("write", os.chmod, self._p(path), mode)

    def chown(self, path, uid, gid):
        return self._call("write", os.chown, self._p(path), uid, gid)

    def utimens(self, path, times=None):
        return self._call("write", os.utime, self._p(path), times)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            return self._call("write", os.ftruncate, fh, length)
        return self._call("write", os.truncate, self._p(path), length)

    def open(self, path, flags):
        return self._call("open", os.open, self._p(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        return self._call("create", os.open, self._p(path), flags, mode)

    def read(self, path, size, offset, fh):
        return self._call("read", os.pread, fh, size, offset)

    def write(self, path, data, offset, fh):
        return self._call("write", os.pwrite, fh, data, offset)

    def flush(self, path, fh):
        return None

    def fsync(self, path, datasync, fh):
        return self._call("write", os.fsync, fh)

    def release(self, path, fh):
        os.close(fh)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("control")
    ap.add_argument("--fsname", default="hangfs")
    a = ap.parse_args()
    FUSE(HangFS(a.backing, a.control), a.mountpoint, foreground=True, nothreads=False,
         fsname=a.fsname, allow_other=True)


if __name__ == "__main__":
    main()
