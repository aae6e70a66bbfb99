"""Prometheus metrics of the agent: requests, jobs, delivery backlogs, host load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .context import AgentContext

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def read_host_load(root: str = "/") -> dict[str, float]:
    """CPU seconds by mode and memory from /proc; blocking, so run off the loop."""
    out: dict[str, float] = {}
    hz = 100.0   # USER_HZ is 100 on every Linux architecture we run on
    with open(f"{root}/proc/stat") as f:
        fields = f.readline().split()[1:]
    for mode, value in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), fields):
        out[f"cpu_{mode}"] = int(value) / hz
    with open(f"{root}/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
    out["mem_total"] = mem.get("MemTotal", 0)
    out["mem_available"] = mem.get("MemAvailable", 0)
    with open(f"{root}/proc/loadavg") as f:
        out["load1"] = float(f.read().split()[0])
    return out


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("node_agent_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("node_agent_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=BUCKETS, registry=r)
        self.jobs = Gauge("node_agent_jobs", "Jobs known to the agent by state", ["state"], registry=r)
        self.backlog = Gauge("node_agent_outbox_backlog", "Undelivered webhooks and events",
                             ["kind"], registry=r)
        self.delivered = Gauge("node_agent_outbox_delivered", "Deliveries since start", ["kind"],
                               registry=r)
        self.host_cpu = Gauge("node_agent_host_cpu_seconds", "Host CPU time by mode", ["mode"],
                              registry=r)
        self.host_mem = Gauge("node_agent_host_memory_bytes", "Host memory", ["kind"], registry=r)
        self.host_load = Gauge("node_agent_host_load1", "Host one-minute load average", registry=r)
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # labels() hashes and locks on every call: keep the children we made.
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)),
                        self.latency.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def render(self, ctx: "AgentContext") -> bytes:
        for state, n in ctx.jobs.counts.items():
            self.jobs.labels(state).set(n)
        for kind, n in ctx.outbox.backlog.items():
            self.backlog.labels(kind).set(n)
        for kind, n in ctx.outbox.delivered.items():
            self.delivered.labels(kind).set(n)
        load = await ctx.runner("core").call(read_host_load, timeout=5)
        for key, value in load.items():
            if key.startswith("cpu_"):
                self.host_cpu.labels(key[4:]).set(value)
        self.host_mem.labels("total").set(load["mem_total"])
        self.host_mem.labels("available").set(load["mem_available"])
        self.host_load.set(load["load1"])
        return generate_latest(self.registry)
