"""Logging set-up: one readable line per record, or one JSON object with --log-format json.

The access log writes a line per request, so the handler is built to be
cheap: no caller lookup, no thread/process names, and a buffered stream that
is flushed for every warning and otherwise a few times a second (by
``flush_loop``), instead of one write() system call per line.

Nothing a client sends can forge a line or leak a secret: every record's
message (every logger's, libraries' included) and every access-log value has
its control characters escaped (``clean``), the agent's token is replaced by
``<token>`` wherever it appears (``redact``), a traceback's lines are indented
so that only a record's first line starts at column 0, and the HTTP parser's
errors (whose text quotes the raw request, Authorization header included)
become one short WARNING line without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone

from aiohttp.http_exceptions import HttpProcessingError

FLUSH_INTERVAL = 0.2

# C0, DEL, C1 and the Unicode line/paragraph separators: what can end or hide a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_token: str | None = None
TOKEN_MARK = "<token>"


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def clean(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x00``, ``\\u2028``)
    and the token as ``<token>``.  Runs on every access line: str.isprintable() is one
    C scan, and almost every value passes it and comes back as it is."""
    if not text.isprintable():
        text = _CONTROL.sub(_escape, text)
    if _token is not None and _token in text:
        text = text.replace(_token, TOKEN_MARK)
    return text


def redact(text: str) -> str:
    """``text`` with the token written ``<token>``."""
    return text.replace(_token, TOKEN_MARK) if _token is not None and _token in text else text


def set_token(token: str) -> None:
    """The secret that is never written to the log, whatever a client puts in a URL."""
    global _token
    _token = token or None


class SafeRecords(logging.Filter):
    """On the handler, so every logger's records pass it (aiohttp's and librados's too).

    The message is rendered once here (msg % args), cleaned, and put back without
    args, so the formatter does not render it again.  aiohttp's "Error handling
    request" for a request its parser refused carries the parser's exception, whose
    text quotes the raw header line (a token with a NUL after it, a folded
    Authorization header): that becomes one WARNING line naming only the error class.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and record.name.startswith("aiohttp"):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg, record.args = "refused a malformed HTTP request from %s: %s (%s)", (
                remote or "an unknown address", type(exc).__name__, getattr(exc, "code", 400))
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:     # a bad request is not the agent's error
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        try:
            message = record.getMessage()
        except Exception:            # a bad format string: let the handler report it
            return True
        record.msg, record.args = clean(message), None
        return True


def _indent(text: str) -> str:
    """A traceback's lines, each behind a marker, so none of them reads as a record:
    only a record's first line starts at column 0.  Escaped too: an exception's text
    can quote what a client sent."""
    return "\n".join(" | " + clean(line) for line in text.splitlines())


class TextFormatter(logging.Formatter):
    def formatException(self, ei) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(stack_info)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("http", "audit"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            # json.dumps escapes its newlines (no line can be forged): kept readable,
            # only the token is taken out.
            out["exception"] = redact(self.formatException(record.exc_info))
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
    path = clean(path)           # the decoded path: %0A is a newline here
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


def route_access(method: str, path: str):
    """access() for a route whose method and logged path never change (no variable
    part: only its own path matches it), as ``write(status, ms, request)``.  The
    line's middle (method, escaped path) is built once here, so a request pays for
    a time stamp, one f-string and the write."""
    path = clean(path)
    middle = f" INFO node_agent.access: {method} {path} "

    def write(status: int, ms: float, request) -> None:
        if not _access.isEnabledFor(_INFO):
            return
        handler = _handler
        if handler is None or _format == "json":
            access(method, path, status, ms, None, request.remote if wants_remote else None)
            return
        line = f"{_timestamp(time.time())}{middle}{status} {ms:.1f}ms\n"
        with handler.lock:
            handler.stream.write(line)
    return write


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
        _handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _handler.addFilter(SafeRecords())
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
