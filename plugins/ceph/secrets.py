"""Ceph keys at rest: one keyring file per storage, mode 0600, never returned or logged.

A key given in a registration is written to ``<state>/ceph/keys/<uuid>.keyring``
(the directory is 0700, the file 0600, written to a temporary name and renamed,
so a half-written key never exists).  librados reads it by path.  A
``keyringPath`` given instead is the operator's own file: it is checked and
used where it is, and never copied or deleted.

Nothing in this module puts a key into an exception message, a log line or a
return value other than the file itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from pathlib import Path

# A CephX secret as `ceph auth get-key` prints it: base64 of a 12-byte header (le16 type,
# 1 = AES; le32 seconds and le32 nanoseconds of its creation; le16 length, 16) and the
# 16-byte AES key.  librados refuses anything else *and prints the refused value to
# stderr*, so the agent checks all of it before librados ever sees a key.
CEPHX_HEADER = struct.Struct("<HIIH")
CEPHX_AES, CEPHX_AES_LEN = 1, 16
CEPHX_KEY_BYTES = CEPHX_HEADER.size + CEPHX_AES_LEN   # 28
_HINT = "(copy it from 'ceph auth get-key client.<user>')"


def check_key(key: str) -> str | None:
    """Why ``key`` is not a cephx secret, or None.  The message never quotes the key."""
    text = key.strip()
    if not text:
        return "the key is empty"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "the key is not base64 (a cephx key looks like 'AQB...==', 40 characters)"
    if base64.b64encode(raw).decode() != text:
        return f"the key is not in canonical base64 (40 characters ending in '==') {_HINT}"
    if len(raw) != CEPHX_KEY_BYTES:
        return f"the key decodes to {len(raw)} bytes, a cephx key has {CEPHX_KEY_BYTES} {_HINT}"
    typ, _sec, nsec, length = CEPHX_HEADER.unpack_from(raw)
    if typ != CEPHX_AES:
        return f"the key is not a cephx secret: its type is {typ}, not 1 (AES) {_HINT}"
    if length != CEPHX_AES_LEN:
        return (f"the key is not a cephx secret: it declares a {length}-byte secret, "
                f"not {CEPHX_AES_LEN} {_HINT}")
    if nsec >= 1_000_000_000:
        return f"the key is not a cephx secret: its creation time is malformed {_HINT}"
    return None


# librados's own log lines go to the agent's stderr (its log) and may quote a keyring
# line.  Set through Rados(conf=...) these two options do not silence the lines it
# prints while loading a keyring (tried with librados 16.2); read from a config file
# they do.  cluster.Connection reads this file into every handle it makes.
QUIET_CONF = "[global]\n\tlog_to_stderr = false\n\terr_to_stderr = false\n"


def write_quiet_conf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(QUIET_CONF)
    return path


def keyring_text(user: str, key: str) -> bytes:
    return f"[client.{user}]\n\tkey = {key.strip()}\n".encode()


def keyring_has_user(path: str, user: str) -> str | None:
    """Why the operator's keyring at ``path`` cannot be used for ``user``, or None."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return f"keyring {path} does not exist"
    except PermissionError:
        return f"keyring {path} cannot be read by the agent (permission denied)"
    except IsADirectoryError:
        return f"keyring {path} is a directory"
    except OSError as e:
        return f"keyring {path} cannot be read: {e.strerror}"
    if not re.search(rf"^\s*\[client\.{re.escape(user)}\]\s*$", text, re.M):
        return f"keyring {path} has no section [client.{user}]"
    return None


class KeyStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, uuid: str) -> Path:
        return self.dir / f"{uuid}.keyring"

    def write(self, uuid: str, user: str, key: str) -> Path:
        """Write the key (blocking; run in a thread); returns the file's path."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        final = self.path(uuid)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)     # whatever the umask
            os.write(fd, keyring_text(user, key))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final

    def delete(self, uuid: str) -> None:
        try:
            self.path(uuid).unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def read(path: str) -> bytes:
        """The file's bytes, only to fingerprint a login (see cluster.Registry)."""
        try:
            return Path(path).read_bytes()
        except OSError:
            return b""
