"""One connection to libvirtd, shared by every plugin that drives VMs or devices.

libvirtaio delivers libvirt's events (domain lifecycle, the connection's
close) on the agent's event loop.  Every libvirt call runs in a runner's
thread pool with a timeout, so a call stuck on one busy VM stalls only its
own thread.  When libvirtd goes away the connection is reopened within a
second or two and the domain-event subscriptions are registered again.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
import time
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qs, urlsplit

from . import errors
from .lazy import lazy_import
from .runner import Runner

log = logging.getLogger("node_agent.libvirt")
T = TypeVar("T")


# The binding and what it links (gnutls, glib, libxml2, ICU...) cost ~12 MB of
# RSS: a storage or PXE node without libvirtd never loads it, a hypervisor
# loads it once libvirtd's socket is there (see load_binding).
try:
    libvirt = lazy_import("libvirt")
    if importlib.util.find_spec("libvirtaio") is None:
        raise ImportError("No module named 'libvirtaio'")
except ImportError as e:     # the plugins that need it report it as their reason
    libvirt = None
    IMPORT_ERROR: str | None = f"the libvirt Python binding is missing ({e}); install python3-libvirt"
else:
    IMPORT_ERROR = None

libvirtaio: Any = None
_load_lock = threading.Lock()
_event_impl_registered = False
NUDGE = 0.1      # seconds; see LibvirtConnection._nudge_loop


def load_binding() -> None:
    """Really import libvirt and libvirtaio (blocking: run it in a runner thread,
    so that the loop does not wait ~50 ms for the libraries to load)."""
    global libvirtaio
    with _load_lock:
        if libvirtaio is None:
            libvirt.registerErrorHandler(_quiet, None)
            import libvirtaio as aio
            libvirtaio = aio


def register_event_impl() -> None:
    """libvirtaio must be registered once per process, before the first open()."""
    global _event_impl_registered
    if not _event_impl_registered and libvirtaio is not None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
        _event_impl_registered = True


def local_sockets(uri: str) -> list[str] | None:
    """The unix sockets a local system URI connects through, or None when only
    libvirt itself can tell (remote, session, test and other drivers)."""
    parts = urlsplit(uri)
    sockets = parse_qs(parts.query).get("socket")
    if sockets:
        return sockets[:1]
    if parts.scheme in ("qemu", "qemu+unix") and not parts.netloc and parts.path == "/system":
        # modular daemons (virtqemud) or the monolithic libvirtd, socket-activated or not
        return ["/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock"]
    return None


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


class LibvirtConnection:
    def __init__(self, uri: str, runner: Runner, *, call_timeout: float = 30.0,
                 check_interval: float = 1.0) -> None:
        self.uri = uri
        self.runner = runner
        self.call_timeout = call_timeout
        self.check_interval = check_interval
        self.conn: Any = None
        self.reason: str | None = IMPORT_ERROR or "not connected yet"
        # event id -> callbacks.  libvirt tracks one callback per event id and
        # connection (the binding's C dispatcher is the same for every Python
        # callback: a second registration fails "already tracked"), so each
        # event id is registered once and fanned out to every subscriber here.
        self._subscriptions: dict[int, list[Callable[..., Any]]] = {}
        self._listeners: list[Callable[[bool, str | None], Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._nudger: asyncio.Task | None = None
        self._users = 0
        # Calls occupying a thread right now (token -> start), including those
        # whose caller timed out: see _nudge_loop.
        self._inflight: dict[object, float] = {}
        self._nudging = threading.Event()

    @property
    def connected(self) -> bool:
        return self.conn is not None

    # -- lifecycle: shared, so started by the first plugin and closed by the last
    async def acquire(self) -> None:
        """Start keeping the connection open (idempotent; pair with release())."""
        self._users += 1
        if self._task is None and libvirt is not None:
            self._task = asyncio.create_task(self._keep_connected(), name="libvirt-connection")
            self._nudger = asyncio.create_task(self._nudge_loop(), name="libvirt-nudge")

    async def release(self) -> None:
        self._users -= 1
        if self._users > 0 or self._task is None:
            return
        self._task.cancel()
        if self._nudger is not None:
            self._nudger.cancel()
        await asyncio.gather(self._task, *([self._nudger] if self._nudger else []),
                             return_exceptions=True)
        self._task = self._nudger = None
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                await self.runner.call(conn.close, timeout=5)
            except Exception:
                pass

    async def wait_connected(self, timeout: float) -> bool:
        """For start-up and tests: wait until connected or timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.conn is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.conn is not None

    def subscribe(self, event_id: int, callback: Callable[..., Any]) -> None:
        """Register a domain event callback now and on every reconnection.

        The callback is called on the event loop as libvirt calls it:
        ``callback(conn, dom, *event_args, opaque)``.
        """
        first = event_id not in self._subscriptions
        self._subscriptions.setdefault(event_id, []).append(callback)
        if first and self.conn is not None:
            asyncio.get_running_loop().create_task(self._register(self.conn, event_id))

    def add_listener(self, fn: Callable[[bool, str | None], Any]) -> None:
        """fn(connected, reason) on every change; called at once with the current state."""
        self._listeners.append(fn)
        fn(self.connected, self.reason)

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   runner: Runner | None = None) -> T:
        """fn(conn, *args) in a runner thread with a timeout.

        Not connected, or the connection lost during the call: Unavailable
        (503).  Other libvirt errors are raised as they are, for the caller to
        map to its own codes.
        """
        conn = self.conn
        if conn is None:
            raise errors.Unavailable(f"libvirt at {self.uri} is not reachable: {self.reason}",
                                     code="VM.1503")
        token = object()

        def tracked(c: Any, *a: Any) -> Any:
            # Registered in the thread, so a call abandoned by its caller
            # stays visible for as long as it really holds the connection.
            self._inflight[token] = time.monotonic()
            try:
                return fn(c, *a)
            finally:
                self._inflight.pop(token, None)
        try:
            return await (runner or self.runner).call(tracked, conn, *args,
                                                      timeout=timeout or self.call_timeout)
        except Exception as e:
            if libvirt is not None and isinstance(e, libvirt.libvirtError) and _is_connection_error(e):
                self._lost(conn, str(e))
                raise errors.Unavailable(f"lost the connection to libvirt at {self.uri}: "
                                         f"{e.get_error_message()}", code="VM.1503") from None
            raise

    # -- internals
    async def _nudge_loop(self) -> None:
        """Keep a shared connection with a long call in flight answering the others.

        libvirt 9.0's RPC client lets one thread at a time drive the socket;
        while that thread waits on a long call (a migration, a VM whose QEMU
        hangs), the wake-up that should make it send the other threads' calls
        is often lost, and those calls (and events) wait until something else
        arrives on the socket.  A cheap call every NUDGE seconds while a call
        is long in flight is that something; measured, it bounds the delay to
        about NUDGE.
        """
        while True:
            await asyncio.sleep(NUDGE)
            now = time.monotonic()
            conn = self.conn
            if conn is None or self._nudging.is_set() or \
                    not any(now - t > NUDGE for t in list(self._inflight.values())):
                continue          # nothing long in flight, or the last nudge is itself stuck
            try:
                await self.runner.call(self._nudge, conn, timeout=5)
            except Exception:
                pass

    def _nudge(self, conn: Any) -> int:
        self._nudging.set()
        try:
            return conn.getLibVersion()
        finally:
            self._nudging.clear()

    def _set(self, conn: Any, reason: str | None) -> None:
        changed = (conn is None) != (self.conn is None) or reason != self.reason
        self.conn, self.reason = conn, reason
        if changed:
            for fn in self._listeners:
                try:
                    fn(conn is not None, reason)
                except Exception:
                    log.exception("libvirt connection listener failed")

    def _lost(self, conn: Any, reason: str) -> None:
        if self.conn is conn:
            log.warning("lost the connection to libvirt at %s: %s", self.uri, reason)
            self._set(None, reason)
            self._wake.set()

    async def _keep_connected(self) -> None:
        sockets = local_sockets(self.uri)
        while True:
            if self.conn is None:
                # A stat on /run, not a connect: while libvirtd is not running
                # the binding need not even be loaded.
                if sockets and not any(os.path.exists(p) for p in sockets):
                    self._set(None, f"libvirtd is not running (no socket at {' or '.join(sockets)})")
                else:
                    await self._connect()
            else:
                try:
                    alive = await self.runner.call(self.conn.isAlive, timeout=5)
                except Exception:
                    alive = False
                if not alive:
                    self._lost(self.conn, "the connection is not alive")
                    continue
            self._wake.clear()
            try:
                async with asyncio.timeout(self.check_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _connect(self) -> None:
        try:
            await self.runner.call(load_binding, timeout=60)
        except Exception as e:
            self._set(None, f"the libvirt Python binding cannot be loaded: {type(e).__name__}: {e}")
            return
        register_event_impl()
        try:
            conn = await self.runner.call(libvirt.open, self.uri, timeout=10)
        except Exception as e:
            msg = e.get_error_message() if hasattr(e, "get_error_message") else str(e)
            self._set(None, f"cannot connect: {msg}")
            return
        try:
            conn.registerCloseCallback(
                lambda _c, reason, _o: self._lost(conn, f"closed by libvirt (reason {reason})"), None)
            # Keepalive lets libvirt notice a dead daemon on a silent socket.
            await self.runner.call(conn.setKeepAlive, 5, 3, timeout=5)
        except Exception as e:
            log.debug("close callback/keepalive not set: %s", e)
        for event_id in self._subscriptions:
            await self._register(conn, event_id)
        log.info("connected to libvirt at %s", self.uri)
        self._set(conn, None)

    def _dispatcher(self, event_id: int) -> Callable[..., None]:
        def dispatch(*args: Any) -> None:
            for callback in list(self._subscriptions.get(event_id, ())):
                try:
                    callback(*args)
                except Exception:
                    log.exception("libvirt event %d callback %r failed", event_id, callback)
        return dispatch

    async def _register(self, conn: Any, event_id: int) -> None:
        try:
            await self.runner.call(conn.domainEventRegisterAny, None, event_id,
                                   self._dispatcher(event_id), None, timeout=10)
        except Exception as e:
            log.error("cannot subscribe to libvirt event %d: %s", event_id, e)


def _is_connection_error(e: Any) -> bool:
    return e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
                                  libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN,
                                  libvirt.VIR_ERR_INTERNAL_ERROR) and \
        e.get_error_domain() in (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC)
