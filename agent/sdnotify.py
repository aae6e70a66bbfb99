"""sd_notify(3) and the systemd watchdog, with the standard library only.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (an AF_UNIX datagram
socket: a path, or an abstract name written with a leading ``@``).  The agent
sends ``READY=1`` once it listens, ``STOPPING=1`` when it shuts down, and, when
the unit sets ``WatchdogSec=``, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds or systemd kills and restarts it.  Outside systemd every call is a
cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

# A full receive queue in systemd must not stall the caller (the event loop).
_SEND_TIMEOUT_S = 1.0


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to systemd.

    Returns True when the datagram was sent, False when there is no
    ``NOTIFY_SOCKET`` (not run by systemd) or sending failed: notification is
    best effort and never raises.
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]          # abstract namespace
    elif not addr.startswith("/"):
        return False                    # unset, or a kind we don't speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1``, or None when no watchdog is asked.

    Half of ``WATCHDOG_USEC`` (as sd_watchdog_enabled(3) advises), and only
    when ``WATCHDOG_PID`` is absent or names this process: a child that
    inherited the variables must not pet the parent's watchdog.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def watchdog_loop(interval: float | None = None) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` (default: watchdog_interval()).

    It runs as a task on the agent's event loop on purpose: if the loop stalls
    (a blocking call, a deadlock), the pings stop and systemd restarts the
    agent.  Returns at once when there is no watchdog; cancel it to stop.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
