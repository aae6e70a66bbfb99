"""Nothing a client sends can forge a log line or put the token in the log (issues 10.2,
10.3, 13.8), against real agent processes, in the text and the JSON log formats."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
FORGED = "2000-01-01 00:00:00,000 INFO node_agent.audit: forged"


def raw_request(agent, data: bytes, timeout: float = 5.0) -> bytes:
    """One request on its own connection, written as given (no client fixes it up)."""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def get(path: bytes, *headers: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + \
        b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def auth(agent) -> bytes:
    return b"Authorization: OAuth " + agent.token.encode()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def log_lines(agent) -> list[str]:
    agent.stop()                      # the log is buffered: stopping flushes it
    return [line for line in agent.log().splitlines()
            if not line.startswith("node-agent")]      # the start-up notes on stderr


def record_starts(fmt: str, lines: list[str]) -> list[str]:
    """The lines that read as the start of a record: every line, in either format."""
    if fmt == "json":
        return [json.loads(line)["message"] for line in lines]
    return [line for line in lines if TEXT_LINE.match(line)]


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_encoded_control_characters_never_start_a_line(agent_factory, fmt):
    agent = agent_factory({"log": {"format": fmt}}).start()
    quoted = FORGED.replace(" ", "%20").encode()
    for path, with_token, status in [
            (b"/v1/pci-devices/x%0A" + quoted, False, 401),           # the reproduction
            (b"/v1/pci-devices/x%0D%0A" + quoted, True, 400),         # routed: the handler's 400
            (b"/v1/nothing-here/x%0A" + quoted, True, 404),           # unrouted
            (b"/x%0A" + quoted, True, 404),
            (b"/v1/pci-devices/x%E2%80%A8" + quoted, True, 400),      # U+2028, a line break to some readers
            (b"/v1/pci-devices/x%00%1B[2J" + quoted, True, 400),      # NUL, a terminal escape
            (b"/v1/host/ping?q=%0A" + quoted, True, 200)]:
        reply = raw_request(agent, get(path, *([auth(agent)] if with_token else [])))
        assert status_of(reply) == status, (path, reply)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"application/json" in head, reply            # the agent's own error body, not aiohttp's text
        if status == 404:
            assert json.loads(body)["error"]["code"] == "SYS.1004"
    # an encoded newline in an unrouted URL gets the agent's JSON 404 (aiohttp's was text)
    reply = raw_request(agent, get(b"/x%0Ay", auth(agent)))
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "SYS.1004"

    lines = log_lines(agent)
    starts = record_starts(fmt, lines)
    assert len(starts) == len(lines), [l for l in lines if l not in starts]
    assert not any("node_agent.audit" in line and "forged" in line and line.startswith("2000") for line in starts)
    assert not [l for l in lines if re.search("[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]", l)]
    access = [s for s in starts if "node_agent.access" in s or (fmt == "json" and "forged" in s)]
    forged = [s for s in (starts if fmt == "json" else access) if "forged" in s]
    assert len(forged) == 4, starts               # the routed ones: path escaped, one line each
    assert all(re.search(r"x(\\n|\\r\\n|\\u2028|\\x00\\x1b\[2J)2000-01-01", s) for s in forged), forged
    if fmt == "text":
        assert "GET /v1/pci-devices/x\\n2000-01-01 00:00:00,000 INFO node_agent.audit: forged 401" in "\n".join(lines)
        assert any("GET /<unrouted> 404" in s for s in access), access
        assert any("GET /v1/<unrouted> 404" in s for s in access), access
        assert any("x\\u2028" in s for s in access) and any("x\\x00\\x1b[2J" in s for s in access), access
    else:
        http = [json.loads(l)["http"] for l in lines if "http" in json.loads(l)]
        assert {"method": "GET", "path": "/v1/pci-devices/x\\n" + FORGED, "status": 401} \
            .items() <= next(h for h in http if h["status"] == 401).items()


@pytest.mark.parametrize("parser", ["c", "python"])
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_malformed_authorization_header_is_one_short_warning(agent_factory, parser, fmt):
    """aiohttp's parser refuses these; its error text quotes the raw header, token included,
    and it logged that at ERROR with a traceback."""
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {}
    agent = agent_factory({"log": {"format": fmt, "level": "DEBUG"}}, env=env).start()
    token = agent.token.encode()
    bad = [get(b"/v1/host/ping", b"Authorization: OAuth " + token + b"\x00"),     # NUL after the token
           get(b"/v1/host/ping", b"Authorization: OAuth", b" " + token),          # folded on a second line
           get(b"/v1/host/ping", b"Authorization: OAuth " + token + b"\x7f"),
           get(b"/v1/host/ping", b"X-Secret\x01: " + token)]
    for data in bad:
        reply = raw_request(agent, data)
        assert status_of(reply) == 400, reply
    assert status_of(raw_request(agent, get(b"/v1/host/ping", auth(agent)))) == 200
    lines = log_lines(agent)
    assert agent.token not in "\n".join(lines)
    if fmt == "json":
        records = [json.loads(l) for l in lines]
    else:
        assert all(TEXT_LINE.match(l) for l in lines), lines           # no traceback lines
        records = [{"level": l.split()[2], "logger": l.split()[3].rstrip(":"), "message": l} for l in lines]
    parser_lines = [r for r in records if r["logger"].startswith("aiohttp")]
    assert len(parser_lines) == len(bad), parser_lines
    assert all(r["level"] == "WARNING" and "malformed HTTP request from 127.0.0.1" in r["message"]
               and len(r["message"]) < 200 and "exception" not in r for r in parser_lines), parser_lines
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records


async def test_token_never_logged_whatever_the_url(agent_factory):
    """The manual's logout is DELETE /v1/accounts/sessions/<session>, and the session is
    the agent's token; a client may put it anywhere in a URL."""
    agent = agent_factory({"log": {"level": "DEBUG"}}).start()
    token = agent.token
    enc = "".join(f"%{b:02X}" for b in token.encode())               # the same token, percent-encoded
    cases = [("DELETE", f"/v1/accounts/sessions/{token}", True, 404),
             ("DELETE", f"/v1/accounts/sessions/{token}", False, 401),
             ("GET", f"/{token}", True, 404),
             ("GET", f"/{enc}", True, 404),
             ("GET", f"/v1/{token}/x", True, 404),
             ("GET", f"/v1/vm-instances/{token}", True, 404),         # not a uuid: unrouted
             ("GET", f"/v1/pci-devices/x{enc}y", True, None),
             ("GET", f"/v1/pci-devices/{token}", False, 401),
             ("GET", f"/v1/host/ping?session={token}", True, 200),
             ("POST", f"/v1/host/ping/{token}", True, 404),
             ("PUT", "/v1/host/ping", True, 405)]
    for method, path, with_token, status in cases:
        data = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n".encode() \
            + ((auth(agent) + b"\r\n") if with_token else b"") + b"\r\n"
        reply = raw_request(agent, data)
        if status is not None:
            assert status_of(reply) == status, (method, path, reply)
    lines = log_lines(agent)
    text = "\n".join(lines)
    assert token not in text
    access = [l.split(": ", 1)[1] for l in lines if "node_agent.access" in l]
    assert f"DELETE /v1/<unrouted> 404" in "\n".join(access)
    assert f"DELETE /v1/accounts/sessions/{token}" not in text
    assert "GET /<unrouted> 404" in "\n".join(access)
    assert "PUT /v1/host/ping 405" in "\n".join(access)        # a known path: its route
    assert any(a.startswith("GET /v1/pci-devices/<token> 401 ") for a in access), access
    assert any(a.startswith("GET /v1/pci-devices/x<token>y ") for a in access), access


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_logger_is_escaped_and_redacted(fmt, capfd):
    """Not only the access log: a record of any logger (a library's too), its arguments
    and its traceback.  logs.setup in a child process, as the agent sets it up."""
    import subprocess
    import sys
    code = f"""
import logging
from agent import logs
logs.setup({fmt!r}, "DEBUG")
logs.set_token("s3cr3t-t0ken-value")
try:
    raise ValueError("bad\\n{FORGED} s3cr3t-t0ken-value")
except ValueError:
    logging.getLogger("librados.like").exception("call failed for %s", "x\\r\\n{FORGED}")
logging.getLogger("aiohttp.client").warning("url %s", "http://h/\\u2028{FORGED}?t=s3cr3t-t0ken-value")
logs.flush()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=str(__import__("agentproc").REPO))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "s3cr3t-t0ken-value" not in out.stderr
    if fmt == "json":
        records = [json.loads(l) for l in lines]
        assert len(records) == 2
        assert records[0]["message"] == f"call failed for x\\r\\n{FORGED}"
        assert "<token>" in records[0]["exception"] and "<token>" in records[1]["message"]
        assert records[1]["message"] == f"url http://h/\\u2028{FORGED}?t=<token>"
    else:
        starts = [l for l in lines if TEXT_LINE.match(l)]
        assert len(starts) == 2, lines
        assert all(l.startswith(" | ") for l in lines if l not in starts), lines
        assert starts[0].endswith(f"librados.like: call failed for x\\r\\n{FORGED}")
        # the exception's own newline stays a line break, behind the marker
        assert " |   File" in out.stderr and " | ValueError: bad" in lines and f" | {FORGED} <token>" in lines
        assert starts[1].endswith(f"aiohttp.client: url http://h/\\u2028{FORGED}?t=<token>")
