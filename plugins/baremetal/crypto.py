"""Secrets at rest: BMC passwords and tokens encrypted with a key file (Fernet).

The key lives in its own file (mode 0600, by default ``<state>/baremetal.key``),
created on first use.  It can be put elsewhere (``[baremetal] key_file``) so a
copy of the state database alone does not reveal any password.  Fernet is
AES-128-CBC with HMAC-SHA256: a changed or foreign key is detected, never
silently decrypted to garbage.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from pathlib import Path
from typing import Any

from agent import errors

log = logging.getLogger("node_agent.baremetal")


class SecretBox:
    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._key = self._load_or_create()
        self._fernet_obj: Any = None

    @property
    def _fernet(self) -> Any:
        # cryptography is imported on the first encryption or decryption, not at start:
        # it costs ~7 MB of RSS that an agent without chassis never needs.
        if self._fernet_obj is None:
            from cryptography.fernet import Fernet
            self._fernet_obj = Fernet(self._key)
        return self._fernet_obj

    @staticmethod
    def _check_key(key: bytes) -> None:
        """What Fernet(key) checks, without importing cryptography: 32 url-safe base64 bytes."""
        try:
            raw = base64.urlsafe_b64decode(key)
        except binascii.Error as e:
            raise ValueError(str(e)) from None
        if len(raw) != 32:
            raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes.")

    def _load_or_create(self) -> bytes:
        path = self.key_file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                log.warning("key file %s had mode %o; set to 0600", path, mode)
                os.chmod(path, 0o600)
            key = path.read_bytes().strip()
            try:
                self._check_key(key)
            except ValueError:
                raise RuntimeError(f"{path} is not a valid key file (32 url-safe base64 bytes); "
                                   "restore it from a backup, or remove it and re-enter the "
                                   "passwords of every chassis") from None
            return key
        key = base64.urlsafe_b64encode(os.urandom(32))   # what Fernet.generate_key() does
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created the baremetal key file %s", path)
        return key

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str, what: str = "a stored secret") -> bytes:
        from cryptography.fernet import InvalidToken
        try:
            return self._fernet.decrypt(token.encode())
        except (InvalidToken, ValueError):
            raise errors.OperationFailed(
                f"{what} cannot be decrypted with the key in {self.key_file} (the key file was "
                "replaced or lost); set the password again with updateBaremetalChassis",
                code="BM.1106") from None
