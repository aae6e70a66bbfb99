"""The request path's cheaper parts keep the old behaviour: metrics exposition, config."""

from __future__ import annotations

import random
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from agent.config import ConfigError, load_config
from agent.metrics import BUCKETS, Metrics


def _reference() -> tuple[CollectorRegistry, callable]:
    """prometheus_client's own Counter and Histogram, as the agent used them before."""
    r = CollectorRegistry(auto_describe=True)
    requests = Counter("node_agent_http_requests", "HTTP requests by route and status",
                       ["method", "route", "status"], registry=r)
    latency = Histogram("node_agent_http_request_seconds", "HTTP request latency",
                        ["method", "route"], buckets=BUCKETS, registry=r)

    def observe(method: str, route: str, status: int, seconds: float) -> None:
        requests.labels(method, route, str(status)).inc()
        latency.labels(method, route).observe(seconds)
    return r, observe


def _without_created(text: str) -> str:
    return re.sub(r"(?m)^(\S*_created\{.*\}) \S+$", r"\1 T", text)


@pytest.mark.parametrize("render", [generate_latest, generate_openmetrics])
def test_request_metrics_expose_what_prometheus_client_would(render):
    ref, ref_observe = _reference()
    ours = Metrics()
    rnd = random.Random(7)
    values = [0.0, 0.0005, 0.001, 0.00049999, 1.0, 2.5, 10.0, 11.0, 1e-9]
    values += [rnd.expovariate(300) for _ in range(3000)] + [rnd.expovariate(0.3) for _ in range(100)]
    for v in values:
        key = (rnd.choice(["GET", "PUT"]), rnd.choice(["/v1/host/ping", "/v1/x/{uuid}", "unmatched"]),
               rnd.choice([200, 202, 401, 404]))
        ref_observe(*key, v)
        ours.observe_request(*key, v)
    ours_text = render(ours.registry).decode()
    # The agent's registry also has its gauges: compare the request families only.
    ours_text = ours_text.split("# HELP node_agent_jobs")[0]
    ref_text = render(ref).decode()
    if render is generate_openmetrics:
        ref_text = ref_text.replace("# EOF\n", "")
    assert _without_created(ours_text) == _without_created(ref_text)


def test_event_loop_setting(tmp_path):
    from agent.cli import _loop_factory
    cfg = tmp_path / "a.toml"
    cfg.write_text("")
    assert load_config(cfg, {}).server.event_loop == "asyncio"   # the default: less memory
    assert _loop_factory("asyncio") is None
    cfg.write_text('[server]\nevent_loop = "uvloop"\n')
    assert load_config(cfg, {}).server.event_loop == "uvloop"
    import uvloop
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    cfg.write_text('[server]\nevent_loop = "fastest"\n')
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(cfg, {})
