"""One librados connection per Ceph cluster, shared, bounded by timeouts.

Everything here blocks and runs in the plugin's runner threads, never on the
event loop.  The binding ignores the timeout arguments of ``connect`` and
``mon_command``; what bounds a call is the configuration each handle is made
with: ``client_mount_timeout`` (connect), ``rados_mon_op_timeout`` (mon and
mgr commands) and ``rados_osd_op_timeout`` (object I/O, so every rbd call).

A ``Connection`` is one cluster seen with one set of credentials: it is shared
by every storage registered against the same mons, user and key, holds at most
one ``rados.Rados`` handle, makes it on first use, and checks on every
(re)connect that the cluster's fsid is the one recorded at registration, so
another cluster answering at the same addresses is an error, not a silent
switch.  A handle is replaced (``invalidate``) only when it is unusable; one
that merely timed out keeps hunting for its mons by itself and recovers when
they answer again.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import json
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from agent import errors
from agent.lazy import LazyModule
from agent.validation import control_chars, full_match

# Debian's python3-rados / python3-rbd; the plugin reports itself unavailable without them.
# Loading them costs ~17 MB of RSS and ~15 ms, which an agent with no Ceph storage never
# needs: whether they import is checked in a child process (same interpreter and sys.path,
# started now so it runs while the agent goes on starting), and the agent imports them
# itself on first use (agent.lazy.LazyModule).
_CHECK = ("import sys; sys.path[:] = {path!r}\n"
          "try:\n    import rados, rbd\n"
          "except Exception as e:\n    print(f'{{type(e).__name__}}: {{e}}'); sys.exit(1)\n")
try:
    _checker: subprocess.Popen | None = subprocess.Popen(
        [sys.executable, "-E", "-S", "-c", _CHECK.format(path=sys.path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
except OSError as e:    # pragma: no cover - no fork: check in this process instead
    _checker = None
_import_error: list[str | None] = []


def import_error() -> str | None:
    """Why rados/rbd cannot be imported, or None (waits for the check to finish)."""
    if not _import_error:
        if _checker is None:
            try:
                importlib.import_module("rados"), importlib.import_module("rbd")
                _import_error.append(None)
            except Exception as e:
                _import_error.append(f"{type(e).__name__}: {e}")
        else:
            try:
                out, _ = _checker.communicate(timeout=60)
                lines = out.strip().splitlines()
                _import_error.append(None if _checker.returncode == 0 else
                                     (lines[-1] if lines else f"exit status {_checker.returncode}"))
            except subprocess.TimeoutExpired:
                _checker.kill()
                _checker.communicate()
                _import_error.append("the import check did not finish in 60 s")
    return _import_error[0]


rados: Any = LazyModule("rados")
rbd: Any = LazyModule("rbd")

ETIMEDOUT = 110
# A config file that keeps librados's log off stderr (written by the plugin at start).
QUIET_CONF: str | None = None
DEFAULT_MON_PORT = 6789


# --- errors ------------------------------------------------------------------------

def bad(description: str, code: str = "CEPH.1001") -> errors.BadRequest:
    return errors.BadRequest(description, code=code)


def not_found(description: str) -> errors.NotFound:
    return errors.NotFound(description, code="CEPH.1004")


def conflict(description: str) -> errors.Conflict:
    return errors.Conflict(description, code="CEPH.1009")


def failed(description: str, code: str = "CEPH.1503", details: str | None = None) -> errors.OperationFailed:
    return errors.OperationFailed(description, code=code, details=details)


class Unreachable(errors.OperationFailed):
    """The cluster did not answer within the configured timeout."""
    code = "CEPH.1408"


class AccessDenied(errors.OperationFailed):
    """The cluster refused the user or its key."""
    code = "CEPH.1401"


class FsidMismatch(errors.OperationFailed):
    """Another cluster answers at the recorded addresses."""
    code = "CEPH.1409"


class ClusterDown(errors.Unavailable):
    """The cluster is known Disconnected: the call is refused at once, not sent."""
    code = "CEPH.1504"


class CommandFailed(Exception):
    """A mon/mgr command answered with an error (``ret`` is a negative errno)."""

    def __init__(self, prefix: str, ret: int, message: str) -> None:
        super().__init__(f"'{prefix}' failed: {message or 'errno %d' % -ret}")
        self.prefix, self.ret, self.message = prefix, ret, message


def translate(e: BaseException, what: str, cluster: str, timeouts: "Timeouts") -> errors.ApiError:
    """A binding exception as the wire's error: the cause in plain words, never a key."""
    if isinstance(e, errors.ApiError):
        return e
    if isinstance(e, CommandFailed):
        if e.ret == -ETIMEDOUT:
            return Unreachable(f"{what}: the Ceph cluster {cluster} did not answer within "
                               f"{timeouts.mon_op:g} s (rados_mon_op_timeout); are its mons "
                               f"up and reachable?")
        return failed(f"{what}: the Ceph cluster refused: {e.message or 'errno %d' % -e.ret}")
    if rados is not None:
        if isinstance(e, rados.TimedOut) or getattr(e, "errno", None) == ETIMEDOUT:
            return Unreachable(f"{what}: the Ceph cluster {cluster} did not answer within the "
                               f"configured timeout (client_mount_timeout {timeouts.mount:g} s, "
                               f"rados_osd_op_timeout {timeouts.osd_op:g} s); are its mons and "
                               f"OSDs up and reachable?")
        if isinstance(e, rados.PermissionDeniedError):
            return AccessDenied(f"{what}: the Ceph cluster {cluster} refused the credentials "
                                f"(permission denied): check the user and its key or keyring")
        if rbd is not None and isinstance(e, rbd.Error):
            return failed(f"{what}: {_rbd_message(e)}")
        if isinstance(e, rados.Error):
            return failed(f"{what}: {e}")
    if isinstance(e, OSError):
        return failed(f"{what}: {e.strerror or e}")
    return errors.InternalError(f"{what}: unexpected {type(e).__name__}", details=str(e)[:500])


