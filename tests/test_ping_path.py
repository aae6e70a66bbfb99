"""The fast path of a route without a variable part (ping, issue 10.8): its access line
and its metrics, built once per route, say exactly what the general path says, in both
log formats, against a real agent process."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

TEXT_ACCESS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO node_agent\.access: "
                         r"GET /v1/host/ping (200|401) \d+\.\dms$")


def fetch(agent, path: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"OAuth {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(agent.url + path, headers=headers),
                                    timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_ping_access_lines_and_metrics(agent_factory, fmt):
    agent = agent_factory({"log": {"format": fmt}}).start()
    for _ in range(3):
        status, body = fetch(agent, "/v1/host/ping", agent.token)
        assert status == 200 and set(json.loads(body)) == {"hostUuid", "version", "uptime"}
    status, body = fetch(agent, "/v1/host/ping", "wrong")
    assert status == 401 and json.loads(body)["error"]["code"] == "AUTH.1001"
    status, text = fetch(agent, "/metrics", agent.token)
    assert status == 200
    samples = [s for fam in text_string_to_metric_families(text.decode()) for s in fam.samples]

    def value(name, **labels):
        found = [s.value for s in samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("node_agent_http_requests_total", method="GET", route="/v1/host/ping", status="200") == 3
    assert value("node_agent_http_requests_total", method="GET", route="/v1/host/ping", status="401") == 1
    assert value("node_agent_http_request_seconds_count", method="GET", route="/v1/host/ping") == 4
    assert value("node_agent_http_request_seconds_bucket", method="GET", route="/v1/host/ping",
                 le="+Inf") == 4

    agent.stop()                     # the log is buffered: stopping flushes it
    lines = [l for l in agent.log().splitlines() if "node_agent.access" in l and "/v1/host/ping" in l]
    assert agent.token not in "\n".join(lines)
    if fmt == "text":
        assert all(TEXT_ACCESS.match(l) for l in lines), lines
        statuses = [TEXT_ACCESS.match(l).group(1) for l in lines]
    else:
        records = [json.loads(l) for l in lines]
        for r in records:
            assert r["level"] == "INFO" and r["logger"] == "node_agent.access"
            assert r["http"]["method"] == "GET" and r["http"]["path"] == "/v1/host/ping"
            assert r["http"]["remote"] == "127.0.0.1" and r["http"]["job"] is None
            assert re.fullmatch(rf"GET /v1/host/ping {r['http']['status']} \d+\.\dms", r["message"])
        statuses = [str(r["http"]["status"]) for r in records]
    # The start-up check's ping (agentproc waits for it) may be among them.
    assert statuses.count("200") >= 3 and statuses.count("401") >= 1, statuses
