"""IPMI over LAN (RMCP+) through pyghmi: one session per BMC, reused and serialized.

pyghmi's client is blocking, so every call runs in a runner thread under a
timeout.  Calls to one BMC go one at a time with a minimum interval between
them (BMCs are small computers that drop or refuse floods); calls to
different BMCs run in parallel.  A transient failure (node busy, a session
the BMC forgot, a lost reply) is retried with backoff on a fresh session; a
wrong password or a command the BMC refuses is not.

pyghmi 1.6.19 needs these fixes, applied once (``_patch_pyghmi``):

- SHA-1 fallback: the client proposes RAKP-HMAC-SHA256 and falls back to
  SHA-1 only when the BMC *refuses* the proposal.  pyghmi-based BMCs
  (virtualbmc among them) accept it but answer with SHA-1 anyway, and the
  client crashes with ``pack expected 32 items for packing (got 20)``.  The
  patch notices the SHA-1-sized RAKP2 and restarts the handshake with SHA-1.
- Lost wake-ups: a reply that arrives before the waiting thread registers
  with pyghmi's I/O thread is noticed only at the retry timer, 0.5-1 s later
  (every ~10th call on loopback).  The patch checks for an already-queued
  reply after registering.
- A failed login's reason is set before the session is marked broken, so a
  login waiting in another thread reads the reason, not AttributeError.
- Credentials go in as ``bytes``: two sessions with the same ``str``
  credentials in one process make pyghmi's session cache hang.

Besides, each session gives up on a silent BMC after two retransmits (about
3 s) instead of pyghmi's ~30 s of retransmits and in-session re-logins:
call() re-logs in itself, with backoff.

A dead BMC must not build a queue (issue 11): one whole call (its wait for
the BMC's turn, logins, attempts and pauses) is bounded by
``CallPolicy.timeout``; a call that ends with the BMC silent marks it down,
and while it is down calls fail at once (``BM.1101`` naming the address)
until a background probe reaches it again.  A caller that goes away while
waiting for its turn leaves the queue; the attempt in flight runs to its
(bounded) end in a task of its own, so a command is never cut in half and
its outcome still marks the BMC up or down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from agent import errors

log = logging.getLogger("node_agent.baremetal.ipmi")
T = TypeVar("T")

_patched = False
_patch_lock = threading.Lock()
_sha1_fallback_allowed = True


def _patch_pyghmi() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        import pyghmi.ipmi.private.session as ps
        from pyghmi.ipmi.private.util import _monotonic_time

        orig_rakp2 = ps.Session._got_rakp2

        def _got_rakp2(self, data):
            # A BMC that accepted our SHA-256 proposal but answers with a
            # 20-byte (SHA-1) key exchange code: start over asking for SHA-1.
            if (_sha1_fallback_allowed and self.currhashlib is hashlib.sha256
                    and self.sessioncontext == "EXPECTINGRAKP2" and len(data) >= 2
                    and data[0] == self.rmcptag and data[1] == 0 and len(data) - 40 == 20):
                log.info("BMC %s:%s answered RAKP with SHA-1: falling back to SHA-1",
                         self.bmc, self.port)
                self.attemptedhash = 1
                self._open_rmcpplus_request()
                return -9
            return orig_rakp2(self, data)

        def _io_wait_checked(timeout, myaddr, ready: Callable[[], bool]) -> None:
            evt = threading.Event()
            deadline = timeout + _monotonic_time()
            ps.ioqueue.append((deadline, evt, myaddr))
            if deadline < ps.selectdeadline:
                intsock = ps.iosockets[0]
                if hasattr(intsock, "fd"):
                    intsock = intsock.fd
                intsock.sendto(b"\x01", (ps.myself, ps.iosockets[0].getsockname()[1]))
            if ready():        # arrived before our registration: do not wait for the timer
                return
            evt.wait()

        def _poller(timeout=0):
            if ps.sessionqueue:
                return True
            _io_wait_checked(timeout, None, lambda: bool(ps.sessionqueue))
            return ps.sessionqueue

        def awaitresponse(self, retry, netfn, command):
            # pyghmi's own loop, with the checked wait.
            self.awaitingresponse = True
            try:
                alltimeout = _monotonic_time() + (self._getmaxtimeout() * 2)
                while (retry and ps.unmatched(self.lastresponse, netfn, command)
                       and (self.logging or self.logged or self.onlogpayload)):
                    timeout = self.expiration - _monotonic_time()
                    _io_wait_checked(timeout, self.sockaddr,
                                     lambda: bool(self.pktqueue) or not ps.unmatched(
                                         self.lastresponse, netfn, command))
                    while self.iterwaiters:
                        waiter = self.iterwaiters.pop()
                        waiter({"success": True})
                    self.process_pktqueue()
                    if _monotonic_time() > alltimeout:
                        self._mark_broken()
                        raise ps.exc.IpmiException("Session no longer connected")
                    with ps.util.protect(ps.WAITING_SESSIONS):
                        if (self in self.waiting_sessions
                                and self.expiration < _monotonic_time()):
                            self.waiting_sessions.pop(self, None)
                            if not self.lastpayload and not self.logging:
                                return
                            self._timedout()
            finally:
                self.awaitingresponse = False

        orig_mark_broken = ps.Session._mark_broken

        def _mark_broken(self, error=None):
            # pyghmi sets errormsg after logout() has marked the session broken; a
            # login waiting in another thread (the pump thread runs pyghmi's loop too)
            # may look in between and die on AttributeError: set it first.
            self.errormsg = error
            return orig_mark_broken(self, error)

        ps.Session.errormsg = None
        ps.Session._mark_broken = _mark_broken
        ps.Session._got_rakp2 = _got_rakp2
        ps.Session.awaitresponse = awaitresponse
        ps._poller = _poller
        _patched = True


def allow_sha1_fallback(allowed: bool) -> None:
    global _sha1_fallback_allowed
    _sha1_fallback_allowed = allowed


# ---- errors -------------------------------------------------------------------

UNREACHABLE, AUTH, REFUSED, BUSY, LOST, FAILED = (
    "unreachable", "auth", "refused", "busy", "lost", "failed")


class BmcError(Exception):
    """A classified failure of one BMC call."""

    def __init__(self, kind: str, message: str, *, transient: bool = False,
                 session_broken: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient
        self.session_broken = session_broken


_AUTH_TEXT = ("Incorrect password", "Unauthorized name", "Invalid role",
              "Unauthorized role", "Invalid username", "Unauthorized GUID",
              "Insufficient privilege")
_TRANSIENT_CODES = {0xC0: "node busy", 0xC3: "timeout while processing",
                    0xCE: "response could not be provided", 0xD2: "BMC initialization in progress",
                    0xFFFF: "timeout"}


def classify(e: BaseException, *, logged_in: bool) -> BmcError:
    """Turn a pyghmi (or socket) exception into a BmcError."""
    if isinstance(e, BmcError):
        return e
    if isinstance(e, socket.gaierror):
        return BmcError(UNREACHABLE, f"the BMC address does not resolve ({e.strerror})")
    if isinstance(e, OSError):
        return BmcError(UNREACHABLE, f"network error talking to the BMC ({e.strerror or e})",
                        transient=logged_in, session_broken=True)
    if isinstance(e, struct.error):
        return BmcError(FAILED, "the BMC's session handshake could not be understood "
                                f"({e}); is SHA-1 fallback disabled?", session_broken=True)
    text = str(e.args[0]) if getattr(e, "args", None) and e.args[0] is not None else ""
    code = getattr(e, "ipmicode", 0) or 0
    if not text or text in ("timeout", "Timeout") or "no longer connected" in text \
            or "failed to initialize" in text:
        if logged_in:
            return BmcError(LOST, "the BMC stopped answering on its session",
                            transient=True, session_broken=True)
        return BmcError(UNREACHABLE, "no answer from the BMC (nothing listens there, "
                                     "or IPMI over LAN is disabled)", session_broken=True)
    if any(t in text for t in _AUTH_TEXT):
        return BmcError(AUTH, f"the BMC refused the credentials ({text})", session_broken=True)
    if "Insufficient resources" in text:
        return BmcError(BUSY, f"the BMC has no free session ({text})", transient=True,
                        session_broken=True)
    for c, words in _TRANSIENT_CODES.items():
        if code == c or words in text.lower():
            return BmcError(BUSY, f"the BMC is busy ({text})", transient=True)
    return BmcError(REFUSED, f"the BMC refused the command ({text})")


def to_api_error(e: BmcError, where: str) -> errors.ApiError:
    """The wire error of a BmcError; ``where`` names the BMC (address:port)."""
    if e.kind == UNREACHABLE:
        return errors.OperationFailed(f"cannot reach the BMC at {where}: {e.message}; check "
                                      "the address, the port and that IPMI over LAN is enabled",
                                      code="BM.1101")
    if e.kind == AUTH:
        return errors.OperationFailed(f"the BMC at {where} refused the login: {e.message}; "
                                      "check ipmiUsername and ipmiPassword", code="BM.1102")
    if e.kind in (BUSY, LOST):
        return errors.OperationFailed(f"the BMC at {where} did not complete the call: "
                                      f"{e.message}; retried without success", code="BM.1105")
    return errors.OperationFailed(f"the BMC at {where} failed the call: {e.message}",
                                  code="BM.1103")


# ---- sessions -----------------------------------------------------------------

SESSION_MAX_TIMEOUT = 2


@dataclass(frozen=True)
class Credentials:
    address: str
    port: int
    username: bytes
    password: bytes

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"

    def __repr__(self) -> str:      # never the password, not even in a traceback
        return f"Credentials({self.where}, user={self.username!r})"


@dataclass
class CallPolicy:
    timeout: float = 8.0           # one whole call: the wait for the BMC's turn, logins,
                                   # every attempt and retry pause
    retries: int = 2               # more attempts after a transient failure
    backoff: float = 0.5           # first pause; doubles each retry
    min_interval: float = 0.1      # between two calls to the same BMC
    max_waiting: int = 32          # calls waiting for the BMC's turn; more are refused
    probe_interval: float = 5.0    # how often a BMC found down is tried again


# The final errors of a call that mean "the BMC does not answer": it is marked down.
_DOWN_KINDS = (UNREACHABLE, LOST)


class BmcSession:
    """The agent's one session with one BMC: calls go one at a time."""

    def __init__(self, creds: Credentials, runner, policy: CallPolicy, *,
                 watch: bool = True) -> None:
        """watch: mark the BMC down when it stops answering (False for a one-off login)."""
        _patch_pyghmi()
        self.watch = watch
        self.creds = creds
        self.runner = runner
        self.policy = policy
        self.lock = asyncio.Lock()
        self.last_used = 0.0
        self._last_call_end = 0.0
        self._cmd = None              # pyghmi Command, touched only in runner threads
        self._cmd_lock = threading.Lock()
        self.closed = False
        self._waiting = 0             # calls waiting for the lock
        self._tasks: set[asyncio.Task] = set()
        self._down: str | None = None  # why the BMC is taken as down; None: up
        self._down_since = 0.0
        self._probe: asyncio.Task | None = None

    # -- blocking side (runner threads) --
    def _command(self):
        from pyghmi.ipmi import command
        with self._cmd_lock:
            cmd = self._cmd
        if cmd is not None and not cmd.ipmi_session.broken and cmd.ipmi_session.logged:
            return cmd, True
        try:
            cmd = command.Command(bmc=self.creds.address, userid=self.creds.username,
                                  password=self.creds.password, port=self.creds.port)
        except Exception as e:
            raise classify(e, logged_in=False) from None
        # pyghmi's own recovery of a silent BMC (retransmits up to 4 s apart, then
        # an in-session re-login) takes ~30 s; give up after two retransmits
        # (2-3 s) instead: call() retries on a fresh login, with backoff.
        sess = cmd.ipmi_session
        sess.maxtimeout = SESSION_MAX_TIMEOUT
        sess.logontries = 0
        # pyghmi asks a BMC of a vendor it has no OEM module for (most of them) for
        # its device id again before every command; once per session is enough.
        try:
            cmd.oem_init()
            cmd._oemknown = True
        except Exception as e:
            raise classify(e, logged_in=True) from None
        with self._cmd_lock:
            self._cmd = cmd
        return cmd, False

    def _run(self, op: Callable[[Any], T]) -> T:
        cmd, reused = self._command()
        try:
            return op(cmd)
        except Exception as e:
            err = classify(e, logged_in=True)
            if err.session_broken:
                self._drop(cmd)
            raise err from None

    def _drop(self, cmd=None) -> None:
        with self._cmd_lock:
            if cmd is None or self._cmd is cmd:
                self._cmd = None

    def _logout(self) -> None:
        with self._cmd_lock:
            cmd, self._cmd = self._cmd, None
        if cmd is not None:
            try:
                cmd.ipmi_session.logout()
            except Exception:
                pass

    # -- async side --
    @property
    def down(self) -> bool:
        return self._down is not None

    def _fail_if_down(self) -> None:
        if self._down is not None:
            since = time.strftime("%H:%M:%S", time.localtime(self._down_since))
            raise BmcError(UNREACHABLE, f"the BMC has not answered since {since} "
                                        f"({self._down}); calls fail at once until a "
                                        "background probe (every "
                                        f"{self.policy.probe_interval:g} s) reaches it again")

    def _mark_down(self, err: BmcError) -> None:
        if self._down is None:
            self._down_since = time.time()
            log.warning("BMC %s is down (%s): its calls fail at once until a probe every "
                        "%g s reaches it", self.creds.where, err.message,
                        self.policy.probe_interval)
        self._down = err.message
        if (self._probe is None or self._probe.done()) and not self.closed:
            self._probe = asyncio.create_task(self._probe_until_up(),
                                              name=f"bmc-probe-{self.creds.where}")

    async def call(self, op: Callable[[Any], T], *, what: str,
                   retries: int | None = None, timeout: float | None = None) -> T:
        """Run op(command) in a thread, serialized, with retries; raise BmcError.

        ``timeout`` bounds the whole call, the wait for the BMC's turn included.
        """
        policy = self.policy
        retries = policy.retries if retries is None else retries
        timeout = policy.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.closed:
            raise BmcError(FAILED, "the chassis was deleted or its credentials changed")
        self._fail_if_down()
        if self._waiting >= policy.max_waiting:
            raise BmcError(BUSY, f"{self._waiting} calls already wait for this BMC")
        if self.lock.locked() or self._waiting:
            await self._wait_turn(what, timeout, deadline)
        else:
            await self.lock.acquire()        # free: taken at once, no timer needed
        # The lock is ours; the task releases it.  A caller who leaves from here on
        # does not cut the BMC command in half: the task ends on its own deadline.
        task = loop.create_task(self._attempts(op, what, retries, timeout, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return await asyncio.shield(task)

    async def _wait_turn(self, what: str, timeout: float, deadline: float) -> None:
        """Acquire the lock behind the BMC's other calls, for at most the call's bound."""
        self._waiting += 1
        try:
            # A little grace: a call ahead that finds the BMC dead ends on the same
            # deadline, and then this one should say so (BM.1101), not "busy".
            async with asyncio.timeout_at(deadline + 0.25):
                await self.lock.acquire()
        except TimeoutError:
            self._fail_if_down()
            raise BmcError(BUSY, f"{what} waited {timeout:g} s for its turn behind the "
                                 "BMC's other calls") from None
        finally:
            self._waiting -= 1

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()          # retrieved: a caller that left never will

    async def _attempts(self, op: Callable[[Any], T], what: str, retries: int,
                        timeout: float, deadline: float) -> T:
        loop = asyncio.get_running_loop()
        policy = self.policy
        try:
            if self.closed:
                raise BmcError(FAILED, "the chassis was deleted or its credentials changed")
            self._fail_if_down()      # found down while this call waited for its turn
            attempt = 0
            while True:
                pause = self._last_call_end + policy.min_interval - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                try:
                    result = await self.runner.call(self._run, op,
                                                    timeout=max(deadline - loop.time(), 0.01))
                    self._down = None
                    return result
                except errors.Timeout:
                    # The thread is abandoned; its session is not trusted again.
                    self._drop()
                    err = BmcError(LOST, f"{what} got no answer within the call's "
                                         f"{timeout:g} s limit", transient=True,
                                   session_broken=True)
                except BmcError as e:
                    err = e
                finally:
                    self._last_call_end = time.monotonic()
                    self.last_used = time.time()
                delay = policy.backoff * (2 ** attempt)
                if not err.transient or attempt >= retries or loop.time() + delay >= deadline:
                    if err.kind in _DOWN_KINDS and self.watch:
                        self._mark_down(err)
                        raise BmcError(UNREACHABLE, f"{err.message}; it is taken as down: "
                                                    "calls fail at once until a probe "
                                                    "reaches it") from None
                    raise err
                attempt += 1
                log.info("BMC %s: %s failed (%s); retry %d/%d in %.1f s", self.creds.where,
                         what, err.message, attempt, retries, delay)
                await asyncio.sleep(delay)
        finally:
            self.lock.release()

    async def _probe_until_up(self) -> None:
        """Try the BMC every probe_interval until it answers (then it is up again)."""
        policy = self.policy
        while self._down is not None and not self.closed:
            await asyncio.sleep(policy.probe_interval)
            async with self.lock:
                if self.closed:
                    return
                try:
                    await self.runner.call(self._run, op_power_status, timeout=policy.timeout)
                except errors.Timeout:
                    self._drop()
                except BmcError as e:
                    if e.kind not in _DOWN_KINDS:   # it answers (a refusal is an answer)
                        self._down = None
                else:
                    self._down = None
                finally:
                    self._last_call_end = time.monotonic()
            if self._down is None:
                log.info("BMC %s answers again", self.creds.where)

    async def close(self) -> None:
        """Log out (best effort, bounded) and refuse further calls."""
        self.closed = True
        if self._probe is not None:
            self._probe.cancel()
        try:
            await self.runner.call(self._logout, timeout=2)
        except Exception:
            pass

    async def logout_if_idle(self, idle: float) -> bool:
        if self.lock.locked() or self._cmd is None or time.time() - self.last_used < idle:
            return False
        async with self.lock:
            try:
                await self.runner.call(self._logout, timeout=5)
            except Exception:
                pass
        return True


# ---- operations (run in runner threads with a pyghmi Command) -------------------

def op_power_status(cmd) -> str:
    return cmd.get_power()["powerstate"]


def op_set_power(state: str) -> Callable[[Any], str]:
    def run(cmd) -> str:
        cmd.set_power(state, wait=False)
        return state
    return run


def op_set_bootdev(dev: str, persist: bool = False) -> Callable[[Any], dict]:
    def run(cmd) -> dict:
        r = cmd.set_bootdev(dev, persist=persist)
        if isinstance(r, dict) and "error" in r:
            raise BmcError(REFUSED, f"the BMC refused the boot device: {r['error']}")
        return cmd.get_bootdev()
    return run


def op_bootdev(cmd) -> dict:
    return cmd.get_bootdev()


HEALTH = {0: "ok", 1: "warning", 2: "critical", 4: "failed"}


def _plain(value: Any) -> Any:
    """FRU values as JSON: bytes as hex, dates as ISO text."""
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def op_hardware_info(cmd) -> dict[str, Any]:
    """FRU inventory and sensor readings; a part the BMC lacks is reported, not fatal."""
    out: dict[str, Any] = {"inventory": {}, "sensors": [], "problems": []}
    try:
        out["inventory"] = {name: _plain(info) for name, info in cmd.get_inventory()
                            if info is not None}
    except Exception as e:
        out["problems"].append(f"FRU inventory: {classify(e, logged_in=True).message}")
    try:
        for s in cmd.get_sensor_data():
            out["sensors"].append({
                "name": s.name, "type": s.type, "value": s.value, "units": s.units or None,
                "health": HEALTH.get(s.health, "failed" if s.health & 4 else
                                     "critical" if s.health & 2 else "warning"),
                "states": list(s.states), "unavailable": bool(s.unavailable)})
    except Exception as e:
        out["problems"].append(f"sensors: {classify(e, logged_in=True).message}")
    return out