def _rbd_message(e: Exception) -> str:
    # "[errno 16] RBD image is busy (error unprotecting snapshot b'x'@b's')": drop the b''.
    return re.sub(r"b'([^']*)'", r"\1", str(e))


# --- settings and endpoints ----------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    mount: float = 10.0       # client_mount_timeout
    mon_op: float = 10.0      # rados_mon_op_timeout
    osd_op: float = 30.0      # rados_osd_op_timeout

    def conf(self) -> dict[str, str]:
        return {"client_mount_timeout": f"{self.mount:g}",
                "rados_mon_op_timeout": f"{self.mon_op:g}",
                "rados_osd_op_timeout": f"{self.osd_op:g}"}

    @property
    def call(self) -> float:
        """How long a runner waits for one binding call: its own bound plus a margin.
        A call may first (re)connect, then run one op."""
        return self.mount + max(self.mon_op, self.osd_op) + 2.0


@dataclass(frozen=True)
class Endpoint:
    """One mon address as the agent uses it: host, optional port and protocol."""
    host: str
    port: int | None = None
    proto: str | None = None          # "v1", "v2" or None (librados picks)

    @property
    def addr(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host

    @property
    def effective_proto(self) -> str | None:
        """The messenger protocol dialled: the given one, else v1 on 6789 (the legacy port)
        and v2 on any other port.  An untyped address would make librados try both, and a
        refused key then surfaces as a timeout instead of 'permission denied'."""
        if self.proto or self.port is None:
            return self.proto
        return "v1" if self.port == DEFAULT_MON_PORT else "v2"

    def mon_host(self) -> str:
        """This endpoint in ceph.conf's ``mon_host`` syntax (a bare host: librados tries
        v2 on 3300 and v1 on 6789)."""
        proto = self.effective_proto
        return f"{proto}:{self.addr}" if proto else self.addr


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$")


def parse_mon_url(url: str) -> Endpoint:
    """``host``, ``host:port``, ``[v6]:port``, ``v1:host:port``, ``v2:host:port`` or the
    manual's ``user:password@host/?monPort=N`` (the ssh part is not used, nor kept)."""
    if control_chars(url) is not None:      # before strip(): "host\n" is refused, not trimmed
        raise ValueError("a mon URL must not contain control characters (line breaks, NUL...)")
    text = url.strip()
    if not text:
        raise ValueError("a mon URL is empty")
    proto = None
    m = re.fullmatch(r"(v[12]):(.*)", text)
    if m:
        proto, text = m.group(1), m.group(2)
    port: int | None = None
    if "@" in text or "/?" in text or "monPort=" in text:
        text = text.rsplit("@", 1)[-1]
        host_part, _, query = text.partition("/")
        qm = re.search(r"monPort=(\d+)", query)
        if qm:
            port = int(qm.group(1))
        text = host_part
        if port is not None and (text.count(":") == 1):
            raise ValueError(f"mon URL '{_safe(url)}' gives the port twice")
    if text.startswith("["):
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
        if not m:
            raise ValueError(f"mon URL '{_safe(url)}' is not [ipv6]:port")
        host = m.group(1)
        port = int(m.group(2)) if m.group(2) else port
    elif text.count(":") == 1:
        host, p = text.split(":")
        if not p.isdigit():
            raise ValueError(f"mon URL '{_safe(url)}' has a port that is not a number")
        port = int(p)
    elif text.count(":") > 1:
        host = text               # a bare IPv6 address
    else:
        host = text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not full_match(_HOST_RE, host):
            raise ValueError(f"mon URL '{_safe(url)}': '{_safe(host)}' is neither an IP address "
                             f"nor a host name") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"mon URL '{_safe(url)}': port {port} is out of range 1-65535")
    return Endpoint(host, port, proto)


