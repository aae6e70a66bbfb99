"""Prometheus metrics of the agent: requests, jobs, delivery backlogs, host load."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .lazy import lazy_import

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .context import AgentContext

log = logging.getLogger("node_agent.metrics")

# Imported on the first scrape: prometheus_client's package imports its HTTP exposition
# servers (http.server, wsgiref, gzip...), ~1 MB of RSS an idle agent does not need.
prometheus_client = lazy_import("prometheus_client")

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def read_host_load() -> dict[str, float]:
    """CPU seconds by mode, memory and load (psutil); blocking, so run off the loop."""
    import os

    import psutil   # lazy: only /metrics needs it
    cpu = psutil.cpu_times()
    out = {f"cpu_{mode}": float(getattr(cpu, mode, 0.0))
           for mode in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")}
    mem = psutil.virtual_memory()
    out["mem_total"], out["mem_available"] = float(mem.total), float(mem.available)
    out["load1"] = os.getloadavg()[0]
    return out


class RequestMetrics:
    """node_agent_http_requests (counter) and node_agent_http_request_seconds (histogram),
    exposed sample for sample as prometheus_client's Counter and Histogram would.

    Why not those classes: every request pays for them (a lock per value, a loop over
    the buckets). Here a request is two dict look-ups, a bisect and three additions.
    Observed and collected on the event loop only, so no lock is needed.
    """

    def __init__(self) -> None:
        self.bounds = tuple(float(b) for b in BUCKETS) + (float("inf"),)
        self._le: tuple[str, ...] | None = None   # the "le" labels, on the first scrape
        # (method, route, status) -> [count, created]
        self.counts: dict[tuple[str, str, int], list[float]] = {}
        # (method, route) -> [count of each bucket (not cumulative)..., sum, created]
        self.latency: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self.counts.get((method, route, status))
        if counter is None:
            counter = self.counts[(method, route, status)] = [0.0, time.time()]
        counter[0] += 1.0
        hist = self.latency.get((method, route))
        if hist is None:
            hist = self.latency[(method, route)] = [0.0] * len(self.bounds) + [0.0, time.time()]
        # The first bucket whose bound is >= the value ("le"), as Histogram.observe finds it.
        hist[bisect_left(self.bounds, seconds)] += 1.0
        hist[-2] += seconds

    def bind(self, method: str, route: str) -> Callable[[int, float], None]:
        """observe() for one route, as ``observe(status, seconds)``: its histogram and its
        200 counter are found once, on first use (a route never requested still has no
        series), instead of two tuple keys hashed per request."""
        bounds, counts, latency, general = self.bounds, self.counts, self.latency, self.observe
        hist: list[float] | None = None
        ok: list[float] | None = None

        def observe(status: int, seconds: float) -> None:
            nonlocal hist, ok
            if status != 200:
                general(method, route, status, seconds)
                return
            if ok is None:
                ok = counts.setdefault((method, route, 200), [0.0, time.time()])
                hist = latency.setdefault((method, route),
                                          [0.0] * len(bounds) + [0.0, time.time()])
            ok[0] += 1.0
            hist[bisect_left(bounds, seconds)] += 1.0
            hist[-2] += seconds
        return observe

    @property
    def le(self) -> tuple[str, ...]:
        if self._le is None:
            self._le = tuple(prometheus_client.utils.floatToGoString(b) for b in self.bounds)
        return self._le

    def describe(self) -> Iterator[Metric]:
        metric = prometheus_client.metrics_core.Metric
        yield metric("node_agent_http_requests", "HTTP requests by route and status", "counter")
        yield metric("node_agent_http_request_seconds", "HTTP request latency", "histogram")

    def collect(self) -> Iterator[Metric]:
        # PROMETHEUS_DISABLE_CREATED_SERIES
        created = getattr(prometheus_client.metrics, "_use_created", True)
        counter, hist = self.describe()
        for (method, route, status), (value, made) in list(self.counts.items()):
            labels = {"method": method, "route": route, "status": str(status)}
            counter.add_sample("node_agent_http_requests_total", labels, value)
            if created:
                counter.add_sample("node_agent_http_requests_created", labels, made)
        name = "node_agent_http_request_seconds"
        for (method, route), values in list(self.latency.items()):
            labels = {"method": method, "route": route}
            acc = 0.0
            for le, n in zip(self.le, values):
                acc += n
                hist.add_sample(name + "_bucket", {**labels, "le": le}, acc)
            hist.add_sample(name + "_count", labels, acc)
            hist.add_sample(name + "_sum", labels, values[-2])
            if created:
                hist.add_sample(name + "_created", labels, values[-1])
        yield counter
        yield hist


class DeferredRegistry:
    """Where the plugins register their collectors (``register``/``unregister``, as on a
    prometheus_client CollectorRegistry); the real registry is built, and given them in
    the order they came, on the first scrape (``get``): until then prometheus_client is
    not imported (memory at idle). A collector whose names clash with an earlier one
    is left out then (logged), as prometheus_client would have refused it at register."""

    def __init__(self, build: Callable[[], CollectorRegistry]) -> None:
        self._build = build
        self._real: CollectorRegistry | None = None
        self._collectors: list[Any] = []

    def register(self, collector: Any) -> None:
        if self._real is not None:
            self._real.register(collector)
        self._collectors.append(collector)

    def unregister(self, collector: Any) -> None:
        if collector not in self._collectors:
            raise KeyError(collector)     # as CollectorRegistry.unregister
        if self._real is not None:
            self._real.unregister(collector)
        self._collectors.remove(collector)

    def get(self) -> CollectorRegistry:
        if self._real is None:
            real = self._build()
            for collector in list(self._collectors):
                try:
                    real.register(collector)
                except ValueError as e:   # its names are taken: the first one serves them
                    log.error("metrics collector %r left out: %s", collector, e)
                    self._collectors.remove(collector)
            self._real = real
        return self._real

    def collect(self) -> Iterator[Metric]:
        return self.get().collect()


class Metrics:
    def __init__(self) -> None:
        self.http = RequestMetrics()
        self.observe_request = self.http.observe
        self.registry = DeferredRegistry(self._build_registry)

    def _build_registry(self) -> CollectorRegistry:
        """The registry with the agent's own series first (then the plugins', by get())."""
        r = prometheus_client.CollectorRegistry(auto_describe=True)
        r.register(self.http)
        Gauge = prometheus_client.Gauge
        self.jobs = Gauge("node_agent_jobs", "Jobs known to the agent by state", ["state"], registry=r)
        self.backlog = Gauge("node_agent_outbox_backlog", "Undelivered webhooks and events",
                             ["kind"], registry=r)
        self.delivered = Gauge("node_agent_outbox_delivered", "Deliveries since start", ["kind"],
                               registry=r)
        self.host_cpu = Gauge("node_agent_host_cpu_seconds", "Host CPU time by mode", ["mode"],
                              registry=r)
        self.host_mem = Gauge("node_agent_host_memory_bytes", "Host memory", ["kind"], registry=r)
        self.host_load = Gauge("node_agent_host_load1", "Host one-minute load average", registry=r)
        return r

    async def render(self, ctx: "AgentContext") -> bytes:
        registry = self.registry.get()
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
        return prometheus_client.generate_latest(registry)
