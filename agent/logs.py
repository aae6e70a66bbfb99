"""Logging set-up: one readable line per record, or one JSON object with --log-format json.

The access log writes a line per request, so the handler is built to be
cheap: no caller lookup, no thread/process names, and a buffered stream that
is flushed for every warning and otherwise a few times a second (by
``flush_loop``), instead of one write() system call per line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

FLUSH_INTERVAL = 0.2


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("http", "audit"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class BufferedStreamHandler(logging.StreamHandler):
    """StreamHandler that flushes on warnings, at exit and on a timer, not per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)


_handler: BufferedStreamHandler | None = None
_format = "text"
wants_remote = False     # only JSON lines carry the client's address: text ones skip looking it up
_access = logging.getLogger("node_agent.access")
_second = (0, "")
_MS = tuple(f",{i:03d}" for i in range(1000))   # asctime's ",mmm", preformatted
_INFO = logging.INFO


def _timestamp(now: float) -> str:
    """asctime as logging.Formatter writes it, with the second's text cached."""
    global _second
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole)))
    return _second[1] + _MS[int((now - whole) * 1000)]


def access(method: str, path: str, status: int, ms: float, job: str | None, remote: str | None) -> None:
    """One access line per request, written straight to the buffered stream.

    The same line as the logging module would write (logger node_agent.access,
    INFO), without a LogRecord and a Formatter per request: ping is the
    agent's hottest path and the logging machinery was most of its cost.
    """
    if not _access.isEnabledFor(_INFO):
        return
    handler = _handler
    if handler is None:          # not set up by serve(): go through logging
        _access.info("%s %s %d %.1fms%s", method, path, status, ms, f" job={job}" if job else "")
        return
    now = time.time()
    if _format == "json":
        line = json.dumps({"time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
                           "level": "INFO", "logger": "node_agent.access",
                           "message": f"{method} {path} {status} {ms:.1f}ms" + (f" job={job}" if job else ""),
                           "http": {"method": method, "path": path, "status": status,
                                    "ms": round(ms, 2), "job": job, "remote": remote}}) + "\n"
    elif job:
        line = f"{_timestamp(now)} INFO node_agent.access: {method} {path} {status} {ms:.1f}ms job={job}\n"
    else:
        # One f-string for the whole line: this runs for every request.
        line = f"{_timestamp(now)} INFO node_agent.access: {method} {path} {status} {ms:.1f}ms\n"
    with handler.lock:
        handler.stream.write(line)


def setup(fmt: str = "text", level: str = "INFO") -> None:
    global _handler, _format, wants_remote
    _format = fmt
    wants_remote = fmt == "json"
    logging._srcfile = None          # no stack walk per record to find the caller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = open(os.dup(sys.stderr.fileno()), "w", buffering=1 << 16,
                  encoding="utf-8", errors="replace")
    _handler = BufferedStreamHandler(stream)
    if fmt == "json":
        _handler.setFormatter(JsonFormatter())
    else:
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True


def flush() -> None:
    if _handler is not None:
        _handler.flush()


async def flush_loop() -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        flush()
