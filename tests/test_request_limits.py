"""Request limits (issue 13.7) against a real agent: a declared body over
max_body_bytes is refused from its header, before any of it is awaited."""

from __future__ import annotations

import json
import socket
import time

LIMIT = 4096


def headers_only(agent, method: str, path: str, length: int, token: bool = True) -> socket.socket:
    """A request whose headers announce ``length`` bytes of body, none of which is sent."""
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {length}\r\n".encode()
              + (f"Authorization: OAuth {agent.token}\r\n".encode() if token else b"") + b"\r\n")
    return s


def read_reply(s: socket.socket, timeout: float) -> tuple[int, dict, bytes, float]:
    """Status, headers, body and seconds until the whole reply was there."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body, time.monotonic() - t0


async def test_declared_body_over_the_limit_is_413_at_once(agent_factory):
    agent = agent_factory({"server": {"max_body_bytes": LIMIT},
                           "host": {"allow_run_shell": True}}).start()
    for method, path in (("PUT", "/v1/host/actions"), ("POST", "/v1/baremetal/chassis")):
        s = headers_only(agent, method, path, LIMIT + 1)
        with s:
            status, headers, body, took = read_reply(s, timeout=5)
            assert status == 413, body
            assert took < 1.0, took                   # from the header: no wait for the body
            err = json.loads(body)["error"]
            assert err["code"] == "SYS.1013" and str(LIMIT) in err["description"]
            # the unread body is not awaited either: the agent ends the connection
            assert headers.get("connection", "").lower() == "close"
            s.settimeout(5)
            assert s.recv(1) == b""
    # at the limit it is read as usual (and is then a body like any other)
    body = json.dumps({"kvmRunShell": {"script": "true"}}).encode()
    s = headers_only(agent, "PUT", "/v1/host/actions", len(body))
    with s:
        s.sendall(body)
        status, _, reply, _ = read_reply(s, timeout=10)
    assert status == 202, reply
    # a declared size past the limit with the whole body sent: still 413, nothing run
    big = json.dumps({"kvmRunShell": {"script": "true #" + "x" * LIMIT}}).encode()
    s = headers_only(agent, "PUT", "/v1/host/actions", len(big))
    with s:
        s.sendall(big)
        status, _, reply, _ = read_reply(s, timeout=10)
    assert status == 413, reply
    # chunked, no size declared: 413 once the limit is passed, with the stream left open
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    with s:
        chunk = b'{"kvmRunShell": {"script": "' + b"x" * (LIMIT + 100)
        s.sendall(b"PUT /v1/host/actions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  + f"Authorization: OAuth {agent.token}\r\n\r\n".encode()
                  + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, headers, _, took = read_reply(s, timeout=5)
        assert status == 413 and took < 1.0 and headers.get("connection", "").lower() == "close"
        s.settimeout(5)
        assert s.recv(1) == b""
    # no token: 401 at once as before, the declared size tells nothing
    s = headers_only(agent, "PUT", "/v1/host/actions", 10 * LIMIT, token=False)
    with s:
        status, _, _, took = read_reply(s, timeout=5)
    assert status == 401 and took < 1.0
    agent.stop()
    log = agent.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert log.count(" 413 ") == 4, log
