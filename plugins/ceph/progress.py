"""Progress from binding threads to a job, and cancellation back into the binding.

librbd calls a progress callback from the thread running the operation; the
job's ``progress`` belongs to the event loop, so updates travel through
``call_soon_threadsafe``.  A callback that returns a negative errno makes librbd
abort the operation (``rbd.OperationCanceled``): that is how a cancelled or
timed-out job stops a flatten or a removal instead of leaving it running.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

ECANCELED = 125


class Progress:
    def __init__(self, job: Any, loop: asyncio.AbstractEventLoop | None = None,
                 lo: float = 0.0, hi: float = 100.0, message: str = "") -> None:
        self.job = job
        self.loop = loop if loop is not None or job is None else asyncio.get_running_loop()
        self.lo, self.hi, self.message = lo, hi, message
        self.cancelled = False
        self._last = (-1.0, 0.0)
        self._parent: Progress | None = None

    def stage(self, lo: float, hi: float, message: str) -> "Progress":
        """A sub-range of this progress (lo..hi of the whole), sharing its cancel flag."""
        p = Progress(self.job, self.loop, lo, hi, message)
        p._parent = self
        p.report(0, 1)
        return p

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled or (self._parent is not None and self._parent.is_cancelled)

    def cancel(self) -> None:
        self.cancelled = True

    def report(self, done: float, total: float, message: str | None = None, **extra: Any) -> None:
        """Thread-safe; throttled to one update per 0.2 s unless the percent jumps by 5."""
        if self.job is None or self.loop is None:
            return
        frac = min(max(done / total, 0.0), 1.0) if total else 1.0
        pct = self.lo + (self.hi - self.lo) * frac
        now = time.monotonic()
        last_pct, last_t = self._last
        if pct < 100 and pct - last_pct < 5 and now - last_t < 0.2:
            return
        self._last = (pct, now)
        try:
            self.loop.call_soon_threadsafe(self._emit, pct, message or self.message, extra)
        except RuntimeError:   # the loop is closed: the agent is stopping
            pass

    def _emit(self, pct: float, message: str, extra: dict) -> None:
        try:
            self.job.progress(pct, message, **extra)
        except Exception:
            pass

    def rbd_callback(self, done: int, total: int) -> int:
        """For librbd's on_progress: report, or abort when cancelled."""
        if self.is_cancelled:
            return -ECANCELED
        self.report(done, total)
        return 0
