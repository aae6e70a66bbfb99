"""Every operation of /v1/openapi.json without the token: no token, a wrong one and
near misses of the right one are all 401 and change nothing, except the routes
that are public by design (the document marks them `security: []`)."""

from __future__ import annotations

import asyncio
import json
import re

# Public by design: liveness, and what firmware, installers and console users fetch
# with a one-time token (or a MAC) in the URL instead of the API token.
PUBLIC = {
    ("get", "/v1/health"),
    ("get", "/v1/backup-storage/ceph/{uuid}/exports/{imageUuid}"),
    ("get", "/v1/backup-storage/exports/{token}"),
    ("post", "/v1/baremetal/inspection/{token}"),
    ("get", "/v1/baremetal/consoles/{token}"),
    ("get", "/v1/baremetal/install/{token}"),
    ("post", "/v1/baremetal/install/{token}/done"),
    ("get", "/v1/baremetal/ipxe/{token}"),
    ("get", "/v1/baremetal/ipxe/mac/{mac}"),
    ("get", "/v1/baremetal/boot/{family}/{name}"),
}


PARSER_REFUSES = {"trailing vertical tab", "trailing form feed"}


def near_misses(token: str) -> dict[str, str | None]:
    def flip(c: str) -> str:
        return "A" if c != "A" else "B"
    return {
        "none": None,
        "empty": "",
        "scheme only": "OAuth",
        "wrong": "OAuth wrong-token",
        "no scheme": token,
        "basic scheme": f"Basic {token}",
        "lower-case scheme": f"oauth {token}",
        "prefix": f"OAuth {token[:-1]}",
        "first char changed": f"OAuth {flip(token[0])}{token[1:]}",
        "last char changed": f"OAuth {token[:-1]}{flip(token[-1])}",
        "one more char": f"OAuth {token}x",
        "upper-cased": f"OAuth {token.upper()}",
        "second word": f"OAuth {token} x",
        # Python's str.strip() also strips these; HTTP's optional whitespace is
        # only space and tab, which the HTTP parser itself removes.
        "trailing no-break space": f"OAuth {token}\xa0",
        "trailing vertical tab": f"OAuth {token}\x0b",
        "trailing form feed": f"OAuth {token}\x0c",
        "token twice": f"OAuth {token}{token}",
    }


async def raw_request(port: int, method: str, target: str, authorization: str | None,
                      body: dict | None) -> tuple[int, str]:
    """One request on its own connection, its header bytes as given: an HTTP client
    library refuses to send the control characters that near misses are made of."""
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if authorization is not None:
        head += f"Authorization: {authorization}\r\n"
    if data:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + data)
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.decode(errors="replace")


def request_body(op: dict) -> dict | None:
    """The smallest body of the right shape, so a broken auth would reach the action."""
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if not schema:
        return None
    if "oneOf" in schema:
        return {schema["oneOf"][0]["required"][0]: {}}
    return {"params": {}}


async def test_every_operation_needs_the_token(agent_factory, http):
    agent = agent_factory().start()
    async with http.get(agent.url + "/v1/openapi.json", headers=agent.headers) as r:
        doc = await r.json()
    token = agent.token
    variants = near_misses(token)
    operations = [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert len(operations) > 50
    public = {(m, p) for m, p, op in operations if op.get("security") == []}
    assert public == PUBLIC, "routes public without the token changed"
    tried, wrong = 0, []
    for method, path, op in operations:
        if (method, path) in public:
            continue
        assert "401" in op["responses"], (method, path)
        target = re.sub(r"{\w+}", "0" * 32, path)
        for name, value in variants.items():
            status, text = await raw_request(agent.port, method.upper(), target, value,
                                             request_body(op))
            tried += 1
            # A control character in a header is refused by the HTTP parser (400)
            # before any route is reached; every other near miss gets to the guard.
            refused = status == 400 and name in PARSER_REFUSES and "Invalid header" in text
            if not refused and (status != 401 or '"AUTH.1001"' not in text):
                wrong.append((method, path, name, status, text[:200]))
    # URLs no route serves are 401 too: no probing of what exists without the token.
    for target in ("/v1/nothing-here", "/v1/vm-instances/x/y/z", "/v1/%0Aforged"):
        status, text = await raw_request(agent.port, "GET", target, variants["prefix"], None)
        tried += 1
        if status != 401:
            wrong.append(("get", target, "prefix", status, text[:200]))
    assert not wrong, f"{len(wrong)} of {tried} requests were not 401: {wrong[:10]}"
    assert tried > 50 * len(variants)

    # Nothing changed: no job was created by any of them.
    async with http.get(agent.url + "/v1/api-jobs", params={"replyWithCount": "true"},
                        headers=agent.headers) as r:
        jobs = await r.json()
    assert r.status == 200 and jobs["inventories"] == [], jobs
    # And the right token still works (the sweep did not lock anything).
    async with http.get(agent.url + "/v1/host/ping", headers=agent.headers) as r:
        assert r.status == 200


async def test_public_routes_answer_without_the_token(agent_factory, http):
    """security: [] is true: the public routes never answer 401 for a missing token."""
    agent = agent_factory().start()
    async with http.get(agent.url + "/v1/openapi.json", headers=agent.headers) as r:
        doc = await r.json()
    for method, path in sorted(PUBLIC):
        op = doc["paths"][path][method]
        assert "401" not in op["responses"], (method, path)
        url = agent.url + re.sub(r"{\w+}", "0" * 32, path)
        async with http.request(method.upper(), url) as r:
            assert r.status != 401, (method, path, r.status)
            if path == "/v1/health":
                assert r.status == 200