def _safe(text: str) -> str:
    """A mon URL for an error message, without a password it may carry."""
    if "@" in text:
        return "***@" + text.rsplit("@", 1)[-1]
    return text[:200]


def mon_host_option(endpoints: list[Endpoint]) -> str:
    return ",".join(e.mon_host() for e in endpoints)


# --- the connection ------------------------------------------------------------------

@dataclass
class _Handle:
    rados: Any
    users: int = 0
    retired: bool = False
    created: float = field(default_factory=time.monotonic)


class Connection:
    """The shared handle of one cluster (mons + user + key + fsid)."""

    def __init__(self, *, mon_host: str, user: str, keyring: str, conf_path: str | None,
                 timeouts: Timeouts, fsid: str | None, label: str) -> None:
        self.mon_host = mon_host
        self.user = user
        self.keyring = keyring
        self.conf_path = conf_path
        self.timeouts = timeouts
        self.fsid = fsid                 # expected; learned on the first connect if None
        self.label = label               # for messages: the mon addresses
        self.storages: set[str] = set()  # the storages sharing it (managed by Registry)
        self._lock = threading.Lock()
        self._handle: _Handle | None = None
        self._last_failure: tuple[float, BaseException] | None = None
        self.connects = 0
        # Known down: (since when, why).  Set when a call found the cluster unreachable,
        # cleared only by a health check that reached it; calls fail fast meanwhile.
        self.down: tuple[float, str] | None = None
        self.runner: Any = None          # its own bounded pool (set by the plugin)
        self.bulk: Any = None            # its own bounded pool for bulk I/O (idem)

    def _make(self) -> Any:
        conf = {"mon_host": self.mon_host, "keyring": self.keyring,
                "log_to_stderr": "false", "err_to_stderr": "false", "log_file": "",
                "admin_socket": "", **self.timeouts.conf()}
        if not self.mon_host:   # from the operator's ceph.conf
            del conf["mon_host"]
        # conffile=None reads no file at all ('' would read /etc/ceph/ceph.conf)
        r = rados.Rados(rados_id=self.user, conffile=self.conf_path or None, conf=conf)
        if QUIET_CONF:      # keeps what the first file set; see secrets.QUIET_CONF
            r.conf_read_file(QUIET_CONF)
        return r

    def _connect(self) -> _Handle:
        r = self._make()
        try:
            r.connect()                     # bounded by client_mount_timeout
            fsid = r.get_fsid()
        except BaseException:
            _shutdown(r)
            raise
        if self.fsid and fsid != self.fsid:
            _shutdown(r)
            raise FsidMismatch(
                f"the mons at {self.label} belong to another Ceph cluster (fsid {fsid}), not the "
                f"one registered (fsid {self.fsid}); fix the mon addresses")
        self.fsid = fsid
        self.connects += 1
        return _Handle(r)

    @contextmanager
    def use(self) -> Iterator[Any]:
        """The connected ``rados.Rados`` for one call (connecting first if needed)."""
        with self._lock:
            h = self._handle
            if h is None or h.retired:
                # Another caller's connect just failed: fail as fast, don't queue up
                # behind one client_mount_timeout each.
                if self._last_failure and time.monotonic() - self._last_failure[0] < 1.0:
                    raise self._last_failure[1]
                try:
                    h = self._handle = self._connect()
                except BaseException as e:
                    self._last_failure = (time.monotonic(), e)
                    raise
                self._last_failure = None
            h.users += 1
        try:
            yield h.rados
        finally:
            with self._lock:
                h.users -= 1
                dead = h.retired and h.users == 0
            if dead:
                _shutdown(h.rados)

    def invalidate(self) -> None:
        """Drop the handle: the next call reconnects (and checks the fsid again)."""
        with self._lock:
            h, self._handle = self._handle, None
            if h is None:
                return
            h.retired = True
            dead = h.users == 0
        if dead:
            _shutdown(h.rados)

    def close(self) -> None:
        self.invalidate()

    @property
    def connected(self) -> bool:
        return self._handle is not None and not self._handle.retired


