"""How ``node-agent call`` shows a running job: a bar on a terminal, lines otherwise.

Everything goes to stderr, so stdout keeps only the result's JSON.
"""

from __future__ import annotations

import shutil
from typing import Any, TextIO

BAR_WIDTH = 30


def cancel_hint(job_uuid: str) -> str:
    return (f"job {job_uuid} goes on running on the agent; cancel it with:\n"
            f"  node-agent call DELETE /v1/api-jobs/{job_uuid}")


class JobProgressView:
    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.job_uuid: str | None = None
        self._last: tuple | None = None
        self._drawn = False

    def submitted(self, job_uuid: str) -> None:
        self.job_uuid = job_uuid
        self._line(f"job {job_uuid} submitted (Ctrl-C stops waiting, not the job)")

    def progress(self, p: dict[str, Any]) -> None:
        percent, message = p.get("percent"), p.get("message") or ""
        if (percent, message) == self._last:
            return
        self._last = (percent, message)
        pct = "   ?  " if percent is None else f"{float(percent):5.1f}%"
        if not self.tty:
            self._line(f"job {self.job_uuid}: {pct.strip()} {message}".rstrip())
            return
        filled = 0 if percent is None else round(BAR_WIDTH * min(max(float(percent), 0), 100) / 100)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        text = f"[{bar}] {pct} {message}"
        width = shutil.get_terminal_size((80, 24)).columns
        # \r and erase-to-end: the bar is redrawn in place, never wrapped.
        self.stream.write("\r\x1b[K" + text[:max(width - 1, BAR_WIDTH + 8)])
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the bar's line before anything else is printed."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def interrupted(self) -> None:
        self.finish()
        if self.job_uuid is not None:
            self._line("node-agent call: interrupted; " + cancel_hint(self.job_uuid))
        else:
            self._line("node-agent call: interrupted before the agent named a job; "
                       "GET /v1/api-jobs lists the running ones")

    def _line(self, text: str) -> None:
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()
