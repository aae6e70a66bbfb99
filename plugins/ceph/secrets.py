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
from pathlib import Path

CEPHX_KEY_BYTES = 28   # type(2) + created(8) + length(2) + secret(16)


def check_key(key: str) -> str | None:
    """Why ``key`` is not a cephx key, or None.  The message never quotes the key."""
    text = key.strip()
    if not text:
        return "the key is empty"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "the key is not base64 (a cephx key looks like 'AQB...==', 40 characters)"
    if len(raw) != CEPHX_KEY_BYTES:
        return (f"the key decodes to {len(raw)} bytes, a cephx key has {CEPHX_KEY_BYTES} "
                "(copy it from 'ceph auth get-key client.<user>')")
    return None


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