def _shutdown(r: Any) -> None:
    try:
        r.shutdown()
    except Exception:
        pass


def probe(*, mon_host: str, user: str, keyring: str, conf_path: str | None,
          timeouts: Timeouts, label: str) -> str:
    """Connect to exactly these mons with a throwaway handle; return the cluster's fsid."""
    c = Connection(mon_host=mon_host, user=user, keyring=keyring, conf_path=conf_path,
                   timeouts=timeouts, fsid=None, label=label)
    h = c._connect()
    _shutdown(h.rados)
    return c.fsid or ""


class Registry:
    """Connections by what identifies a cluster login; shared by storages.

    Used from the event loop only (creating a Connection does no I/O).
    """

    def __init__(self) -> None:
        self._conns: dict[tuple, Connection] = {}

    @staticmethod
    def key_digest(keyring_text: bytes) -> str:
        return hashlib.sha256(keyring_text).hexdigest()

    def attach(self, storage_uuid: str, *, mon_host: str, user: str, keyring: str, digest: str,
               conf_path: str | None, fsid: str | None, timeouts: Timeouts, label: str) -> Connection:
        self.detach(storage_uuid)
        key = (mon_host, user, digest, conf_path or "", fsid or "")
        conn = self._conns.get(key)
        if conn is None:
            conn = Connection(mon_host=mon_host, user=user, keyring=keyring, conf_path=conf_path,
                              timeouts=timeouts, fsid=fsid, label=label)
            self._conns[key] = conn
        conn.storages.add(storage_uuid)
        return conn

    def detach(self, storage_uuid: str) -> Connection | None:
        """Forget a storage; returns a connection nobody uses any more (to close off-loop)."""
        for key, conn in list(self._conns.items()):
            if storage_uuid in conn.storages:
                conn.storages.discard(storage_uuid)
                if not conn.storages:
                    del self._conns[key]
                    return conn
        return None

    def all(self) -> list[Connection]:
        return list(self._conns.values())


# --- commands --------------------------------------------------------------------------

def mon_command(r: Any, prefix: str, **args: Any) -> Any:
    """One mon command (the mon forwards mgr ones such as ``df``), parsed JSON."""
    cmd = {"prefix": prefix, "format": "json", **args}
    ret, out, errs = r.mon_command(json.dumps(cmd), b"")
    if ret != 0:
        raise CommandFailed(prefix, ret, (errs or "").strip())
    return json.loads(out) if out and out.strip() else None
